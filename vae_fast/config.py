"""Settings of vae_fast, as thread-safe context managers.

Each setting has a process-wide default (``set_*``) and a per-context override (the context
manager, on :mod:`contextvars`): a ``with`` block affects only the code running inside it, in
its own thread or asyncio task, never a concurrent caller.

* :func:`validate_args` — read the support check of ``x`` (fused into the kernels) and raise.
* :func:`inplace_backward` — let the likelihoods' backward scale their saved gradient in place
  (one backward per graph; opt-in, see below).
* :func:`save_inputs` — make the likelihoods keep their inputs alive for double backward.
* ``vae_fast.use_backend(name)`` — force a backend (:mod:`vae_fast._backend`).

A setting is read when an op runs forward and recorded with its autograd node, so a backward
pass (which on CUDA runs on autograd's device threads, outside the caller's context) behaves
as the forward pass was told. Code compiled by torch.compile sees the process-wide defaults
(dynamo cannot trace a contextvar read).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import torch

_UNSET = object()


class _Setting:
    """A process-wide default plus a contextvar override."""

    # Overrides entered and not yet left, in any thread: while there are none (every training step
    # that sets nothing) get() returns the default without reading the contextvar.
    active_overrides = 0
    # Settings whose process-wide default is not their built-in one: while this and active_overrides are 0,
    # every setting has its built-in value, which the per-step autograd Functions hold as class constants.
    changed_defaults = 0
    _lock = threading.Lock()

    def __init__(self, name: str, default):
        self.default = self.builtin = default
        self.var = contextvars.ContextVar(f"vae_fast.{name}", default=_UNSET)

    def set_default(self, value) -> None:
        """Make ``value`` the process-wide default (the ``set_*`` functions below)."""
        with _Setting._lock:
            _Setting.changed_defaults += (value != self.builtin) - (self.default != self.builtin)
            self.default = value

    def get(self):
        # is_compiling first: dynamo cannot trace ContextVar.get (compiled code sees the default), and reading
        # the override count while tracing would guard the graph on it (a recompile per change)
        if torch.compiler.is_compiling():
            return self.default
        return self.get_eager()

    def get_eager(self):
        """:meth:`get` for callers that have checked they run eagerly (not under torch.compile): the
        per-step paths, which read settings on every call."""
        if not _Setting.active_overrides:
            return self.default
        value = self.var.get()
        return self.default if value is _UNSET else value

    @contextlib.contextmanager
    def override(self, value):
        with _Setting._lock:
            _Setting.active_overrides += 1
        token = self.var.set(value)
        try:
            yield
        finally:
            self.var.reset(token)
            with _Setting._lock:
                _Setting.active_overrides -= 1


VALIDATE_ARGS = _Setting("validate_args", True)
INPLACE_BACKWARD = _Setting("inplace_backward", False)
SAVE_INPUTS = _Setting("save_inputs", False)
BACKEND = _Setting("backend", None)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def validate_args(enabled: bool = True):
    """``with vae_fast.validate_args(False):`` skips the data-dependent support check of ``x``.

    The check itself is fused into the kernels (an out-of-support count); reading it is what
    costs: on CPU nothing measurable, on CUDA it is done without a host sync by default (the
    count is copied back asynchronously and checked on a later call, see
    :func:`vae_fast.check_pending_errors`)."""
    return VALIDATE_ARGS.override(_check_bool("enabled", enabled))


def set_validate_args(enabled: bool) -> None:
    """Process-wide default of :func:`validate_args` (default True)."""
    VALIDATE_ARGS.set_default(_check_bool("enabled", enabled))


def inplace_backward(enabled: bool = True):
    """``with vae_fast.inplace_backward():`` lets ops created inside scale their saved gradient
    in place during backward when the upstream gradient is not the expected one.

    Off by default, because it allows one backward pass per graph only (a second one, e.g.
    ``retain_graph=True``, raises) and the returned gradient aliases the saved buffer. What it
    buys is small on CPU (where the expected upstream gradient is detected on the host and
    backward is free either way) and one pass over the gradient on CUDA, where the rescaling
    kernel then skips rows whose upstream gradient is the expected one without a host sync."""
    return INPLACE_BACKWARD.override(_check_bool("enabled", enabled))


def set_inplace_backward(enabled: bool) -> None:
    """Process-wide default of :func:`inplace_backward` (default False)."""
    INPLACE_BACKWARD.set_default(_check_bool("enabled", enabled))


def save_inputs(enabled: bool = True):
    """``with vae_fast.save_inputs():`` makes the likelihood ops keep their decoder output alive
    for double backward (``create_graph=True``), as torch's own losses do.

    By default they keep only the gradient computed in forward plus a weak reference to the
    input: double backward works whenever the input is still alive at backward time (held by
    the caller, a leaf, saved by another op) and raises a RuntimeError saying so otherwise;
    inside this context it always works, at the cost of one decoder-sized buffer."""
    return SAVE_INPUTS.override(_check_bool("enabled", enabled))
