"""Tests of bench/gpu_check.py, the one prepared GPU run: its plumbing end to end without a GPU
(`--device cpu --quick`), and its helpers on hand-checkable cases.

Oracles: the exactness of the generated inputs is checked against float64 and by counting distinct
values; `agreement` against hand-built outputs whose matches and IoUs are worked out here; the full run
against what it must write (every step, a JSON and a Markdown report, every check passed).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_inference  # noqa: E402
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(module_tmp_path):
    out = module_tmp_path
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=900,
    )
    return result, out


def test_quick_run_on_cpu_passes_every_step_and_writes_both_reports(quick_run):
    result, out = quick_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["steps"]) == list(gpu_check.STEPS)
    for name, step in report["steps"].items():
        # On the CPU the build (nothing to build) and the sanitizer (no GPU) are skipped; the rest ran.
        expected = "skipped" if name in ("build", "sanitizer") else "ok"
        assert step["status"] == expected, (name, step)
        # One summary line per step, printed as it ended.
        assert f"[gpu_check] {name}: {expected}" in result.stdout
    assert report["machine"]["device"] == "cpu" and report["machine"]["cores"] == os.cpu_count()
    markdown = (out / "gpu_check.md").read_text()
    for name in gpu_check.STEPS:
        assert f"## {name}: " in markdown


def test_quick_run_checks_are_real(quick_run):
    # The kernels step compared keep lists and pooled values; every checked row passed, and it ran
    # the nms, batched_nms, roi_align, deterministic-backward and gradcheck cases.
    _, out = quick_run
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    summary = steps["kernels"]["summary"]
    passed, total = (int(v) for v in summary.split(" checks passed")[0].split(" of "))
    assert passed == total > 100
    assert all(row["ok"] for row in steps["opcheck"]["rows"]) and len(steps["opcheck"]["rows"]) == 6
    model_rows = steps["model"]["rows"]
    assert [row["matched_fraction"] for row in model_rows] == [1.0, 1.0]
    speed = steps["speed_kernels"]["rows"]
    assert {row["case"].split(",")[0] for row in speed} == {"nms", "batched_nms", "roi_align forward",
                                                            "roi_align backward"}
    assert all(row["ours_ms"] > 0 and row["torchvision_ms"] > 0 for row in speed)
    training = steps["speed_training"]["rows"]
    assert training and all(row["ours losses finite"] and row["torchvision losses finite"] for row in training)
    converge = steps["converge"]["rows"][0]
    assert converge["iterations"] == gpu_check.QUICK.converge_iters and 0.0 <= converge["segm AP"] <= 1.0


def test_no_gpu_for_device_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--device", "cuda", "--steps", "kernels"]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err


def test_unknown_step_is_named():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "kernels,warp_drive"])


def test_missing_package_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(gpu_check.NEEDED, "no_such_module_xyz", "no-such-package")
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-package" in err and "wheels" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_distinct_scores_are_distinct_in_their_dtype(dtype):
    n = 20000
    scores = gpu_check.distinct_scores(n, dtype, torch.Generator().manual_seed(0))
    assert scores.dtype == dtype and scores.shape == (n,)
    assert torch.unique(scores).numel() == n
    assert bool((scores >= 0).all()) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_boxes_are_exact_in_their_dtype(dtype):
    boxes = gpu_check.grid_boxes(5000, dtype, torch.Generator().manual_seed(1))
    exact = boxes.double()
    # Every corner, and every difference of two coordinates, is the same number in float64.
    assert torch.equal(exact.to(dtype).double(), exact)
    widths = exact[:, 2] - exact[:, 0]
    assert torch.equal(widths.to(dtype).double(), widths)
    assert bool((widths >= 0).all()) and float(exact.max()) < 256


def _output(boxes, labels, scores, masks):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": torch.tensor(masks, dtype=torch.float32)[:, None]}


def test_agreement_matches_by_label_and_overlap():
    mask_a = [[1.0, 1.0, 0.0, 0.0]] * 4  # 8 pixels on
    mask_b = [[1.0, 0.0, 0.0, 0.0]] * 4  # 4 of them: IoU 0.5
    a = [_output([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [0.9, 0.8], [mask_a, mask_a])]
    # The first detection moves by 0.5 px and its mask halves; the second has another label: no match.
    b = [_output([[0.5, 0, 10.5, 10], [20, 20, 30, 30]], [1, 3], [0.85, 0.8], [mask_b, mask_a])]
    stats = bench_inference.agreement(a, b)
    assert stats["detections"] == [2, 2]
    assert stats["matched_fraction"] == 0.5
    assert stats["max_box_diff_px"] == 0.5
    assert stats["max_score_diff"] == pytest.approx(0.05)
    assert stats["mean_mask_iou"] == 0.5 and stats["min_mask_iou"] == 0.5
    assert bench_inference.agreement(a, a)["matched_fraction"] == 1.0


def test_reference_batched_nms_keeps_groups_apart():
    import torchvision

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # Boxes 0 and 1 overlap (IoU 81/119 > 0.5) in group 0; box 2 is alone in group 1.
    keep = gpu_check.reference_batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5, torchvision.ops.nms)
    assert keep.tolist() == [0, 2]


def test_kernels_once_runs_every_kernel_without_error():
    # What compute-sanitizer watches on a GPU; here it must at least run through on the CPU.
    assert gpu_check.main(["--kernels-once", "--device", "cpu"]) == 0
    assert not torch.are_deterministic_algorithms_enabled()
