"""The ``vae_fast`` op namespace and the per-call backend lookup shared by all ops."""
from __future__ import annotations

import torch

from .. import config, kernels
from .._backend import backend, triton_interpreting
from .._validation import is_plain
from ._autograd import FORWARD_AD, _dispatch_modes, _transforms_active, loop_vmap

LIB = torch.library.Library("vae_fast", "DEF")

_kernel_cache: dict = {}


def kernels_for(t: torch.Tensor):
    """The kernel module of the backend that serves ``t``'s device (cached per device type
    and backend override: this sits on every call's hot path)."""
    key = ("cpu" if t.is_cpu else t.device.type, config.BACKEND.get())
    module = _kernel_cache.get(key)
    if module is None:
        module = _kernel_cache[key] = _resolve_kernels(t)
    return module


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def step_kernels_for(t: torch.Tensor, output_elements: int):
    """The kernel module serving a plain eager call on the CPU tensor ``t`` if it has per-step entry
    points (``latent_step_forward``, ...) for ``t``'s dtype (``STEP_DTYPES``) and outputs of
    ``output_elements`` elements (below ``STEP_MAX_OUTPUT_BYTES``; the heads pass 0: their step functions take
    large gradients from the buffer pool): the CPU extension, see kernels/cpu.py; else None.

    Plain eager as in :func:`vae_fast.ops._autograd.eager_call`, tested inline with the backend
    lookup of :func:`kernels_for` (each Python call costs 0.1 us here, and this runs on every call
    of a training step)."""
    # (is_compiling first: dynamo folds it to True and traces nothing after it)
    if (torch.compiler.is_compiling() or _transforms_active() or _dispatch_modes() or FORWARD_AD._current_level >= 0
            or type(t) is not torch.Tensor or not t.is_cpu or _functorch_wrapped(t)):
        return None
    # (while no setting is overridden, the backend setting is its default, None: the dtype alone is the key)
    key = (t.dtype, config.BACKEND.get_eager()) if _Setting.active_overrides else t.dtype
    entry = _step_cache.get(key)
    if entry is None:
        entry = _step_cache[key] = _step_entry(t)
    kernels, max_output_elements = entry
    return kernels if output_elements < max_output_elements else None


# dtype (no override active) or (dtype, backend setting) -> (kernels, max output elements): 0 without step entry points
_step_cache: dict = {}
_Setting = config._Setting  # (BACKEND itself has no process-wide default to set: only use_backend overrides)


def _step_entry(t: torch.Tensor):
    kernels = kernels_for(t)
    if t.dtype not in getattr(kernels, "STEP_DTYPES", ()):
        return None, 0
    return kernels, kernels.STEP_MAX_OUTPUT_BYTES // t.element_size()


def _resolve_kernels(t: torch.Tensor):
    name = backend(t.device)
    if name == "triton" and t.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("vae_fast: the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if name == "cpu" and t.device.type != "cpu":
        raise RuntimeError(f"vae_fast: the 'cpu' backend serves CPU tensors only, got a tensor on {t.device}")
    return kernels.get(name)


def optional_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and return reductions (log-likelihoods, KL) in: float64
    for float64 inputs, float32 otherwise (half-precision inputs give float32 losses, as torch's
    losses do under autocast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_op(name: str, schema: str, kernel, fake, function) -> None:
    """Defines ``torch.ops.vae_fast.<name>`` with ``kernel`` for CPU and CUDA tensors, ``fake`` for
    meta/fake tensors, and the autograd of the ``autograd.Function`` ``function`` (if given: its
    setup_context and backward are the op's, so the op and the public functions share one autograd
    implementation). The op and the function get the same vmap rule: the generic loop over the
    vmapped dim (:func:`loop_vmap`) unless the function defines its own.

    ``kernel`` returns None for outputs that were not asked for and may count invalid inputs as
    a Python int (C++) or as integer counts per row or block (Triton: no reduction launch on the
    eager path, see :func:`vae_fast._validation.raise_if_invalid`); the registered wrapper turns
    those into the op schema's empty tensors and 0-d int64 count.

    Also defines ``torch.ops.vae_fast.<name>_traced``: the same kernels and fake without autograd, the op that
    ``function`` calls while torch.compile traces it (see :func:`call`; ``kernel.traced_op``)."""
    LIB.define(f"{name}{schema}")
    LIB.define(f"{name}_traced{schema}")

    def op_kernel(first, *args):
        return tuple(_schema_output(first, o) for o in kernel(first, *args))

    for op_name in (name, f"{name}_traced"):
        for key in ("CPU", "CUDA"):
            LIB.impl(op_name, op_kernel, key)
        torch.library.register_fake(f"vae_fast::{op_name}", fake, lib=LIB)
    if hasattr(kernel, "traced_op"):  # (one kernel function per op: call() finds the twin through it)
        raise RuntimeError(f"vae_fast: {kernel.__name__} already serves {kernel.traced_op}")
    kernel.traced_op = getattr(torch.ops.vae_fast, f"{name}_traced").default
    op = getattr(torch.ops.vae_fast, name).default
    vmap_rule = loop_vmap(op)
    if function is not None:
        torch.library.register_autograd(f"vae_fast::{name}", function.backward, setup_context=function.setup_context,
                                        lib=LIB)
        if "vmap" not in vars(function):
            function.vmap = staticmethod(vmap_rule)
        vmap_rule = function.vmap
    torch.library.register_vmap(f"vae_fast::{name}", vmap_rule, lib=LIB)


def _schema_output(first: torch.Tensor, out):
    if out is None:
        return first.new_empty(0)
    if isinstance(out, int):
        return first.new_full((), out, dtype=torch.int64)  # (first's device, as the fake kernels; torch.tensor: +1.3 us)
    if not out.is_floating_point() and out.dim() > 0:  # support counts per row / block
        return out.sum(dtype=torch.int64)
    return out


def call(op, kernel, first: torch.Tensor, *args):
    """Runs op ``op`` (a ``torch.ops.vae_fast`` overload) on ``(first, *args)``.

    Plain eager CPU/CUDA tensors take a shortcut straight to the op's ``kernel`` (the function
    the dispatcher would reach, minus its boxing and the empty placeholder outputs: about
    10 us a call, which matters at B x Z = 128 x 32); torch.compile tracing records the op's ``_traced`` twin
    (``kernel.traced_op``: no autograd layer of its own; the Function being traced is the autograd); torch.export,
    meta, fake or subclass tensors, torch.func wrappers and active dispatch modes go through the op itself.
    Either way, absent outputs come back as None or an empty tensor: callers accept both.
    """
    if torch.compiler.is_compiling() and not (torch.compiler.is_exporting() or _transforms_active()):
        # the compiled graph then calls the op without its Python autograd layer (the Function being traced is the
        # autograd; the layer ran at every call of the compiled step: 70 us of a 2.4 ms MLP VAE step here).
        # torch.export keeps the op itself: an exported program is differentiable through the op's own autograd
        return kernel.traced_op(first, *args)
    if is_plain(first) and torch._C._len_torch_dispatch_stack() == 0:
        return kernel(first, *args)
    return op(first, *args)


def with_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous kernel output seen with another shape, as a tensor of its own rather than a
    view: autograd may then hand it to ``.grad`` without a copy (a view's base shares its storage,
    which makes AccumulateGrad clone it)."""
    if t.shape == shape:  # (torch.Size compares with tuples)
        return t
    shape = tuple(shape)
    if torch.compiler.is_compiling() or not t.is_contiguous() or type(t) is not torch.Tensor:
        return t.view(shape)
    return t.new_empty((0,)).set_(t.untyped_storage(), t.storage_offset(), shape)


def with_layout(t: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``view`` (a view of the kernel output ``t``, e.g. a permutation back to channels-first) as a tensor of its
    own with the same storage, shape and strides, for the reason :func:`with_shape` gives."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return view
    return t.new_empty((0,)).set_(t.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def inverse_permutation(order) -> tuple[int, ...]:
    """The dim order that undoes ``t.permute(order)``."""
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def present(t: torch.Tensor | None) -> torch.Tensor | None:
    """None for an absent (None or empty placeholder) optional tensor."""
    return None if t is None or t.numel() == 0 else t
