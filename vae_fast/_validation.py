"""Argument checks shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, range or name) naming the argument and what was expected, before
any kernel runs. Data-dependent checks (x inside the likelihood's support) are
fused into the kernels; see :func:`raise_if_invalid`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_validate_data = True


def set_validate_args(enabled: bool) -> None:
    """Turn the data-dependent support checks on or off (default on).

    Checking that ``x`` lies in the likelihood's support costs nothing extra in the
    kernels (the count is fused into the pass) but reading the count back is a
    host-device sync on CUDA; training loops that know their data may turn it off.
    """
    global _validate_data
    _validate_data = bool(enabled)


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in zip(names, tensors) if isinstance(t, torch.Tensor)]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in zip(names, tensors) if isinstance(t, torch.Tensor)]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; use one floating dtype")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_broadcastable(name: str, t: torch.Tensor, target_shape, target_name: str) -> None:
    try:
        shape = torch.broadcast_shapes(t.shape, target_shape)
    except RuntimeError:
        shape = None
    if shape != torch.Size(target_shape):
        raise ValueError(f"{name} of shape {tuple(t.shape)} must broadcast to {target_name}'s shape {tuple(target_shape)}")


def check_no_grad(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.requires_grad:
        raise ValueError(f"{name} is treated as data and must not require grad (detach it)")


def raise_if_invalid(num_invalid: torch.Tensor | int, message: str) -> None:
    """Raise ``ValueError(message)`` if a kernel counted out-of-support values.

    Skipped under torch.compile (it would force a graph break) and when
    :func:`set_validate_args` turned it off."""
    if not _validate_data or torch.compiler.is_compiling():
        return
    if int(num_invalid) != 0:
        raise ValueError(message)
