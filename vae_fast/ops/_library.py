"""The ``vae_fast`` op namespace and the per-call backend lookup shared by all ops."""
from __future__ import annotations

import torch

from .. import kernels
from .. import _backend
from .._backend import backend, triton_interpreting

LIB = torch.library.Library("vae_fast", "DEF")

# Codes shared with the kernels (csrc/kernels.h, kernels/triton).
SCALE_PARAMS = {"logvar": 0, "logstd": 1, "softplus": 2}
ELEMENTWISE_LIKELIHOODS = {"bernoulli": 0, "continuous_bernoulli": 1, "gaussian": 2}


_kernel_cache: dict = {}


def kernels_for(t: torch.Tensor):
    """The kernel module of the backend that serves ``t``'s device (cached per device type
    and backend override: this sits on every call's hot path)."""
    key = (t.device.type, _backend._override)
    module = _kernel_cache.get(key)
    if module is None:
        module = _kernel_cache[key] = _resolve_kernels(t)
    return module


def _resolve_kernels(t: torch.Tensor):
    name = backend(t.device)
    if name == "triton" and t.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("vae_fast: the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if name == "cpu" and t.device.type != "cpu":
        raise RuntimeError(f"vae_fast: the 'cpu' backend serves CPU tensors only, got a tensor on {t.device}")
    return kernels.get(name)


def optional_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def register_kernel(name: str, kernel) -> None:
    """Registers ``kernel`` as op ``name``'s implementation for CPU and CUDA tensors.

    ``kernel`` returns None for outputs that were not asked for and may count invalid
    inputs as a Python int; the registered wrapper turns those into the op schema's
    empty tensors and 0-d int64 tensor.
    """

    def op_kernel(first, *args):
        outs = kernel(first, *args)
        return tuple(
            first.new_empty(0) if o is None else torch.tensor(o, dtype=torch.int64) if isinstance(o, int) else o
            for o in outs
        )

    for key in ("CPU", "CUDA"):
        LIB.impl(name, op_kernel, key)


def call(op, kernel, first: torch.Tensor, *args):
    """Runs op ``op`` (a ``torch.ops.vae_fast`` overload) on ``(first, *args)``.

    Plain eager tensors take a shortcut straight to the op's ``kernel`` (the function the
    dispatcher would reach, minus its boxing and the empty placeholder outputs: about
    10 us a call, which matters at B x Z = 128 x 32); torch.compile tracing, fake or
    subclass tensors and active dispatch modes go through the dispatcher. Either way,
    absent outputs come back as None or an empty tensor: callers accept both.
    """
    if type(first) is torch.Tensor and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0:
        return kernel(first, *args)
    return op(first, *args)


def present(t: torch.Tensor | None) -> torch.Tensor | None:
    """None for an absent (None or empty placeholder) optional tensor."""
    return None if t is None or t.numel() == 0 else t
