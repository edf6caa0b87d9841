"""Per-call overhead of the fused ops on the CPU backend (Python, dispatch, autograd), forward and
backward separately, in the terms of issue #18: wrapper time minus raw-kernel time.

* forward overhead = the public function on inputs that require grad (so its autograd node is
  built) minus its C++ kernel called directly on preallocated outputs;
* backward overhead = ``torch.autograd.grad`` through the op's node minus the same call through a
  Python node that returns precomputed gradients (the engine's own cost) minus the C++ backward
  kernel.

Next to them, the floor that any ``torch.autograd.Function`` pays here: an empty Function that
allocates the op's outputs (forward) and its gradients (backward); and the seed draw the latent op
needs (``torch.randint``). Shapes: the MNIST VAE's 128 x 20 latent and 128 x 784 Bernoulli, and a
128 x 784 Gaussian with a fixed variance.
Overheads are minima over alternated rounds (the machine's noise only adds to them); medians in
parentheses.

    .venv/bin/python -m benchmarks.bench_overhead [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import vae_fast
from benchmarks.timing import alternated_rounds
from vae_fast.kernels import cpu as kernels

_C = kernels._C


def _time(fns: dict, rounds: int, calls: int) -> dict:
    """name -> (min, median) seconds per call over alternated rounds."""
    times = alternated_rounds(fns, rounds, calls, warmup=200)
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


def _floor_function(output_shapes, grads):
    """An autograd.Function with the op's tensor outputs (allocated) and a backward that returns
    ``grads`` (allocating them when given as shapes): what any Python op pays."""

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            return tuple(torch.empty(shape) for shape in output_shapes)

        @staticmethod
        def backward(ctx, *grad_outputs):
            return tuple(torch.empty(g) if isinstance(g, tuple) else g for g in grads)

    return Floor


def cases(batch: int = 128, dim: int = 20, pixels: int = 784) -> dict:
    """op -> dict of zero-argument callables: kernel_fwd, public_fwd, floor_fwd, kernel_bwd (or None),
    node_bwd, engine_bwd, floor_bwd."""
    threads = torch.get_num_threads()
    mu = torch.randn(batch, dim, requires_grad=True)
    lv = torch.randn(batch, dim, requires_grad=True)
    mu_d, lv_d = mu.detach(), lv.detach()
    n = batch * dim
    z_buf, kl_buf = torch.empty(1, batch, dim), torch.empty(batch)
    gz, gk = torch.ones(batch, dim), torch.ones(batch)
    gm_buf, gs_buf = torch.empty(batch, dim), torch.empty(batch, dim)
    latent_common = (0, 0, batch, dim, 1, mu_d.data_ptr(), dim, lv_d.data_ptr(), dim, 0, 0, 0, 0, 0, 0, 0, 12345, 0)
    z, kl = vae_fast.gaussian_sample_kl(mu, lv)
    floor = _floor_function([(batch, dim), (batch,)], [(batch, dim), (batch, dim)])
    engine = _floor_function([(batch, dim), (batch,)], [gm_buf, gs_buf])
    fz, fkl = floor.apply(mu, lv)
    ez, ekl = engine.apply(mu, lv)
    latent = {
        "kernel_fwd": lambda: _C.latent_forward(*latent_common, z_buf.data_ptr(), kl_buf.data_ptr(), 0, 0, threads,
                                                [n, n, 0, 0, 0, n, batch, 0, 0]),
        "public_fwd": lambda: vae_fast.gaussian_sample_kl(mu, lv),
        "floor_fwd": lambda: floor.apply(mu, lv),
        "seed_draw": lambda: torch.randint(2**62, ()),  # (as vae_fast draws it)
        "kernel_bwd": lambda: _C.latent_backward(*latent_common, gz.data_ptr(), gk.data_ptr(), 0, gm_buf.data_ptr(),
                                                 gs_buf.data_ptr(), 0, 0, threads, [n, n, 0, 0, 0, n, batch, 0, n, n, 0, 0]),
        "node_bwd": lambda: torch.autograd.grad((z, kl), (mu, lv), (gz, gk), retain_graph=True),
        "engine_bwd": lambda: torch.autograd.grad((ez, ekl), (mu, lv), (gz, gk), retain_graph=True),
        "floor_bwd": lambda: torch.autograd.grad((fz, fkl), (mu, lv), (gz, gk), retain_graph=True),
    }
    logits = torch.randn(batch, pixels, requires_grad=True)
    logits_d = logits.detach()
    x = torch.rand(batch, pixels).round()
    lp_buf, grad_buf = torch.empty(batch), torch.empty(batch, pixels)
    m = batch * pixels
    upstream = torch.full((batch,), -1.0 / batch)  # what -log_p.mean() sends: backward returns the saved gradient
    lp = vae_fast.bernoulli_log_prob(logits, x)
    floor_l = _floor_function([(batch,), (batch, pixels)], [(batch, pixels), None])
    engine_l = _floor_function([(batch,)], [grad_buf, None])
    flp, _ = floor_l.apply(logits, x)
    (elp,) = engine_l.apply(logits, x)
    bernoulli = {
        "kernel_fwd": lambda: _C.elementwise_likelihood(0, 0, batch, batch, pixels, logits_d.data_ptr(), x.data_ptr(), 0,
                                                        0, 0, lp_buf.data_ptr(), grad_buf.data_ptr(), 0, False, -1.0 / batch,
                                                        threads, [m, m, 0, batch, m, 0]),
        "public_fwd": lambda: vae_fast.bernoulli_log_prob(logits, x),
        "floor_fwd": lambda: floor_l.apply(logits, x),
        "node_bwd": lambda: torch.autograd.grad(lp, logits, upstream, retain_graph=True),
        "engine_bwd": lambda: torch.autograd.grad(elp, logits, upstream, retain_graph=True),
        "floor_bwd": lambda: torch.autograd.grad(flp, logits, upstream, retain_graph=True),
    }
    # the Gaussian with a fixed scalar log-variance (the default 0): the kernel reads it with strides 0
    mean, mean_d, target = logits, logits_d, torch.rand(batch, pixels)
    zero = torch.zeros(())
    lp = vae_fast.gaussian_log_prob(mean, target)
    engine_g = _floor_function([(batch,)], [grad_buf, None])
    (egp,) = engine_g.apply(mean, target)
    gaussian = {
        "kernel_fwd": lambda: _C.elementwise_likelihood(0, 2, batch, batch, pixels, mean_d.data_ptr(), target.data_ptr(),
                                                        zero.data_ptr(), 0, 0, lp_buf.data_ptr(), grad_buf.data_ptr(), 0, False,
                                                        -1.0 / batch, threads, [m, m, 1, batch, m, 0]),
        "public_fwd": lambda: vae_fast.gaussian_log_prob(mean, target),
        "floor_fwd": lambda: floor_l.apply(mean, target),
        "node_bwd": lambda: torch.autograd.grad(lp, mean, upstream, retain_graph=True),
        "engine_bwd": lambda: torch.autograd.grad(egp, mean, upstream, retain_graph=True),
        "floor_bwd": lambda: torch.autograd.grad(flp, logits, upstream, retain_graph=True),
    }
    return {f"latent {batch}x{dim}": latent, f"bernoulli {batch}x{pixels}": bernoulli,
            f"gaussian (fixed scalar variance) {batch}x{pixels}": gaussian}


def measure(rounds: int = 15, calls: int = 500) -> list[dict]:
    """One row per op: microseconds (min over rounds, and medians) of every quantity above."""
    rows = []
    for op, fns in cases().items():
        t = _time(fns, rounds, calls)
        us = {name: value[0] * 1e6 for name, value in t.items()}
        med = {name: value[1] * 1e6 for name, value in t.items()}
        kernel_bwd = us.get("kernel_bwd", 0.0)
        rows.append(dict(
            op=op, kernel_fwd=us["kernel_fwd"], public_fwd=us["public_fwd"],
            fwd_overhead=us["public_fwd"] - us["kernel_fwd"],
            fwd_overhead_median=med["public_fwd"] - med["kernel_fwd"],
            floor_fwd=us["floor_fwd"], seed_draw=us.get("seed_draw", 0.0),
            kernel_bwd=kernel_bwd, node_bwd=us["node_bwd"], engine_bwd=us["engine_bwd"],
            bwd_overhead=us["node_bwd"] - us["engine_bwd"] - kernel_bwd,
            bwd_overhead_median=med["node_bwd"] - med["engine_bwd"] - med.get("kernel_bwd", 0.0),
            floor_bwd_overhead=us["floor_bwd"] - us["engine_bwd"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op | forward: public / kernel us | forward overhead us (median) | empty Function with the outputs "
             "(+ seed draw) us | backward: node / kernel us | backward overhead us (median) | "
             "empty Function's backward, allocating the gradients, us |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = f" + {r['seed_draw']:.1f}" if r["seed_draw"] else ""
        lines.append(f"| {r['op']} | {r['public_fwd']:.1f} / {r['kernel_fwd']:.1f} | {r['fwd_overhead']:.1f} "
                     f"({r['fwd_overhead_median']:.1f}) | {r['floor_fwd']:.1f}{seed} | "
                     f"{r['node_bwd'] - r['engine_bwd']:.1f} / {r['kernel_bwd']:.1f} | {r['bwd_overhead']:.1f} "
                     f"({r['bwd_overhead_median']:.1f}) | {r['floor_bwd_overhead']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(markdown(measure(args.rounds)))


if __name__ == "__main__":
    main()
