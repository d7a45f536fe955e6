"""Timing shared by the benchmarks: the median seconds of a call, after warm-up, and the machine it ran on.

On CUDA each call is timed with CUDA events recorded around it on the current stream (the device's
own clock, so host-side launch overhead counts only where it leaves the device idle); on the CPU with
the wall clock, or with cpu_time the process's CPU time (all its threads), which moves little with the
load other processes put on a shared machine (with one thread it is the wall-clock time of an idle one)."""

import datetime
import os
import platform
import statistics
import time

import torch
import torchvision


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1, cpu_time: bool = False) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            clock = time.process_time if cpu_time else time.perf_counter
            start = clock()
            fn()
            times.append(clock() - start)
    return statistics.median(times)


def machine_description(device) -> dict:
    """What a benchmark's figures depend on: date, CPU model and cores, versions, and the GPU if one is used."""
    device = torch.device(device)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
               "torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                       gpu_memory_gb=round(props.total_memory / 2**30), multiprocessors=props.multi_processor_count)
    return machine
