"""Exported models against eager ones on the CPU: onnxruntime running our ONNX export, the torch.export
program (.pt2), our eager MaskRCNN and torchvision's eager maskrcnn_resnet50_fpn, same weights, same image.

    python bench/bench_export.py                        # median of 3, COCO config, coffee at 800x1066
    python bench/bench_export.py --demo runs/demo/last.pth   # also export and check make demo's model

The models are bench_inference.build_models' (torchvision's random weights scaled to make detections,
loaded into ours; torchvision's COCO checkpoint instead when it is in torch's cache), the input
scikit-image's coffee photo at 800x1066 (COCO's size: no further resize). Prints the export times, the
median seconds per image of each runtime, the ratios to our eager model, and how far each export's
detections are from the eager ones (export.compare_detections). With --demo, the checkpoint is exported to
ONNX and checked on scikit-image's photos and on the shapes validation images when data/shapes is there.
"""

import argparse
import datetime
import glob
import os
import platform
import sys
import tempfile
import time

import numpy as np
import onnxruntime
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import build_models, coffee_image  # noqa: E402
from timing import median_seconds  # noqa: E402

import export  # noqa: E402
from model import MaskRCNN  # noqa: E402

COCO_CHECKPOINT = os.path.join(torch.hub.get_dir(), "checkpoints", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")


def report_line(report: dict) -> str:
    return (f"{report['count_got']} detections (eager {report['count_expected']}), largest box difference "
            f"{report['box_error']:.2g} px, score {report['score_error']:.2g}, smallest mask IoU "
            f"{report['min_mask_iou']:.4f}, labels equal: {report['labels_equal']}, same: {report['same']}")


def check_demo(path: str, folder: str, shapes_folder: str) -> None:
    """Exports make demo's checkpoint to ONNX and prints the check on the photos and shapes images."""
    model = MaskRCNN.from_checkpoint(path).eval()
    onnx_path = os.path.join(folder, "demo.onnx")
    start = time.perf_counter()
    export.export_onnx(model, onnx_path)
    print(f"- make demo's model ({path}): ONNX export {time.perf_counter() - start:.0f} s")
    images = export.photos()
    shapes = sorted(glob.glob(os.path.join(shapes_folder, "*.png")))[:5]
    for file in shapes:
        array = torch.from_numpy(np.array(Image.open(file).convert("RGB")))
        images[os.path.basename(file)] = array.permute(2, 0, 1).float() / 255
    if not shapes:
        print(f"  (no images in {shapes_folder}: photos only)")
    for (name, image), report in zip(images.items(),
                                     export.check_export(model, onnx_path, "onnx", list(images.values()))):
        print(f"  - {name} {tuple(image.shape[1:])}: {report_line(report)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", help="make demo's checkpoint (runs/demo/last.pth) to export and check too")
    parser.add_argument("--shapes", default="data/shapes/val", help="with --demo: shapes images to check on too")
    args = parser.parse_args()
    device = torch.device("cpu")
    theirs, ours = build_models(device)
    weights = "random weights scaled to detect (no cached COCO checkpoint)"
    if os.path.exists(COCO_CHECKPOINT):
        state = torch.load(COCO_CHECKPOINT, weights_only=True)
        theirs.load_state_dict(state)
        ours.config.FROZEN_BN_EPS = 0.0
        ours = MaskRCNN(ours.config).eval()
        ours.load_weights(state)
        weights = "torchvision's COCO checkpoint"
    image = coffee_image(800, 1066, device)
    threads = torch.get_num_threads()
    print(f"{datetime.date.today()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{threads} threads each, {weights}, coffee 800x1066, median of {args.repeats}")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, program_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.pt2")
        start = time.perf_counter()
        exported = export.export_program(ours, program_path)
        t_program_export = time.perf_counter() - start
        start = time.perf_counter()
        export.export_onnx(ours, onnx_path, program=exported)
        t_onnx_export = time.perf_counter() - start
        print(f"export: torch.export {t_program_export:.0f} s, then ONNX from it {t_onnx_export:.0f} s "
              f"({os.path.getsize(onnx_path) / 2**20:.0f} MB)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        program = export.load_program(program_path)
        array = image.numpy()
        with torch.inference_mode():
            runs = {
                "torchvision eager": lambda: theirs([image]),
                "ours eager": lambda: export.DetectionProgram(ours)(image),
                "ours torch.export (.pt2)": lambda: program(image),
                "ours ONNX, onnxruntime": lambda: export.run_onnx(session, array),
            }
            seconds = {name: median_seconds(fn, device, args.repeats) for name, fn in runs.items()}
            expected = export.eager_detections(ours, image)
            reports = {"ours torch.export (.pt2)": export.compare_detections(expected, program(image)),
                       "ours ONNX, onnxruntime": export.compare_detections(expected, export.run_onnx(session, array))}
        print()
        print("| runtime | s / image | ours eager / it |")
        print("|---|---:|---:|")
        for name, s in seconds.items():
            print(f"| {name} | {s:.2f} | {seconds['ours eager'] / s:.2f}x |")
        print()
        for name, report in reports.items():
            print(f"- {name} against ours eager: {report_line(report)}")
        if args.demo:
            check_demo(args.demo, folder, args.shapes)


if __name__ == "__main__":
    main()
