"""Tests of train.py: a short run and everything it writes, the learning-rate schedule, exact resumption
(after --iters, and after a real SIGKILL, SIGINT or SIGTERM), two processes under torchrun (gloo), the stop
on a non-finite loss, atomic checkpoints, staged training and clear errors on bad input; the output folder
(a fresh run refuses an old one's checkpoints, the lock against a second run, the snapshot written before
last.pth, stale temporaries removed, a truncated last.pth), settings changed on --resume, the data folder
(a mistyped --data is an error); and, in this process, each piece of the loop alone (build_run,
train_step, the checkpoint round trip, TrainingLog, evaluate, StopOnSignal) and MaskRCNN.from_checkpoint.

Everything runs on CPU with a tiny model on a tiny shapes data set (64 px images), one thread per process
(the machine is shared). Expected values are hand-computed from the documented formulas (the SGD update,
the clipped gradient's norm computed here in float64, the learning rate), or come from comparing two ways
of running that must agree bit for bit (an uninterrupted run against a stopped and resumed one, random
numbers drawn after a save and after the restore).
"""

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import coco
import model as model_module
import shapes
import train
from config import Config, named_config
from model import MaskRCNN

REPO = Path(__file__).resolve().parent.parent

# A tiny, fast model; MAX_ITERS=8 with a checkpoint every 2 iterations. Later --set values override these.
SETTINGS = [
    "IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64", "IMAGE_MIN_DIM_TRAIN=(64,)", "FPN_CHANNELS=16", "BOX_HEAD_DIM=32",
    "MASK_HEAD_CHANNELS=16", "MASK_HEAD_CONVS=1", "RPN_PRE_NMS_TOP_N_TRAIN=50", "RPN_POST_NMS_TOP_N_TRAIN=30",
    "RPN_PRE_NMS_TOP_N_TEST=50", "RPN_POST_NMS_TOP_N_TEST=30", "ROI_BATCH_SIZE_PER_IMAGE=16",
    "RPN_BATCH_SIZE_PER_IMAGE=32", "BATCH_SIZE=2", "NUM_WORKERS=0", "MAX_ITERS=8", "WARMUP_ITERS=2", "LOG_PERIOD=1",
    "CHECKPOINT_PERIOD=2", "LEARNING_RATE=0.01",
]  # fmt: skip
LOSS_KEYS = {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
STAT_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): the machine has 2 busy cores, and the
    in-process runs are compared bit for bit with subprocess runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(module_tmp_path):
    """A tiny shapes data set: 16 training and 4 validation images of 64x64."""
    root = module_tmp_path / "shapes"
    shapes.generate(root, train=16, val=4, size=64, seed=0)
    return root


def train_args(data, out, *settings, resume=False, iters=None):
    args = ["--config", "shapes", "--data", str(data), "--out", str(out)]
    if resume:
        args.append("--resume")
    if iters is not None:
        args += ["--iters", str(iters)]
    if settings:
        args += ["--set", *settings]
    return args


def run(data, out, *settings, resume=False, iters=None):
    """train.py in this process: the full SETTINGS plus `settings` on a fresh run; only `settings` on
    resume (the checkpoint holds the rest)."""
    train.main(train_args(data, out, *(settings if resume else (*SETTINGS, *settings)), resume=resume,
                          iters=iters))


def load(path):
    """A checkpoint as --resume and from_checkpoint load it: tensors and plain types only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def initial_weights(*settings):
    """The weights train.py starts from: it seeds torch with SEED + rank right before building the model."""
    config = named_config("shapes").override([*SETTINGS, *settings])
    torch.manual_seed(config.SEED)
    return MaskRCNN(config).state_dict()


def log_records(out):
    with open(Path(out) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def training_records(out):
    return [r for r in log_records(out) if "loss" in r]


def different(a: dict, b: dict, prefix=""):
    """Names (starting with `prefix`) of the tensors that differ between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert different(a, b) == []


def assert_same_momentum(a: dict, b: dict):
    """Two optimizer state dicts have the same momentum buffers (bit for bit) for the same parameters."""
    assert a["state"].keys() == b["state"].keys()
    assert len(a["state"]) > 0
    for index in a["state"]:
        assert torch.equal(a["state"][index]["momentum_buffer"], b["state"][index]["momentum_buffer"]), index


def leftovers(out):
    """Temporary files left in an output folder."""
    return sorted(p.name for p in Path(out).iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def reference(data, module_tmp_path):
    """An uninterrupted run of SETTINGS (8 iterations), the reference for the resumed ones."""
    out = module_tmp_path / "reference"
    out.mkdir()
    run(data, out)
    return out


############################################################
#  Learning rate
############################################################


def test_lr_factor_step_schedule_with_warmup():
    config = Config(WARMUP_ITERS=4, WARMUP_FACTOR=0.1, LR_SCHEDULE="step", LR_STEPS=(6, 8), LR_GAMMA=0.1,
                    MAX_ITERS=10)
    # warm-up: 0.1 * (1 - it / 4) + it / 4 until iteration 4; then x 0.1 at 6 and again at 8.
    expected = {0: 0.1, 1: 0.325, 2: 0.55, 3: 0.775, 4: 1.0, 5: 1.0, 6: 0.1, 7: 0.1, 8: 0.01, 10: 0.01}
    assert {it: train.lr_factor(it, config) for it in expected} == pytest.approx(expected, rel=1e-12)


def test_lr_factor_cosine_schedule_with_warmup():
    config = Config(WARMUP_ITERS=4, WARMUP_FACTOR=0.1, LR_SCHEDULE="cosine", MAX_ITERS=10)
    # warm-up as above times 0.5 * (1 + cos(pi * it / 10)), 0 from MAX_ITERS on:
    # it 2: 0.55 * 0.5 * (1 + cos(0.2 pi)) = 0.55 * 0.9045084972 = 0.4974796735
    # it 4: 0.5 * (1 + cos(0.4 pi)) = 0.6545084972;  it 5: 0.5;  it 8: 0.5 * (1 + cos(0.8 pi)) = 0.0954915028
    expected = {0: 0.1, 2: 0.4974796735, 4: 0.6545084972, 5: 0.5, 8: 0.0954915028, 10: 0.0, 12: 0.0}
    got = {it: train.lr_factor(it, config) for it in expected}
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


############################################################
#  A short run and its outputs
############################################################


def test_short_run_writes_logs_checkpoints_and_metrics(reference):
    out = reference
    records = training_records(out)
    assert [r["iteration"] for r in records] == list(range(1, 9))
    for record in records:
        assert LOSS_KEYS | {"iteration", "lr", "images_per_second"} <= record.keys()
        assert all(math.isfinite(record[k]) for k in LOSS_KEYS)
        assert record["images_per_second"] > 0
    # The lr logged at iteration k is the one set for the next step: LEARNING_RATE * lr_factor(k) with the
    # shapes config's cosine schedule, WARMUP_FACTOR 0.001, WARMUP_ITERS 2, MAX_ITERS 8:
    # k=1: 0.01 * (0.001 * 0.5 + 0.5) * 0.5 * (1 + cos(pi / 8)) = 0.01 * 0.5005 * 0.9619397663
    # k=2: 0.01 * 0.5 * (1 + cos(pi / 4)) = 0.01 * 0.8535533906;  k=4: 0.01 * 0.5;  k=8: 0
    lrs = {r["iteration"]: r["lr"] for r in records}
    expected = {1: 0.004814508530, 2: 0.008535533906, 4: 0.005, 8: 0.0}
    assert {k: lrs[k] for k in expected} == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # lr rises during warm-up, then only falls.
    assert lrs[1] < lrs[2] and all(lrs[k] > lrs[k + 1] for k in range(2, 8))

    checkpoint = load(out / "last.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "rng", "config"} <= checkpoint.keys()
    assert checkpoint["iteration"] == 8
    assert checkpoint["config"]["MAX_ITERS"] == 8 and checkpoint["config"]["FPN_CHANNELS"] == 16
    assert len(checkpoint["rng"]) == 1 and {"torch", "numpy", "python"} <= checkpoint["rng"][0].keys()
    assert checkpoint["scheduler"]["last_epoch"] == 8
    for iteration in (2, 4, 6, 8):
        assert load(out / f"model_{iteration:07d}.pth")["iteration"] == iteration
    assert not (out / "model_0000001.pth").exists() and not (out / "model_0000003.pth").exists()
    assert_same_state(load(out / "model_0000008.pth")["model"], checkpoint["model"])
    assert list(out.glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["LEARNING_RATE"] == 0.01

    # Every weight trained (all stages train in the shapes config; weight decay moves even unused ones).
    initial = initial_weights()
    weights = [k for k in initial if k.endswith(".weight")]
    assert weights
    assert [k for k in weights if torch.equal(initial[k], checkpoint["model"][k])] == []

    metrics = json.loads((out / "metrics.json").read_text())
    for kind in ("bbox", "segm"):
        assert STAT_KEYS <= metrics[kind].keys()
        assert all(-1.0 <= metrics[kind][k] <= 1.0 for k in STAT_KEYS)
    assert metrics["train_seconds"] > 0 and metrics["iteration"] == 8
    # AP per class of the shapes data set, each None (no detection matched) or a fraction.
    for kind in ("bbox", "segm"):
        table = metrics["per_class"][kind]
        assert sorted(table) == sorted(shapes.CLASSES)
        assert all(row[stat] is None or 0.0 <= row[stat] <= 1.0 for row in table.values() for stat in ("AP", "AP50"))
    evaluations = [r for r in log_records(out) if "eval" in r]
    assert len(evaluations) == 1 and evaluations[0]["iteration"] == 8
    assert evaluations[0]["eval"]["bbox"] == metrics["bbox"]
    assert leftovers(out) == []


############################################################
#  Resuming
############################################################


def test_resume_after_iters_is_bit_for_bit_the_same_run(data, reference, tmp_path):
    out = tmp_path / "b"
    run(data, out, iters=3)
    first = load(out / "last.pth")
    assert first["iteration"] == 3
    assert not (out / "metrics.json").exists()  # the final evaluation is for MAX_ITERS only
    # The rest with a data-loading worker process: the data and the random streams must not depend on it.
    run(data, out, "NUM_WORKERS=1", resume=True)

    a, b = load(reference / "last.pth"), load(out / "last.pth")
    assert b["iteration"] == 8 and b["config"]["NUM_WORKERS"] == 1
    assert_same_state(a["model"], b["model"])
    assert_same_momentum(a["optimizer"], b["optimizer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # One log line per iteration, with the same losses as the uninterrupted run.
    records = training_records(out)
    assert [r["iteration"] for r in records] == list(range(1, 9))
    keys = LOSS_KEYS | {"lr"}
    assert [{k: r[k] for k in keys} for r in records] == [{k: r[k] for k in keys} for r in training_records(reference)]
    assert json.loads((out / "metrics.json").read_text())["segm"] == json.loads(
        (reference / "metrics.json").read_text())["segm"]


def kill_after(data, out, max_iters, min_iteration=3, timeout=240, sig=signal.SIGKILL, processes=1, settings=()):
    """Starts `python train.py` (under torchrun with several `processes`) and sends it (the launcher) `sig`
    once its log reports `min_iteration`. Returns False if it finished first."""
    out.mkdir(parents=True)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    with open(out.parent / f"{out.name}.stderr", "w") as stderr:
        process = subprocess.Popen(
            [*launcher, "train.py", *train_args(data, out, *SETTINGS, f"MAX_ITERS={max_iters}", *settings)],
            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                logged = []
                if (out / "log.jsonl").exists():
                    for line in (out / "log.jsonl").read_text().splitlines():
                        try:
                            logged.append(json.loads(line).get("iteration", 0))
                        except json.JSONDecodeError:  # a line being written
                            pass
                if max(logged, default=0) >= min_iteration:
                    process.send_signal(sig)
                    process.wait(timeout=timeout)
                    if processes == 1 and sig in (signal.SIGINT, signal.SIGTERM):  # it saves, exits as killed
                        assert process.returncode == 128 + sig, (out.parent / f"{out.name}.stderr").read_text()[-3000:]
                    return True
                time.sleep(0.02)
            if process.poll() is None:
                pytest.fail(f"train.py logged no iteration {min_iteration} in {timeout} s")
            assert process.returncode == 0, (out.parent / f"{out.name}.stderr").read_text()[-3000:]
            return False
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_resume_after_sigkill_is_bit_for_bit_the_same_run(data, reference, tmp_path):
    out, max_iters = tmp_path / "killed", 8
    if not kill_after(data, out, max_iters) or load(out / "last.pth")["iteration"] == max_iters:
        # It finished before it could be killed: again with a run long enough to be caught halfway.
        out, max_iters = tmp_path / "killed_long", 40
        assert kill_after(data, out, max_iters), "train.py finished twice before it could be killed"
    checkpoint = load(out / "last.pth")  # the newest complete checkpoint, whatever the kill interrupted
    assert checkpoint["iteration"] % 2 == 0 and 2 <= checkpoint["iteration"] < max_iters
    run(data, out, resume=True)

    if max_iters == 8:
        expected = reference
    else:
        expected = tmp_path / "uninterrupted"
        run(data, expected, f"MAX_ITERS={max_iters}")
    final = load(out / "last.pth")
    assert final["iteration"] == max_iters
    assert_same_state(load(expected / "last.pth")["model"], final["model"])
    assert_same_momentum(load(expected / "last.pth")["optimizer"], final["optimizer"])
    assert [r["iteration"] for r in training_records(out)] == list(range(1, max_iters + 1))


def test_ctrl_c_finishes_the_step_saves_and_resumes_bit_for_bit(data, reference, tmp_path):
    out = tmp_path / "sigint"
    if not kill_after(data, out, 8, sig=signal.SIGINT):
        pytest.skip("train.py finished before the interrupt could be sent")
    stopped = load(out / "last.pth")["iteration"]
    assert 3 <= stopped <= 8  # saved right after the step that was running, not at the last period
    assert [r["iteration"] for r in training_records(out)][-1] <= stopped
    run(data, out, resume=True)
    assert_same_state(load(reference / "last.pth")["model"], load(out / "last.pth")["model"])
    assert [r["iteration"] for r in training_records(out)] == list(range(1, 9))


def test_sigterm_finishes_the_step_saves_and_resumes_bit_for_bit(data, reference, tmp_path):
    # A cluster pre-empts a job with SIGTERM: the same as Ctrl-C, exit status 128 + 15.
    out = tmp_path / "sigterm"
    if not kill_after(data, out, 8, sig=signal.SIGTERM):
        pytest.skip("train.py finished before SIGTERM could be sent")
    stopped = load(out / "last.pth")["iteration"]
    assert 3 <= stopped <= 8
    assert "SIGTERM: saving iteration" in (tmp_path / "sigterm.stderr").read_text()
    run(data, out, resume=True)
    assert_same_state(load(reference / "last.pth")["model"], load(out / "last.pth")["model"])
    assert [r["iteration"] for r in training_records(out)] == list(range(1, 9))


def test_sigterm_to_torchrun_stops_every_process_after_the_same_step_and_saves(data, tmp_path):
    # torchrun passes SIGTERM on to its workers; they agree on the step to stop after and save it (only
    # the save on a signal can write last.pth here: CHECKPOINT_PERIOD is beyond MAX_ITERS).
    out = tmp_path / "ddp_sigterm"
    if not kill_after(data, out, 40, min_iteration=2, sig=signal.SIGTERM, processes=2,
                      settings=("CHECKPOINT_PERIOD=100",)):
        pytest.skip("torchrun finished before SIGTERM could be sent")
    checkpoint = load(out / "last.pth")
    assert 2 <= checkpoint["iteration"] < 40 and len(checkpoint["rng"]) == 2
    assert training_records(out)[-1]["iteration"] <= checkpoint["iteration"]
    assert "SIGTERM: saving iteration" in (tmp_path / "ddp_sigterm.stderr").read_text()


def test_resume_after_ctrl_c_is_bit_for_bit_the_same_run(data, reference, tmp_path, monkeypatch):
    original = model_module.RoIHeads.train_forward
    calls = []

    def train_forward(self, *args, **kwargs):  # Ctrl-C in the middle of step 3, after the RPN sampled anchors
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_module.RoIHeads, "train_forward", train_forward)
    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as stop:
        run(data, out)
    assert stop.value.code == 130
    monkeypatch.undo()
    # Stopped inside step 3 (as a second Ctrl-C does): nothing of that step is saved; the checkpoint of
    # iteration 2 (CHECKPOINT_PERIOD=2) stands.
    assert load(out / "last.pth")["iteration"] == 2
    run(data, out, resume=True)
    assert_same_state(load(reference / "last.pth")["model"], load(out / "last.pth")["model"])


def test_resume_after_a_log_line_cut_short(data, tmp_path):
    out = tmp_path / "cut"
    run(data, out, iters=2)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iteration": 3, "lr": 0.00')  # e.g. the disk filled up while the line was written
    run(data, out, resume=True, iters=3)
    assert [r["iteration"] for r in training_records(out)] == [1, 2, 3]


############################################################
#  Two processes (DDP, gloo)
############################################################


def test_two_processes_under_torchrun_train_one_model(data, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "ddp_worker.py"), *train_args(data, out, *SETTINGS, "MAX_ITERS=3")]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]

    rank0, rank1 = load(out / "rank0.pth"), load(out / "rank1.pth")
    # Parameters are the same on both ranks. BatchNorm's running statistics are each rank's own after
    # its last forward pass (DDP broadcasts rank 0's at the start of every forward; rank 0's are saved).
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert_same_state({k: v for k, v in rank0.items() if not k.endswith(statistics)},
                      {k: v for k, v in rank1.items() if not k.endswith(statistics)})
    initial = initial_weights("MAX_ITERS=3")
    assert len(different(initial, rank0)) > len(initial) // 2  # training did something
    checkpoint = load(out / "last.pth")
    assert checkpoint["iteration"] == 3
    assert_same_state(checkpoint["model"], rank0)
    # Each process's random state, gathered by the first one (seeded with SEED + rank, so different).
    assert len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    # Only the first process logs: one line per iteration, one TensorBoard file.
    assert [r["iteration"] for r in training_records(out)] == [1, 2, 3]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert {p.name for p in out.glob("*.pth")} == {"last.pth", "model_0000002.pth", "model_0000003.pth",
                                                    "rank0.pth", "rank1.pth"}
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 3
    assert leftovers(out) == []


############################################################
#  Failures: non-finite loss, a crash while saving
############################################################


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch,
                                                                                   caplog):
    original = model_module.RoIHeads.train_forward
    calls = []

    def train_forward(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(model_module.RoIHeads, "train_forward", train_forward)
    out = tmp_path / "nan"
    caplog.set_level(logging.ERROR, logger="train")
    with pytest.raises(SystemExit) as stopped:
        run(data, out, "CHECKPOINT_PERIOD=1")
    assert stopped.value.code == 1
    assert len(calls) == 3
    errors = [r.getMessage() for r in caplog.records if r.name == "train" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "iteration 3" in errors[0] and "loss_mask" in errors[0] and "loss_classifier" not in errors[0]
    checkpoint = load(out / "last.pth")
    assert checkpoint["iteration"] == 2
    assert not (out / "model_0000003.pth").exists()
    assert [r["iteration"] for r in training_records(out)] == [1, 2]
    assert leftovers(out) == []


def test_save_atomic_replaces_whole_files_only(tmp_path, monkeypatch):
    path = tmp_path / "state.pth"
    train.save_atomic({"x": torch.arange(3), "iteration": 1}, str(path))
    assert torch.equal(load(path)["x"], torch.arange(3))
    train.save_atomic({"x": torch.arange(5), "iteration": 2}, str(path))
    assert load(path)["iteration"] == 2 and torch.equal(load(path)["x"], torch.arange(5))

    def failing_save(state, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train.save_atomic({"x": torch.zeros(7), "iteration": 3}, str(path))
    monkeypatch.undo()
    assert load(path)["iteration"] == 2 and torch.equal(load(path)["x"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pth"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(data, tmp_path, monkeypatch):
    original = torch.save
    writes = []

    def save(state, f, *args, **kwargs):
        name = os.path.basename(getattr(f, "name", ""))
        if ".tmp" in name:
            writes.append((name.split(".")[0], state["iteration"]))
            if len(writes) == 3:  # the second snapshot (each checkpoint writes model_<it> first)
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return original(state, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "crash"
    with pytest.raises(OSError, match="No space left"):
        run(data, out, "CHECKPOINT_PERIOD=1")
    monkeypatch.undo()
    assert writes == [("model_0000001", 1), ("last", 1), ("model_0000002", 2)]
    assert load(out / "last.pth")["iteration"] == 1
    assert load(out / "model_0000001.pth")["iteration"] == 1
    assert not (out / "model_0000002.pth").exists()
    assert leftovers(out) == []


############################################################
#  Staged training
############################################################


def test_training_stages_freeze_then_train_the_backbone(data, tmp_path):
    stages = "TRAINING_STAGES=((0, 'heads'), (2, 'all'))"
    out = tmp_path / "stages"
    run(data, out, stages, "MAX_ITERS=4")
    initial = initial_weights(stages, "MAX_ITERS=4")
    at_2, at_4 = load(out / "model_0000002.pth")["model"], load(out / "model_0000004.pth")["model"]
    body = [k for k in initial if k.startswith("backbone.body.")]
    heads = [k for k in initial if k.startswith(("backbone.fpn.", "rpn.", "roi_heads."))]
    assert body and heads
    # Iterations 1-2 ("heads"): the ResNet is exactly as initialised, everything after it trained.
    assert different(initial, at_2, "backbone.body.") == []
    assert set(different(initial, at_2)) >= {k for k in heads if k.endswith(".weight")}
    # Iterations 3-4 ("all"): every ResNet weight trained too.
    assert set(different(at_2, at_4, "backbone.body.")) >= {k for k in body if k.endswith(".weight")}


############################################################
#  Bad input
############################################################


def test_resume_without_a_checkpoint_is_a_clear_error(data, tmp_path):
    out = tmp_path / "empty"
    with pytest.raises(SystemExit) as stopped:
        run(data, out, resume=True)
    assert "last.pth" in str(stopped.value.code) and "--resume" in str(stopped.value.code)
    assert not out.exists() or list(out.iterdir()) == []


def copy_data(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


def test_corrupt_annotation_file_is_a_clear_error(data, tmp_path):
    bad = copy_data(data, tmp_path)
    annotations = bad / "annotations" / "instances_train.json"
    annotations.write_text(annotations.read_text()[:100])  # cut short
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run(data=bad, out=out)
    assert str(annotations) in str(error.value)
    assert not (out / "last.pth").exists() and not list(out.glob("model_*.pth"))


@pytest.mark.parametrize("fault", ["garbage", "missing"])
def test_unreadable_training_image_is_a_clear_error(data, tmp_path, fault):
    bad = copy_data(data, tmp_path)
    # The first image of the first batch (what the training sampler gives first).
    dataset = coco.CocoDataset(str(bad), "train")
    (index, _), _ = next(iter(coco.TrainingBatchSampler(dataset.aspect_ratios, 2, seed=0)))
    image = bad / "train" / dataset.coco.imgs[dataset.image_ids[index]]["file_name"]
    if fault == "garbage":
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    else:
        image.unlink()
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        run(bad, out)
    assert str(image) in str(error.value)
    assert not (out / "last.pth").exists() and not list(out.glob("model_*.pth"))


def test_mixed_precision_on_cpu_trains_with_finite_losses(data, tmp_path):
    # --amp on CPU autocasts to bfloat16; the losses stay finite and the weights stay float32.
    out = tmp_path / "amp"
    train.main([*train_args(data, out, *SETTINGS, "MAX_ITERS=2"), "--amp"])
    records = training_records(out)
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    state = load(out / "last.pth")["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert "bbox" in json.loads((out / "metrics.json").read_text())


def test_training_without_tensorboard_still_logs(data, tmp_path, monkeypatch, caplog):
    # A machine with its own torch may lack the tensorboard package: training goes on, log.jsonl
    # has every step, and a warning says there are no events.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    out = tmp_path / "no_tensorboard"
    with caplog.at_level(logging.WARNING, logger="train"):
        run(data, out, "MAX_ITERS=2")
    assert [r["iteration"] for r in training_records(out)] == [1, 2]
    assert list(out.glob("events.out.tfevents.*")) == []
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)


############################################################
#  The loop's pieces, in this process
############################################################


def build(data, out, *settings, resume=False, iters=None):
    """train.build_run for SETTINGS plus `settings` (only `settings` on resume, as `run` does)."""
    args = train_args(data, out, *(settings if resume else (*SETTINGS, *settings)), resume=resume, iters=iters)
    return train.build_run(train.parse_args(args))


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_build_run_gives_the_optimizer_and_schedule_the_config_asks_for(data, tmp_path):
    run = build(data, tmp_path, "LR_SCHEDULE=step", "LEARNING_RATE=0.02", "WARMUP_ITERS=4", "WARMUP_FACTOR=0.1",
                "LR_STEPS=(6,)", "LR_GAMMA=0.5", "LEARNING_MOMENTUM=0.8", "WEIGHT_DECAY=0.001", iters=5)
    assert run.iteration == 0 and run.end == 5 and run.config.MAX_ITERS == 8
    assert run.data == str(data) and run.world_size == 1 and run.main_process
    assert isinstance(run.optimizer, torch.optim.SGD)
    group = run.optimizer.param_groups[0]
    assert group["momentum"] == 0.8 and group["weight_decay"] == 0.001
    assert len(group["params"]) == len(list(run.model.parameters()))
    # The shapes config trains every stage; the loader gives BATCH_SIZE=2 images a step.
    assert run.layers == 5 and all(p.requires_grad for p in run.model.parameters())
    images, targets = next(iter(run.loader))
    assert len(images) == len(targets) == 2
    # LEARNING_RATE * lr_factor: warm-up 0.1 * (1 - it / 4) + it / 4 until iteration 4, then 1, then x 0.5 from 6:
    # it 0: 0.02 * 0.1 = 0.002;  it 1: 0.02 * 0.325 = 0.0065;  it 4, 5: 0.02;  it 6: 0.01.
    lrs = [group["lr"]]
    for _ in range(6):
        run.optimizer.step()  # no gradients yet: changes nothing, keeps the scheduler's order check quiet
        run.scheduler.step()
        lrs.append(group["lr"])
    assert lrs == pytest.approx([0.002, 0.0065, 0.011, 0.0155, 0.02, 0.02, 0.01], rel=1e-12)
    assert json.loads((tmp_path / "config.json").read_text())["LEARNING_RATE"] == 0.02


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_is_one_sgd_step_with_finite_losses(data, tmp_path, channels_last):
    # No warm-up and no clipping: the step is plain SGD at LEARNING_RATE, momentum buffer = gradient +
    # WEIGHT_DECAY * weight on the first step, so weight -= lr * (gradient + weight_decay * weight).
    run = build(data, tmp_path, "WARMUP_ITERS=0", "GRADIENT_CLIP_NORM=0.0", f"CHANNELS_LAST={channels_last}")
    before = parameters(run.model)
    stats = train.train_step(run, next(iter(run.loader)))
    assert set(stats) == LOSS_KEYS and next(iter(stats)) == "loss"
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["loss"] == pytest.approx(sum(v for k, v in stats.items() if k != "loss"), rel=1e-5)
    assert run.iteration == 1 and run.scheduler.last_epoch == 1
    lr, decay = 0.01, run.config.WEIGHT_DECAY
    trained = 0
    for name, p in run.model.named_parameters():
        if p.grad is None:
            continue
        grad, weight = p.grad.double(), before[name].double()
        expected = weight - lr * (grad + decay * weight)
        # float32 arithmetic: a few roundings of operands this large (the order of the operations, or an
        # FMA, differs with the memory format: channels-last weights take another vectorised path).
        bound = 4 * torch.finfo(torch.float32).eps * (weight.abs() + lr * (grad.abs() + decay * weight.abs()))
        error = (p.detach().double() - expected).abs()
        assert bool((error <= bound).all()), f"{name}: off by {float(error.max()):.3g} (bound {float(bound.max()):.3g})"
        trained += not torch.equal(p.detach(), before[name])
    assert trained > len(before) // 2


def test_train_step_stops_on_a_nan_loss_before_changing_anything(data, tmp_path):
    run = build(data, tmp_path)
    with torch.no_grad():  # NaN mask logits: only loss_mask is NaN
        run.model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    before = parameters(run.model)
    with pytest.raises(FloatingPointError) as error:
        train.train_step(run, next(iter(run.loader)))
    message = str(error.value)
    # The message train.py logs (test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint).
    assert "non-finite loss at iteration 1: loss = nan, loss_mask = nan." in message
    assert "loss_classifier" not in message and run.last_path in message and "LEARNING_RATE" in message
    assert run.iteration == 0 and run.scheduler.last_epoch == 0 and run.optimizer.state_dict()["state"] == {}
    for name, value in parameters(run.model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_clipping_bounds_the_gradient_norm(data, tmp_path):
    # The same step twice from the same seed: unclipped, then clipped to a quarter of the gradient's norm.
    free = build(data, tmp_path / "free", "GRADIENT_CLIP_NORM=0.0")
    free_stats = train.train_step(free, next(iter(free.loader)))
    assert "grad_norm" not in free_stats
    raw = {name: p.grad.double() for name, p in free.model.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float((g**2).sum()) for g in raw.values()))
    clip = norm / 4
    clipped = build(data, tmp_path / "clipped", f"GRADIENT_CLIP_NORM={clip!r}")
    stats = train.train_step(clipped, next(iter(clipped.loader)))
    assert stats["loss"] == free_stats["loss"]
    # The norm before clipping (torch sums float32 squares, this test float64 ones: 1e-4 apart at most).
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-4)
    grads = {name: p.grad.double() for name, p in clipped.model.named_parameters() if p.grad is not None}
    assert grads.keys() == raw.keys()
    assert math.sqrt(sum(float((g**2).sum()) for g in grads.values())) == pytest.approx(clip, rel=1e-4)
    for name in raw:  # every gradient scaled by the same factor
        torch.testing.assert_close(grads[name], raw[name] * (clip / norm), rtol=1e-4, atol=1e-12, msg=name)


def random_draws():
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_checkpoint_round_trip_restores_model_optimizer_iteration_and_random_state(data, tmp_path):
    run = build(data, tmp_path)
    batches = iter(run.loader)
    for _ in range(3):
        train.train_step(run, next(batches))
    run.train_seconds = 12.5
    train.save_checkpoint(run)
    after_save = random_draws()
    next_images, _ = next(batches)
    torch.manual_seed(1234)  # whatever happens in between
    np.random.seed(1234)
    random.seed(1234)

    resumed = build(data, tmp_path, resume=True)
    assert random_draws() == after_save
    assert resumed.iteration == 3 and resumed.train_seconds == 12.5
    assert resumed.config.to_dict() == run.config.to_dict()
    assert_same_state(run.model.state_dict(), resumed.model.state_dict())
    assert_same_momentum(run.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert resumed.scheduler.last_epoch == 3
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]
    images, _ = next(iter(resumed.loader))  # the data continues where it stopped
    assert all(torch.equal(a, b) for a, b in zip(images, next_images))
    # last.pth always; model_<iteration>.pth at CHECKPOINT_PERIOD=2 multiples only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "last.pth"]
    run.iteration = 4
    train.save_checkpoint(run)
    assert load(tmp_path / "model_0000004.pth")["iteration"] == 4 and leftovers(tmp_path) == []


def test_training_log_writes_json_lines_and_keeps_only_steps_up_to_a_resume(tmp_path, monkeypatch):
    clock = iter([100.0, 102.0, 103.0, 104.0, 105.0])  # window start, then one reading per write_step / restart
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    log = train.TrainingLog(str(tmp_path), start=0, end=4, enabled=True)
    log.step(8)
    log.write_step(1, {"loss": 1.234567891, "loss_mask": 0.5, "grad_norm": 3.14159265}, lr=0.01, train_seconds=2.06)
    log.step(8)
    log.step(8)
    log.write_step(3, {"loss": 0.75, "loss_mask": 0.25}, lr=0.005, train_seconds=4.0)
    log.write({"iteration": 3, "eval": {"bbox": {"AP": 0.5}, "segm": {"AP": 0.25}}})
    log.close()
    monkeypatch.undo()
    # images/s: 8 images over 102 - 100 s; then 16 images over 104 - 103 s.
    assert log_records(tmp_path) == [
        {"iteration": 1, "lr": 0.01, "loss": 1.23457, "loss_mask": 0.5, "images_per_second": 4.0,
         "train_seconds": 2.1, "grad_norm": 3.1416},
        {"iteration": 3, "lr": 0.005, "loss": 0.75, "loss_mask": 0.25, "images_per_second": 16.0,
         "train_seconds": 4.0},
        {"iteration": 3, "eval": {"bbox": {"AP": 0.5}, "segm": {"AP": 0.25}}},
    ]
    assert list(tmp_path.glob("events.out.tfevents.*"))

    train.TrainingLog(str(tmp_path), start=2, end=4, enabled=True).close()  # resumed at 2: 3 will run again
    assert [r["iteration"] for r in log_records(tmp_path)] == [1]
    train.TrainingLog(str(tmp_path), start=0, end=4, enabled=True).close()  # a new run: a new file
    assert not (tmp_path / "log.jsonl").exists()
    quiet = train.TrainingLog(str(tmp_path / "other"), start=0, end=4, enabled=False)  # not the first process
    quiet.write({"iteration": 1, "loss": 1.0})
    quiet.close()
    assert not (tmp_path / "other").exists()


def test_training_stage_changes_what_trains(data, tmp_path):
    run = build(data, tmp_path, "TRAINING_STAGES=((0, 'heads'), (2, '4+'))")
    body = dict(run.model.backbone.body.named_parameters())
    assert run.layers == 0 and not any(p.requires_grad for p in body.values())
    run.iteration = 2
    train.set_training_stage(run)
    # "4+": layer3 and layer4 (2 stages) train, the rest of the ResNet stays frozen.
    assert run.layers == 2
    assert {name for name, p in body.items() if p.requires_grad} == {
        name for name in body if name.startswith(("layer3.", "layer4."))}


def test_evaluate_logs_the_coco_metrics(data, tmp_path):
    run = build(data, tmp_path)
    log = train.TrainingLog(str(tmp_path), start=0, end=run.end, enabled=True)
    metrics = train.evaluate(run, log)
    log.close()
    assert run.model.training  # evaluation puts it back
    (record,) = log_records(tmp_path)
    assert record == {"iteration": 0, "eval": {"bbox": metrics["bbox"], "segm": metrics["segm"]}}
    assert STAT_KEYS <= metrics["segm"].keys()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_asks_to_stop_and_a_second_one_stops_at_once(signum):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with train.StopOnSignal() as stop:
        assert not stop.requested
        signal.raise_signal(signum)
        assert stop.requested and stop.signum == signum
        with pytest.raises(KeyboardInterrupt) as stopped:
            signal.raise_signal(signum)
        assert stopped.value.signum == signum
    assert {s: signal.getsignal(s) for s in previous} == previous
    with train.StopOnSignal(enabled=False) as off:
        assert {s: signal.getsignal(s) for s in previous} == previous and not off.requested
    with train.StopOnSignal(repeat_stops=False) as stop:  # under torchrun the launcher passes signals on again
        signal.raise_signal(signum)
        signal.raise_signal(signum)
        assert stop.requested and stop.signum == signum


############################################################
#  The output folder: one run at a time, nothing lost
############################################################


def test_a_new_run_into_a_folder_with_a_checkpoint_is_refused(data, tmp_path):
    for name in ("last.pth", "model_0000300.pth"):  # either kind of checkpoint
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_bytes(b"the previous run")
        (out / "log.jsonl").write_text('{"iteration": 300}\n')
        with pytest.raises(SystemExit) as stopped:
            run(data, out, "MAX_ITERS=1")
        message = str(stopped.value.code)
        assert str(out / name) in message and "--resume" in message and "another --out" in message
        assert "--overwrite" in message
        assert (out / name).read_bytes() == b"the previous run"
        assert (out / "log.jsonl").read_text() == '{"iteration": 300}\n'
        assert not (out / "config.json").exists()


def test_overwrite_starts_a_new_run_in_place_of_the_old_one(data, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for name in ("last.pth", "model_0000300.pth", "metrics.json", "log.jsonl", "events.out.tfevents.1.host"):
        (out / name).write_text("the previous run")
    (out / "notes.txt").write_text("mine")  # not a run's output: kept
    run_ = train.build_run(train.parse_args([*train_args(data, out, *SETTINGS), "--overwrite"]))
    assert run_.iteration == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]


def test_a_second_run_into_the_same_folder_is_refused_with_the_holders_pid(data, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, train\n"
         "with train.RunFolderLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(300)", str(out)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as stopped:
            run(data, out, "MAX_ITERS=1")
        message = str(stopped.value.code)
        assert f"pid {holder.pid}" in message and str(out) in message
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # SIGKILL: the operating system releases its lock
        holder.wait()
    with train.RunFolderLock(str(out)):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_the_snapshot_is_written_before_last_pth(data, tmp_path, monkeypatch):
    # A SIGKILL while model_<it>.pth is written must leave last.pth at the previous checkpoint, so that
    # --resume writes the snapshot again: the snapshot goes first.
    run_ = build(data, tmp_path)
    written = []
    monkeypatch.setattr(train, "save_atomic", lambda state, path: written.append(os.path.basename(path)))
    run_.iteration = 2  # CHECKPOINT_PERIOD=2
    train.save_checkpoint(run_)
    run_.iteration = 3
    train.save_checkpoint(run_)
    assert written == ["model_0000002.pth", "last.pth", "last.pth"]


def test_a_run_removes_the_temporaries_a_killed_run_left(data, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # the pid of a process that has ended, like a run killed while saving
    out = tmp_path / "killed"
    out.mkdir()
    for name in (f"last.pth.tmp{pid}", f"model_0000002.pth.tmp{pid}", "notes.tmp"):
        (out / name).write_bytes(b"PK\x03\x04 half a checkpoint")
    build(data, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.tmp"]


def test_a_truncated_last_pth_names_it_and_the_newest_intact_snapshot(data, tmp_path):
    run_ = build(data, tmp_path)
    batches = iter(run_.loader)
    for _ in range(3):
        train.train_step(run_, next(batches))
        train.save_checkpoint(run_)  # model_0000002.pth at CHECKPOINT_PERIOD=2; last.pth at 3
    last = tmp_path / "last.pth"
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])  # e.g. a copy that did not finish
    with pytest.raises(SystemExit) as stopped:
        build(data, tmp_path, resume=True)
    message = str(stopped.value.code)
    snapshot = tmp_path / "model_0000002.pth"
    assert f"{last} is incomplete or corrupt" in message
    assert f"newest intact snapshot is {snapshot} (iteration 2)" in message and f"cp {snapshot} {last}" in message
    # Following the advice resumes from iteration 2.
    shutil.copy(snapshot, last)
    assert build(data, tmp_path, resume=True).iteration == 2
    # With no intact snapshot, it says so.
    last.write_bytes(whole[:100])
    snapshot.write_bytes(b"")
    with pytest.raises(SystemExit, match="No model_<iteration>.pth .* is intact either"):
        build(data, tmp_path, resume=True)


def test_checkpoints_hold_plain_types_only(reference):
    # weights_only=True refuses anything but tensors and plain Python types (numpy's RNG state included).
    for path in (reference / "last.pth", reference / "model_0000008.pth"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["iteration"] == 8 and torch.is_tensor(checkpoint["rng"][0]["numpy"]["keys"])


############################################################
#  Settings on --resume
############################################################


def checkpoint_at(data, out, iterations):
    """A run of SETTINGS stopped after `iterations` steps, with its checkpoint; returns the Run."""
    run_ = build(data, out)
    batches = iter(run_.loader)
    for _ in range(iterations):
        train.train_step(run_, next(batches))
    train.save_checkpoint(run_)
    return run_


def test_resume_applies_changed_optimizer_settings(data, tmp_path, caplog):
    checkpoint_at(data, tmp_path, 3)
    with caplog.at_level(logging.INFO, logger="train"):
        resumed = build(data, tmp_path, "LEARNING_RATE=0.5", "LEARNING_MOMENTUM=0.8", "WEIGHT_DECAY=0.001",
                        "MAX_ITERS=16", resume=True)
    # The shapes schedule (cosine to MAX_ITERS, warm-up done at WARMUP_ITERS=2), from the new values:
    # next lr = 0.5 * 0.5 * (1 + cos(pi * 3 / 16)) = 0.5 * 0.9157348062
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.5 * 0.9157348062, rel=1e-9)
    assert group["momentum"] == 0.8 and group["weight_decay"] == 0.001 and resumed.scheduler.base_lrs == [0.5]
    assert resumed.end == 16
    resumed.optimizer.step()
    resumed.scheduler.step()  # the schedule goes on from the new base: 0.5 * 0.5 * (1 + cos(pi * 4 / 16))
    assert group["lr"] == pytest.approx(0.5 * 0.8535533906, rel=1e-9)
    logged = caplog.text
    assert "LEARNING_RATE 0.01 -> 0.5" in logged and "LEARNING_MOMENTUM 0.9 -> 0.8" in logged
    assert "MAX_ITERS 8 -> 16" in logged
    assert json.loads((tmp_path / "config.json").read_text())["LEARNING_RATE"] == 0.5


@pytest.mark.parametrize("setting, kind", [("FPN_CHANNELS=32", "network"), ("BACKBONE=resnet34", "network"),
                                           ("BATCH_SIZE=4", "data pipeline"), ("IMAGE_MIN_DIM_TRAIN=(48,)",
                                                                               "data pipeline")])
def test_resume_refuses_changes_to_the_network_or_the_data(data, tmp_path, setting, kind):
    checkpoint_at(data, tmp_path, 1)
    before = (tmp_path / "last.pth").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        build(data, tmp_path, setting, resume=True)
    message = str(stopped.value.code)
    assert f"--resume cannot change {setting.split('=')[0]} ({kind}" in message and "--weights" in message
    assert (tmp_path / "last.pth").read_bytes() == before


def test_resume_warns_that_config_and_weights_are_ignored(data, tmp_path, caplog):
    checkpoint_at(data, tmp_path, 1)
    args = [*train_args(data, tmp_path, resume=True), "--weights", "imagenet"]
    with caplog.at_level(logging.WARNING, logger="train"):
        resumed = train.build_run(train.parse_args(args))
    assert resumed.iteration == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("--config shapes is ignored with --resume") for m in warnings)
    assert any(m.startswith("--weights imagenet is ignored with --resume") for m in warnings)


############################################################
#  The data folder
############################################################


def test_a_mistyped_data_folder_is_an_error_not_a_new_data_set(tmp_path, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("the shapes data set was written")

    monkeypatch.setattr(shapes, "generate", no_generation)
    typo = tmp_path / "data" / "shapez"
    with pytest.raises(SystemExit) as stopped:
        train.main(["--config", "shapes", "--data", str(typo), "--out", str(tmp_path / "out"), "--set", *SETTINGS])
    message = str(stopped.value.code)
    assert str(typo) in message and "no annotations" in message and "--make-data" in message
    assert not typo.exists()


def test_make_data_and_the_default_folder_write_the_shapes_data_set(tmp_path, monkeypatch):
    small = shapes.generate
    monkeypatch.setattr(shapes, "generate", lambda out, **kwargs: small(out, train=4, val=2, size=64))
    asked = tmp_path / "asked"
    run_ = train.build_run(train.parse_args([*train_args(asked, tmp_path / "a", *SETTINGS), "--make-data"]))
    assert run_.data == str(asked) and (asked / "annotations" / "instances_train.json").exists()
    default = tmp_path / "default" / "shapes"
    monkeypatch.setattr(shapes, "DEFAULT_ROOT", str(default))
    run_ = train.build_run(train.parse_args(["--config", "shapes", "--out", str(tmp_path / "b"), "--set", *SETTINGS]))
    assert run_.data == str(default) and (default / "annotations" / "instances_train.json").exists()


############################################################
#  MaskRCNN.from_checkpoint
############################################################


def test_from_checkpoint_builds_the_trained_model_with_overrides(reference):
    checkpoint = load(reference / "last.pth")
    model = MaskRCNN.from_checkpoint(reference / "last.pth", ["DETECTION_MIN_CONFIDENCE=0.3"])
    assert model.config.to_dict() == {**checkpoint["config"], "DETECTION_MIN_CONFIDENCE": 0.3}
    assert_same_state(model.state_dict(), checkpoint["model"])
    assert model.training and next(model.parameters()).device == torch.device("cpu")
    # The dict torch.load gives works the same (train.py --resume passes it).
    assert_same_state(MaskRCNN.from_checkpoint(checkpoint).state_dict(), checkpoint["model"])


def test_from_checkpoint_of_weights_without_a_config(reference, tmp_path):
    state = load(reference / "last.pth")["model"]
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    with pytest.raises(ValueError, match=r"bare\.pth.*no 'config'.*config="):
        MaskRCNN.from_checkpoint(bare)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        MaskRCNN.from_checkpoint(tmp_path / "missing.pth")
    config = named_config("shapes").override(SETTINGS)
    model = MaskRCNN.from_checkpoint(bare, ["MASK_THRESHOLD=0.25"], config=config)
    assert_same_state(model.state_dict(), state)
    assert model.config.MASK_THRESHOLD == 0.25 and type(model.config) is type(config)
    assert config.MASK_THRESHOLD == 0.5  # the caller's config is copied, not changed


############################################################
#  Fine-tuning on one's own data: the custom preset
############################################################


def test_custom_preset_takes_the_classes_from_the_data_and_skips_the_class_specific_layers(data, tmp_path, caplog):
    # A COCO-like source model (91 classes) of the same small architecture, saved as a weights file.
    small = [s for s in SETTINGS if not s.startswith(("MAX_ITERS", "CHECKPOINT_PERIOD"))]
    small += ["BACKBONE=resnet18", "MAX_ITERS=2", "CHECKPOINT_PERIOD=2", "TRAINING_STAGES=((0,'heads'),(1,'all'))"]
    source_config = Config(NUM_CLASSES=91).override([s for s in small if not s.startswith("TRAINING_STAGES")])
    source = MaskRCNN(source_config)
    weights = tmp_path / "coco_like.pth"
    torch.save(source.state_dict(), weights)
    args = ["--config", "custom", "--data", str(data), "--weights", str(weights), "--out", str(tmp_path / "run"),
            "--set", *small]
    with caplog.at_level(logging.INFO):
        run_ = train.build_run(train.parse_args(args))
    # The shapes data set has 4 categories: 1 + 4 classes, named as in its annotation file.
    assert run_.config.NUM_CLASSES == 5
    assert run_.config.CLASS_NAMES == ("__background__", *shapes.CLASSES)
    assert run_.model.roi_heads.box_predictor.cls_score.out_features == 5
    # Everything but the class-specific layers came from the weights file; those were skipped, and logged.
    own, given = run_.model.state_dict(), source.state_dict()
    class_specific = {k for k in given if given[k].shape != own[k].shape}
    assert class_specific == {
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias",
    }
    assert all(torch.equal(own[k], given[k]) for k in given if k not in class_specific)
    assert "skipped (shape differs)" in caplog.text and "cls_score" in caplog.text
    # The first stage trains the heads alone.
    assert run_.layers == 0
    train.fit(run_)
    checkpoint = load(tmp_path / "run" / "last.pth")
    assert checkpoint["iteration"] == 2 and checkpoint["config"]["NUM_CLASSES"] == 5
    assert checkpoint["config"]["CLASS_NAMES"] == ["__background__", *shapes.CLASSES]
