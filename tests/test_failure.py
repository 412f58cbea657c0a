"""The object-level failure signal (lazyxmem_core/failure.py) and its use by the Lazy controller:
slow loss, which S does not see, must raise the failure score."""
from __future__ import annotations

import numpy as np
import pytest

from lazyxmem_core import Decision, LazyConfig, LazySession
from lazyxmem_core.failure import FEATURES, Anchor, Frame, failure_score, features
from lazyxmem_core.uncertainty import object_uncertainty

H, W = 96, 128


def scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A two-coloured object (red left half, blue right half) on a textured green background."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((60, 120, 60), 12, (H, W, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((H, W), bool)
    mask[28:68, 34:94] = True
    red = mask.copy()
    red[:, 64:] = False
    img[red] = np.clip(rng.normal((200, 40, 40), 10, (int(red.sum()), 3)), 0, 255).astype(np.uint8)
    blue = mask & ~red
    img[blue] = np.clip(rng.normal((40, 60, 210), 10, (int(blue.sum()), 3)), 0, 255).astype(np.uint8)
    return img, mask


def shrinking(t: int, n: int, mask: np.ndarray) -> np.ndarray:
    """The mask on frame t of n: it loses the blue half column by column (slow loss)."""
    m = mask.copy()
    cut = 94 - round(30 * t / (n - 1))
    m[:, cut:] = False
    return m


def confident_probs(mask: np.ndarray, q: float) -> np.ndarray:
    """Background/object probabilities: q inside the mask, 1 - q in a 2-px band outside it, 0 beyond."""
    import cv2

    band = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    p = np.where(mask, q, np.where(band, 1 - q, 0.0)).astype(np.float32)
    return np.stack([1 - p, p])


def test_the_anchor_itself_scores_zero():
    img, mask = scene()
    frame = Frame.prepare(img)
    anchor = Anchor.from_mask(frame, mask)
    figs = features(frame, anchor, mask, mask.astype(np.float32))
    assert set(figs) == set(FEATURES)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in figs.values()), figs
    assert failure_score(figs) == pytest.approx(0.0, abs=1e-9)


def test_slow_loss_raises_the_failure_score_while_S_falls():
    img, mask = scene()
    frame = Frame.prepare(img)
    anchor = Anchor.from_mask(frame, mask)
    n = 11
    S, F, err = [], [], []
    for t in range(n):
        m = shrinking(t, n, mask)
        # The propagator grows more confident as it keeps only the part it is sure of.
        probs = confident_probs(m, 0.7 + 0.29 * t / (n - 1))
        S.append(object_uncertainty(probs, m).S)
        F.append(failure_score(features(frame, anchor, m, probs[1])))
        err.append(1 - (m & mask).sum() / (m | mask).sum())
    assert all(b < a for a, b in zip(S, S[1:])), S  # S alone says "more and more certain"
    assert all(b > a for a, b in zip(F[1:], F[2:])), F  # F rises with the loss
    assert F[-1] > 0.5 and F[0] < 0.05  # at first only the soft band's probability spills out
    combined = [s + f for s, f in zip(S, F)]
    assert np.corrcoef(np.argsort(np.argsort(combined)), np.argsort(np.argsort(err)))[0, 1] > 0.9


def test_a_mask_on_background_is_foreign_and_an_empty_one_is_lost():
    img, mask = scene()
    frame = Frame.prepare(img)
    anchor = Anchor.from_mask(frame, mask)
    off = np.zeros_like(mask)
    off[2:26, 2:32] = True  # background only
    figs = features(frame, anchor, off)
    assert figs["foreign"] > 0.5 and figs["coverage"] > 0.9
    gone = features(frame, anchor, np.zeros_like(mask))
    assert failure_score(gone) > failure_score(figs) > 1.0


def test_fragments_and_spill():
    img, mask = scene()
    frame = Frame.prepare(img)
    anchor = Anchor.from_mask(frame, mask)
    split = mask.copy()
    split[:, 60:70] = False
    assert features(frame, anchor, split)["fragments"] > 0.3
    prob = np.zeros(mask.shape, np.float32)
    prob[mask] = 1.0
    prob[:, :20] = 0.5  # probability mass far from the mask
    assert features(frame, anchor, mask, prob)["spill"] == pytest.approx(0.5 * H * 20 / mask.sum(), rel=1e-3)


def test_unknown_weights_are_refused():
    with pytest.raises(ValueError, match="unknown failure feature"):
        failure_score({}, {"area": 1.0})
    img, mask = scene()
    with pytest.raises(ValueError, match="unknown failure feature"):
        LazySession(Shrinking(img, mask, 5), FramesOf(img, 5), {0: mask.astype(np.uint8)},
                    config=LazyConfig(pseudo=False, failure_weights=(("area", 1.0),)))


class FramesOf:
    def __init__(self, img: np.ndarray, n: int) -> None:
        self.img, self.n = img, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.img


class Shrinking:
    """A propagator that slowly loses the blue half, ever more confidently (and starts over from
    the mask committed by a correction)."""

    def __init__(self, img: np.ndarray, mask: np.ndarray, n: int) -> None:
        self.mask, self.n = mask, n
        self.reset()

    @property
    def labels(self) -> list[int]:
        return [1]

    def reset(self) -> None:
        self.t, self.since_fix = -1, 0

    def step(self, frame, given=None):
        self.t += 1
        self.since_fix += 1
        m = shrinking(min(self.since_fix, self.n - 1), self.n, self.mask)
        return confident_probs(m, min(0.99, 0.7 + 0.03 * self.since_fix))

    def commit(self, mask=None, write=None):
        if mask is not None and (mask == 1).sum() >= self.mask.sum() - 1:
            self.since_fix = 0  # corrected back to the whole object
        return bool(write)

    def snapshot(self):
        return self.t, self.since_fix

    def restore(self, state):
        self.t, self.since_fix = state


def whole_object(mask: np.ndarray):
    from lazyxmem_core import Correction

    return lambda req: Correction(mask=mask.copy())


def test_the_paper_trigger_misses_slow_loss_and_the_combined_score_asks():
    img, mask = scene()
    n = 30
    given = {0: mask.astype(np.uint8)}
    base = dict(pseudo=False, udu=False, tau_u=0.3, tau_s=None)
    paper = LazySession(Shrinking(img, mask, 20), FramesOf(img, n), given, config=LazyConfig(**base),
                        user=whole_object(mask))
    paper.run()
    assert not any(o.decision is Decision.USER for r in paper.records.values() for o in r.objects.values())
    assert paper.failure_scores[n - 1][1] > 0.5  # measured, though the triggers do not use it

    lazy = LazySession(Shrinking(img, mask, 20), FramesOf(img, n), given,
                       config=LazyConfig(**base, score="combined", tau_f=0.5), user=whole_object(mask))
    lazy.run()
    asked = [t for t, r in sorted(lazy.records.items()) if r.objects[1].decision is Decision.USER]
    assert asked and asked[0] < 15
    # After the correction F starts again from the corrected mask, and the bar for the next request rose.
    assert lazy.failure_scores[asked[0] + 1][1] < 0.2
    assert lazy.view().score < paper.view().score  # the session's score sees the loss too


def test_deferred_correction_drops_the_failure_scores_it_recomputes():
    from lazyxmem_core import Correction

    img, mask = scene()
    n = 24
    session = LazySession(Shrinking(img, mask, 40), FramesOf(img, n), {0: mask.astype(np.uint8)},
                          config=LazyConfig(pseudo=False, udu=False, score="combined", tau_f=0.5, tau_u=5.0))
    session.run()
    review = session.review_frames
    assert review
    before = dict(session.failure_scores[n - 1])
    session.correct({(review[0], 1): Correction(mask=mask.copy())})
    assert session.failure_scores[n - 1][1] < before[1]
    assert set(session.failure_scores) == set(range(1, n))


class Recording(Shrinking):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.writes: list[bool | None] = []

    def reset(self) -> None:
        super().reset()
        self.writes = []

    def commit(self, mask=None, write=None):
        self.writes.append(write)
        return super().commit(mask, write)


def test_veto_on_the_failure_score_keeps_lost_frames_out_of_memory():
    img, mask = scene()
    n = 20
    runs = {}
    for veto_f in (False, True):
        prop = Recording(img, mask, 20)
        session = LazySession(prop, FramesOf(img, n), {0: mask.astype(np.uint8)},
                              config=LazyConfig(pseudo=False, user=False, score="combined", tau_f=0.5, tau_m=9.0,
                                                veto_f=veto_f))
        session.run()
        lost = [t for t in range(1, n) if session.failure_scores[t][1] > 0.5]
        assert lost
        runs[veto_f] = [prop.writes[t] for t in lost]
    assert all(w is None for w in runs[False])  # the propagator's own schedule
    assert all(w is False for w in runs[True])  # vetoed


def test_integrated_failure_trigger_asks_once_the_summed_excess_passes_and_doubles_the_bar():
    img, mask = scene()
    n = 60
    given = {0: mask.astype(np.uint8)}
    base = dict(pseudo=False, udu=False, tau_u=5.0, tau_s=None, score="combined")
    # Without the trigger: F's trace of the slow loss, and no request.
    plain = LazySession(Shrinking(img, mask, 20), FramesOf(img, n), given, config=LazyConfig(**base),
                        user=whole_object(mask))
    plain.run()
    assert not any(o.decision is Decision.USER for r in plain.records.values() for o in r.objects.values())
    F = [plain.failure_scores[t][1] for t in range(1, n)]
    floor, bar = 0.3, 2.0
    total, expected = 0.0, None
    for t, f in enumerate(F, start=1):
        total += max(0.0, f - floor)
        if total > bar:
            expected = t
            break
    assert expected is not None and expected > 1 + int(np.argmax(np.asarray(F) > floor))  # a sum, not a bar

    session = LazySession(Shrinking(img, mask, 20), FramesOf(img, n), given,
                          config=LazyConfig(**base, tau_fi=bar, fi_floor=floor), user=whole_object(mask))
    session.run()
    asked = [t for t, r in sorted(session.records.items()) if r.objects[1].decision is Decision.USER]
    assert asked[0] == expected
    assert len(asked) >= 2
    # The sum starts again at each request (F against the correction), and the next one needs twice as much.
    second = sum(max(0.0, session.failure_scores[t][1] - floor) for t in range(asked[0] + 1, asked[1] + 1))
    assert second > 2 * bar
    assert sum(max(0.0, session.failure_scores[t][1] - floor) for t in range(asked[0] + 1, asked[1])) <= 2 * bar
    assert asked[1] - asked[0] > asked[0]  # the slower bar spaces the requests out

    # Deferred: the same requests become review frames, and a correction replays the same way.
    deferred = LazySession(Shrinking(img, mask, 20), FramesOf(img, n), given,
                           config=LazyConfig(**base, tau_fi=bar, fi_floor=floor))
    deferred.run()
    assert deferred.review_frames[0] == expected
    from lazyxmem_core import Correction

    deferred.correct({(expected, 1): Correction(mask=mask.copy())})
    nxt = deferred.review_frames[0]
    assert nxt > expected + 1  # the corrected mask starts the sum again
    assert sum(max(0.0, deferred.failure_scores[t][1] - floor) for t in range(expected + 1, nxt + 1)) > bar


def test_fail_ask_off_leaves_tau_f_to_the_veto():
    img, mask = scene()
    n = 20
    asks, writes = {}, {}
    for fail_ask in (True, False):
        prop = Recording(img, mask, 20)
        session = LazySession(prop, FramesOf(img, n), {0: mask.astype(np.uint8)},
                              config=LazyConfig(pseudo=False, tau_u=5.0, score="combined", tau_f=0.5, tau_m=9.0,
                                                veto_f=True, fail_ask=fail_ask))
        session.run()  # deferred: requests become review frames, the masks stay the propagator's
        asks[fail_ask] = session.review_frames
        lost = [t for t in range(1, n) if session.failure_scores[t][1] > 0.5]
        writes[fail_ask] = [prop.writes[t] for t in lost if t not in session.review_frames]
        assert lost
    assert asks[True] and not asks[False]
    assert writes[False] and all(w is False for w in writes[False])  # still vetoed


def test_ask_delay_asks_k_frames_after_the_trigger_fired_and_on_the_last_frame_at_the_latest():
    from lazyxmem_core import Correction

    img, mask = scene()
    n, k = 40, 6
    given = {0: mask.astype(np.uint8)}
    base = dict(pseudo=False, udu=False, tau_u=5.0, tau_s=None, score="combined", tau_f=0.5, tau_f_step=99.0)

    def asked(session):
        return [t for t, r in sorted(session.records.items()) if r.objects[1].decision is Decision.USER]

    at_once = LazySession(Shrinking(img, mask, 30), FramesOf(img, n), given, config=LazyConfig(**base),
                          user=whole_object(mask))
    at_once.run()
    fired = asked(at_once)[0]

    shown: list[int] = []

    def user(req):
        shown.append(req.frame_index)
        return Correction(mask=mask.copy())

    delayed = LazySession(Shrinking(img, mask, 30), FramesOf(img, n), given, config=LazyConfig(**base, ask_delay=k),
                          user=user)
    delayed.run()
    assert asked(delayed)[0] == shown[0] == fired + k and delayed._n_user == len(asked(delayed))
    # Until it asks the object is left as it was (as with no request at all: F keeps rising);
    # then the correction restarts F from the whole object.
    plain = LazySession(Shrinking(img, mask, 30), FramesOf(img, n), given, config=LazyConfig(**base, user=False))
    plain.run()
    for t in range(1, fired + k):
        assert delayed.failure_scores[t][1] == pytest.approx(plain.failure_scores[t][1])
    assert delayed.failure_scores[fired + k - 1][1] > at_once.failure_scores[fired][1]
    assert delayed.failure_scores[fired + k + 1][1] < 0.2

    # Deferred: the delayed frame is the review frame; past the video's end it is the last frame.
    deferred = LazySession(Shrinking(img, mask, 30), FramesOf(img, n), given, config=LazyConfig(**base, ask_delay=k))
    deferred.run()
    assert deferred.review_frames[0] == fired + k
    late = LazySession(Shrinking(img, mask, 30), FramesOf(img, fired + 3), given, config=LazyConfig(**base, ask_delay=k))
    late.run()
    assert late.review_frames == [fired + 2]

    with pytest.raises(ValueError, match="ask_delay"):
        LazySession(Shrinking(img, mask, 30), FramesOf(img, n), given, config=LazyConfig(**base, ask_delay=-1))



class LostFor(Shrinking):
    """A propagator that holds the whole object except on frames ``lost``, where it has only the
    red half (an object hidden in part for a few frames, then back)."""

    def __init__(self, img: np.ndarray, mask: np.ndarray, lost: range) -> None:
        super().__init__(img, mask, 2)
        self.lost = lost

    def step(self, frame, given=None):
        self.t += 1
        m = shrinking(1, 2, self.mask) if self.t in self.lost else self.mask
        return confident_probs(m, 0.9)


def test_ask_clear_asks_a_delayed_request_where_the_failure_ends():
    img, mask = scene()
    n, lost = 40, range(10, 16)
    given = {0: mask.astype(np.uint8)}
    base = dict(pseudo=False, udu=False, tau_u=5.0, tau_s=None, score="combined", tau_f=0.5, tau_f_step=99.0,
                ask_delay=20)
    late = LazySession(LostFor(img, mask, lost), FramesOf(img, n), given, config=LazyConfig(**base))
    late.run()
    assert late.review_frames == [lost.start + 20]  # the object has been back for 14 frames
    assert late.failure_scores[lost.stop][1] < 0.2 < 0.5 < late.failure_scores[lost.start][1]
    clear = LazySession(LostFor(img, mask, lost), FramesOf(img, n), given, config=LazyConfig(**base, ask_clear=0.2))
    clear.run()
    assert clear.review_frames == [lost.stop]  # the first frame the object is back
    # A failure that outlasts the delay is still asked about after ask_delay frames.
    long = LazySession(LostFor(img, mask, range(10, 35)), FramesOf(img, n), given,
                       config=LazyConfig(**base, ask_clear=0.2))
    long.run()
    assert long.review_frames == [30]
    with pytest.raises(ValueError, match="ask_clear"):
        LazySession(LostFor(img, mask, lost), FramesOf(img, n), given,
                    config=LazyConfig(**{**base, "score": "S"}, ask_clear=0.2))


class TwoShrinking:
    """Two copies of the scene's object, one above the other, each slowly losing its blue half."""

    def __init__(self, mask: np.ndarray, n: int) -> None:
        self.mask, self.n = mask, n
        self.reset()

    @property
    def labels(self) -> list[int]:
        return [1, 2]

    def reset(self) -> None:
        self.t = -1

    def step(self, frame, given=None):
        self.t += 1
        m = shrinking(min(self.t, self.n - 1), self.n, self.mask)
        q = min(0.99, 0.7 + 0.03 * self.t)
        top = confident_probs(np.concatenate([m, np.zeros_like(m)]), q)[1]
        bottom = confident_probs(np.concatenate([np.zeros_like(m), m]), q)[1]
        return np.stack([1 - top - bottom, top, bottom])

    def commit(self, mask=None, write=None):
        return bool(write)

    def snapshot(self):
        return self.t

    def restore(self, state):
        self.t = state


def test_delayed_requests_count_against_the_review_budget():
    img, mask = scene()
    two = np.concatenate([img, img])
    n = 40
    given = {0: np.concatenate([mask.astype(np.uint8), 2 * mask.astype(np.uint8)])}
    base = dict(pseudo=False, udu=False, tau_u=5.0, tau_s=None, score="combined", tau_f=0.5, tau_f_step=99.0)

    def requests(**extra):
        session = LazySession(TwoShrinking(mask, 30), FramesOf(two, n), given, config=LazyConfig(**base, **extra))
        session.run()
        return [(t, v) for t, r in sorted(session.records.items()) for v, o in r.objects.items()
                if o.decision is Decision.USER]

    both = requests()
    assert len(both) == 2 and both[0][0] == both[1][0]  # both objects fire on the same frame
    assert len(requests(ask_delay=5)) == 2
    assert requests(ask_delay=5, user_budget=1) == [(both[0][0] + 5, 1)]  # the second waits for no budget
    assert requests(user_budget=1) == [(both[0][0], 1)]
