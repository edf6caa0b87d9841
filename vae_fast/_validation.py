"""Argument checks shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, range or name) naming the argument and what was expected, before
any kernel runs. Data-dependent checks (x inside the likelihood's support) are
fused into the kernels; see :func:`raise_if_invalid`.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import torch

from . import config

# The per-step paths test their tensors' layout against this in their one-expression checks (a module global:
# torch.strided is a further attribute read); sparse and mkldnn tensors are torch.Tensor too, and have no strides.
# (A nested tensor's layout is torch.strided, but reading its shape raises RuntimeError: the checks catch that,
# at no cost when nothing is raised, and leave the call to the general path, whose check_tensor names it.)
STRIDED = torch.strided


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    if (len(tensors) == 2 and isinstance(tensors[0], torch.Tensor) and isinstance(tensors[1], torch.Tensor)
            and tensors[0].is_cpu and tensors[1].is_cpu):  # the per-call common case, cheaply
        return
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
    if t.dim() == 0 or t.shape == target_shape:  # a scalar, or the same shape: the per-call cases, at once
        return  # (torch.broadcast_shapes goes through torch._refs: 8 us a call)
    try:
        shape = torch.broadcast_shapes(t.shape, target_shape)
    except RuntimeError:
        shape = None
    if shape != torch.Size(target_shape):
        raise ValueError(f"{name} of shape {tuple(t.shape)} must broadcast to {target_name}'s shape {tuple(target_shape)}")


def check_no_grad(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.requires_grad:
        raise ValueError(f"{name} is treated as data and must not require grad (detach it)")


def is_plain(t: torch.Tensor) -> bool:
    """A real CPU/CUDA tensor whose data can be read (not meta, fake, a subclass or a torch.func
    wrapper): only those take the eager shortcuts (host checks, direct kernel calls)."""
    # (t.is_cpu / t.is_cuda: attribute reads, 4x cheaper than building t.device; this runs on every call)
    return (type(t) is torch.Tensor and (t.is_cpu or t.is_cuda)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


# torch.autograd.grad(..., is_grads_batched=True) (and autograd.functional.jacobian(vectorize=True)) runs backward
# once under torch's legacy vmap: the upstream gradients are batched tensors without storage, which is_plain does
# not tell apart (checked in backward only, where they can arrive). Ops given one go through the dispatcher, whose
# fallback for them runs the op once per batch entry.
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def is_legacy_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a legacy-vmap batched tensor (never while torch.compile traces: dynamo cannot trace the
    test, and traced graphs are batched by functorch, which the ops' vmap rules serve)."""
    return not torch.compiler.is_compiling() and _legacy_batched(t)


class DeferredChecks:
    """Support checks of device tensors read without a host sync.

    The kernel's out-of-support count is copied to pinned host memory with a non-blocking copy
    and an event recorded after it; every later check (and :func:`check_pending_errors`) first
    looks at the earlier counts whose event has completed and raises for the first non-zero one.
    Trade-off: on CUDA the ValueError for bad ``x`` arrives one or a few calls late (naming the
    call it belongs to) instead of at the call itself — but the training step never waits for
    the GPU. ``make_event`` and ``copy_to_host`` are parameters so the queue can be tested
    without a GPU."""

    def __init__(self, make_event=None, copy_to_host=None, max_pending: int = 64):
        self.pending = collections.deque()
        self.lock = threading.Lock()
        self.make_event = make_event or (lambda: torch.cuda.Event())
        self.copy_to_host = copy_to_host or _pinned_copy
        self.max_pending = max_pending
        self.calls = 0

    def add(self, count: torch.Tensor, message: str) -> None:
        self.raise_completed()
        host = self.copy_to_host(count)
        event = self.make_event()
        event.record()
        with self.lock:
            self.calls += 1
            self.pending.append((event, host, message, self.calls))
            overflow = len(self.pending) > self.max_pending
        if overflow:  # bound the queue: wait for the oldest (long done in any real loop)
            self.pending[0][0].synchronize()
            self.raise_completed()

    def raise_completed(self, wait: bool = False) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    return
                event, host, message, call = self.pending[0]
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
                self.pending.popleft()
            if _any_nonzero(host):
                with self.lock:
                    self.pending.clear()  # later counts may be from the same bad batch
                raise ValueError(f"{message} (support check of an earlier call, deferred to avoid a host sync: "
                                 f"call {call} of this process's deferred checks)")


def _any_nonzero(counts: torch.Tensor) -> bool:
    """Whether a CPU tensor of support counts (0-d, per row or per block) holds a non-zero count: a
    host read (no kernel; on CUDA the counts reach the host by one non-blocking copy, not by a
    reduction launch)."""
    return any(counts.reshape(-1).tolist())


def _pinned_copy(count: torch.Tensor) -> torch.Tensor:
    host = torch.empty(count.shape, dtype=count.dtype, device="cpu", pin_memory=True)
    host.copy_(count, non_blocking=True)
    return host


DEFERRED = DeferredChecks()


def check_pending_errors() -> None:
    """Wait for the deferred support checks of earlier CUDA calls and raise the first failure
    (a no-op on CPU, where every check is immediate). Call it at the end of an epoch or before
    trusting a result."""
    DEFERRED.raise_completed(wait=True)


def raise_if_invalid(num_invalid: torch.Tensor | int, message: str) -> None:
    """Raise ``ValueError(message)`` if a kernel counted out-of-support values (``num_invalid``: an
    int, or an integer tensor of counts of any shape, e.g. one per row as the Triton kernels write them).

    CPU counts are read at once; CUDA counts through :data:`DEFERRED` (no host sync). Skipped
    under torch.compile (it would force a graph break), for meta/fake tensors and torch.func
    transforms (no data to read), and inside ``vae_fast.validate_args(False)``."""
    if type(num_invalid) is int:  # the C++ kernels' count: nothing to read, nothing to trace
        if num_invalid and config.VALIDATE_ARGS.get():
            raise ValueError(message)
        return
    if not config.VALIDATE_ARGS.get() or torch.compiler.is_compiling():
        return
    if not is_plain(num_invalid):
        return
    if num_invalid.is_cpu:
        if _any_nonzero(num_invalid):
            raise ValueError(message)
        return
    DEFERRED.add(num_invalid, message)
