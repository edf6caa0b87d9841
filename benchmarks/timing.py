"""Timing and memory helpers shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_step(step, inputs, leaves=None):
    """A closure running ``step(*inputs).backward()`` with the leaves' gradients reset first
    (default leaves: the inputs that require grad)."""
    if leaves is None:
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def once():
        for leaf in leaves:
            leaf.grad = None
        step(*inputs).backward()

    return once


def time_fwd_bwd(step, inputs, leaves, *, device="cpu", budget_s=0.5, min_reps=5, max_reps=2000, warmup=3):
    """Median seconds of ``step(*inputs).backward()`` (gradients reset between reps)."""
    once = fwd_bwd_step(step, inputs, leaves)

    for _ in range(warmup):
        once()
    sync(device)
    start = time.perf_counter()
    once()
    sync(device)
    single = max(time.perf_counter() - start, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / single)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def saved_bytes(step, inputs) -> int:
    """Bytes autograd saves for backward while running ``step(*inputs)`` (counted once per storage)."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:
            key = (id(t), t.numel() * t.element_size())
        seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(*inputs)
    del loss
    return sum(seen.values())


def copy_bandwidth(device="cpu", nbytes=256 * 2**20) -> float:
    """Bytes per second of a large tensor copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    samples = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        samples.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(samples)


def alternated_rounds(fns: dict, rounds: int, calls: int, warmup: int = 3, device="cpu") -> dict:
    """name -> seconds per call in each of ``rounds`` rounds, the zero-argument callables ``fns``
    alternating round by round (so that the machine's slow spells hit every one of them alike); on a
    CUDA ``device`` each round ends with a synchronisation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times
