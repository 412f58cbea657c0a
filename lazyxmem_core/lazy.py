"""The Lazy controller: decides per frame and per object whether to do nothing, to correct the
mask itself (pseudo-click -> refiner) or to ask a human (user correction), and what enters the
propagator's memory (UDU veto, IDU write). See docs in README and ``shared/reference/lazy-xmem.md``.

Two ways to run a :class:`LazySession`:
- on the fly: give ``user``, a callback that answers each user request at once;
- deferred: without ``user`` the requests become "needs review" frames; later
  :meth:`LazySession.correct` resumes from the earliest corrected frame and re-propagates.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import failure
from .protocols import Propagator, Refiner
from .session_view import SessionView, correction_mask
from .types import Click, Correction, Decision, FrameRecord, ObjectRecord, PackedMask
from .uncertainty import argmax_channels, object_uncertainty

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LazyConfig:
    """Every behaviour of the controller, switchable so that the paper's ablations can be re-run."""

    tau_u: float = 0.5  # trigger above this -> user correction
    tau_p: float = 0.2  # trigger above this (and <= tau_u) -> pseudo-correction
    tau_m: float = 0.8  # any S_c above this -> the frame is kept out of memory (UDU)
    trigger: Literal["dS", "S"] = "dS"  # what the thresholds compare: the derivative or S itself
    udu: bool = True  # uncertainty-driven update (veto)
    pseudo: bool = True  # pseudo-corrections
    pseudo_idu: bool = False  # write pseudo-corrected frames to memory (lowers J&F in the paper)
    user: bool = True  # user corrections from the trigger
    idu: bool = True  # write user-corrected frames to memory at once
    # Ask the user when an object is lost (not in the paper): its area collapses, or the
    # propagator's own presence score (SAM 2's object score) turns negative.
    detect_loss: bool = False
    loss_ratio: float = 0.2  # collapse = area below this fraction of the previous frame's area
    loss_min_area: int = 400  # ... for objects at least this big on the previous frame
    user_budget: int | None = None  # at most this many user requests per video (None: no limit)
    min_user_gap: int = 0  # at least this many frames between two requests for one object
    # Sustained uncertainty (not in the paper): slow drift never makes dS jump, so also ask when
    # S_c has stayed above tau_s for level_run frames in a row. Each such request for an object
    # doubles the run it needs next: an object that stays uncertain after corrections is one whose
    # uncertainty says little, and the requests stay a vanishing share of a long video.
    tau_s: float | None = None
    level_run: int = 10
    snapshot_every: int = 10  # keep the propagator's state every k frames for deferred corrections
    # Each kept state costs memory (XMem's holds its memory bank, on the GPU: tens of MB per object
    # at 480p), so a long video keeps at most this many. Past the cap the state whose removal
    # leaves the smallest gap goes (review frames last): a correction then replays at most about
    # len(video) / max_snapshots frames, and memory stays within max_snapshots states however long
    # the video.
    max_snapshots: int = 32
    # A user correction is also propagated backwards, to the object's previous human-made mask, and
    # revises the frames in between where the backward mask is the better bet (not in the paper;
    # pays when corrections are good: SAM, masks drawn by a reviewer).
    backward: bool = False
    backward_max: int = 250  # at most this many earlier frames are revised per correction
    # Object-level failure signal (failure.py, not in the paper). S falls while an object is slowly
    # lost (it is normalised by the shrinking mask), so "combined" adds the failure score F, which
    # compares the object with its last human-made mask, to S: the dS / S triggers, the sustained
    # run and the session's score then see S + F. "S" is the paper's behaviour.
    score: Literal["S", "combined"] = "S"
    # With "combined", also ask when F alone passes tau_f (None: never); each such request for an
    # object raises the bar it needs next by tau_f_step (a loss F cannot tell from a change of
    # look is not asked about over and over).
    tau_f: float | None = None
    tau_f_step: float = 0.5
    fail_ask: bool = True  # False: tau_f only vetoes (veto_f) and the failure triggers are tau_fi's
    veto_f: bool = False  # with "combined" and tau_f: F above tau_f also keeps the frame out of memory (UDU)
    # With "combined", also ask when F has stayed high for a while: the excess of F over fi_floor,
    # summed over the frames since the object's last request or human-made mask, passes tau_fi
    # (None: never). A loss that F sees only moderately (F hovering between fi_floor and tau_f
    # for tens of frames) is asked about once it has cost enough frames; a short spike is not.
    # Each such request for an object doubles the sum it needs next, so the requests stay a
    # vanishing share of a long video.
    tau_fi: float | None = None
    fi_floor: float = 2.0
    failure_weights: tuple[tuple[str, float], ...] | None = None  # None: failure.DEFAULT_WEIGHTS
    # A fired trigger asks ask_delay frames later (on the last frame at the latest; not in the
    # paper). The failures F sees build up over tens of frames: asked at their onset, one
    # correction is soon undone and repairs few frames; asked later, backward revision repairs
    # the frames since the onset and the correction reaches further into the rest of the loss.
    ask_delay: int = 0
    # With ask_delay and "combined": a delayed request asks at once on the frame where the
    # object's F has fallen to ask_clear (None: never early). A failure that ends within the delay
    # (an object hidden for a few frames and back) is asked about where it ends, not after it.
    ask_clear: float | None = None
    measure_failure: bool = True  # compute F (for reports) even when the triggers do not use it

    @classmethod
    def off(cls) -> LazyConfig:
        """Plain propagation: no correction, no veto (the propagator's own memory schedule)."""
        return cls(udu=False, pseudo=False, user=False, idu=False)


@dataclass(frozen=True)
class UserRequest:
    """What a user callback is shown: the frame, the object and its current mask."""

    frame_index: int
    label: int
    frame: np.ndarray
    mask: np.ndarray  # bool (H, W), the object's current mask on this frame
    S: float
    dS: float | None


UserCallback = Callable[[UserRequest], Correction | None]


@dataclass
class _Replay:
    given: dict[int, np.ndarray] = field(default_factory=dict)
    corrections: dict[tuple[int, int], Correction] = field(default_factory=dict)


class LazySession:
    """Runs one video through a propagator under the Lazy controller and keeps what it did.

    frames: anything with ``len`` and integer indexing returning RGB uint8 (H, W, 3) frames.
    given: index masks per frame index (the annotation); the first frame with objects starts.
    forced_user: optional schedule {frame: labels} of user requests that replaces the trigger
    (Rand-Lazy, every-k baselines). probs_hook(t, probs) sees the propagator's raw output.
    video_key: names the video in every refiner call (``FrameRef(video_key, t)``), so a refiner
    shared by several sessions never serves one video's cached work to another; None: the
    refiner keys frames by their pixels.

    A session is not thread-safe: one writer at a time (the backend's task store holds a lock per
    task). Readers take :meth:`view`, an immutable copy.
    """

    def __init__(
        self,
        propagator: Propagator,
        frames: Sequence[np.ndarray],
        given: Mapping[int, np.ndarray],
        refiner: Refiner | None = None,
        config: LazyConfig | None = None,
        user: UserCallback | None = None,
        forced_user: Mapping[int, Sequence[int]] | None = None,
        probs_hook: Callable[[int, np.ndarray], None] | None = None,
        video_key: str | None = None,
    ) -> None:
        if not given:
            raise ValueError("no initial mask: give an index mask for at least one frame")
        self.propagator = propagator
        self.frames = frames
        self.refiner = refiner
        self.config = config or LazyConfig()
        self.user = user
        self.probs_hook = probs_hook
        self.video_key = video_key
        self.forced_user = {int(t): tuple(v) for t, v in (forced_user or {}).items()}
        self._replay = _Replay(given={int(t): m for t, m in given.items()})
        self.start = min(self._replay.given)
        self.records: dict[int, FrameRecord] = {}
        self._snapshots: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._prev_S: dict[int, float] = {}
        self._prev_area: dict[int, int] = {}
        # label -> whether the propagator's own presence score said "there" on the previous frame
        self._prev_present: dict[int, bool] = {}
        self._last_user: dict[int, int] = {}
        self._n_user = 0
        # label -> {frame: mask} where a human gave or corrected the object's mask (in frame order):
        # a correction on frame t refines with the latest one before t as its reference.
        self._anchors: dict[int, dict[int, PackedMask]] = {}
        self._high_run: dict[int, int] = {}  # label -> frames in a row with S above tau_s
        self._level_asks: dict[int, int] = {}  # label -> requests made by the sustained trigger
        self._fail_asks: dict[int, int] = {}  # label -> requests made by the failure trigger (tau_f)
        self._fail_sum: dict[int, float] = {}  # label -> excess of F over fi_floor since its last request
        self._fi_asks: dict[int, int] = {}  # label -> requests made by the integrated failure trigger (tau_fi)
        self._delayed: dict[int, int] = {}  # label -> frame a fired trigger asks on (ask_delay)
        # frame -> label -> failure score F (objects with an anchor before the frame), and the
        # figures it was weighed from: what reports correlate with the error.
        self.failure_scores: dict[int, dict[int, float]] = {}
        self.failure_figures: dict[tuple[int, int], dict[str, float]] = {}
        self._anchor_models: dict[tuple[int, int, bytes], failure.Anchor | None] = {}
        self._weights = dict(self.config.failure_weights) if self.config.failure_weights is not None else None
        if self._weights is not None:
            failure.failure_score({}, self._weights)  # unknown feature names fail here, not mid-video
        self._next = self.start
        if self.config.backward_max < 1:
            raise ValueError(f"backward_max must be >= 1, got {self.config.backward_max}")
        if self.config.max_snapshots < 1:
            raise ValueError(f"max_snapshots must be >= 1 (the first frame's state is always kept), "
                             f"got {self.config.max_snapshots}")
        if self.config.ask_delay < 0:
            raise ValueError(f"ask_delay must be >= 0 frames, got {self.config.ask_delay}")
        if self.config.ask_clear is not None and self.config.score != "combined":
            raise ValueError("ask_clear compares the failure score F, which the triggers see only with "
                             "score='combined': set score='combined' or leave ask_clear unset")
        if self.config.tau_s is not None and self.config.level_run < 1:
            raise ValueError(f"level_run must be >= 1 frame, got {self.config.level_run}")
        if self.config.pseudo and self.refiner is None:
            raise ValueError("pseudo-corrections need a refiner: pass one, or disable pseudo in LazyConfig")

    # -- running -------------------------------------------------------------------------
    def run(self, until: int | None = None, progress: Callable[[int], None] | None = None) -> list[FrameRecord]:
        """Process the frames from where the session stands to ``until`` (exclusive; default: the end)."""
        end = len(self.frames) if until is None else min(until, len(self.frames))
        while self._next < end:
            self._process(self._next)
            self._next += 1
            if progress is not None:
                progress(1)
        return self.ordered_records()

    def ordered_records(self) -> list[FrameRecord]:
        return [self.records[t] for t in sorted(self.records)]

    @property
    def remaining(self) -> int:
        """Frames still to process (the session runs from the first annotated frame to the end)."""
        return max(0, len(self.frames) - self._next)

    @property
    def review_frames(self) -> list[int]:
        """Frames where a user correction was requested and not answered yet, in order."""
        return [t for t in sorted(self.records) if self.records[t].review]

    # -- deferred corrections --------------------------------------------------------------
    def correct(self, corrections: Mapping[tuple[int, int], Correction], progress: Callable[[int], None] | None = None) -> int:
        """Apply user corrections {(frame, label): Correction}, then re-propagate after them.

        Resumes from the earliest corrected frame t: the state kept before t (or the nearest kept
        state before it) is restored, so frames before t are not recomputed when t was a review
        frame or a kept frame. Returns the first frame that was recomputed.
        """
        if not corrections:
            raise ValueError("no correction given")
        end = self._next
        for (t, label), corr in corrections.items():
            if not 0 <= t < len(self.frames):
                raise ValueError(f"correction on frame {t}: the video has frames 0..{len(self.frames) - 1}")
            if t < self.start:
                raise ValueError(f"correction on frame {t} precedes the first annotated frame {self.start}")
            self._replay.corrections[(int(t), int(label))] = corr
        first = min(t for t, _ in corrections)
        resume = max((s for s in self._snapshots if s <= first), default=None)
        if resume is None:  # nothing kept: start over
            self.propagator.reset()
            self._reset_controller()
            resume = self.start
        else:
            state, controller = self._snapshots[resume]
            self.propagator.restore(state)
            self._restore_controller(controller)
        for t in [t for t in self.records if t >= resume]:
            del self.records[t]
            self.failure_scores.pop(t, None)
        for key in [k for k in self.failure_figures if k[0] >= resume]:
            del self.failure_figures[key]
        for frames in self._anchors.values():
            for t in [t for t in frames if t >= resume]:
                del frames[t]
        for s in [s for s in self._snapshots if s > resume]:
            del self._snapshots[s]
        self._next = resume
        self.run(until=max(end, first + 1), progress=progress)
        return resume

    # -- one frame -----------------------------------------------------------------------
    def _process(self, t: int) -> None:
        cfg = self.config
        pending = self._take_snapshot(t)
        frame = self.frames[t]
        given = self._replay.given.get(t)
        t0 = time.perf_counter()
        probs = self.propagator.step(frame, given)
        t1 = time.perf_counter()
        if self.probs_hook is not None:
            self.probs_hook(t, probs)
            t1 = time.perf_counter()
        labels = list(self.propagator.labels)
        # A propagator that says whether each object is there (SAM 2's object score) blanks the
        # mask of an absent object: its pixel entropy collapses and S cannot see the loss.
        scores: dict[int, float] = getattr(self.propagator, "object_scores", None) or {}
        if probs.shape[0] != len(labels) + 1 or probs.shape[1:] != frame.shape[:2]:
            raise RuntimeError(
                f"propagator returned probabilities of shape {probs.shape} for {len(labels)} objects "
                f"on a {frame.shape[1]}x{frame.shape[0]} frame; expected ({len(labels) + 1}, {frame.shape[0]}, {frame.shape[1]})"
            )
        output = argmax_channels(probs)
        if labels != list(range(1, len(labels) + 1)):  # channel index -> label value
            output = np.asarray([0, *labels], dtype=output.dtype)[output]
        given_labels = set() if given is None else {int(v) for v in np.unique(given) if v != 0}
        for label in given_labels:
            _replace_object(output, label, given == label)  # the annotation is the output, exactly

        objects: dict[int, ObjectRecord] = {}
        veto = False
        combined = cfg.score == "combined"
        prepared = None
        for k, label in enumerate(labels, start=1):
            mask = output == label
            u = object_uncertainty(probs, mask)
            F = None
            if (combined or cfg.measure_failure) and label not in given_labels:
                if prepared is None:
                    prepared = failure.Frame.prepare(frame)
                F = self._failure(t, label, prepared, mask, probs[k])
            # The score the triggers see: S (the paper), or S + F. dS is its change.
            value = u.S + F if combined and F is not None else u.S
            prev = self._prev_S.get(label)
            dS = None if prev is None else value - prev
            rec = ObjectRecord(label=label, area=u.area, S=u.S, dS=dS)
            objects[label] = rec
            if cfg.udu and (u.S > cfg.tau_m or (combined and cfg.veto_f and F is not None and cfg.tau_f is not None
                                                and F > cfg.tau_f)):
                veto = True  # with the failure score, a frame whose object looks lost stays out of memory
            if label in given_labels:
                continue
            vanished = label in scores and scores[label] <= 0 and self._prev_present.get(label, False)
            rec.decision = self._decide(t, label, value, dS, u.area, vanished, F if combined else None)
        lazy_seconds = time.perf_counter() - t1

        user_written = False
        pseudo_done = False
        user_corrected: list[int] = []
        for label, rec in objects.items():
            if rec.decision is Decision.PSEUDO:
                click = object_uncertainty(probs, output == label, with_click=True).click
                if click is None:
                    rec.decision = Decision.NONE
                    continue
                rec.clicks = [Click(float(click[0]), float(click[1]), True)]
                rec.forward = PackedMask.pack(output == label)
                refined = self._correction_mask(t, label, Correction(clicks=tuple(rec.clicks)), output == label)
                _replace_object(output, label, refined)
                pseudo_done = True
            elif rec.decision is Decision.USER:
                corr = self._user_correction(t, label, frame, output, rec)
                if corr is None:
                    continue
                rec.answered = True
                rec.clicks = list(corr.clicks)
                rec.box = corr.box
                rec.forward = PackedMask.pack(output == label)
                refined = self._correction_mask(t, label, corr, output == label)
                _replace_object(output, label, refined)
                user_corrected.append(label)
                user_written = user_written or cfg.idu

        if given is not None:
            write: bool | None = None  # an annotated frame always enters memory
        elif user_written:
            write = True
        elif veto:
            write = False
        elif pseudo_done:
            write = True if cfg.pseudo_idu else False
        else:
            write = None
        t2 = time.perf_counter()
        corrected = pseudo_done or any(o.answered for o in objects.values())
        # Without a correction the output is the propagator's own prediction: let it keep that
        # (at its working resolution) rather than re-reading our upsampled argmax.
        written = self.propagator.commit(mask=output if corrected else None, write=write)
        t3 = time.perf_counter()

        for label, rec in objects.items():
            if label in given_labels:
                # A given mask has no uncertainty of its own: dS starts one frame later, and a
                # run of high S starts again.
                self._prev_S.pop(label, None)
                self._high_run.pop(label, None)
                self._fail_sum.pop(label, None)  # ... and so does the sum of F's excess (a new anchor)
                self._delayed.pop(label, None)  # a delayed request is answered by the annotation
            else:
                self._prev_S[label] = rec.S + (self.failure_scores.get(t, {}).get(label, 0.0) if combined else 0.0)
            self._prev_area[label] = rec.area
            if label in scores:
                self._prev_present[label] = scores[label] > 0 or label in given_labels
        self.records[t] = FrameRecord(
            index=t, packed=PackedMask.pack(output), objects=objects, written=bool(written), given=given is not None,
            seconds=(t1 - t0) + (t3 - t2), lazy_seconds=lazy_seconds,
        )
        if cfg.backward and user_corrected:
            t4 = time.perf_counter()
            self._revise_backward(t, user_corrected)
            self.records[t].seconds += time.perf_counter() - t4
        if given_labels or user_corrected:
            final = self.records[t].mask
            for label in given_labels.union(user_corrected):
                self._anchors.setdefault(label, {})[t] = PackedMask.pack(final == label)
        self._keep_snapshot(t, pending)

    def _revise_backward(self, t: int, labels: list[int]) -> None:
        """Propagate frame t's output backwards to each corrected object's previous anchor and
        revise the frames in between.

        A fresh run of the same propagator (its forward state is kept aside and restored) starts
        from frame t's output. On frame tau between the anchor a and t, the backward mask of
        object c replaces the forward one when S_b * (1 - w) < S_f * w, w = (tau - a) / (t - a):
        each pass is trusted near its own start, and the less uncertain one wins in between.
        """
        output = self.records[t].mask
        if not output.any():
            return
        lo = {c: max(self._last_anchor(c, t, self.start) + 1, t - self.config.backward_max) for c in labels}
        first = min(lo.values())
        if first >= t:
            return
        state = self.propagator.snapshot()
        try:
            self.propagator.reset()
            self.propagator.step(self.frames[t], given=output)
            self.propagator.commit()
            for tau in range(t - 1, first - 1, -1):
                probs = self.propagator.step(self.frames[tau])
                self.propagator.commit()
                back = np.asarray([0, *self.propagator.labels])[argmax_channels(probs)]
                rec = self.records.get(tau)
                if rec is None:
                    continue
                mask, changed = rec.mask, False
                for c in labels:
                    if tau < lo[c] or c not in rec.objects:
                        continue
                    a = lo[c] - 1
                    w = (tau - a) / (t - a)
                    b = back == c
                    if not b.any():
                        continue  # the backward pass lost the object: nothing to offer here
                    S_b = object_uncertainty(probs, b).S
                    S_f = rec.objects[c].S
                    if self.config.score == "combined":
                        # S alone trusts a backward pass that kept its confidence after leaving
                        # the object (through a cut or a jump): add F, which compares each mask
                        # with the object's last human-made one, to both sides, as the triggers do.
                        F_f = self.failure_scores.get(tau, {}).get(c)
                        if F_f is not None:
                            k = 1 + list(self.propagator.labels).index(c)
                            F_b = self._failure(tau, c, failure.Frame.prepare(self.frames[tau]), b, probs[k])
                            if F_b is not None:
                                S_b, S_f = S_b + F_b, S_f + F_f
                    if S_b * (1.0 - w) < S_f * w:
                        if rec.objects[c].forward is None:
                            rec.objects[c].forward = PackedMask.pack(mask == c)
                        _replace_object(mask, c, b)
                        rec.objects[c].revised = changed = True
                if changed:
                    rec.mask = mask
        finally:
            self.propagator.restore(state)

    def _failure(self, t: int, label: int, frame: failure.Frame, mask: np.ndarray, prob: np.ndarray) -> float | None:
        """F of one object on frame t against its last anchor before t (None: no anchor yet)."""
        s = self._last_anchor(label, t, None)
        if s is None:
            return None
        packed = self._anchors[label][s]
        key = (label, s, packed.data)  # a deferred correction can replace the anchor on frame s
        if key not in self._anchor_models:
            if len(self._anchor_models) >= 64:  # anchors of earlier corrections are rarely needed again
                self._anchor_models.clear()
            self._anchor_models[key] = failure.Anchor.from_mask(failure.Frame.prepare(self.frames[s]), packed.unpack())
        anchor = self._anchor_models[key]
        if anchor is None:
            return None
        figures = failure.features(frame, anchor, mask, prob)
        F = failure.failure_score(figures, self._weights)
        self.failure_figures[(t, label)] = figures
        self.failure_scores.setdefault(t, {})[label] = F
        return F

    def _decide(self, t: int, label: int, S: float, dS: float | None, area: int, vanished: bool = False,
                F: float | None = None) -> Decision:
        """S and dS are the trigger's score and its change (S + F with ``score="combined"``); F is
        the failure score alone (None when the triggers do not use it)."""
        cfg = self.config
        if t in self.forced_user:
            if label in self.forced_user[t]:
                return self._count_user(t, label)
        if (t, label) in self._replay.corrections:
            self._delayed.pop(label, None)
            return self._count_user(t, label)
        value = S if cfg.trigger == "S" else dS
        if label in self._delayed:  # a trigger fired: no other request until it asks
            cleared = cfg.ask_clear is not None and F is not None and F <= cfg.ask_clear
            if cleared or t >= self._delayed[label] or t == len(self.frames) - 1:
                del self._delayed[label]
                return self._count_user(t, label)
            return Decision.PSEUDO if cfg.pseudo and value is not None and value > cfg.tau_p else Decision.NONE
        if cfg.user and value is not None and value > cfg.tau_u and self._user_allowed(t, label):
            return self._ask(t, label)
        if cfg.tau_s is not None:
            run = self._high_run[label] = self._high_run.get(label, 0) + 1 if S > cfg.tau_s else 0
            asked = self._level_asks.get(label, 0)
            if cfg.user and run >= cfg.level_run * 2 ** asked and self._user_allowed(t, label):
                self._level_asks[label] = asked + 1
                return self._ask(t, label)
        if cfg.user and cfg.fail_ask and cfg.tau_f is not None and F is not None:
            asked = self._fail_asks.get(label, 0)
            if F > cfg.tau_f + cfg.tau_f_step * asked and self._user_allowed(t, label):
                self._fail_asks[label] = asked + 1
                return self._ask(t, label)
        if cfg.user and cfg.tau_fi is not None and F is not None:
            total = self._fail_sum[label] = self._fail_sum.get(label, 0.0) + max(0.0, F - cfg.fi_floor)
            asked = self._fi_asks.get(label, 0)
            if total > cfg.tau_fi * 2 ** asked and self._user_allowed(t, label):
                self._fi_asks[label] = asked + 1
                return self._ask(t, label)
        if cfg.detect_loss and vanished and self._user_allowed(t, label):
            return self._ask(t, label)  # the propagator itself says the object just went
        prev_area = self._prev_area.get(label, 0)
        if (cfg.detect_loss and prev_area >= cfg.loss_min_area and area < cfg.loss_ratio * prev_area
                and self._user_allowed(t, label)):
            return self._ask(t, label)
        if cfg.pseudo and value is not None and value > cfg.tau_p:
            return Decision.PSEUDO
        return Decision.NONE

    def _ask(self, t: int, label: int) -> Decision:
        """A trigger fired for ``label`` on frame t: ask now, or ask_delay frames later."""
        decision = self._count_user(t, label)  # the triggers' sums and gaps start again from here
        if self.config.ask_delay == 0 or t == len(self.frames) - 1:
            return decision
        self._n_user -= 1  # counted when it asks
        self._delayed[label] = t + self.config.ask_delay
        return Decision.NONE

    def _user_allowed(self, t: int, label: int) -> bool:
        cfg = self.config
        if cfg.user_budget is not None and self._n_user + len(self._delayed) >= cfg.user_budget:
            return False  # delayed requests still to ask count against the budget
        last = self._last_user.get(label)
        return last is None or t - last > cfg.min_user_gap

    def _count_user(self, t: int, label: int) -> Decision:
        self._n_user += 1
        self._last_user[label] = t
        self._high_run[label] = 0
        self._fail_sum[label] = 0.0  # F is measured against the correction from now on
        return Decision.USER

    def _user_correction(self, t: int, label: int, frame: np.ndarray, output: np.ndarray, rec: ObjectRecord) -> Correction | None:
        stored = self._replay.corrections.get((t, label))
        if stored is not None:
            return stored
        if self.user is None:
            return None
        corr = self.user(UserRequest(t, label, frame, output == label, rec.S, rec.dS))
        if corr is not None:
            self._replay.corrections[(t, label)] = corr
        return corr

    def _correction_mask(self, t: int, label: int, corr: Correction, prior: np.ndarray) -> np.ndarray:
        return correction_mask(self.refiner, self.frames, t, corr, prior, self._reference_at(label, t),
                               self.video_key)

    def _reference_at(self, label: int, t: int) -> tuple[int, np.ndarray] | None:
        s = self._last_anchor(label, t, None)
        return None if s is None else (s, self._anchors[label][s].unpack())

    def _last_anchor(self, label: int, t: int, default: Any) -> Any:
        return max((s for s in self._anchors.get(label, {}) if s < t), default=default)

    # -- what readers see ------------------------------------------------------------------------
    def view(self) -> SessionView:
        """An immutable copy of the results so far (cheap: it shares the packed masks)."""
        h, w = self._replay.given[self.start].shape[:2]
        records = self.ordered_records()
        # The score that drives the triggers: S, or S + F with score="combined".
        extra = self.failure_scores if self.config.score == "combined" else {}
        S = [min(1.0, o.S + extra.get(r.index, {}).get(v, 0.0)) for r in records for v, o in r.objects.items()
             if o.area > 0]
        labels = sorted({v for r in records for v in r.objects} | set(self._anchors))
        return SessionView(
            video_key=self.video_key, n_frames=len(self.frames), shape=(h, w), labels=tuple(labels),
            masks=tuple(self.records[t].packed if t in self.records else None for t in range(len(self.frames))),
            forward={(r.index, v): o.forward for r in records for v, o in r.objects.items() if o.forward is not None},
            anchors={v: tuple(sorted(a.items())) for v, a in self._anchors.items()},
            review=tuple(self.review_frames),
            pseudo=tuple(r.index for r in records if r.decision is Decision.PSEUDO),
            score=round(1.0 - float(np.mean(S)), 4) if S else 0.0,
            uncertainty={v: tuple(self._object_score(v, extra, t) for t in range(len(self.frames))) for v in labels},
            requests={v: tuple(r.index for r in records if v in r.objects and r.objects[v].decision is Decision.USER
                               and not r.objects[v].answered) for v in labels})

    def _object_score(self, label: int, extra: Mapping[int, Mapping[int, float]], t: int) -> float | None:
        """Object ``label``'s trigger score on frame ``t`` (S, or S + F; not capped at 1 as the
        session score is: a reviewer's list ranks frames past the cap too), None where it is not seen."""
        rec = self.records.get(t)
        o = None if rec is None else rec.objects.get(label)
        if o is None or o.area <= 0:
            return None
        return round(o.S + extra.get(t, {}).get(label, 0.0), 4)

    def preview(self, t: int, label: int, corr: Correction) -> np.ndarray:
        """The mask ``corr`` gives object ``label`` on frame ``t`` now, without re-propagating:
        the same mask :meth:`correct` puts there (one function makes both)."""
        return self.view().preview(self.frames, self.refiner, t, label, corr)

    # -- state kept for deferred corrections -------------------------------------------------
    def _controller_state(self) -> dict[str, Any]:
        return {"prev_S": dict(self._prev_S), "prev_area": dict(self._prev_area),
                "prev_present": dict(self._prev_present), "last_user": dict(self._last_user), "n_user": self._n_user, "high_run": dict(self._high_run),
                "level_asks": dict(self._level_asks), "fail_asks": dict(self._fail_asks),
                "fail_sum": dict(self._fail_sum), "fi_asks": dict(self._fi_asks),
                "delayed": dict(self._delayed)}

    def _restore_controller(self, state: dict[str, Any]) -> None:
        self._prev_S = dict(state["prev_S"])
        self._prev_area = dict(state["prev_area"])
        self._prev_present = dict(state["prev_present"])
        self._last_user = dict(state["last_user"])
        self._n_user = state["n_user"]
        self._high_run = dict(state["high_run"])
        self._level_asks = dict(state["level_asks"])
        self._fail_asks = dict(state["fail_asks"])
        self._fail_sum = dict(state["fail_sum"])
        self._fi_asks = dict(state["fi_asks"])
        self._delayed = dict(state["delayed"])

    def _reset_controller(self) -> None:
        self._restore_controller({"prev_S": {}, "prev_area": {}, "prev_present": {}, "last_user": {}, "n_user": 0,
                                  "high_run": {}, "level_asks": {}, "fail_asks": {},
                                  "fail_sum": {}, "fi_asks": {}, "delayed": {}})

    def _periodic(self, t: int) -> bool:
        return t == self.start or (t - self.start) % max(1, self.config.snapshot_every) == 0

    def _take_snapshot(self, t: int) -> tuple[Any, dict[str, Any]] | None:
        """The state before frame t, when it may be kept: on periodic frames, and in deferred mode
        on every frame until we know whether it becomes a review frame."""
        if self._periodic(t) or self.user is None:
            return self.propagator.snapshot(), self._controller_state()
        return None

    def _keep_snapshot(self, t: int, pending: tuple[Any, dict[str, Any]] | None) -> None:
        if pending is not None and (self._periodic(t) or self.records[t].review):
            self._snapshots[t] = pending
            self._thin_snapshots()

    def _thin_snapshots(self) -> None:
        """Drop kept states beyond ``max_snapshots``: each time the one whose removal leaves the
        smallest gap, review frames (where corrections are expected) only when nothing else is
        left; the first frame's state always stays, so every correction can still resume."""
        while len(self._snapshots) > self.config.max_snapshots:
            kept = sorted(self._snapshots)
            ends = kept[1:] + [self._next + 1]  # the state after the last kept one is the session's own
            review = {t for t in kept if t in self.records and self.records[t].review}
            candidates = [i for i in range(1, len(kept)) if kept[i] not in review] or list(range(1, len(kept)))
            drop = min(candidates, key=lambda i: (ends[i] - kept[i - 1], kept[i]))
            del self._snapshots[kept[drop]]


def _replace_object(output: np.ndarray, label: int, mask: np.ndarray) -> None:
    """The refined mask replaces the object's channel in the frame's output (in place)."""
    output[output == label] = 0
    output[mask] = label
