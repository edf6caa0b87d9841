"""The ``vae_fast`` op namespace and the per-call backend lookup shared by all ops."""
from __future__ import annotations

import torch

from .. import kernels
from .._backend import backend, triton_interpreting

LIB = torch.library.Library("vae_fast", "DEF")

# Codes shared with the kernels (csrc/kernels.h, kernels/triton).
SCALE_PARAMS = {"logvar": 0, "logstd": 1, "softplus": 2}
ELEMENTWISE_LIKELIHOODS = {"bernoulli": 0, "continuous_bernoulli": 1, "gaussian": 2}


def kernels_for(t: torch.Tensor):
    """The kernel module of the backend that serves ``t``'s device."""
    name = backend(t.device)
    if name == "triton" and t.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("vae_fast: the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if name == "cpu" and t.device.type != "cpu":
        raise RuntimeError(f"vae_fast: the 'cpu' backend serves CPU tensors only, got a tensor on {t.device}")
    return kernels.get(name)


def impl_all_devices(name: str, fn) -> None:
    """Registers ``fn`` as the kernel of op ``name`` for CPU and CUDA tensors."""
    for key in ("CPU", "CUDA"):
        LIB.impl(name, fn, key)


def optional_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
