"""The evaluation harness end to end on a generated DAVIS-layout dataset."""
from __future__ import annotations

import csv
import json

import cv2
import pytest

from lazyxmem_core.cli import main
from lazyxmem_core.evaluation import EvalSequence, every_k_schedule, random_schedule
from lazyxmem_core.media import write_index_mask
from synthetic import make_video

KEYS = {"J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5", "N_dI", "N_oI", "dI", "interaction_rate", "fps",
        "spearman_S_error", "spearman_failure_error"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    specs = {"crossing": dict(distractor=True, seed=1), "change": dict(appearance_change_at=9, seed=2),
             "two": dict(n_objects=2, seed=3)}
    for name, kw in specs.items():
        video = make_video(n_frames=16, size=(72, 96), radius=13, **kw)
        (root / name / "frames").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for i, (f, m) in enumerate(zip(video.frames, video.masks)):
            cv2.imwrite(str(root / name / "frames" / f"{i:05d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            write_index_mask(root / name / "masks" / f"{i:05d}.png", m)
    return root


@pytest.mark.parametrize("mode", ["none", "lazy", "rand-lazy", "every-k"])
def test_eval_writes_table_csv_plots_and_summary(dataset, tmp_path, mode):
    out = tmp_path / mode
    rc = main(["eval", "--data", str(dataset), "--mode", mode, "--engine", "embedded", "--refiner", "embedded",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert KEYS <= set(summary)
    assert 0 <= summary["J&F"] <= 1 and summary["J&F"] > 0.4
    assert set(summary["sequences"]) == {"crossing", "change", "two"}
    for s in summary["sequences"].values():
        assert {"J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5", "interaction_rate"} <= set(s)
    table = (out / "table.md").read_text()
    assert "| Method | J&F | R@0.1 | R@0.25 | R@0.5 | N_dI | N_oI | dI |" in table
    rows = list(csv.DictReader(open(out / "per_sequence.csv")))
    assert [r["sequence"] for r in rows] == ["change", "crossing", "two"]
    for name in ("crossing", "change", "two"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
        assert len(list((out / "masks" / name).glob("*.png"))) == 16
    if mode == "none":
        assert summary["N_oI"] == 0
    # The rate is a fraction like J&F: N_oI over the object-frames (3 sequences x 16 frames, 4 objects).
    object_frames = 16 * 4
    assert summary["interaction_rate"] == pytest.approx(summary["N_oI"] / object_frames)
    assert 0 <= summary["interaction_rate"] <= 1
    for s in summary["sequences"].values():
        assert 0 <= s["interaction_rate"] <= 1


def test_oracle_corrections_with_a_scheduled_user_do_not_hurt(dataset, tmp_path):
    base = main(["eval", "--data", str(dataset), "--mode", "none", "--engine", "embedded", "--out", str(tmp_path / "a"),
                 "--no-masks"])
    every = main(["eval", "--data", str(dataset), "--mode", "every-k", "--k", "3", "--correction", "oracle",
                  "--engine", "embedded", "--refiner", "embedded", "--out", str(tmp_path / "b"), "--no-masks"])
    assert base == every == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["N_oI"] > 0 and b["J&F"] >= a["J&F"] - 0.01


def test_schedules_and_sequence_loading(dataset):
    seq = EvalSequence.load(dataset / "two")
    assert seq.labels == [1, 2] and list(seq.initial_masks()) == [0]
    r = random_schedule(20, 0, [1, 2], 5, seed=1)
    assert sum(len(v) for v in r.values()) == 5 and min(r) >= 1
    assert r == random_schedule(20, 0, [1, 2], 5, seed=1)
    assert every_k_schedule(20, 0, [1], k=5) == {5: [1], 10: [1], 15: [1]}
    assert sum(len(v) for v in every_k_schedule(21, 0, [1], count=3).values()) == 3
