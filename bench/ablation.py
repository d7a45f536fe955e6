"""Do the original implementation's claims hold? Trains every arm on the shapes data set with the same
iteration budget and seeds, evaluates each run with COCOeval, and compares each arm with the baseline.

    python bench/ablation.py                                   # every arm, 3 seeds, 300 steps: ~100 min on 2 CPU cores
    python bench/ablation.py --arms baseline,focal_rpn --seeds 0,1,2,3,4 --iters 500
    python bench/ablation.py --device cuda --jobs 9            # on a GPU, nine runs at a time

The claims (matterport's README, of its RoIAlign and losses): a bicubic RoIAlign "offers a slightly better
result, however not enough to justify the additional complexity", and focal loss helps single-stage
detectors more than two-stage ones, whose sampling already balances the classes. The arms:

  baseline              bilinear RoIAlign, cross-entropy losses (the shapes preset as it is)
  bicubic_mask          bicubic RoIAlign for the mask head's pooling only
  bicubic_both          bicubic RoIAlign for the box and the mask pooling
  focal_rpn             sigmoid focal loss for the RPN's objectness (FOCAL_GAMMA 2, no alpha)
  focal_classifier      softmax focal loss for the box classifier
  focal_mask            sigmoid focal loss on the mask logits
  mask_28               28x28 pooled masks (56x56 predictions) instead of 14x14 (28x28), for scale
  all_anchors           the imbalance made strong: the RPN loss over every anchor of the image (4,096
                        sampled per image: about 1 positive to 100 negatives) instead of 128 sampled at
                        up to half positives, with cross-entropy, as a single-stage detector sees it
  all_anchors_focal     the same with focal loss: where focal loss should help, if anywhere
  all_anchors_retinanet the same with RetinaNet's whole recipe: focal loss with alpha 0.25, summed and
                        divided by the positives (not a mean over the 4,096 anchors, which dilutes the
                        focal term ~100-fold), the objectness starting at a 0.01 prior

Every run is `train.py --config shapes` with SEED set to the seed and MAX_ITERS to --iters (the cosine
schedule ends there), on the same data (data/shapes, written once if missing). The arms of one seed
share the initial weights and the order of the batches, so differences to the baseline are paired by
seed: for each arm the table gives the mean and standard deviation over seeds of segm AP, AP75, APs and
Boundary AP, and the mean paired difference to the baseline with its 95% t-interval over seeds.

Runs whose metrics.json exists are not run again, so an interrupted ablation continues where it stopped
(delete --out to start over); --report summarises the finished runs and trains nothing. Results:
OUT/ablation.json and OUT/ablation.md (default runs/ablation).
"""

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional

from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import machine_description  # noqa: E402

import shapes  # noqa: E402
import utils  # noqa: E402

ARMS = {
    "baseline": [],
    "bicubic_mask": ["POOL_INTERPOLATION=('bilinear', 'bicubic')"],
    "bicubic_both": ["POOL_INTERPOLATION=bicubic"],
    "focal_rpn": ["RPN_FOCAL_LOSS=True"],
    "focal_classifier": ["BOX_FOCAL_LOSS=True"],
    "focal_mask": ["MASK_FOCAL_LOSS=True"],
    "mask_28": ["MASK_POOL_SIZE=28"],
    # A 128 px image has 4,092 anchors (5 levels, 3 ratios), so 4,096 per image samples all of them.
    "all_anchors": ["RPN_BATCH_SIZE_PER_IMAGE=4096"],
    "all_anchors_focal": ["RPN_BATCH_SIZE_PER_IMAGE=4096", "RPN_FOCAL_LOSS=True"],
    "all_anchors_retinanet": ["RPN_BATCH_SIZE_PER_IMAGE=4096", "RPN_FOCAL_LOSS=True", "FOCAL_ALPHA=0.25",
                              "RPN_OBJECTNESS_NORMALISER=positives", "RPN_PRIOR_PROBABILITY=0.01"],
}
# Arms whose claim is about another arm than the baseline: focal loss should pay where the RPN is imbalanced,
# so those arms are also compared, seed by seed, with the imbalanced cross-entropy arm.
REFERENCES = {"all_anchors_focal": "all_anchors", "all_anchors_retinanet": "all_anchors"}
# The figures compared: (metrics.json section, key) -> column name.
METRICS = {("segm", "AP"): "segm AP", ("segm", "AP75"): "segm AP75", ("segm", "APs"): "segm APs",
           ("boundary", "AP"): "Boundary AP"}  # fmt: skip


def run_folder(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, arm, f"seed{seed}")


def train_arm(arm: str, seed: int, args, threads: int) -> dict:
    """Trains and evaluates one run (a subprocess: train.py exactly as a user runs it); returns its metrics."""
    folder = run_folder(args.out, arm, seed)
    metrics_file = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics_file):
        settings = [f"SEED={seed}", f"MAX_ITERS={args.iters}", f"CHECKPOINT_PERIOD={args.iters}", *ARMS[arm], *args.set]
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "shapes", "--data", args.data,
                   "--out", folder, "--overwrite", "--set", *settings]
        if args.device:
            command += ["--device", args.device]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(args.out, f"{arm}_seed{seed}.log"), "w") as log:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f"{arm}, seed {seed}: train.py exited {result.returncode}; see "
                               f"{os.path.join(args.out, f'{arm}_seed{seed}.log')}")
    with open(metrics_file) as f:
        metrics = json.load(f)
    row = {"arm": arm, "seed": seed, "train_seconds": metrics["train_seconds"]}
    for (section, key), name in METRICS.items():
        row[name] = metrics[section][key] if section in metrics else math.nan
    return row


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval) of per-seed differences; half-width nan for one seed."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return mean, stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)


def paired_difference(own: list[dict], reference: str, name: str, by_run: dict) -> Optional[tuple[float, float]]:
    """paired_interval of metric `name` of the runs `own` minus the `reference` arm's run of the same seed
    (seeds the reference lacks are left out); None when no seed has both."""
    paired = [row[name] - by_run[reference, row["seed"]][name] for row in own if (reference, row["seed"]) in by_run]
    return paired_interval(paired) if paired else None


def summarise(rows: list[dict], arms: list[str]) -> list[dict]:
    """Per arm: mean and sd over seeds of each metric, the paired difference to the baseline and, for the
    arms in REFERENCES, to their reference arm."""
    by_run = {(row["arm"], row["seed"]): row for row in rows}
    summary = []
    for arm in arms:
        own = [row for row in rows if row["arm"] == arm]
        if not own:
            continue
        entry = {"arm": arm, "seeds": len(own), "train s": sum(r["train_seconds"] for r in own) / len(own)}
        for name in METRICS.values():
            values = [row[name] for row in own]
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            entry[name] = (mean, sd)
            entry[f"{name} vs baseline"] = None if arm == "baseline" else paired_difference(own, "baseline", name,
                                                                                             by_run)
            if arm in REFERENCES:
                entry["reference"] = REFERENCES[arm]
                entry[f"{name} vs reference"] = paired_difference(own, REFERENCES[arm], name, by_run)
        summary.append(entry)
    return summary


def plus_minus(value: float, spread: float, form: str) -> str:
    """'0.312 ± 0.004', or the value alone where one seed gives no spread."""
    return form.format(value) if math.isnan(spread) else f"{form.format(value)} ± {spread:.3f}"


def markdown(summary: list[dict], command: str, machine: dict, seconds: float, report: bool) -> str:
    where = "summarised on" if report else f"{seconds / 60:.0f} min in all on"
    lines = [f"`{command}`: {where} {', '.join(f'{k}: {v}' for k, v in machine.items())}.", "",
             "Mean ± sd over seeds; vs baseline: the mean of the differences to the baseline of the same seed ± the "
             "half-width of its 95% t-interval (the value alone for one seed).", ""]
    columns = list(METRICS.values())
    lines.append("| arm | seeds | train s | " + " | ".join(f"{c} | vs baseline" for c in columns) + " |")
    lines.append("|---|---|---|" + "---|---|" * len(columns))
    for entry in summary:
        cells = [entry["arm"], str(entry["seeds"]), f"{entry['train s']:.0f}"]
        for name in columns:
            cells.append(plus_minus(*entry[name], "{:.3f}"))
            paired = entry[f"{name} vs baseline"]
            cells.append("" if paired is None else plus_minus(*paired, "{:+.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    against = [entry for entry in summary if any(entry.get(f"{name} vs reference") for name in columns)]
    if against:
        lines += ["", "Against their reference arm (REFERENCES), paired by seed in the same way:", "",
                  "| arm | reference | " + " | ".join(f"{c} vs reference" for c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for entry in against:
            cells = [entry["arm"], entry["reference"]]
            for name in columns:
                paired = entry[f"{name} vs reference"]
                cells.append("" if paired is None else plus_minus(*paired, "{:+.3f}"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_list(text: str, name: str, convert=str) -> list:
    try:
        values = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values:
        raise SystemExit(f"{name} must be a comma-separated list; got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--iters", type=int, default=300, help="training steps of every run (default 300)")
    parser.add_argument("--data", default=os.path.join(ROOT, shapes.DEFAULT_ROOT),
                        help="shapes data set (written there first if missing; default data/shapes)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"), help="folder of the runs")
    parser.add_argument("--device", help="cpu or cuda (default: train.py's, cuda when there is one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; on a GPU machine, more)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--report", action="store_true", help="summarise the runs that finished; train nothing")
    args = parser.parse_args(argv)
    arms = parse_list(args.arms, "--arms")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    if "baseline" not in arms:
        arms.insert(0, "baseline")  # every comparison is against it
    seeds = parse_list(args.seeds, "--seeds", int)
    if args.iters < 1 or args.jobs < 1:
        raise SystemExit(f"--iters and --jobs must be at least 1; got {args.iters} and {args.jobs}")

    if not args.report and not os.path.exists(os.path.join(args.data, "annotations", "instances_val.json")):
        print(f"writing the shapes data set to {args.data}", flush=True)
        shapes.generate(args.data)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: a cut-short run has whole seeds
    if args.report:
        runs = [(arm, seed) for arm, seed in runs
                if os.path.exists(os.path.join(run_folder(args.out, arm, seed), "metrics.json"))]
        if not any(arm == "baseline" for arm, _ in runs):
            raise SystemExit(f"--report: no finished baseline run in {args.out}")
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train_arm, arm, seed, args, threads): (arm, seed) for arm, seed in runs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            print(f"[ablation] {row['arm']} seed {row['seed']}: " + ", ".join(
                f"{name} {row[name]:.3f}" for name in METRICS.values()) + f" ({len(rows)}/{len(runs)}, "
                f"{(time.time() - start) / 60:.1f} min)", flush=True)
    seconds = time.time() - start
    summary = summarise(rows, arms)
    command = "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description(args.device or "cpu")
    text = markdown(summary, command.strip(), machine, seconds, args.report)
    utils.atomic_write(os.path.join(args.out, "ablation.md"), lambda f: f.write(text), mode="w")
    report = {"command": command, "machine": machine, "seconds": seconds,
              "runs": sorted(rows, key=lambda r: (r["arm"], r["seed"])), "summary": summary}
    utils.write_json_atomic(os.path.join(args.out, "ablation.json"), report)
    print(text)
    return summary


if __name__ == "__main__":
    main()
