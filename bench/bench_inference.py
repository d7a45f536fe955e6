"""Whole-model inference: our MaskRCNN against torchvision's maskrcnn_resnet50_fpn, same weights,
same images, same process.

    python bench/bench_inference.py                    # CPU, batch 1 and 4, median of 3
    python bench/bench_inference.py --device cuda --repeats 10
    python bench/bench_inference.py --threads 1 --cpu-time --batches 1   # on a CPU shared with other work

torchvision's model gets random weights scaled so that it makes real detections (no weights can be
downloaded here); its state_dict is loaded into ours. The input is scikit-image's coffee photo resized
to a COCO-sized 800x1066 (no further resize in either model). Prints the median seconds per batch,
images per second, the throughput ratio (ours / torchvision, above 1 means we are faster), the peak
memory of each, how far the detections differ, and what detect(..., return_intermediates=True) costs.
"""

import argparse
import datetime
import functools
import os
import platform
import sys

import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

import utils  # noqa: E402
from config import Config  # noqa: E402
from model import MaskRCNN  # noqa: E402


def build_models(device, min_size=800, max_size=1333):
    """torchvision's maskrcnn_resnet50_fpn with random weights that detect things, and ours with its weights;
    both resize images to min_size / max_size."""
    torch.manual_seed(0)
    theirs = make_detecting(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                                  min_size=min_size, max_size=max_size)).eval()
    # Untrained torchvision models use BatchNorm2d (eps 1e-5); ours freezes it with the same eps.
    ours = MaskRCNN(Config(FROZEN_BN_EPS=1e-5, IMAGE_MIN_DIM=min_size, IMAGE_MAX_DIM=max_size))
    ours.load_weights(theirs.state_dict())
    return theirs.to(device).eval(), ours.to(device).eval()


def make_detecting(model):
    """A random torchvision Mask R-CNN (in place) whose norms are not the identity and whose class and
    objectness logits are sharp enough to detect things."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        model.roi_heads.box_predictor.cls_score.weight.mul_(40)  # confident enough to detect things
        model.rpn.head.cls_logits.weight.mul_(30)
    return model


def peak_memory_mb(fn, device):
    """Peak memory of one call: CUDA allocator peak, or on CPU the process's peak resident set
    (reset through /proc/self/clear_refs, Linux only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    fn()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def coffee_image(height, width, device):
    """scikit-image's coffee photo as a 3 x height x width float tensor in [0, 1]."""
    photo = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(photo, size=(height, width), mode="bilinear", align_corners=False)[0].to(device)


def agreement(a, b, min_iou=0.5) -> dict:
    """How far two models' outputs (torchvision's format, one dict per image) agree when they need not
    be identical (another device, another precision): detections of `a` matched greedily, by
    decreasing score, to the unmatched detection of `b` with the same label and the highest box IoU (at
    least `min_iou`). Returns the counts, the fraction of the larger count matched, and over the
    matched pairs the largest box and score differences and the mean and smallest mask IoU."""
    total_a = total_b = matched = 0
    box = score = 0.0
    mask_ious = []
    for x, y in zip(a, b):
        total_a, total_b = total_a + len(x["boxes"]), total_b + len(y["boxes"])
        if not len(x["boxes"]) or not len(y["boxes"]):
            continue
        iou = utils.box_iou(x["boxes"].float(), y["boxes"].float())
        iou[x["labels"][:, None] != y["labels"][None, :]] = -1
        taken = torch.zeros(len(y["boxes"]), dtype=torch.bool, device=iou.device)
        for i in torch.argsort(x["scores"], descending=True).tolist():
            candidates = iou[i].masked_fill(taken, -1)
            j = int(candidates.argmax())
            if candidates[j] < min_iou:
                continue
            taken[j] = True
            matched += 1
            box = max(box, (x["boxes"][i] - y["boxes"][j]).abs().max().item())
            score = max(score, abs(x["scores"][i].item() - y["scores"][j].item()))
            mx, my = x["masks"][i, 0] > 0.5, y["masks"][j, 0] > 0.5
            union = (mx | my).sum().item()
            mask_ious.append((mx & my).sum().item() / union if union else 1.0)
    return {
        "detections": [total_a, total_b],
        "matched_fraction": matched / max(total_a, total_b, 1),
        "max_box_diff_px": box,
        "max_score_diff": score,
        "mean_mask_iou": sum(mask_ious) / len(mask_ious) if mask_ious else 1.0,
        "min_mask_iou": min(mask_ious) if mask_ious else 1.0,
    }


def differences(a, b):
    """Largest box and score differences, label mismatches and mean mask IoU over paired detections."""
    box, score, labels, ious = 0.0, 0.0, 0, []
    for x, y in zip(a, b):
        if len(x["boxes"]) != len(y["boxes"]):
            return f"different numbers of detections: {len(x['boxes'])} and {len(y['boxes'])}"
        box = max(box, (x["boxes"] - y["boxes"]).abs().max().item() if len(x["boxes"]) else 0.0)
        score = max(score, (x["scores"] - y["scores"]).abs().max().item() if len(x["boxes"]) else 0.0)
        labels += int((x["labels"] != y["labels"]).sum())
        mx, my = x["masks"][:, 0] > 0.5, y["masks"][:, 0] > 0.5
        inter = (mx & my).flatten(1).sum(1).float()
        union = (mx | my).flatten(1).sum(1).float().clamp(min=1)
        ious += (inter / union).tolist()
    mean_iou = sum(ious) / max(len(ious), 1)
    return (f"{sum(len(x['boxes']) for x in a)} detections; max box diff {box:.2g} px, max score diff "
            f"{score:.2g}, {labels} label mismatches, mean mask IoU {mean_iou:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="time the process's CPU time, not the wall clock "
                        "(on a CPU shared with other work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    median_seconds = functools.partial(timing.median_seconds, cpu_time=args.cpu_time)
    theirs, ours = build_models(device)
    image = coffee_image(800, 1066, device)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{datetime.date.today()}, {machine}, {os.cpu_count()} cores, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {torch.get_num_threads()} threads, 800x1066 input, median of {args.repeats}"
          f"{' (CPU time)' if args.cpu_time else ''}, load average {os.getloadavg()[0]:.1f}")
    print()
    print("| batch | torchvision s | ours s | torchvision img/s | ours img/s | ours / torchvision | "
          "peak MB torchvision | peak MB ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for batch in (int(b) for b in args.batches.split(",")):
        images = [image.flip(-1) if i % 2 else image for i in range(batch)]
        with torch.inference_mode():
            t_theirs = median_seconds(lambda images=images: theirs(images), device, args.repeats)
            t_ours = median_seconds(lambda images=images: ours(images), device, args.repeats)
            m_theirs = peak_memory_mb(lambda images=images: theirs(images), device)
            m_ours = peak_memory_mb(lambda images=images: ours(images), device)
            notes.append(f"batch {batch}: {differences(theirs(images), ours(images))}")
        print(f"| {batch} | {t_theirs:.2f} | {t_ours:.2f} | {batch / t_theirs:.2f} | {batch / t_ours:.2f} | "
              f"{t_theirs / t_ours:.2f}x | {m_theirs:.0f} | {m_ours:.0f} |", flush=True)
    print()
    for note in notes:
        print(f"- {note}")
    # What asking for the stage views costs, and that not asking costs nothing: detect() on the uint8
    # photo, with and without return_intermediates, against the plain forward.
    array = (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    with torch.inference_mode():
        t_forward = median_seconds(lambda: ours([image]), device, args.repeats)
    t_detect = median_seconds(lambda: ours.detect([array]), device, args.repeats)
    t_stages = median_seconds(lambda: ours.detect([array], return_intermediates=True), device, args.repeats)
    print(f"- ours, batch 1: forward {t_forward:.2f} s, detect() {t_detect:.2f} s, "
          f"detect(return_intermediates=True) {t_stages:.2f} s ({t_stages / t_detect:.2f}x detect)")


if __name__ == "__main__":
    main()
