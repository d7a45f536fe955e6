"""Times our NMS and RoIAlign kernels against torchvision's, in one process, on the same inputs.

    python bench/bench_kernels.py                 # CPU (and the GPU tables when CUDA is available)
    python bench/bench_kernels.py --device cpu --repeats 5
    python bench/bench_kernels.py --device cpu --bicubic   # our RoIAlign, bicubic against bilinear

Prints a markdown table per device and dtype: median milliseconds for torchvision and for us, and
the ratio torchvision / ours (above 1 means we are faster). With --bicubic the table is our RoIAlign
with interpolation="bicubic" against our bilinear one (torchvision has no bicubic RoIAlign), and the
ratio is bicubic / bilinear. Inputs are shaped like Mask R-CNN's:
RPN-like clusters of boxes in an 800x1344 image, and a P2-sized feature map (stride 4) of 256 channels
with RoIs of 16 to 512 pixels, pooled to the box head's 7x7 and the mask head's 14x14.
"""

import argparse
import datetime
import os
import platform
import sys

import torch
import torchvision
from torchvision import ops as tv_ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402

import nms as our_nms  # noqa: E402
import roialign as our_roialign  # noqa: E402

IMAGE_H, IMAGE_W = 800, 1344


def clustered_boxes(n, generator, device, dtype):
    """n boxes in clusters of about 10 jittered copies, like RPN proposals around objects."""
    centres = torch.rand(max(n // 10, 1), 2, generator=generator) * torch.tensor([IMAGE_W, IMAGE_H])
    sizes = 16 * 32 ** torch.rand(centres.shape[0], 2, generator=generator)  # 16 to 512 px
    pick = torch.randint(0, centres.shape[0], (n,), generator=generator)
    centre = centres[pick] + torch.randn(n, 2, generator=generator) * sizes[pick] * 0.1
    size = sizes[pick] * (1 + 0.1 * torch.randn(n, 2, generator=generator)).clamp(min=0.5)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    scores = torch.rand(n, generator=generator)
    return boxes.to(device, dtype), scores.to(device, dtype)


def rois_on_map(k, batch, generator, device, dtype):
    boxes, _ = clustered_boxes(k, generator, "cpu", torch.float32)
    index = torch.randint(0, batch, (k, 1), generator=generator).float()
    return torch.cat([index, boxes], dim=1).to(device, dtype)


def cases(device, dtype, generator, nms_sizes=(1000, 5000, 20000), batched_sizes=(5000, 20000),
          roi_counts=(1000, 4000), feature_shape=(2, 256, IMAGE_H // 4, IMAGE_W // 4)):
    """(name, torchvision's fn, our fn) for every row of the table. The default sizes are the
    table's; bench/gpu_check.py passes smaller ones for its quick run."""
    rows = []
    threshold = 0.7
    for n in nms_sizes:
        boxes, scores = clustered_boxes(n, generator, device, dtype)
        rows.append((
            f"nms, {n} boxes, IoU {threshold}",
            lambda b=boxes, s=scores, t=threshold: tv_ops.nms(b, s, t),
            lambda b=boxes, s=scores, t=threshold: our_nms.nms(b, s, t),
        ))
    for n in batched_sizes:
        boxes, scores = clustered_boxes(n, generator, device, dtype)
        classes = torch.randint(0, 80, (n,), generator=generator).to(device)
        rows.append((
            f"batched_nms, {n} boxes, 80 classes, IoU 0.5",
            lambda b=boxes, s=scores, c=classes: tv_ops.batched_nms(b, s, c, 0.5),
            lambda b=boxes, s=scores, c=classes: our_nms.batched_nms(b, s, c, 0.5),
        ))
    batch, channels, height, width = shape = feature_shape
    features = torch.randn(batch, channels, height, width, generator=generator).to(device, dtype)
    for k in roi_counts:
        rois = rois_on_map(k, batch, generator, device, dtype)
        for size in (7, 14):
            args = (rois, 0.25, size, size)
            grad = torch.randn(k, channels, size, size, generator=generator).to(device, dtype)
            rows.append((
                f"roi_align forward, {k} RoIs, {size}x{size}",
                lambda a=args: tv_ops.roi_align(features, a[0], (a[2], a[3]), a[1], 2, False),
                lambda a=args: our_roialign.roi_align(features, a[0], (a[2], a[3]), a[1], 2, False),
            ))
            rows.append((
                f"roi_align backward, {k} RoIs, {size}x{size}",
                lambda a=args, g=grad: torch.ops.torchvision._roi_align_backward(g, *a, *shape, 2, False),
                lambda a=args, g=grad: torch.ops.maskrcnn.roi_align_backward(g, *a, *shape, 2, False, False),
            ))
    return rows


def bicubic_cases(device, dtype, generator, roi_counts=(1000, 4000),
                  feature_shape=(2, 256, IMAGE_H // 4, IMAGE_W // 4)):
    """(name, our bilinear fn, our bicubic fn) for the RoIAlign rows of `cases`, forward on an NCHW map
    (which the kernel transposes first, as in `cases`) and on a channels-last one, and backward."""
    batch, channels, height, width = shape = feature_shape

    def forward(x, rois, size, interpolation):
        return lambda: our_roialign.roi_align(x, rois, size, 0.25, 2, False, interpolation)

    def backward(grad, rois, size, interpolation):
        code = our_roialign.INTERPOLATIONS[interpolation]
        return lambda: torch.ops.maskrcnn.roi_align_backward(grad, rois, 0.25, size, size, *shape, 2, False, False,
                                                              code)

    rows = []
    features = torch.randn(batch, channels, height, width, generator=generator).to(device, dtype)
    layouts = {"NCHW": features, "channels-last": features.contiguous(memory_format=torch.channels_last)}
    for k in roi_counts:
        rois = rois_on_map(k, batch, generator, device, dtype)
        for size in (7, 14):
            for layout, x in layouts.items():
                rows.append((f"roi_align forward, {layout}, {k} RoIs, {size}x{size}",
                             forward(x, rois, size, "bilinear"), forward(x, rois, size, "bicubic")))
            grad = torch.randn(k, channels, size, size, generator=generator).to(device, dtype)
            rows.append((f"roi_align backward, {k} RoIs, {size}x{size}",
                         backward(grad, rois, size, "bilinear"), backward(grad, rois, size, "bicubic")))
    return rows


def measure(device, dtype, repeats, warmup=1, make_cases=cases, **sizes):
    """One dict per case: {"case", "torchvision_ms", "ours_ms", "ratio"} (torchvision / ours; None where
    torchvision has no kernel for the dtype). `sizes` go to `make_cases`; with `bicubic_cases`, the
    "torchvision" column is our bilinear RoIAlign and "ours" our bicubic one."""
    generator = torch.Generator().manual_seed(0)
    for name, theirs, ours in make_cases(device, dtype, generator, **sizes):
        t_ours = median_seconds(ours, device, repeats, warmup) * 1000
        try:
            t_theirs = median_seconds(theirs, device, repeats, warmup) * 1000
        except (RuntimeError, NotImplementedError):  # e.g. no bfloat16 kernel in torchvision
            t_theirs = None
        ratio = t_theirs / t_ours if t_theirs is not None else None
        yield {"case": name, "torchvision_ms": t_theirs, "ours_ms": t_ours, "ratio": ratio}


def table_row(row) -> str:
    if row["torchvision_ms"] is None:
        return f"| {row['case']} | not supported | {row['ours_ms']:.2f} | - |"
    return f"| {row['case']} | {row['torchvision_ms']:.2f} | {row['ours_ms']:.2f} | {row['ratio']:.1f}x |"


def bicubic_table_row(row) -> str:
    bilinear, bicubic = row["torchvision_ms"], row["ours_ms"]
    return f"| {row['case']} | {bilinear:.2f} | {bicubic:.2f} | {bicubic / bilinear:.2f}x |"


def table(device, dtype, repeats, bicubic=False):
    header = ("| case | bilinear ms | bicubic ms | bicubic / bilinear |" if bicubic
              else "| case | torchvision ms | ours ms | torchvision / ours |")
    lines = [f"### {device.type}, {str(dtype).replace('torch.', '')}", "", header, "|---|---:|---:|---:|"]
    rows = measure(device, dtype, repeats, make_cases=bicubic_cases if bicubic else cases)
    for row in rows:
        lines.append(bicubic_table_row(row) if bicubic else table_row(row))
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--bicubic", action="store_true",
                        help="time our bicubic RoIAlign against our bilinear one instead of torchvision")
    args = parser.parse_args()
    runs = []
    if args.device in ("cpu", "all"):
        runs.append((torch.device("cpu"), torch.float32))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        runs += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.bfloat16)]
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"{datetime.date.today()}, {machine}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for device, dtype in runs:
        print()
        print(table(device, dtype, args.repeats, args.bicubic))


if __name__ == "__main__":
    main()
