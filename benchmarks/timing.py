"""How a step is timed, and the device's copy bandwidth.

GPU: `triton.testing.do_bench` (median; warm-up excluded; it flushes L2 before
every repetition), CUDA-graph replay of many unrolled steps for small shapes,
peak extra memory from `torch.cuda.max_memory_allocated`.  CPU: a wall-clock
median, no memory figure.  Every step rotates among several input copies by
itself (see `inputs.copies`).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch

Step = Callable[[], object]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(step: Step, device: torch.device) -> float:
    """Seconds of the first call (compilation, autotuning, caches), synchronised."""
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def median_ms(step: Step, device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of one step, warm-up excluded."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    deadline = time.perf_counter() + warmup_ms / 1e3
    step()
    while time.perf_counter() < deadline:
        step()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_sync_reason(step: Step) -> Optional[str]:
    """None when one step runs without synchronising with the host (so a CUDA graph can
    capture it), else the error that `torch.cuda.set_sync_debug_mode("error")` raised."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        if "synchroniz" not in str(e):  # "called a synchronizing CUDA operation"; anything else is a failure
            raise
        return "synchronises with the host: " + (str(e).strip().splitlines() or ["?"])[0]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return None


def graph_median_ms(step: Step, rotation: int, rep_ms: float, replays: int = 10) -> float:
    """Median ms of one step under CUDA-graph replay: n >= rotation steps (a multiple of it,
    so every input copy is used) captured in one graph, replayed `replays` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autograd must warm up on a side stream before capture
        for _ in range(rotation):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rotation):
            step()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / rotation, 1e-3)
    torch.cuda.current_stream().wait_stream(side)
    n = min(512, max(rotation, int(rep_ms / estimate_ms)))
    n = -(-n // rotation) * rotation
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    return statistics.median(times)


def peak_extra_mib(step: Step) -> float:
    """MiB allocated at the peak of one step beyond what was allocated before it (CUDA only)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth(device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Bytes per second (read + written) of a device-to-device copy of a large buffer."""
    nbytes = (512 << 20) if device.type == "cuda" else (32 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    # A long warm-up: a cold GPU (clocks ramping up) would read low and inflate every floor.
    ms = median_ms(lambda: dst.copy_(src), device, max(warmup_ms, 100.0), rep_ms)
    del src, dst
    return 2 * nbytes / (ms / 1e3)
