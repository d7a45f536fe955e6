"""Where the time goes: a torch.profiler breakdown of our model by stage, for inference at 800x1066 (batch 1)
and for the training step of both configurations of bench_training.py, and the fraction of the CPU's float32
FMA peak that the convolutions reach.

    python bench/profile_stages.py                      # all three runs
    python bench/profile_stages.py --runs inference --ghz 2.1 --fma-units 2

The stages are record_function ranges put around modules (forward pre/post hooks) and around model.py's
functions (the module's globals, wrapped here), so model.py carries no profiling code:
    preprocess (normalise, resize, pad), backbone (the ResNet), FPN, RPN (head, anchors, proposals and
    their NMS), targets (anchor and RoI matching, sampling, mask targets), RoIAlign (box and mask pooling),
    heads (box and mask heads and predictors), losses, post-processing (per-class NMS of the detections),
    mask pasting, backward, optimizer (the SGD step).
A stage's time excludes the stages nested in it (the losses called inside the RPN count as losses); "other"
is the rest of the step. Each run is one profiled call after three warm-up calls.

Convolutions: their multiply-adds (from the shapes the profiler records: N Cout Hout Wout Cin/groups kh kw
for the forward, and that again for each of the input and weight gradients a backward computes) over the
time of aten::convolution and aten::convolution_backward (layout changes included).
Peak = cores x GHz x FMA units x 16 float32 lanes (AVX-512) x 2 flops; the GHz and FMA units are
arguments (lscpu in a VM rarely gives the turbo clock), and the assumption is printed.
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import build_models, coffee_image  # noqa: E402
from bench_training import build_pair, samples, step_function  # noqa: E402

import model as model_module  # noqa: E402
from config import ShapesConfig  # noqa: E402

# model.py's functions, by stage (wrapped in the module's globals, where the model looks them up).
FUNCTION_STAGES = {
    "preprocess": ["preprocess"],
    "targets": ["assign_targets", "sample_balanced", "mask_targets"],
    "losses": ["rpn_losses", "fastrcnn_losses", "mask_loss"],
    "mask pasting": ["paste_masks"],
}
STAGE_PREFIX = "stage: "


def ranged(stage: str, fn):
    def wrapper(*args, **kwargs):
        with record_function(STAGE_PREFIX + stage):
            return fn(*args, **kwargs)
    return wrapper


def wrap_functions():
    for stage, names in FUNCTION_STAGES.items():
        for name in names:
            setattr(model_module, name, ranged(stage, getattr(model_module, name)))


def add_ranges(model):
    """record_function ranges around the modules of each stage, and around the RoI heads' sampling and
    post-processing (methods, wrapped on the instance)."""
    heads = model.roi_heads
    modules = {
        "backbone": [model.backbone.body], "FPN": [model.backbone.fpn], "RPN": [model.rpn],
        "RoIAlign": [heads.box_roi_pool, heads.mask_roi_pool],
        "heads": [heads.box_head, heads.box_predictor, heads.mask_head, heads.mask_predictor],
    }
    for stage, group in modules.items():
        for module in group:
            module.register_forward_pre_hook(lambda m, args, stage=stage: enter(m, stage))
            module.register_forward_hook(lambda m, args, out: exit_(m))
    heads.select_training_samples = ranged("targets", heads.select_training_samples)
    heads.postprocess_detections = ranged("post-processing", heads.postprocess_detections)


_open = defaultdict(list)  # module -> the record_function contexts it has entered


def enter(module, stage):
    context = record_function(STAGE_PREFIX + stage)
    context.__enter__()
    _open[module].append(context)


def exit_(module):
    _open[module].pop().__exit__(None, None, None)


def stage_times(prof) -> dict:
    """Exclusive milliseconds of each stage (its range's time less that of the stage ranges inside it)."""
    times = defaultdict(float)

    def visit(event, stage):
        name = event.name
        inner = name[len(STAGE_PREFIX):] if name.startswith(STAGE_PREFIX) else stage
        if inner != stage:
            times[inner] += event.cpu_time_total / 1e3
            if stage is not None:
                times[stage] -= event.cpu_time_total / 1e3
        for child in event.cpu_children:
            visit(child, inner)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, None)
    return times


def conv_work(prof) -> tuple[float, float]:
    """(multiply-adds, seconds) of the convolutions the profiler saw (aten::convolution and
    aten::convolution_backward, inclusive times). A forward does numel(output) x Cin/groups x kh x kw
    multiply-adds (numel(input) x Cout/groups x kh x kw for a transposed conv, whose weight is
    [Cin, Cout/groups, kh, kw]); a backward as many for each of the input and weight gradients it
    computes (its output_mask)."""
    macs = seconds = 0.0
    for event in prof.events():
        if event.name not in ("aten::convolution", "aten::convolution_backward"):
            continue
        if event.cpu_parent is not None and event.cpu_parent.name == event.name:
            continue
        seconds += event.cpu_time_total / 1e6
        if event.name == "aten::convolution":
            x, weight = event.input_shapes[:2]
            stride, padding, dilation, transposed = event.concrete_inputs[3:7]
            if transposed:
                macs += prod(x) * prod(weight[1:])
                continue
            out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                   for size, k, s, p, d in zip(x[2:], weight[2:], stride, padding, dilation)]
            macs += x[0] * weight[0] * prod(out) * prod(weight[1:])
            continue
        grad_output, x, weight = event.input_shapes[:3]
        transposed, mask = event.concrete_inputs[7], event.concrete_inputs[10]
        macs += prod(x if transposed else grad_output) * prod(weight[1:]) * (bool(mask[0]) + bool(mask[1]))
    return macs, seconds


def prod(values) -> float:
    result = 1.0
    for v in values:
        result *= v
    return result


def profiled(fn, warmup: int = 3):
    """A profile of one call of fn, after `warmup` calls: oneDNN makes its kernels for each new shape at
    the first calls, and the first SGD step allocates the momentum buffers."""
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return prof


def report(title: str, prof, peak_gflops: float, assumption: str):
    times = stage_times(prof)
    total = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e3
    times["other"] = total - sum(times.values())
    print(f"### {title}: {total / 1e3:.2f} s")
    print()
    print("| stage | ms | share |")
    print("|---|---:|---:|")
    order = ["preprocess", "backbone", "FPN", "RPN", "targets", "RoIAlign", "heads", "losses", "post-processing",
             "mask pasting", "backward", "optimizer", "other"]
    for stage in order:
        if stage in times:
            print(f"| {stage} | {times[stage]:.0f} | {100 * times[stage] / total:.1f}% |")
    macs, seconds = conv_work(prof)
    rate = 2 * macs / seconds / 1e9
    print()
    share = 100 * seconds * 1e3 / total
    print(f"Convolutions: {macs / 1e9:.1f} G multiply-adds in {seconds:.2f} s ({share:.0f}% of the time): "
          f"{rate:.0f} GFLOP/s, {100 * rate / peak_gflops:.0f}% of the {peak_gflops:.0f} GFLOP/s peak "
          f"({assumption}).")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="inference,shapes,coco")
    parser.add_argument("--ghz", type=float, default=2.1, help="sustained clock of the cores (default: lscpu's "
                        "BogoMIPS / 2000, the base clock in a KVM guest)")
    parser.add_argument("--fma-units", type=int, default=2, help="AVX-512 FMA units per core (2 on Xeon Gold and "
                        "Platinum)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = torch.get_num_threads()
    peak = cores * args.ghz * args.fma_units * 16 * 2
    assumption = f"{cores} cores x {args.ghz} GHz x {args.fma_units} FMA units x 16 lanes x 2"
    wrap_functions()
    cpu = torch.device("cpu")
    for run in args.runs.split(","):
        if run == "inference":
            _, ours = build_models(cpu)
            add_ranges(ours)
            image = coffee_image(800, 1066, cpu)
            with torch.inference_mode():
                prof = profiled(lambda model=ours, image=image: model([image]))
            report("Inference, 800x1066, batch 1", prof, peak, assumption)
            continue
        ours, _ = build_pair(run)
        add_ranges(ours)
        images, targets = samples(run, ShapesConfig.BATCH_SIZE if run == "shapes" else 2)
        prof = profiled(step_function(ours, images, targets, stage=lambda name: record_function(STAGE_PREFIX + name)))
        report(f"Training step, {run} configuration", prof, peak, assumption)


if __name__ == "__main__":
    main()
