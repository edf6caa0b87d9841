"""Per-call overhead of the two ways to expose an op with autograd (the reason vae_fast's public
functions wrap ``torch.library.Library`` ops in a thin ``autograd.Function``), forward + backward
of a trivial op on a 128 x 32 tensor:

* ``torch.library.custom_op`` with ``register_autograd``;
* ``torch.library.Library`` op + ``register_fake``, called from an ``autograd.Function``.

Both compile with ``torch.compile(fullgraph=True)``. Run:
``.venv/bin/python -m pytest benchmarks/bench_dispatch.py --benchmark-enable``.
"""
import torch

_lib = torch.library.Library("vae_fast_bench", "DEF")
_lib.define("scale_by_two(Tensor x) -> Tensor")
_lib.impl("scale_by_two", lambda x: x * 2, "CPU")
torch.library.register_fake("vae_fast_bench::scale_by_two")(lambda x: torch.empty_like(x))


@torch.library.custom_op("vae_fast_bench::scale_by_two_custom", mutates_args=())
def _scale_custom(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_scale_custom.register_fake(lambda x: torch.empty_like(x))
_scale_custom.register_autograd(lambda ctx, grad: grad * 2)


class _ScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ops.vae_fast_bench.scale_by_two(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.vae_fast_bench.scale_by_two(grad)


def _fwd_bwd(fn):
    x = torch.randn(128, 32, requires_grad=True)

    def run():
        x.grad = None
        fn(x).sum().backward()

    return run


def test_custom_op(benchmark):
    benchmark.group = "dispatch 128x32"
    benchmark(_fwd_bwd(_scale_custom))


def test_library_op_in_autograd_function(benchmark):
    benchmark.group = "dispatch 128x32"
    benchmark(_fwd_bwd(_ScaleFunction.apply))


def test_eager_reference(benchmark):
    benchmark.group = "dispatch 128x32"
    benchmark(_fwd_bwd(lambda x: x * 2))
