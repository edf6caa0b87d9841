"""Per-call overhead of the fused ops on the CPU backend (Python, dispatch, autograd), forward and
backward separately, in the terms of issue #18: wrapper time minus raw-kernel time.

* forward overhead = the public function on inputs that require grad (so its autograd node is
  built) minus its C++ kernel's own time writing into new outputs, as the op's kernel does (the kernel
  called on outputs allocated in the same call, minus those allocations alone: allocating is the
  wrapper's work, so it counts as overhead). Next to it the older measure, the public function minus the
  kernel on outputs reused call after call: at 128 x 784 those stay in cache, which no training step's
  outputs do (writing a new 400 KB gradient costs the kernel 1-5 us more here, 13-17 with one thread), so
  that difference also holds memory traffic that is not Python or dispatch;
* backward overhead = ``torch.autograd.grad`` through the op's node minus the same call through a
  Python node that returns precomputed gradients (the engine's own cost) minus the C++ backward
  kernel;
* in-call forward overhead = the public function's time per call outside its C++ entry point, the kernel timed
  inside the same calls (a timer around the extension's entry point, whose own cost, about 0.2 us, is included):
  no second measurement of the kernel, whose noise (1-2 % of 60 us at 16 x 64 x 256) makes the difference above
  unsteady by a microsecond. It also shows what the Python costs where it runs: after a kernel that streamed
  megabytes through the cache (the categorical's 2 MiB), the same code misses the cache and costs microseconds
  more than after a small one.

Next to them, the floor that any ``torch.autograd.Function`` pays here: an empty Function that
allocates the op's outputs (forward) and its gradients (backward), called on its own (warm caches) and right
after the op's kernel (the kernel then the Function, minus the kernel alone: the caches as the public call finds
them after its kernel, which the in-call column measures in); and the seed draw the latent op needs
(``torch.randint``). Shapes: the MNIST VAE's 128 x 20 latent, every elementwise likelihood at 128 x 784
(the Gaussian with a fixed and a learned scalar variance, the Laplace with a learned scale as in the LDM
autoencoder), a 256-way categorical over 16 x 64 pixels and a packed 16 x 3 x 8 x 8 logistic mixture.
Overheads are minima over alternated rounds (the machine's noise only adds to them); in parentheses the
median over rounds of each round's own difference (a slow spell moves both of its terms). ``main`` first fixes
glibc's mmap and trim thresholds (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would):
with its adaptive defaults, whether a 0.4-1 MiB buffer is mapped afresh (and page-faulted in by the kernel, 60-90
us a call) depends on the process's allocation history, and one run in four here measured the public calls or the
kernel alone that way; page faults are not per-call overhead (the README's step table keeps glibc's defaults).

    .venv/bin/python -m benchmarks.bench_overhead [--rounds 15]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch

import vae_fast
from benchmarks.timing import alternated_rounds
from vae_fast.kernels import cpu as kernels
from vae_fast.ops.codes import TargetDtype

_C = kernels._C


def _time(fns: dict, rounds: int, calls: int) -> dict:
    """name -> seconds per call in each of the alternated rounds."""
    return alternated_rounds(fns, rounds, calls, warmup=200)


def _paired_median(times: dict, plus: tuple, minus: tuple) -> float:
    """The median over rounds of sum(plus) - sum(minus), each round's times taken together (a slow spell that
    lasts a round moves both sides): steadier than a difference of medians."""
    return statistics.median(sum(times[name][r] for name in plus) - sum(times[name][r] for name in minus if name in times)
                             for r in range(len(times[plus[0]])))


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


def _kernel_callables(kernel, output_shapes) -> dict:
    """``kernel(*outputs)`` run on outputs reused call after call (kernel_fwd), on outputs allocated in the call
    (kernel_new_fwd), and those allocations alone (alloc_fwd): kernel_new_fwd - alloc_fwd is the kernel's time
    writing into new memory, as the op's kernel does."""
    reused = [torch.empty(shape) for shape in output_shapes]
    return {"kernel_fwd": lambda: kernel(*reused),
            "kernel_new_fwd": lambda: kernel(*[torch.empty(shape) for shape in output_shapes]),
            "alloc_fwd": lambda: [torch.empty(shape) for shape in output_shapes]}


def cases(batch: int = 128, dim: int = 20, pixels: int = 784) -> dict:
    """op -> dict of zero-argument callables: kernel_fwd, kernel_new_fwd, alloc_fwd, public_fwd, floor_fwd,
    kernel_bwd (or None), node_bwd, engine_bwd, floor_bwd."""
    threads = torch.get_num_threads()
    mu = torch.randn(batch, dim, requires_grad=True)
    lv = torch.randn(batch, dim, requires_grad=True)
    mu_d, lv_d = mu.detach(), lv.detach()
    n = batch * dim
    gz, gk = torch.ones(batch, dim), torch.ones(batch)
    gm_buf, gs_buf = torch.empty(batch, dim), torch.empty(batch, dim)
    latent_common = (0, 0, batch, dim, 1, mu_d.data_ptr(), dim, lv_d.data_ptr(), dim, 0, 0, 0, 0, 0, 0, 0, 12345, 0)
    z, kl = vae_fast.gaussian_sample_kl(mu, lv)
    floor = _floor_function([(batch, dim), (batch,)], [(batch, dim), (batch, dim)])
    engine = _floor_function([(batch, dim), (batch,)], [gm_buf, gs_buf])
    fz, fkl = floor.apply(mu, lv)
    ez, ekl = engine.apply(mu, lv)
    latent = {
        **_kernel_callables(lambda z_out, kl_out: _C.latent_forward(
            *latent_common, z_out.data_ptr(), kl_out.data_ptr(), 0, 0, threads, [n, n, 0, 0, 0, n, batch, 0, 0]),
            [(1, batch, dim), (batch,)]),
        "public_fwd": lambda: vae_fast.gaussian_sample_kl(mu, lv),
        "floor_fwd": lambda: floor.apply(mu, lv),
        "seed_draw": lambda: torch.randint(2**62, ()),  # (as vae_fast draws it)
        "kernel_bwd": lambda: _C.latent_backward(*latent_common, gz.data_ptr(), gk.data_ptr(), 0, gm_buf.data_ptr(),
                                                 gs_buf.data_ptr(), 0, 0, threads, [n, n, 0, 0, 0, n, batch, 0, n, n, 0, 0]),
        "node_bwd": lambda: torch.autograd.grad((z, kl), (mu, lv), (gz, gk), retain_graph=True),
        "engine_bwd": lambda: torch.autograd.grad((ez, ekl), (mu, lv), (gz, gk), retain_graph=True),
        "floor_bwd": lambda: torch.autograd.grad((fz, fkl), (mu, lv), (gz, gk), retain_graph=True),
        "entry": "latent_step_forward",
    }
    rows = {f"latent {batch}x{dim}": latent}
    rows.update(likelihood_cases(batch, pixels, threads))
    return rows


def _likelihood_case(public, inputs, differentiable, kernel, output_shapes, grad_shapes, entry: str) -> dict:
    """The callables of one likelihood row: ``public(*inputs)`` -> log p (B,) (its node built for the inputs
    that require grad, ``differentiable``), ``kernel(*outputs)`` its raw C++ kernel writing outputs of
    ``output_shapes``, ``grad_shapes`` the shape of each input's gradient (None where it gets none), which the
    op computes in forward and its backward hands out."""
    rows = public(*inputs).shape[0]
    upstream = torch.full((rows,), -1.0 / rows)  # what -log_p.mean() sends: backward returns the saved gradient
    log_p = public(*inputs)
    computed = [g for g in grad_shapes if g is not None]
    floor = _floor_function([(rows,), *computed], grad_shapes)
    engine = _floor_function([(rows,)], [None if g is None else torch.empty(g) for g in grad_shapes])
    floor_out = floor.apply(*inputs)[0]
    (engine_out,) = engine.apply(*inputs)
    return {
        **_kernel_callables(kernel, output_shapes),
        "public_fwd": lambda: public(*inputs),
        "floor_fwd": lambda: floor.apply(*inputs),
        "node_bwd": lambda: torch.autograd.grad(log_p, differentiable, upstream, retain_graph=True),
        "engine_bwd": lambda: torch.autograd.grad(engine_out, differentiable, upstream, retain_graph=True),
        "floor_bwd": lambda: torch.autograd.grad(floor_out, differentiable, upstream, retain_graph=True),
        "entry": entry,
    }


def likelihood_cases(batch: int, pixels: int, threads: int) -> dict:
    """One row per likelihood at the shape a training step sends: 128 x 784 for the elementwise ones (fixed and
    learned scalar variances), a 16 x 64-pixel 256-way categorical and a 16 x 3 x 8 x 8 packed logistic mixture."""
    theta = torch.randn(batch, pixels, requires_grad=True)
    theta_d = theta.detach()
    binary, grey = torch.rand(batch, pixels).round(), torch.rand(batch, pixels)
    zero, learned = torch.zeros(()), torch.zeros((), requires_grad=True)
    n = batch * pixels
    shape = (batch, pixels)

    def raw(code, x, scale=None, scale_grad=False):
        """(kernel(log_prob, grad[, grad_scale]), the outputs' shapes)"""
        def kernel(log_prob, grad, grad_scale=None):
            return _C.elementwise_step(0, code, batch, pixels, theta_d.data_ptr(), n, x.data_ptr(), n,
                                       0 if scale is None else scale.data_ptr(), 0.0, log_prob.data_ptr(),
                                       grad.data_ptr(),
                                       0 if grad_scale is None else grad_scale.data_ptr(), -1.0 / batch, threads)
        return kernel, [(batch,), shape] + ([(batch,)] if scale_grad else [])

    cases = {
        f"bernoulli {batch}x{pixels}": _likelihood_case(
            vae_fast.bernoulli_log_prob, (theta, binary), theta, *raw(0, binary), [shape, None], "elementwise_step"),
        f"continuous bernoulli {batch}x{pixels}": _likelihood_case(
            vae_fast.continuous_bernoulli_log_prob, (theta, grey), theta, *raw(1, grey), [shape, None], "elementwise_step"),
        f"gaussian (fixed scalar variance) {batch}x{pixels}": _likelihood_case(
            vae_fast.gaussian_log_prob, (theta, grey), theta, *raw(2, grey), [shape, None], "elementwise_step"),
        f"gaussian (learned scalar variance) {batch}x{pixels}": _likelihood_case(
            vae_fast.gaussian_log_prob, (theta, grey, learned), (theta, learned), *raw(2, grey, zero, True),
            [shape, None, ()], "elementwise_step"),
        f"laplace (learned scalar scale) {batch}x{pixels}": _likelihood_case(
            vae_fast.laplace_log_prob, (theta, grey, learned), (theta, learned), *raw(4, grey, zero, True),
            [shape, None, ()], "elementwise_step"),
        f"mse {batch}x{pixels}": _likelihood_case(
            vae_fast.mse_log_prob, (theta, grey), theta, *raw(3, grey), [shape, None], "elementwise_step"),
    }
    rows, positions, classes = 16, 64, 256
    logits = torch.randn(rows, positions, classes, requires_grad=True)
    logits_d, target = logits.detach(), torch.randint(0, classes, (rows, positions))
    cases[f"categorical {rows}x{positions}x{classes}"] = _likelihood_case(
        vae_fast.categorical_log_prob, (logits, target), logits,
        lambda log_prob, grad: _C.categorical_step(0, rows, positions, classes, logits_d.data_ptr(), logits_d.numel(),
                                                   target.data_ptr(), int(TargetDtype.INT64), target.numel(),
                                                   log_prob.data_ptr(),
                                                   grad.data_ptr(), -1.0 / rows, threads),
        [(rows,), (rows, positions, classes)], [(rows, positions, classes), None], "categorical_step")
    mixtures, side = 5, 8
    packed = mixtures * (1 + 3 * 3)
    params = torch.randn(rows, packed, side, side, requires_grad=True)
    params_d = params.detach()
    images = torch.randint(0, 256, (rows, 3, side, side)) / 127.5 - 1
    cases[f"logistic mixture (packed) {rows}x3x{side}x{side}, M={mixtures}"] = _likelihood_case(
        lambda x, p: vae_fast.dmol_packed_log_prob(x, p), (images, params), params,
        lambda log_prob, grad: _C.dmol_packed_step(0, rows, 3, mixtures, side * side, images.data_ptr(),
                                                   images.numel(), params_d.data_ptr(), params_d.numel(), 1.0 / 255,
                                                   -7.0, log_prob.data_ptr(), grad.data_ptr(), -1.0 / rows, threads),
        [(rows,), (rows, packed, side, side)], [None, (rows, packed, side, side)], "dmol_packed_step")
    return cases


def outside_kernel(public, entry: str, rounds: int, calls: int) -> tuple[float, float]:
    """(min, median) over ``rounds`` rounds of the seconds per call of ``public()`` spent outside the extension's
    entry point ``entry``, which is timed inside the same calls (the timer's own cost, about 0.2 us, counts as
    outside)."""
    original = getattr(_C, entry)
    clock = time.perf_counter
    inside = [0.0]

    def timed(*args):
        start = clock()
        result = original(*args)
        inside[0] += clock() - start
        return result

    setattr(_C, entry, timed)  # (the CPU wrappers look the entry point up on the module at every call)
    try:
        for _ in range(200):
            public()
        outside = []
        for _ in range(rounds):
            inside[0] = 0.0
            start = clock()
            for _ in range(calls):
                public()
            outside.append((clock() - start - inside[0]) / calls)
    finally:
        setattr(_C, entry, original)
    return min(outside), statistics.median(outside)


def measure(rounds: int = 15, calls: int = 500) -> list[dict]:
    """One row per op: microseconds (min over rounds; the overheads also as the median over rounds of each
    round's difference) of every quantity above."""
    rows = []
    for op, fns in cases().items():
        entry = fns.pop("entry")
        # the empty Function again, right after the op's kernel (as in the public call: the caches as the kernel
        # left them), minus that kernel alone: what any autograd.Function costs there
        kernel_new, floor = fns["kernel_new_fwd"], fns["floor_fwd"]
        fns["floor_after_kernel_fwd"] = lambda kernel_new=kernel_new, floor=floor: (kernel_new(), floor())
        in_call = outside_kernel(fns["public_fwd"], entry, rounds, calls)
        t = _time(fns, rounds, calls)
        us = {name: min(v) * 1e6 for name, v in t.items()}
        kernel_bwd = us.get("kernel_bwd", 0.0)
        kernel_new = us["kernel_new_fwd"] - us["alloc_fwd"]  # the kernel writing into new outputs
        rows.append(dict(
            op=op, kernel_fwd=us["kernel_fwd"], kernel_new_fwd=kernel_new, public_fwd=us["public_fwd"],
            fwd_overhead=us["public_fwd"] - kernel_new,
            fwd_overhead_median=_paired_median(t, ("public_fwd", "alloc_fwd"), ("kernel_new_fwd",)) * 1e6,
            fwd_overhead_reused=us["public_fwd"] - us["kernel_fwd"],
            in_call_overhead=in_call[0] * 1e6, in_call_overhead_median=in_call[1] * 1e6,
            floor_fwd=us["floor_fwd"], seed_draw=us.get("seed_draw", 0.0),
            floor_after_kernel=_paired_median(t, ("floor_after_kernel_fwd",), ("kernel_new_fwd",)) * 1e6,
            kernel_bwd=kernel_bwd, node_bwd=us["node_bwd"], engine_bwd=us["engine_bwd"],
            bwd_overhead=us["node_bwd"] - us["engine_bwd"] - kernel_bwd,
            bwd_overhead_median=_paired_median(t, ("node_bwd",), ("engine_bwd", "kernel_bwd")) * 1e6,
            floor_bwd_overhead=us["floor_bwd"] - us["engine_bwd"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op | forward: public / kernel on new outputs (on reused outputs) us | forward overhead us (median) "
             "[vs the kernel on reused outputs] | in-call forward overhead us (median) | empty Function with the outputs (+ seed draw) us | "
             "the same after the op's kernel us (median) | "
             "backward: node / kernel us | backward overhead us (median) | "
             "empty Function's backward, allocating the gradients, us |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = f" + {r['seed_draw']:.1f}" if r["seed_draw"] else ""
        lines.append(f"| {r['op']} | {r['public_fwd']:.1f} / {r['kernel_new_fwd']:.1f} ({r['kernel_fwd']:.1f}) | "
                     f"{r['fwd_overhead']:.1f} ({r['fwd_overhead_median']:.1f}) [{r['fwd_overhead_reused']:.1f}] | "
                     f"{r['in_call_overhead']:.1f} ({r['in_call_overhead_median']:.1f}) | "
                     f"{r['floor_fwd']:.1f}{seed} | {r['floor_after_kernel']:.1f} | "
                     f"{r['node_bwd'] - r['engine_bwd']:.1f} / {r['kernel_bwd']:.1f} | {r['bwd_overhead']:.1f} "
                     f"({r['bwd_overhead_median']:.1f}) | {r['floor_bwd_overhead']:.1f} |")
    return "\n".join(lines)


def steady_malloc() -> bool:
    """Fix glibc's mmap threshold (64 MiB) and trim threshold (256 MiB), so that freed buffers below them are
    reused from the heap rather than unmapped and faulted in again; False where the C library is not glibc."""
    libc_name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # (glibc's malloc.h)
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    steady_malloc()
    print(markdown(measure(args.rounds)))


if __name__ == "__main__":
    main()
