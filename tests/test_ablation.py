"""bench/ablation.py: the statistics against hand-computed values (a t-interval from the t table), the
per-arm summary against hand-made runs, argument errors, and one tiny end-to-end run whose run folders
must hold each arm's settings (read back from the config.json that train.py wrote)."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ablation  # noqa: E402

import shapes  # noqa: E402
from config import ShapesConfig  # noqa: E402

TINY = ["IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64", "IMAGE_MIN_DIM_TRAIN=(64,)", "FPN_CHANNELS=16", "BOX_HEAD_DIM=32",
        "MASK_HEAD_CHANNELS=16", "MASK_HEAD_CONVS=1", "BATCH_SIZE=2", "NUM_WORKERS=0", "WARMUP_ITERS=1",
        "LOG_PERIOD=1"]  # fmt: skip


def test_paired_interval_is_the_t_interval():
    # Differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01; t(0.975, 2 df) = 4.303 from the table.
    mean, half = ablation.paired_interval([0.01, 0.02, 0.03])
    assert mean == pytest.approx(0.02)
    assert half == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    # Two seeds: t(0.975, 1 df) = 12.706; differences 0 and 0.02 have sd 0.01414.
    assert ablation.paired_interval([0.0, 0.02])[1] == pytest.approx(12.706 * 0.02 / math.sqrt(2) / math.sqrt(2),
                                                                     rel=1e-3)
    mean, half = ablation.paired_interval([0.05])
    assert mean == 0.05 and math.isnan(half)


def row(arm, seed, ap):
    return {"arm": arm, "seed": seed, "train_seconds": 10.0, "segm AP": ap, "segm AP75": ap, "segm APs": ap,
            "Boundary AP": ap}


def test_summary_pairs_arms_with_the_baseline_by_seed():
    rows = [row("baseline", 0, 0.30), row("baseline", 1, 0.40), row("focal_rpn", 0, 0.32), row("focal_rpn", 1, 0.44),
            row("mask_28", 0, 0.25)]
    summary = {entry["arm"]: entry for entry in ablation.summarise(rows, ["baseline", "focal_rpn", "mask_28"])}
    mean, sd = summary["focal_rpn"]["segm AP"]
    assert mean == pytest.approx(0.38) and sd == pytest.approx(math.sqrt(0.0072))  # (0.32, 0.44)
    # Paired differences 0.02 and 0.04: mean 0.03, sd 0.01414, half-width 12.706 * 0.01414 / sqrt(2).
    diff, half = summary["focal_rpn"]["segm AP vs baseline"]
    assert diff == pytest.approx(0.03) and half == pytest.approx(12.706 * 0.01, rel=1e-3)
    # One seed: the difference to that seed's baseline, no interval.
    diff, half = summary["mask_28"]["segm AP vs baseline"]
    assert diff == pytest.approx(-0.05) and math.isnan(half)
    assert summary["baseline"]["segm AP vs baseline"] is None
    assert summary["baseline"]["seeds"] == 2 and summary["mask_28"]["seeds"] == 1
    assert "segm AP vs reference" not in summary["focal_rpn"]


def test_imbalance_arms_are_also_paired_with_their_reference():
    rows = [row("baseline", 0, 0.30), row("baseline", 1, 0.40), row("all_anchors", 0, 0.20),
            row("all_anchors", 1, 0.30), row("all_anchors_retinanet", 0, 0.25), row("all_anchors_retinanet", 1, 0.29)]
    arms = ["baseline", "all_anchors", "all_anchors_retinanet"]
    summary = {entry["arm"]: entry for entry in ablation.summarise(rows, arms)}
    # Against all_anchors: +0.05 and -0.01, mean 0.02, sd 0.0424, half-width 12.706 * 0.0424 / sqrt(2).
    diff, half = summary["all_anchors_retinanet"]["segm AP vs reference"]
    assert diff == pytest.approx(0.02) and half == pytest.approx(12.706 * 0.03, rel=1e-3)
    assert summary["all_anchors_retinanet"]["reference"] == "all_anchors"
    assert summary["all_anchors_retinanet"]["segm AP vs baseline"][0] == pytest.approx(-0.08)  # -0.05, -0.11
    table = ablation.markdown(list(summary.values()), "cmd", {}, 0.0, True)
    assert "| all_anchors_retinanet | all_anchors | +0.020 ± 0.381 |" in table


@pytest.mark.parametrize(
    "argv, message",
    [(["--arms", "baseline,bicubic"], "unknown bicubic"), (["--seeds", "a,b"], "--seeds must be"),
     (["--iters", "0"], "--iters and --jobs must be at least 1")],
)  # fmt: skip
def test_bad_arguments_name_what_is_wrong(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        ablation.main([*argv, "--out", str(tmp_path)])


def test_tiny_ablation_runs_each_arm_with_its_settings(tmp_path):
    data = tmp_path / "data"
    shapes.generate(str(data), train=4, val=2, size=64)
    out = tmp_path / "out"
    summary = ablation.main(["--arms", "focal_rpn,bicubic_mask", "--seeds", "3", "--iters", "1", "--data", str(data),
                             "--out", str(out), "--device", "cpu", "--set", *TINY])
    assert [entry["arm"] for entry in summary] == ["baseline", "focal_rpn", "bicubic_mask"]  # baseline added
    for arm, expected in (("baseline", {"RPN_FOCAL_LOSS": False, "POOL_INTERPOLATION": "bilinear"}),
                          ("focal_rpn", {"RPN_FOCAL_LOSS": True, "POOL_INTERPOLATION": "bilinear"}),
                          ("bicubic_mask", {"RPN_FOCAL_LOSS": False, "POOL_INTERPOLATION": ["bilinear", "bicubic"]})):
        with open(out / arm / "seed3" / "config.json") as f:
            config = json.load(f)
        assert {key: config[key] for key in expected} == expected, arm
        assert config["SEED"] == 3 and config["MAX_ITERS"] == 1 and config["IMAGE_MIN_DIM"] == 64
    report = json.loads((out / "ablation.json").read_text())
    assert sorted(r["arm"] for r in report["runs"]) == ["baseline", "bicubic_mask", "focal_rpn"]
    table = (out / "ablation.md").read_text()
    assert "| focal_rpn | 1 |" in table and "segm AP" in table


@pytest.mark.parametrize("arm", list(ablation.ARMS))
def test_every_arm_is_a_valid_shapes_configuration(arm):
    # train.py would refuse a misspelt or out-of-range setting only when that arm's run starts.
    config = ShapesConfig().override(ablation.ARMS[arm])
    for setting in ablation.ARMS[arm]:
        key = setting.split("=")[0]
        assert getattr(config, key) != getattr(ShapesConfig(), key), setting
