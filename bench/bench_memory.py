"""Peak memory (resident set) of model.detect() on one large photo with many detections.

    python bench/bench_memory.py                         # 5000x4000 (20 MP), 80 detections
    python bench/bench_memory.py --size 8000x6000 --detections 100

Each case runs in a fresh process (a subprocess of this script), so that its peak resident set size
(ru_maxrss) is its own. The model is small (ResNet-18, narrow heads; the network sees the photo resized
to 800 x 1000) with DETECTION_MIN_CONFIDENCE = 0, so that a random model makes the asked number of
detections, each pasted at the photo's full size: the masks, not the network, dominate the memory.
Prints, per case, the resident set before detect() (Python, torch, the model and the photo) and the
peak during it, in GB (10^9 bytes).
"""

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_gb() -> float:
    """This process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure(height: int, width: int, detections: int) -> dict:
    """Runs detect() once on a height x width photo with `detections` detections; returns the figures."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    from config import Config
    from model import MaskRCNN

    torch.manual_seed(0)
    config = Config(NUM_CLASSES=4, BACKBONE="resnet18", NORM="gn", FPN_CHANNELS=64, BOX_HEAD_DIM=128,
                    MASK_HEAD_CHANNELS=64, MASK_HEAD_CONVS=2, DETECTION_MIN_CONFIDENCE=0.0,
                    DETECTION_MAX_INSTANCES=detections)
    model = MaskRCNN(config).eval()
    rng = np.random.default_rng(0)
    # A smooth photo-like image: coarse random colours upsampled, plus noise.
    coarse = rng.integers(0, 256, (height // 500 + 2, width // 500 + 2, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 500, axis=0), 500, axis=1)[:height, :width]
    image = np.ascontiguousarray(image ^ rng.integers(0, 16, image.shape, dtype=np.uint8))
    before = peak_gb()
    (result,) = model.detect([image])
    return {"size": f"{width}x{height}", "detections": int(len(result["masks"])),
            "masks_gb": result["masks"].nbytes / 1e9, "before_gb": before, "peak_gb": peak_gb()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="5000x4000", help="photo size, WIDTHxHEIGHT")
    parser.add_argument("--detections", type=int, default=80)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(measure(height, width, args.detections)))
        return
    command = [sys.executable, os.path.abspath(__file__), "--child", "--size", args.size,
               "--detections", str(args.detections)]
    figures = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"detect() on a {figures['size']} photo, {figures['detections']} detections "
          f"(bool masks {figures['masks_gb']:.2f} GB): resident set {figures['before_gb']:.2f} GB before, "
          f"peak {figures['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
