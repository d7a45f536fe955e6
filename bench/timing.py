"""Timing shared by the benchmarks: the median seconds of a call, after warm-up.

On CUDA each call is timed with CUDA events recorded around it on the current stream (the device's
own clock, so host-side launch overhead counts only where it leaves the device idle); on the CPU with
the wall clock, or with cpu_time the process's CPU time (all its threads), which moves little with the
load other processes put on a shared machine (with one thread it is the wall-clock time of an idle one)."""

import statistics
import time

import torch


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
