"""Fused decoder heads vs the unfused paths: time (forward + backward, alternated rounds, medians) and
peak memory growth (peak RSS of a fresh process running one forward + backward, minus its RSS with
the inputs in place).

Cases (the issue's): a per-pixel 256-way categorical head 16x3x32x32x256 from 64 features, and a
logistic-mixture 1x1 conv 64 -> 100 channels (M = 10, RGB) at 8x3x64x64; and the MNIST MLP decoder's last
layer, 400 -> 784 Bernoulli logits at B = 1024 (B = 128 in the quick run), the most common head and one
whose output is small: there the fused head must not cost more than the unfused path. Implementations: the
fused head (``vae_fast.linear_log_prob``), the unfused vae_fast path (F.linear / conv2d, then the fused
likelihood), eager torch (F.cross_entropy, F.binary_cross_entropy_with_logits; NVAE's DiscMixLogistic),
torch.compile of eager and, for the categorical head, ``F.linear_cross_entropy``. Each round times every
implementation over at least 20 ms (one step of the full categorical case, many of the quick ones).

    .venv/bin/python -m benchmarks.bench_heads [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vae_fast
from benchmarks import impls

CASES = {
    "categorical": dict(batch=16, pixels=(3, 32, 32), features=64, classes=256),
    "dmol": dict(batch=8, size=(64, 64), features=64, mixtures=10),
    "bernoulli": dict(batch=1024, features=400, outputs=784),
}
QUICK = {
    "categorical": dict(batch=4, pixels=(3, 16, 16), features=64, classes=256),
    "dmol": dict(batch=2, size=(32, 32), features=64, mixtures=10),
    "bernoulli": dict(batch=128, features=400, outputs=784),
}


def make_inputs(case: str, quick: bool):
    spec = (QUICK if quick else CASES)[case]
    gen = torch.Generator().manual_seed(0)
    if case == "categorical":
        b, pix, hdim, k = spec["batch"], spec["pixels"], spec["features"], spec["classes"]
        h = torch.randn(b, *pix, hdim, generator=gen).requires_grad_()
        weight = (torch.randn(k, hdim, generator=gen) / hdim ** 0.5).requires_grad_()
        bias = torch.zeros(k).requires_grad_()
        x = torch.randint(0, k, (b, *pix), generator=gen)
        return h, weight, bias, x
    if case == "bernoulli":
        b, hdim, out = spec["batch"], spec["features"], spec["outputs"]
        h = torch.randn(b, hdim, generator=gen).requires_grad_()
        weight = (torch.randn(out, hdim, generator=gen) / hdim ** 0.5).requires_grad_()
        bias = torch.zeros(out).requires_grad_()
        x = (torch.rand(b, out, generator=gen) > 0.5).float()
        return h, weight, bias, x
    b, size, hdim, m = spec["batch"], spec["size"], spec["features"], spec["mixtures"]
    out = m + 3 * 3 * m
    h = torch.randn(b, hdim, *size, generator=gen).requires_grad_()
    weight = (torch.randn(out, hdim, generator=gen) / hdim ** 0.5).requires_grad_()
    bias = torch.zeros(out).requires_grad_()
    x = torch.randint(0, 256, (b, 3, *size), generator=gen) / 127.5 - 1
    return h, weight, bias, x


def implementations(case: str) -> dict:
    if case == "categorical":
        def fused(h, w, b, x):
            return -vae_fast.linear_log_prob(h, w, b, x, likelihood="categorical").mean()

        def unfused(h, w, b, x):
            return -vae_fast.categorical_log_prob(F.linear(h, w, b), x).mean()

        def eager(h, w, b, x):
            logits = F.linear(h, w, b)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="sum") / x.shape[0]

        def torch_lce(h, w, b, x):
            return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, x.reshape(-1), linear_bias=b,
                                          reduction="sum") / x.shape[0]

        return {"fused head": fused, "vae_fast unfused": unfused, "eager": eager, "torch.compile(eager)": eager,
                "F.linear_cross_entropy": torch_lce}

    if case == "bernoulli":
        def fused(h, w, b, x):
            return -vae_fast.linear_log_prob(h, w, b, x, likelihood="bernoulli").mean()

        def unfused(h, w, b, x):
            return -vae_fast.bernoulli_log_prob(F.linear(h, w, b), x).mean()

        def eager(h, w, b, x):
            return F.binary_cross_entropy_with_logits(F.linear(h, w, b), x, reduction="sum") / x.shape[0]

        return {"fused head": fused, "vae_fast unfused": unfused, "eager": eager, "torch.compile(eager)": eager}

    def fused(h, w, b, x):
        return -vae_fast.linear_log_prob(h, w, b, x, likelihood="dmol", channel_dim=1).mean()

    def unfused(h, w, b, x):
        return -vae_fast.dmol_packed_log_prob(x, F.conv2d(h, w[:, :, None, None], b)).mean()

    def eager(h, w, b, x):
        return impls.dmol_eager(F.conv2d(h, w[:, :, None, None], b), x, 10)

    return {"fused head": fused, "vae_fast unfused": unfused, "eager": eager, "torch.compile(eager)": eager}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth_child(case: str, impl: str, quick: bool) -> None:
    """Runs in a fresh process: one forward + backward; prints the growth of its peak RSS (VmHWM,
    reset to the current RSS first through /proc/self/clear_refs) over the RSS with the inputs
    allocated, in bytes."""
    inputs = make_inputs(case, quick)
    fn = implementations(case)[impl]
    if impl.startswith("torch.compile"):
        fn = torch.compile(fn, dynamic=False)
        fn(*inputs).backward()  # compile first: the compiler's own memory is not the head's
        for t in inputs[:3]:
            t.grad = None
    vae_fast.release_buffer_cache()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn(*inputs).backward()
    print(json.dumps({"growth": _status_bytes("VmHWM") - before}))


def peak_growth(case: str, impl: str, quick: bool) -> float:
    """MiB of peak memory growth of one forward + backward, in a fresh process whose glibc maps every allocation
    of 128 KiB and more and unmaps it when freed (a fixed mmap threshold): the peak is then the tensors live at
    once. With glibc's dynamic threshold, freed buffers raise it and later ones stay on the heap, so the same
    code measured 16-32 MiB from one allocation order to another (the mixture head: 16.6 MiB either way here)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_heads", "--child", case, impl] +
                         (["--quick"] if quick else []), capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"] / 2**20


def time_impls(case: str, quick: bool, rounds: int) -> dict:
    inputs = make_inputs(case, quick)
    fns = implementations(case)
    fns = {name: torch.compile(fn, dynamic=False) if name.startswith("torch.compile") else fn for name, fn in fns.items()}

    def step(fn):
        for t in inputs[:3]:
            t.grad = None
        fn(*inputs).backward()

    reps = {}
    for name, fn in fns.items():
        step(fn)
        start = time.perf_counter()
        step(fn)
        reps[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                step(fn)
            times[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        peak_growth_child(*args.child, args.quick)
        return
    rounds = 5 if args.quick else 15
    lines = ["| head | implementation | fwd+bwd ms | speed-up of the fused head | peak memory growth MiB |"
             " fused / this |", "|---|---|---|---|---|---|"]
    for case in CASES:
        spec = (QUICK if args.quick else CASES)[case]
        times = time_impls(case, args.quick, rounds)
        peaks = {name: peak_growth(case, name, args.quick) for name in times}
        for name, seconds in times.items():
            lines.append(f"| {case} {spec} | {name} | {seconds * 1e3:.1f} | {seconds / times['fused head']:.2f}x | "
                         f"{peaks[name]:.1f} | {peaks['fused head'] / max(peaks[name], 1e-9):.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Fused decoder heads, torch {torch.__version__}, {platform.machine()}-{torch.get_num_threads()}threads; "
              f"fwd+bwd medians of {rounds} alternated rounds; peak memory growth of one fwd+bwd in a fresh process "
              "(allocations of 128 KiB and more mapped and unmapped: the tensors live at once).\n\n")
    (out / f"heads-{platform.machine()}{'-quick' if args.quick else ''}.md").write_text(header + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
