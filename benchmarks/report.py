"""Runs the CPU benchmark suite in one process and writes the results.

    python -m benchmarks.report            # full: every shape, with torch.compile
    python -m benchmarks.report --quick    # `make bench`: small subset, no torch.compile

Writes ``benchmarks/results/<machine>.csv`` (one row per op, shape, implementation),
``<machine>.md`` (speed-up table, achieved GB/s against this machine's copy bandwidth,
bytes saved for backward) and ``<machine>_<op>.png`` (time vs size, one line per
implementation). All ratios in one table come from one run on one machine.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
from pathlib import Path

import torch

import vae_fast

from . import impls
from .timing import copy_bandwidth, saved_bytes, time_fwd_bwd

RESULTS = Path(__file__).resolve().parent / "results"

LATENT_SHAPES = [(128, 32), (1024, 256), (4096, 512)]
PIXEL_SHAPES = [(128, 784), (1024, 3072), (4096, 3072)]
CATEGORICAL_SHAPES = [(64, 3, 32, 32, 256)]
CONV_LATENT_SHAPES = [(8, 4, 32, 32), (8, 4, 64, 64)]  # SD-like latents (256 and 512 px images)
ELBO_SHAPES = [(128, 32, 784), (1024, 64, 3072), (4096, 128, 3072)]
DMOL_SHAPES = [(16, 3, 32, 32, 10), (64, 3, 32, 32, 10)]  # B, C, H, W, mixtures


def machine_name() -> str:
    cpu = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = vae_fast._backend._cpu_ext.isa() if vae_fast._backend._cpu_ext else "noext"
    tag = f"{platform.machine()}-{os.cpu_count()}cores-{isa}"
    return tag, cpu


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def run_case(rows, op, shape, make, impl_fns, nbytes, *, with_compile, budget):
    inputs = make()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    fns = dict(impl_fns)
    if with_compile:
        fns["torch.compile"] = compiled(impl_fns["eager"])
    for name, fn in fns.items():
        seconds = time_fwd_bwd(fn, inputs, leaves, budget_s=budget)
        saved = saved_bytes(fn, inputs) if name != "torch.compile" else float("nan")
        rows.append({"op": op, "shape": "x".join(map(str, shape)), "impl": name, "ms": seconds * 1e3,
                     "gb_per_s": nbytes / seconds / 1e9 if nbytes else float("nan"), "saved_mb": saved / 2**20})
        print(f"{op:22s} {rows[-1]['shape']:>16s} {name:14s} {seconds * 1e3:9.3f} ms  saved {saved / 2**20:8.2f} MiB",
              flush=True)


def collect(quick: bool):
    with_compile = not quick
    budget = 0.2 if quick else 0.6
    rows = []
    latent = LATENT_SHAPES[:2] if quick else LATENT_SHAPES
    pixels = PIXEL_SHAPES[:2] if quick else PIXEL_SHAPES
    for shape in latent:
        run_case(rows, "latent", shape, lambda: impls.latent_inputs(shape, "cpu"),
                 {"vae_fast": impls.latent_fused, "eager": impls.latent_eager,
                  "distributions": impls.latent_distributions}, impls.latent_bytes(shape),
                 with_compile=with_compile, budget=budget)
    for shape in (CONV_LATENT_SHAPES[:1] if quick else CONV_LATENT_SHAPES):
        run_case(rows, "conv_latent", shape, lambda: impls.conv_latent_inputs(shape, "cpu"),
                 {"vae_fast": impls.conv_latent_fused, "DiagonalGaussian": impls.conv_latent_posterior,
                  "eager": impls.conv_latent_eager}, impls.conv_latent_bytes(shape),
                 with_compile=with_compile, budget=budget)
    for kind in ("bernoulli", "continuous_bernoulli", "gaussian"):
        for shape in pixels:
            run_case(rows, kind, shape, lambda: impls.likelihood_inputs(shape, "cpu", kind),
                     {"vae_fast": impls.likelihood_step(impls.FUSED_LIKELIHOOD[kind]),
                      "eager": impls.likelihood_step(impls.EAGER_LIKELIHOOD[kind])},
                     impls.likelihood_bytes(shape, kind), with_compile=with_compile, budget=budget)
    for shape in ([] if quick else CATEGORICAL_SHAPES):
        run_case(rows, "categorical", shape, lambda: impls.likelihood_inputs(shape, "cpu", "categorical"),
                 {"vae_fast": impls.likelihood_step(impls.FUSED_LIKELIHOOD["categorical"]),
                  "eager": impls.likelihood_step(impls.EAGER_LIKELIHOOD["categorical"])},
                 impls.likelihood_bytes(shape, "categorical"), with_compile=with_compile, budget=budget)
    for shape in (DMOL_SHAPES[:1] if quick else DMOL_SHAPES):
        run_case(rows, "dmol", shape, lambda: impls.dmol_inputs(shape, "cpu"),
                 {"vae_fast": impls.dmol_fused, "eager": impls.dmol_eager}, impls.dmol_bytes(shape),
                 with_compile=with_compile, budget=budget)
    for shape in (ELBO_SHAPES[:1] if quick else ELBO_SHAPES):
        run_case(rows, "elbo_loss", shape, lambda: impls.elbo_inputs(shape, "cpu"),
                 {"vae_fast": impls.elbo_fused, "eager": impls.elbo_eager}, 0,
                 with_compile=with_compile, budget=budget)
    return rows


def write(rows, quick: bool, bandwidth_before: float | None = None):
    tag, cpu = machine_name()
    suffix = "-quick" if quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"{tag}{suffix}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # memory bandwidth on a shared machine moves between runs (40-72 GB/s seen here): measure it
    # before and after the cases and divide by the higher, so that roofline % never flatters
    samples = [b for b in (bandwidth_before, copy_bandwidth()) if b]
    bandwidth = max(samples)
    by_key = {(r["op"], r["shape"], r["impl"]): r for r in rows}
    lines = [
        f"# vae_fast CPU benchmarks: {cpu} ({tag}), {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "Forward + backward, median wall time; all numbers from one run of `python -m benchmarks.report"
        f"{' --quick' if quick else ''}`. Speed-up = other implementation's time / vae_fast's time.",
        f"Copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s (the higher of "
        f"{' and '.join(f'{b / 1e9:.1f}' for b in samples)} GB/s, measured before and after the cases). "
        "GB/s = bytes that must move (inputs read once, outputs written once) / time; roofline % = that / copy bandwidth.",
        "",
        "| op | shape | vae_fast ms | eager ms | × eager | compile ms | × compile | GB/s | roofline % | saved MiB fused / eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for op, shape in dict.fromkeys((r["op"], r["shape"]) for r in rows):
        fused, eager = by_key[(op, shape, "vae_fast")], by_key[(op, shape, "eager")]
        comp = by_key.get((op, shape, "torch.compile"))
        gbs = fused["gb_per_s"]
        lines.append(
            f"| {op} | {shape} | {fused['ms']:.3f} | {eager['ms']:.3f} | {eager['ms'] / fused['ms']:.1f} | "
            + (f"{comp['ms']:.3f} | {comp['ms'] / fused['ms']:.1f} | " if comp else "– | – | ")
            + (f"{gbs:.1f} | {100 * gbs * 1e9 / bandwidth:.0f} | " if not math.isnan(gbs) else "– | – | ")
            + f"{fused['saved_mb']:.2f} / {eager['saved_mb']:.2f} |")
    md_path = RESULTS / f"{tag}{suffix}.md"
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, tag + suffix)
    print(f"wrote {csv_path}, {md_path}")


def plot(rows, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.2))
    for ax, op in zip(axes if len(ops) > 1 else [axes], ops):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["op"] == op):
            sel = [r for r in rows if r["op"] == op and r["impl"] == impl]
            ax.plot(range(len(sel)), [r["ms"] for r in sel], marker="o", label=impl)
            ax.set_xticks(range(len(sel)), [r["shape"] for r in sel], rotation=30, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_ylabel("ms (fwd + bwd)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / f"{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subset without torch.compile (make bench)")
    args = parser.parse_args(argv)
    bandwidth_before = copy_bandwidth()
    rows = collect(args.quick)
    write(rows, args.quick, bandwidth_before)


if __name__ == "__main__":
    main()
