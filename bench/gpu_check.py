"""The one prepared GPU run: builds our kernels for the GPU at hand, checks them and the whole model
against torchvision and against our own CPU ops, times them side by side with torchvision, and trains a
short shapes run with COCO evaluation.

    python bench/gpu_check.py                        # on one GPU: every step, at most 8 minutes
    python bench/gpu_check.py --steps build,kernels  # some steps only
    python bench/gpu_check.py --device cpu --quick   # no GPU: the same steps on tiny sizes, in seconds
    make gpu-check                                   # the first line, with the project's .venv

Each step prints one summary line when it ends, and the results so far are rewritten after every step
to OUT/gpu_check.json and OUT/gpu_check.md (OUT is --out, default runs/gpu_check), so a run that is cut
short still leaves what finished. Exit status: 0 when every check passed, 1 when one failed, 2 when the
run could not start (a missing package, no GPU, a failed build: the compiler's message is printed).

Steps, in order:
  build            compile nms._C and roialign._C in place for this GPU's compute capability only
                   (TORCH_CUDA_ARCH_LIST), with ninja on every core; log in OUT/build.log
  kernels          nms / batched_nms keep lists against torchvision and our CPU op (float32, float16,
                   bfloat16; 0 to 20k boxes), roi_align forward and backward (float32, float16, bfloat16;
                   NCHW and channels-last; aligned or not; sampling ratio 0, 1, 2; empty RoIs and RoIs
                   outside the map) against torchvision and our CPU op, the deterministic backward
                   (bit-identical twice, equal to the atomic one), gradcheck in float64
  opcheck          torch.library.opcheck of every op on the device
  suite            the CUDA tests of the test suite (pytest -k cuda)
  model            whole model: our detections against torchvision's Mask R-CNN on the device with the
                   same weights, and against our own model on the CPU (TF32 off)
  sanitizer        compute-sanitizer memcheck and racecheck over one call of each kernel (skipped, with
                   a note, when the tool is absent)
  speed_kernels    kernel times against torchvision (CUDA events, warm-up, medians), float32, bfloat16
  speed_inference  batch 1 and 8 at 800x1333: float32 with TF32 off and on, bfloat16 autocast; ms per
                   image, images/s, peak memory, agreement with float32
  speed_training   training images/s at batch 8, AMP float16 and bfloat16, against torchvision's
                   MaskRCNN (frozen BN, same weights, same synthetic images and targets), peak memory
  converge         `train.py --config shapes` for 400 steps on the device (1,000 training images), then
                   COCO evaluation on 100: AP, s/iter

Python packages needed beyond torch and torchvision: numpy, pillow, pycocotools, scikit-image, scipy,
tqdm, matplotlib, pytest and ninja (see NEEDED). The GPU machine's image has all but pycocotools:
bring it as a wheel (`make gpu-wheels` downloads it into .whl/; README, "On a GPU").
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine_description  # noqa: E402

# Import name -> package name, for everything this script (and what it runs) imports.
NEEDED = {
    "numpy": "numpy", "PIL": "pillow", "pycocotools": "pycocotools", "skimage": "scikit-image",
    "scipy": "scipy", "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest", "ninja": "ninja",
}  # fmt: skip

# Sizes of the full run (one H100/H200-class GPU, at most 8 minutes) and of --quick (CPU, seconds).
FULL = SimpleNamespace(
    nms_sizes=(0, 1, 1000, 5000, 20000), batched_sizes=(0, 1, 5000, 20000), roi_map=(2, 16, 40, 48),
    roi_counts=(0, 1, 150), determinism_rois=400, gradcheck_map=(1, 2, 6, 7),
    speed_kernels=dict(nms_sizes=(1000, 5000, 20000), batched_sizes=(5000, 20000), roi_counts=(1000, 4000),
                       feature_shape=(2, 256, 200, 336)),
    repeats=20, inference_repeats=10, warmup=3, image=(800, 1333), model_image=(800, 1066), inference_batches=(1, 8),
    train_batch=8, train_steps=6, converge_iters=400, converge_data=(1000, 100, 128), budget=480,
)  # fmt: skip
QUICK = SimpleNamespace(
    nms_sizes=(0, 1, 300), batched_sizes=(0, 1, 300), roi_map=(2, 3, 12, 14), roi_counts=(0, 1, 20),
    determinism_rois=40, gradcheck_map=(1, 2, 5, 6),
    speed_kernels=dict(nms_sizes=(300,), batched_sizes=(300,), roi_counts=(40,), feature_shape=(1, 8, 24, 32)),
    repeats=1, inference_repeats=1, warmup=1, image=(64, 96), model_image=(64, 96), inference_batches=(1,),
    train_batch=1, train_steps=1, converge_iters=2, converge_data=(6, 4, 64), budget=math.inf,
)  # fmt: skip

# The tiny model and schedule of the quick converge step (those of tests/test_train.py).
QUICK_TRAIN_SETTINGS = [
    "IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64", "IMAGE_MIN_DIM_TRAIN=(64,)", "FPN_CHANNELS=16", "BOX_HEAD_DIM=32",
    "MASK_HEAD_CHANNELS=16", "MASK_HEAD_CONVS=1", "RPN_PRE_NMS_TOP_N_TRAIN=50", "RPN_POST_NMS_TOP_N_TRAIN=30",
    "RPN_PRE_NMS_TOP_N_TEST=50", "RPN_POST_NMS_TOP_N_TEST=30", "ROI_BATCH_SIZE_PER_IMAGE=16",
    "RPN_BATCH_SIZE_PER_IMAGE=32", "BATCH_SIZE=2", "NUM_WORKERS=0", "WARMUP_ITERS=1", "LOG_PERIOD=1",
]  # fmt: skip

# Relative error ||got - reference|| / ||reference|| allowed against a float32 (or float64) reference.
REL_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# torchvision's roi_align computes in the input's dtype where ours computes in float32, so its low-precision
# results get looser bounds, still far below a wrong result. Measured against our float32 CPU op: 5e-3 in
# float16 on the CPU; on an H200 up to 4.7e-2 in float16 (aligned, sampling 2), and within 8e-2 in bfloat16.
TORCHVISION_REL_TOLERANCE = {**REL_TOLERANCE, torch.float16: 8e-2, torch.bfloat16: 8e-2}


# ----------------------------------------------------------------------------------------------------
# The report: one JSON file and one Markdown file, rewritten after every step


class Report:
    def __init__(self, out: str, machine: dict):
        self.out = out
        self.data = {"machine": machine, "steps": {}}

    def add(self, name, status, seconds, summary, rows=()):
        self.data["steps"][name] = {"status": status, "seconds": round(seconds, 1), "summary": summary,
                                    "rows": list(rows)}
        print(f"[gpu_check] {name}: {status} ({seconds:.1f} s) {summary}", flush=True)
        self.write()

    def failed(self) -> bool:
        return any(step["status"] in ("failed", "error") for step in self.data["steps"].values())

    def markdown(self) -> str:
        machine = self.data["machine"]
        lines = ["# gpu_check", "", ", ".join(f"{k}: {v}" for k, v in machine.items()), ""]
        for name, step in self.data["steps"].items():
            lines += [f"## {name}: {step['status']} ({step['seconds']} s)", "", step["summary"], ""]
            if step["rows"]:
                columns = list(dict.fromkeys(k for row in step["rows"] for k in row))
                lines.append("| " + " | ".join(columns) + " |")
                lines.append("|" + "---|" * len(columns))
                for row in step["rows"]:
                    lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
                lines.append("")
        return "\n".join(lines)

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=1)), ("gpu_check.md", self.markdown())):
            with tempfile.NamedTemporaryFile("w", dir=self.out, delete=False, suffix=".tmp") as f:
                f.write(text + "\n")
            os.replace(f.name, os.path.join(self.out, name))


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def check_rows_summary(rows) -> tuple[str, str]:
    bad = [row for row in rows if not row["ok"]]
    status = "failed" if bad else "ok"
    summary = f"{len(rows) - len(bad)} of {len(rows)} checks passed"
    if bad:
        summary += "; failed: " + "; ".join(f"{row['case']} ({row.get('detail', '')})" for row in bad[:5])
    return status, summary


# ----------------------------------------------------------------------------------------------------
# Set-up: packages, machine, build


def missing_packages() -> list[str]:
    return [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]


def build_environment(device: torch.device) -> dict:
    """Environment of the in-place build: this GPU's architecture only, every core, CUDA forced on."""
    major, minor = torch.cuda.get_device_capability(device)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 1),
               FORCE_CUDA="1")
    return env


def build(ctx) -> tuple[str, str, list]:
    if ctx.device.type != "cuda":
        import nms
        import roialign

        paths = [os.path.relpath(m.__file__, ROOT) for m in (sys.modules["nms._C"], sys.modules["roialign._C"])]
        del nms, roialign
        return "skipped", f"no GPU: the kernels already built are used ({', '.join(paths)})", []
    log_path = os.path.join(ctx.out, "build.log")
    env = build_environment(ctx.device)
    command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path) as f:
            print(f.read()[-6000:], file=sys.stderr)
        summary = f"`{' '.join(command)}` exited {result.returncode}; the compiler's output is above and in {log_path}"
        return "failed", summary, []
    summary = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={env['MAX_JOBS']}, log in {log_path}"
    return "ok", summary, []


# ----------------------------------------------------------------------------------------------------
# Inputs


def distinct_scores(n, dtype, generator) -> torch.Tensor:
    """n scores, all different in `dtype` (so that no keep list depends on the order of ties): a random
    permutation of n/n for 32 and 64 bits, random distinct bit patterns of positive normal numbers for
    the 16-bit types."""
    if dtype.itemsize >= 4:
        return (torch.randperm(n, generator=generator).double() / max(n, 1)).to(dtype)
    low, high = (0x0400, 0x7BFF) if dtype == torch.float16 else (0x0080, 0x7F7F)
    if n > high - low:
        raise ValueError(f"distinct_scores: at most {high - low} distinct positive {dtype} values; got n={n}")
    bits = torch.randperm(high - low, generator=generator)[:n] + low
    return bits.to(torch.int16).view(dtype)


def grid_boxes(n, dtype, generator) -> torch.Tensor:
    """n boxes in [0, 256) whose corners, and every difference of two, are exact in `dtype` (a 1/8 grid for
    float16, integers for bfloat16, any float32 otherwise), so that every device computes the same IoUs."""
    step = {torch.float16: 0.125, torch.bfloat16: 1.0}.get(dtype, 0.0)
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 200
    size = 4 + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 50
    boxes = torch.cat([corner, (corner + size).clamp(max=255)], dim=1)
    if step:
        boxes = (boxes / step).round() * step
    return boxes.to(dtype)


def mixed_rois(k, batch, height, width, spatial_scale, generator) -> torch.Tensor:
    """[k, 5] float32 RoIs on a height x width map: about a quarter each inside, partly outside, fully
    outside the map, and degenerate (zero width or height, or inverted corners)."""
    size = torch.tensor([width, height], dtype=torch.float64) / spatial_scale
    low = (torch.rand(k, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2) * size
    extent = (0.05 + 0.6 * torch.rand(k, 2, generator=generator, dtype=torch.float64)) * size
    kind = torch.randint(0, 4, (k,), generator=generator)
    low[kind == 2] += size * 1.5  # fully outside
    degenerate = int((kind == 3).sum())
    extent[kind == 3, 0] *= torch.tensor([0.0, -0.5])[torch.randint(0, 2, (degenerate,), generator=generator)]
    index = torch.randint(0, batch, (k, 1), generator=generator).double()
    return torch.cat([index, low, low + extent], dim=1).float()


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    got, reference = got.double().cpu(), reference.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - reference).norm() / reference.norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------------
# Step: kernels


def reference_batched_nms(boxes, scores, idxs, threshold, nms_fn) -> torch.Tensor:
    """batched_nms by its definition: nms within each group, merged by decreasing score."""
    kept = [torch.where(idxs == g)[0][nms_fn(boxes[idxs == g], scores[idxs == g], threshold)] for g in idxs.unique()]
    kept = torch.cat(kept) if kept else torch.empty(0, dtype=torch.int64)
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def unless_unsupported(fn):
    """fn(), or None where torchvision has no kernel for the dtype on this device."""
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as error:
        if "not implemented for" in str(error) or isinstance(error, NotImplementedError):
            return None
        raise


def nms_checks(ctx, generator) -> list:
    import torchvision

    import nms

    rows, device = [], ctx.device
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in ctx.sizes.nms_sizes:
            boxes, scores = grid_boxes(n, dtype, generator), distinct_scores(n, dtype, generator)
            for threshold in (0.5, 0.7):
                # The corners and scores are exact in dtype, so the float32 IoUs of torchvision's CPU op
                # on upcast copies are the IoUs every implementation must compare.
                expected = torchvision.ops.nms(boxes.float(), scores.float(), threshold)
                got = {"ours": nms.nms(boxes.to(device), scores.to(device), threshold).cpu(),
                       "ours CPU": nms.nms(boxes, scores, threshold)}
                if dtype != torch.bfloat16:  # torchvision's bfloat16 kernel rounds its areas to bfloat16
                    got["torchvision"] = unless_unsupported(
                        lambda b=boxes, s=scores, t=threshold: torchvision.ops.nms(b.to(device), s.to(device), t).cpu())
                for who, keep in got.items():
                    case = f"nms {who} {dtype_name(dtype)} n={n} iou={threshold}"
                    if keep is None:
                        rows.append({"case": case, "ok": True, "detail": "not supported by torchvision"})
                    else:
                        rows.append({"case": case, "ok": keep.tolist() == expected.tolist(),
                                     "detail": f"{len(expected)} kept"})
        # Ties: our device op and our CPU op both keep equal scores in input order.
        n = ctx.sizes.nms_sizes[-1]
        boxes = grid_boxes(n, dtype, generator)
        scores = torch.randint(0, 8, (n,), generator=generator).to(dtype)
        keep_device = nms.nms(boxes.to(device), scores.to(device), 0.5).cpu()
        keep_cpu = nms.nms(boxes, scores, 0.5)
        rows.append({"case": f"nms ties {dtype_name(dtype)} n={n}", "ok": keep_device.tolist() == keep_cpu.tolist(),
                     "detail": f"{len(keep_cpu)} kept"})
    for n in ctx.sizes.batched_sizes:
        boxes, scores = grid_boxes(n, torch.float32, generator), distinct_scores(n, torch.float32, generator)
        idxs = torch.randint(0, 80, (n,), generator=generator)
        expected = reference_batched_nms(boxes, scores, idxs, 0.5, torchvision.ops.nms)
        on_device = (boxes.to(device), scores.to(device), idxs.to(device), 0.5)
        got = {"ours": nms.batched_nms(*on_device).cpu(), "ours CPU": nms.batched_nms(boxes, scores, idxs, 0.5),
               "torchvision": torchvision.ops.batched_nms(*on_device).cpu()}
        for who, keep in got.items():
            rows.append({"case": f"batched_nms {who} n={n} 80 classes", "ok": keep.tolist() == expected.tolist(),
                         "detail": f"{len(expected)} kept"})
    return rows


def roi_align_forward_backward(fn, features, grad):
    features = features.detach().requires_grad_()
    out = fn(features)
    out.backward(grad)
    return out.detach(), features.grad


def roi_align_checks(ctx, generator) -> list:
    import torchvision

    import roialign

    rows, device = [], ctx.device
    batch, channels, height, width = ctx.sizes.roi_map
    features = torch.randn(batch, channels, height, width, generator=generator)
    for k in ctx.sizes.roi_counts:
        # Corners rounded to bfloat16, so that every dtype holds the same RoIs (torchvision's op takes
        # them in the feature map's dtype).
        rois = mixed_rois(k, batch, height, width, 0.5, generator).bfloat16().float()
        grad = torch.randn(k, channels, 7, 7, generator=generator)
        for aligned in (False, True):
            for sampling in (0, 1, 2):
                args = ((7, 7), 0.5, sampling, aligned)
                # The reference: our CPU op in float32 (itself checked against float64 in the suite).
                ref, ref_grad = roi_align_forward_backward(lambda t, r=rois, a=args: roialign.roi_align(t, r, *a),
                                                           features, grad)
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    for layout in ("NCHW", "channels-last"):
                        x = features.to(device, dtype)
                        if layout == "channels-last":
                            x = x.contiguous(memory_format=torch.channels_last)
                        r, g = rois.to(device, dtype), grad.to(device, dtype)
                        case = f"k={k} aligned={aligned} sampling={sampling} {dtype_name(dtype)} {layout}"
                        for who, op in (("ours", roialign.roi_align), ("torchvision", torchvision.ops.roi_align)):
                            def run(o=op, a=args, x=x, r=r, g=g):
                                return roi_align_forward_backward(lambda t: o(t, r, *a), x, g)

                            result = run() if who == "ours" else unless_unsupported(run)
                            if result is None:
                                rows.append({"case": f"roi_align {who} {case}", "ok": True,
                                             "detail": "not supported by torchvision"})
                                continue
                            out, out_grad = result
                            errors = (relative_error(out, ref), relative_error(out_grad, ref_grad)) if k else (0.0, 0.0)
                            tolerance = (REL_TOLERANCE if who == "ours" else TORCHVISION_REL_TOLERANCE)[dtype]
                            ok = out.dtype == dtype and out.shape == ref.shape and max(errors) <= tolerance
                            rows.append({"case": f"roi_align {who} {case}", "ok": ok,
                                         "detail": f"rel. error forward {errors[0]:.1e}, backward {errors[1]:.1e}"})
    # The deterministic backward: bit-identical twice, and equal to the atomic one to float32 rounding.
    k = ctx.sizes.determinism_rois
    rois = mixed_rois(k, batch, height, width, 0.25, generator).to(device)
    grad = torch.randn(k, channels, 3, 5, generator=generator).to(device)
    args = (0.25, 3, 5, batch, channels, height, width, 2, True)
    first = torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True)
    second = torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, True)
    atomic = torch.ops.maskrcnn.roi_align_backward(grad, rois, *args, False)
    cpu = torch.ops.maskrcnn.roi_align_backward(grad.cpu(), rois.cpu(), *args, True)
    rows.append({"case": f"roi_align deterministic backward twice, {k} RoIs", "ok": torch.equal(first, second),
                 "detail": "bit-identical" if torch.equal(first, second) else "differs"})
    for who, other in (("atomic", atomic), ("CPU", cpu)):
        error = relative_error(first, other)
        rows.append({"case": f"roi_align deterministic backward against {who}",
                     "ok": error <= REL_TOLERANCE[torch.float32], "detail": f"rel. error {error:.1e}"})
    # gradcheck in float64 on the device.
    b, c, h, w = ctx.sizes.gradcheck_map
    x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    rois = mixed_rois(4, b, h, w, 1.0, generator).double().to(device)
    for aligned in (False, True):
        ok = torch.autograd.gradcheck(lambda t, a=aligned: roialign.roi_align(t, rois, (2, 3), 1.0, 2, a), (x,),
                                      raise_exception=False)
        rows.append({"case": f"roi_align gradcheck float64 aligned={aligned}", "ok": bool(ok), "detail": ""})
    return rows


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def step_kernels(ctx):
    generator = torch.Generator().manual_seed(0)
    rows = nms_checks(ctx, generator) + roi_align_checks(ctx, generator)
    status, summary = check_rows_summary(rows)
    return status, summary, [row for row in rows if not row["ok"]] or rows[:: max(len(rows) // 40, 1)]


# ----------------------------------------------------------------------------------------------------
# Step: opcheck


def step_opcheck(ctx):
    import nms  # noqa: F401  (registers the ops)
    import roialign  # noqa: F401

    generator = torch.Generator().manual_seed(1)
    device = ctx.device
    boxes = grid_boxes(60, torch.float32, generator).to(device)
    scores = distinct_scores(60, torch.float32, generator).to(device)
    x = torch.randn(2, 3, 10, 12, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    rois = mixed_rois(6, 2, 10, 12, 0.5, generator).to(device)
    grad = torch.randn(6, 3, 7, 7, generator=generator).to(device)
    x_channels_last = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
    calls = {
        "nms": (torch.ops.maskrcnn.nms.default, (boxes, scores, 0.5)),
        "batched_nms": (torch.ops.maskrcnn.batched_nms.default,
                        (boxes, scores, torch.randint(0, 3, (60,), generator=generator).to(device), 0.5)),
        "roi_align float64": (torch.ops.maskrcnn.roi_align.default, (x, rois.double(), 0.5, 3, 4, 2, True)),
        "roi_align channels-last": (
            torch.ops.maskrcnn.roi_align.default,
            (x_channels_last, rois, 0.5, 7, 7, -1, False)),
        "roi_align_backward": (torch.ops.maskrcnn.roi_align_backward.default,
                               (grad, rois, 0.5, 7, 7, 2, 3, 10, 12, 2, False, False)),
        "roi_align_backward deterministic": (torch.ops.maskrcnn.roi_align_backward.default,
                                             (grad, rois, 0.5, 7, 7, 2, 3, 10, 12, 2, False, True)),
    }
    rows = []
    for name, (op, args) in calls.items():
        try:
            torch.library.opcheck(op, args)
            rows.append({"case": name, "ok": True, "detail": ""})
        except Exception as error:  # opcheck raises OpCheckError, or the op's own error
            rows.append({"case": name, "ok": False, "detail": f"{type(error).__name__}: {str(error)[:200]}"})
    status, summary = check_rows_summary(rows)
    return status, summary, rows


# ----------------------------------------------------------------------------------------------------
# Step: the suite's CUDA tests


def step_suite(ctx):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               "tests/test_nms.py", "tests/test_roialign.py"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=ctx.time_left())
    with open(os.path.join(ctx.out, "suite.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    status = "ok" if result.returncode == 0 else "failed"
    if ctx.device.type != "cuda":
        last += " (no GPU: the CUDA tests skip themselves)"
    return status, f"`pytest -k cuda`: {last}", []


# ----------------------------------------------------------------------------------------------------
# Step: the whole model


def step_model(ctx):
    import bench_inference

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    height, width = ctx.sizes.model_image
    theirs, ours = bench_inference.build_models(ctx.device, min_size=min(height, width), max_size=max(height, width))
    image = bench_inference.coffee_image(height, width, ctx.device)
    images = [image, image.flip(-1)]
    with torch.inference_mode():
        ours_out, theirs_out = ours(images), theirs(images)
        ours_cpu = copy.deepcopy(ours).cpu()([i.cpu() for i in images])
    rows = []
    for name, reference, minimum in (("ours against torchvision, same device", theirs_out, 1.0),
                                     ("ours against ours on the CPU", ours_cpu, 0.98)):
        stats = bench_inference.agreement([to_cpu(o) for o in ours_out], [to_cpu(o) for o in reference])
        ok = stats["matched_fraction"] >= minimum and stats["mean_mask_iou"] >= 0.98 and stats["max_box_diff_px"] < 0.5
        rows.append({"case": name, "ok": ok, **stats})
    status, summary = check_rows_summary(rows)
    return status, summary + f"; {rows[0]['detections'][0]} detections on 2 images of {height}x{width}", rows


def to_cpu(output: dict) -> dict:
    return {key: value.float().cpu() if value.is_floating_point() else value.cpu() for key, value in output.items()}


# ----------------------------------------------------------------------------------------------------
# Step: compute-sanitizer


def kernels_once(device: torch.device):
    """One call of every kernel (each dtype and layout the model uses): what the sanitizer watches."""
    import nms
    import roialign

    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        boxes = grid_boxes(3000, dtype, generator).to(device)
        scores = distinct_scores(3000, dtype, generator).to(device)
        nms.nms(boxes, scores, 0.7)
        nms.batched_nms(boxes, scores, torch.randint(0, 80, (3000,), generator=generator).to(device), 0.5)
        x = torch.randn(2, 8, 30, 34, generator=generator).to(device, dtype)
        rois = mixed_rois(200, 2, 30, 34, 0.25, generator).to(device)
        for features in (x, x.contiguous(memory_format=torch.channels_last)):
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic)
                roi_align_forward_backward(lambda t, r=rois: roialign.roi_align(t, r, 7, 0.25, 0, True), features,
                                           torch.randn(200, 8, 7, 7, generator=generator).to(device, dtype))
    torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "compute-sanitizer")
    return found or (candidate if os.path.exists(candidate) else None)


def step_sanitizer(ctx):
    if ctx.device.type != "cuda":
        return "skipped", "no GPU", []
    tool = find_sanitizer()
    if tool is None:
        return "skipped", "compute-sanitizer not found (not on PATH nor in CUDA_HOME/bin)", []
    rows = []
    for check in ("memcheck", "racecheck"):
        # Only our kernels are instrumented (their names all contain our namespace), which keeps the
        # run to seconds instead of instrumenting every library kernel torch launches.
        command = [tool, "--tool", check, "--kernel-name", "kns=maskrcnn", "--error-exitcode", "1",
                   sys.executable, os.path.abspath(__file__), "--kernels-once", "--device", str(ctx.device)]
        try:
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                    timeout=min(90, ctx.time_left() or 90))
        except subprocess.TimeoutExpired:
            rows.append({"case": check, "ok": True, "detail": "timed out: not checked"})
            continue
        with open(os.path.join(ctx.out, f"sanitizer_{check}.log"), "w") as f:
            f.write(result.stdout + result.stderr)
        summary = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR SUMMARY" in line
                   or "RACECHECK SUMMARY" in line]
        rows.append({"case": check, "ok": result.returncode == 0,
                     "detail": (summary[-1].strip() if summary else f"exit {result.returncode}")[:200]})
    status, summary = check_rows_summary(rows)
    return status, summary, rows


# ----------------------------------------------------------------------------------------------------
# Step: kernel speed


def step_speed_kernels(ctx):
    import bench_kernels

    rows = []
    dtypes = (torch.float32, torch.bfloat16) if ctx.device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        for row in bench_kernels.measure(ctx.device, dtype, ctx.sizes.repeats, ctx.sizes.warmup,
                                         **ctx.sizes.speed_kernels):
            rows.append({"dtype": dtype_name(dtype), **row})
    ratios = [row["ratio"] for row in rows if row["ratio"]]
    summary = f"{len(rows)} cases; torchvision / ours from {min(ratios):.2f}x to {max(ratios):.2f}x"
    return "ok", summary, rows


# ----------------------------------------------------------------------------------------------------
# Step: inference speed


def step_speed_inference(ctx):
    import bench_inference
    from timing import median_seconds

    height, width = ctx.sizes.image
    theirs, ours = bench_inference.build_models(ctx.device, min_size=min(height, width), max_size=max(height, width))
    image = bench_inference.coffee_image(height, width, ctx.device)
    modes = [("float32", False, None)]
    if ctx.device.type == "cuda":
        modes.append(("float32 TF32", True, None))
    modes.append(("bfloat16 autocast", False, torch.bfloat16))
    rows = []
    for batch in ctx.sizes.inference_batches:
        images = [image.flip(-1) if i % 2 else image for i in range(batch)]
        baseline = None
        for mode, tf32, autocast in modes:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            row = {"batch": batch, "mode": mode}
            for who, net in (("torchvision", theirs), ("ours", ours)):
                def run(net=net, images=images, autocast=autocast):
                    with torch.inference_mode(), torch.autocast(
                        ctx.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
                    ):
                        return net(images)

                seconds = median_seconds(run, ctx.device, ctx.sizes.inference_repeats, ctx.sizes.warmup)
                row[f"{who} ms/img"] = seconds * 1000 / batch
                row[f"{who} img/s"] = batch / seconds
                row[f"{who} peak MB"] = bench_inference.peak_memory_mb(run, ctx.device)
                if who == "ours":
                    outputs = [to_cpu(o) for o in run()]
                    baseline = outputs if baseline is None else baseline
                    stats = bench_inference.agreement(outputs, baseline)
                    row["matched vs float32"] = stats["matched_fraction"]
                    row["mask IoU vs float32"] = stats["mean_mask_iou"]
            row["ours / torchvision"] = row["ours img/s"] / row["torchvision img/s"]
            rows.append(row)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    first = rows[0]
    summary = (f"{height}x{width}: float32 batch {first['batch']} ours {first['ours ms/img']:.1f} ms/img, "
               f"{first['ours / torchvision']:.2f}x torchvision")
    return "ok", summary, rows


# ----------------------------------------------------------------------------------------------------
# Step: training speed


def synthetic_batch(batch, height, width, device, generator):
    """Images and targets (3 to 6 ellipses per image, labels 1..90) the same for both models."""
    images, targets = [], []
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        count = int(torch.randint(3, 7, (1,), generator=generator))
        centre = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.8 + \
            torch.tensor([width, height]) * 0.1
        half = (0.03 + 0.15 * torch.rand(count, 2, generator=generator)) * min(height, width)
        boxes = torch.cat([centre - half, centre + half], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        masks = (((xs - centre[:, 0, None, None]) / half[:, 0, None, None]) ** 2
                 + ((ys - centre[:, 1, None, None]) / half[:, 1, None, None]) ** 2) <= 1
        labels = torch.randint(1, 91, (count,), generator=generator)
        masks = masks.to(torch.uint8)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def training_models(device, height, width):
    """torchvision's MaskRCNN on a ResNet-50-FPN with frozen BN and 3 trainable stages (its fine-tuning
    set-up), and ours with the same settings and its weights."""
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from config import Config
    from model import MaskRCNN

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    size = dict(min_size=min(height, width), max_size=max(height, width))
    theirs = TorchvisionMaskRCNN(backbone, num_classes=91, **size)
    ours = MaskRCNN(Config(FROZEN_BN_EPS=1e-5, IMAGE_MIN_DIM=size["min_size"], IMAGE_MAX_DIM=size["max_size"],
                           IMAGE_MIN_DIM_TRAIN=(size["min_size"],)))
    ours.load_weights(theirs.state_dict())
    return theirs.to(device).train(), ours.to(device).train()


def step_speed_training(ctx):
    import bench_inference
    from timing import median_seconds

    height, width = ctx.sizes.image
    batch = ctx.sizes.train_batch
    theirs, ours = training_models(ctx.device, height, width)
    images, targets = synthetic_batch(batch, height, width, ctx.device, torch.Generator().manual_seed(3))
    dtypes = (torch.float16, torch.bfloat16) if ctx.device.type == "cuda" else (torch.bfloat16,)
    rows = []
    for dtype in dtypes:
        row = {"batch": batch, "amp": dtype_name(dtype)}
        for who, net in (("torchvision", theirs), ("ours", ours)):
            optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
            scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
            losses_seen = []

            def step(net=net, optimizer=optimizer, scaler=scaler, losses_seen=losses_seen, dtype=dtype):
                with torch.autocast(ctx.device.type, dtype=dtype):
                    losses = net(images, targets)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses_seen.append(loss.detach())

            seconds = median_seconds(step, ctx.device, ctx.sizes.train_steps, ctx.sizes.warmup)
            row[f"{who} s/step"] = seconds
            row[f"{who} img/s"] = batch / seconds
            row[f"{who} peak MB"] = bench_inference.peak_memory_mb(step, ctx.device)
            row[f"{who} losses finite"] = bool(torch.isfinite(torch.stack(losses_seen)).all())
        row["ours / torchvision"] = row["ours img/s"] / row["torchvision img/s"]
        rows.append(row)
    ok = all(row["ours losses finite"] for row in rows)
    summary = ", ".join(f"AMP {row['amp']}: ours {row['ours img/s']:.1f} img/s, {row['ours / torchvision']:.2f}x "
                        "torchvision" for row in rows)
    return ("ok" if ok else "failed"), f"batch {batch} at {height}x{width}; {summary}", rows


# ----------------------------------------------------------------------------------------------------
# Step: a short training run that must converge


def step_converge(ctx):
    import shapes

    train_images, val_images, size = ctx.sizes.converge_data
    data = os.path.join(ctx.out, f"shapes_{train_images}_{val_images}_{size}")
    if not os.path.exists(os.path.join(data, "annotations", "instances_val.json")):
        shutil.rmtree(data, ignore_errors=True)
        shapes.generate(data, train=train_images, val=val_images, size=size)
    run = os.path.join(ctx.out, "converge")
    shutil.rmtree(run, ignore_errors=True)
    settings = [f"MAX_ITERS={ctx.sizes.converge_iters}"]
    settings += QUICK_TRAIN_SETTINGS if ctx.quick else [f"NUM_WORKERS={min(8, os.cpu_count() or 1)}"]
    command = [sys.executable, "train.py", "--config", "shapes", "--data", data, "--out", run,
               "--device", str(ctx.device), "--set", *settings]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=ctx.time_left())
    with open(os.path.join(ctx.out, "converge.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return "failed", f"train.py exited {result.returncode}: {' / '.join(tail)}", []
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    seconds = metrics["train_seconds"]
    row = {"iterations": metrics["iteration"], "train s": seconds, "s/iter": seconds / max(metrics["iteration"], 1),
           "segm AP": metrics["segm"]["AP"], "segm AP50": metrics["segm"]["AP50"], "bbox AP": metrics["bbox"]["AP"]}
    summary = (f"{row['iterations']} steps in {seconds:.0f} s ({row['s/iter']:.3f} s/iter): "
               f"segm AP {row['segm AP']:.3f}, AP50 {row['segm AP50']:.3f}, bbox AP {row['bbox AP']:.3f}")
    return "ok", summary, [row]


# ----------------------------------------------------------------------------------------------------
# Main

STEPS = {
    "build": build, "kernels": step_kernels, "opcheck": step_opcheck, "suite": step_suite, "model": step_model,
    "sanitizer": step_sanitizer, "speed_kernels": step_speed_kernels, "speed_inference": step_speed_inference,
    "speed_training": step_speed_training, "converge": step_converge,
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; the current GPU) or cpu (the plumbing only)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: seconds, for tests")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, gpu_check.md and logs")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of: {', '.join(STEPS)}")
    parser.add_argument("--budget", type=float, help="seconds after which the remaining steps are skipped "
                        "(default 480 for the full run, none with --quick)")
    parser.add_argument("--kernels-once", action="store_true", help=argparse.SUPPRESS)  # what the sanitizer runs
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; expected some of {', '.join(STEPS)}")
    args.steps = steps
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False); "
              "use --device cpu --quick to check the script's plumbing without one", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_check: --device must be cuda or cpu; got {args.device!r}", file=sys.stderr)
        return 2
    if args.kernels_once:
        kernels_once(device)
        return 0
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)}. Without network, bring them as wheels "
              "(`make gpu-wheels` on a machine with network, then `pip install --no-index --no-deps .whl/*.whl`; "
              "see the README, 'On a GPU').", file=sys.stderr)
        return 2
    sizes = copy.copy(QUICK if args.quick else FULL)
    budget = args.budget if args.budget is not None else sizes.budget
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    def time_left():  # seconds, for the subprocess timeouts (None: no limit)
        return None if budget == math.inf else max(budget - (time.perf_counter() - started), 1)

    ctx = SimpleNamespace(device=device, quick=args.quick, out=out, sizes=sizes, time_left=time_left)
    report = Report(out, machine_description(device))
    given = argv if argv is not None else sys.argv[1:]
    report.data["machine"]["command"] = " ".join(["python bench/gpu_check.py", *given])
    # In STEPS' order, so the build comes first: importing nms or roialign loads the compiled modules.
    for name in [s for s in STEPS if s in args.steps]:
        if time.perf_counter() - started > budget:
            report.add(name, "skipped", 0.0, f"out of time: the {budget:.0f} s budget is spent")
            continue
        step_start = time.perf_counter()
        try:
            status, summary, rows = STEPS[name](ctx)
        except Exception as error:
            status, summary, rows = "error", f"{type(error).__name__}: {error}", []
            traceback.print_exc()
        report.add(name, status, time.perf_counter() - step_start, summary, rows)
        if name == "build" and status == "failed":
            return 2
    print(f"[gpu_check] {'FAILED' if report.failed() else 'all checks passed'} in "
          f"{time.perf_counter() - started:.0f} s; {os.path.join(out, 'gpu_check.md')}", flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
