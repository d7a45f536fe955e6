"""detect.py on a large photo: peak memory (resident set) and time of the command line on a synthetic
6000x4000 JPEG with hundreds of objects, cut into tiles.

    python bench/bench_detect.py                       # 6000x4000, 400 objects, default tiling, batch 1
    python bench/bench_detect.py --batch 4 --tile 1333

The model is a small random Mask R-CNN (ResNet-18 FPN, COCO's image sizes 800 / 1333, random norms and
sharpened class and objectness logits as in tests/helpers_model.py, so that it reports the 100
detections a tile allows). detect.py runs in a subprocess; its peak resident set is the parent's
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss once it has ended.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers_model import make_detecting  # noqa: E402

from config import Config  # noqa: E402
from model import MaskRCNN  # noqa: E402


def synthetic_photo(height, width, objects, seed=0) -> Image.Image:
    """A smooth random background with `objects` filled ellipses and rectangles of 40 to 300 pixels."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 200 + 2, width // 200 + 2, 3)) * 255).astype(np.uint8)
    photo = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(photo)
    for _ in range(objects):
        w, h = rng.integers(40, 300, 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return photo


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        text = f.read()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in text else 'no AVX-512'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tile", type=int, help="detect.py --tile (default: its own choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        config = Config(BACKBONE="resnet18", NORM="gn", NUM_CLASSES=5, FPN_CHANNELS=64, BOX_HEAD_DIM=256,
                        MASK_HEAD_CHANNELS=64, MASK_HEAD_CONVS=2)
        model = make_detecting(MaskRCNN(config))
        weights = os.path.join(work, "last.pth")
        torch.save({"model": model.state_dict(), "config": config.to_dict()}, weights)
        photo = os.path.join(work, "photo.jpg")
        synthetic_photo(args.height, args.width, args.objects).save(photo, quality=90)
        out = os.path.join(work, "out")
        command = [sys.executable, os.path.join(ROOT, "detect.py"), "--weights", weights, "--input", photo,
                   "--out", out, "--batch", str(args.batch), "--device", args.device]
        command += ["--tile", str(args.tile)] if args.tile else []
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
        with open(os.path.join(out, "detections.json")) as f:
            detections = len(json.load(f))
    shown = " ".join(c if c not in (weights, photo, out) else os.path.basename(c) for c in command[1:])
    print(f"{datetime.date.today()} {cpu_name()}; torch {torch.__version__}, Python {platform.python_version()}")
    print(f"python {shown}")
    print(f"{args.width}x{args.height}, {args.objects} objects drawn: {detections} detections (score >= 0.5) "
          f"in {seconds:.0f} s, peak resident set {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
