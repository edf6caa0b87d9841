"""GPU roofline benchmark for the Triton kernels.

    python benchmarks/gpu_roofline.py [--out DIR] [--quick]

For each op at large shapes: forward + backward time (``triton.testing.do_bench``, median)
of vae_fast, eager PyTorch and ``torch.compile`` of the eager code; achieved GB/s of
vae_fast (bytes that must be read and written / time) next to a plain device copy's GB/s on
the same card; peak ``torch.cuda.max_memory_allocated`` per implementation; and the number of
CUDA kernel launches vae_fast makes for one fwd + bwd at a small shape. Writes
``gpu_<card>.csv`` and ``gpu_<card>.md`` under ``--out`` (default benchmarks/results).
Needs a CUDA device; without one it exits with a message (status 2).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vae_fast  # noqa: E402
from benchmarks import impls  # noqa: E402
from benchmarks.timing import fwd_bwd_step  # noqa: E402

CASES = [
    ("latent", (4096, 512)), ("latent", (65536, 512)),
    ("bernoulli", (4096, 3072)), ("bernoulli", (32768, 3072)),
    ("continuous_bernoulli", (32768, 3072)), ("gaussian", (32768, 3072)),
    ("categorical", (64, 3, 32, 32, 256)), ("categorical", (256, 3, 32, 32, 256)),
    ("elbo_loss", (4096, 128, 3072)),
    ("dmol", (16, 3, 32, 32, 10)), ("dmol", (128, 3, 32, 32, 10)),
    # a few long rows, an SD autoencoder's batch: 4 latents of 4x64x64, 4 images of 3x512x512 (rows are cut
    # into chunks of kernels/triton ROW_CHUNK elements; one program per row would use 4 SMs)
    ("latent", (4, 16384)), ("gaussian", (4, 786432)),
]
QUICK = {("latent", (4096, 512)), ("bernoulli", (32768, 3072)), ("categorical", (64, 3, 32, 32, 256))}
# torch.compile takes tens of seconds per case: compare against it where it matters most
COMPILE = {("latent", (4096, 512)), ("bernoulli", (32768, 3072)), ("continuous_bernoulli", (32768, 3072)),
           ("categorical", (64, 3, 32, 32, 256))}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="three cases, no torch.compile")
    parser.add_argument("--no-compile", action="store_true")
    return parser.parse_args(argv)


def without_check(fn):
    """vae_fast with the data-dependent support check off (on CUDA it is deferred, not a host sync,
    but its non-blocking copy and event still cost a little)."""

    def run(*args):
        with vae_fast.validate_args(False):
            return fn(*args)

    return run


def make_case(op, shape, device):
    if op == "latent":
        inputs = impls.latent_inputs(shape, device)
        fns = {"vae_fast": impls.latent_fused, "eager": impls.latent_eager}
        nbytes = impls.latent_bytes(shape)
    elif op == "elbo_loss":
        inputs = impls.elbo_inputs(shape, device)
        fns = {"vae_fast": impls.elbo_fused, "vae_fast no check": without_check(impls.elbo_fused),
               "eager": impls.elbo_eager}
        batch, latent, pixels = shape
        nbytes = impls.latent_bytes((batch, latent)) + impls.likelihood_bytes((batch, pixels), "bernoulli")
    elif op == "dmol":
        inputs = impls.dmol_inputs(shape, device)
        fns = {"vae_fast": impls.dmol_fused, "vae_fast no check": without_check(impls.dmol_fused),
               "eager": impls.dmol_eager}
        nbytes = impls.dmol_bytes(shape)
    else:
        inputs = impls.likelihood_inputs(shape, device, op)
        fused = impls.likelihood_step(impls.FUSED_LIKELIHOOD[op])
        fns = {"vae_fast": fused, "vae_fast no check": without_check(fused),
               "eager": impls.likelihood_step(impls.EAGER_LIKELIHOOD[op])}
        nbytes = impls.likelihood_bytes(shape, op)
    return inputs, fns, nbytes


def bench(fn, inputs):
    import triton.testing

    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ms = triton.testing.do_bench(fwd_bwd_step(fn, inputs, leaves), warmup=25, rep=100, return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*inputs).backward()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbs():
    import triton.testing

    src = torch.randn(256 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def launches_per_step(fn, inputs):
    step = fwd_bwd_step(fn, inputs)
    step()  # warm (autotuning, compilation)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # demangled ATen kernel names run to kilobytes: keep the kernel's own name
    short = [n[5:].split("<")[0].split("::")[-1] if n.startswith("void ") else n for n in names]
    return len(short), sorted(set(short))


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_roofline.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    import triton

    card = torch.cuda.get_device_name()
    tag = card.replace(" ", "_").replace("/", "_")
    print(f"{card}; torch {torch.__version__}; triton {triton.__version__}; backend {vae_fast.backend('cuda')}")
    bandwidth = copy_gbs()
    print(f"device copy: {bandwidth:.0f} GB/s (read + write)")
    rows = []
    cases = [c for c in CASES if not args.quick or c in QUICK]
    for op, shape in cases:
        inputs, fns, nbytes = make_case(op, shape, "cuda")
        if not (args.quick or args.no_compile) and (op, shape) in COMPILE:
            fns["torch.compile"] = torch.compile(fns["eager"], dynamic=False)
        for name, fn in fns.items():
            ms, peak = bench(fn, inputs)
            row = {"op": op, "shape": "x".join(map(str, shape)), "impl": name, "ms": ms,
                   "gb_per_s": nbytes / (ms * 1e-3) / 1e9, "peak_mib": peak}
            rows.append(row)
            print(f"{op:22s} {row['shape']:>18s} {name:14s} {ms:9.4f} ms {row['gb_per_s']:8.0f} GB/s peak {peak:9.1f} MiB",
                  flush=True)
        del inputs
        torch.cuda.empty_cache()
    small = {}
    for op, shape, make, fn in (
        ("latent", (128, 32), lambda: impls.latent_inputs((128, 32), "cuda"), impls.latent_fused),
        ("bernoulli", (128, 784), lambda: impls.likelihood_inputs((128, 784), "cuda", "bernoulli"),
         impls.likelihood_step(impls.FUSED_LIKELIHOOD["bernoulli"])),
    ):
        count, names = launches_per_step(fn, make())
        small[op] = (shape, count, names)
        print(f"{op} {shape}: {count} CUDA kernels for fwd + bwd (incl. the loss reduction): {names}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"gpu_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by = {(r["op"], r["shape"], r["impl"]): r for r in rows}
    lines = [f"# vae_fast GPU roofline: {card}", "",
             f"torch {torch.__version__}, triton {triton.__version__}. Forward + backward, `triton.testing.do_bench` "
             f"median. Device copy: {bandwidth:.0f} GB/s (read + write). All ratios from one run.", "",
             "GB/s counts the bytes that must move (inputs read once, outputs written once); the likelihoods' "
             "backward scales the saved gradient in place, one more read + write of it (5/3 of the bytes). "
             "'no check' = `vae_fast.validate_args(False)`: no support check of x (deferred copy + event).", "",
             "| op | shape | vae_fast ms | GB/s | % of copy | no-check ms | % of copy | eager ms | × eager | compile ms | × compile | peak MiB fused / eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op, shape in dict.fromkeys((r["op"], r["shape"]) for r in rows):
        f_, e_ = by[(op, shape, "vae_fast")], by[(op, shape, "eager")]
        c_ = by.get((op, shape, "torch.compile"))
        n_ = by.get((op, shape, "vae_fast no check"))
        lines.append(f"| {op} | {shape} | {f_['ms']:.4f} | {f_['gb_per_s']:.0f} | {100 * f_['gb_per_s'] / bandwidth:.0f} | "
                     + (f"{n_['ms']:.4f} | {100 * n_['gb_per_s'] / bandwidth:.0f} | " if n_ else "– | – | ")
                     + f"{e_['ms']:.4f} | {e_['ms'] / f_['ms']:.1f} | "
                     + (f"{c_['ms']:.4f} | {c_['ms'] / f_['ms']:.2f} | " if c_ else "– | – | ")
                     + f"{f_['peak_mib']:.0f} / {e_['peak_mib']:.0f} |")
    lines.append("")
    for op, (shape, count, names) in small.items():
        lines.append(f"- {op} {shape}: {count} CUDA kernel launches for fwd + bwd: {', '.join(names)}")
    (out / f"gpu_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
