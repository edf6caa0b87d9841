"""Helpers shared by the functional modules: reductions, shape checks, the expected upstream gradient."""
from __future__ import annotations

import torch

from .._validation import check_choice, check_no_grad, check_same_device, check_tensor
from ..ops._autograd import default_expected_upstream  # noqa: F401  (the functional modules' import)

REDUCTIONS = ("none", "sum", "mean")


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    return values


def lead_ndim(name: str, param_shape, x_shape, what: str) -> int:
    """1 if the decoder output matches x (B, ...), 2 if it has an extra leading sample dim K."""
    if param_shape == x_shape:  # (torch.Size compares with Sizes and tuples: no conversion per call)
        return 1
    if len(param_shape) == len(x_shape) + 1 and param_shape[1:] == x_shape:
        return 2
    raise ValueError(f"{name} of shape {tuple(param_shape)} must have {what} (B, ...) = {tuple(x_shape)} "
                     f"or (K, B, ...) for K decoder samples")


def check_x(x, theta_name: str, theta: torch.Tensor, *, differentiable: bool) -> None:
    """x: a real tensor with a batch dim on theta's device; ``differentiable=False`` for likelihoods
    whose log-density is not differentiable in x (class indices, binned pixels)."""
    check_tensor("x", x, floating=False)
    if x.dim() < 1:
        raise ValueError(f"x must have a leading batch dim, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"x must be real, got dtype {x.dtype}")
    if not differentiable:
        check_no_grad("x", x)
    check_same_device((theta_name, "x"), (theta, x))
