"""Autograd pieces shared by the ops: the saved-gradient backward, double backward, vmap.

Every op has one autograd implementation: a ``setup_context``-style ``autograd.Function``
whose ``setup_context`` and ``backward`` are also registered on the ``torch.ops.vae_fast`` op
(``torch.library.register_autograd``), so ``opcheck`` tests the code users run, and whose
``vmap`` is also the op's ``torch.library.register_vmap`` rule.

Saved-gradient ops (the likelihoods) compute d log p / d theta in forward, already multiplied
by the upstream gradient the caller most likely sends (``expected_upstream``). Backward:

* receives that upstream gradient (checked on the host for CPU tensors, to a few ulps): returns
  the saved buffer itself — no pass over it, and nothing is modified, so any number of backward
  passes (``retain_graph=True``) see the same buffer;
* receives anything else: returns ``saved * (grad_out / expected)``, a new tensor; inside
  ``vae_fast.inplace_backward()`` the saved buffer is scaled in place instead (one backward per
  graph, checked), which on CUDA lets the rescaling kernel skip expected rows on the device;
* runs with grad mode on (``create_graph=True``, torch.func): the gradient is recomputed from the
  inputs by its closed form in differentiable torch ops, so higher derivatives are exact and
  torch.func can transform it. The decoder output is referenced weakly, not saved (it would cost a decoder-sized buffer
  in every training step): if it was freed before backward, a RuntimeError says how to keep it.
"""
from __future__ import annotations

import inspect
import weakref

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import config
from .._validation import is_legacy_batched, is_plain

# Below this many elements a host check of the upstream gradient by torch ops (a reduction and two
# reads, about 4 us) costs more than the scaling pass it saves (a new buffer and a pass: 30 us at
# 128 x 784 here). The CPU extension's check (one call, about 1 us) is used at every size.
SKIP_CHECK_MIN_ELEMENTS = 1 << 14
SKIP_CHECK_ULPS = 4
_EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def default_expected_upstream(reduction: str, rows: int) -> float:
    """The upstream gradient each row's log-likelihood most likely receives from a public
    likelihood function: log-likelihoods are maximised, so the guess is a negative
    log-likelihood loss, ``-log_p.mean()`` (-1/N per row; also for reduction="none") or
    ``-log_p.sum()`` (-1). The kernels pre-scale their gradients by it, so that backward makes no
    pass over the gradient when the guess holds; any other upstream costs the usual scaling pass
    (see the module docstring). :func:`vae_fast.elbo` passes the exact value instead."""
    return -1.0 if reduction == "sum" or rows == 0 else -1.0 / rows


def row_factor(grad_out: torch.Tensor, ndim: int) -> torch.Tensor:
    """grad_out (lead...) viewed to broadcast over a tensor of ``ndim`` dims with the same lead."""
    return grad_out.reshape(*grad_out.shape, *([1] * (ndim - grad_out.dim())))


def _upstream_is_expected(saved: torch.Tensor, grad_out: torch.Tensor, expected: float) -> bool:
    if torch.compiler.is_compiling() or not (saved.is_cpu and is_plain(grad_out) and is_plain(saved)):
        return False
    if not grad_out.numel():
        return True
    tolerance = SKIP_CHECK_ULPS * _EPS.get(grad_out.dtype, 0.0) * abs(expected)
    low, high = expected - tolerance, expected + tolerance
    from ._library import kernels_for

    values_within = getattr(kernels_for(saved), "values_within", None)
    within = None if values_within is None else values_within(grad_out, low, high)
    if within is not None:
        return within
    if saved.numel() < SKIP_CHECK_MIN_ELEMENTS:
        return False
    smallest, largest = torch.aminmax(grad_out)  # one op and two host reads (was a difference, abs and max)
    return low <= float(smallest) and float(largest) <= high  # False for NaN


def scale_saved(ctx, saved: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d loss / d input from a gradient saved in forward as ``expected * d log p / d input``
    (rows along ``grad_out``'s dims): see the module docstring."""
    expected = ctx.expected_upstream
    if is_legacy_batched(grad_out):  # (is_grads_batched: out of place, no host read; see _validation)
        return saved * row_factor((grad_out if expected == 1.0 else grad_out / expected).to(saved.dtype), saved.dim())
    if _upstream_is_expected(saved, grad_out, expected):
        return saved
    if not ctx.inplace_backward and grad_out.dtype == saved.dtype and expected != 1.0:
        # saved * grad_out / expected in one pass (one kernel launch on CUDA, not a division and a
        # product): addcmul onto a cached broadcast zero
        return torch.addcmul(_zero_like(saved), saved, row_factor(grad_out, saved.dim()), value=1.0 / expected)
    factor = grad_out if expected == 1.0 else grad_out / expected
    if ctx.inplace_backward and not torch.compiler.is_compiling() and is_plain(saved):
        ctx.saved_consumed = True
        from ._library import kernels_for

        scale_rows_inplace = getattr(kernels_for(saved), "scale_rows_inplace", None)
        flat = saved.view(factor.numel(), saved.numel() // max(factor.numel(), 1))
        if scale_rows_inplace is not None:  # Triton: rows whose factor is 1 are skipped on the device
            scale_rows_inplace(flat, factor.reshape(-1), SKIP_CHECK_ULPS * torch.finfo(grad_out.dtype).eps)
            return saved
        return saved.mul_(row_factor(factor.to(saved.dtype), saved.dim()))
    return saved * row_factor(factor.to(saved.dtype), saved.dim())


_scalars: dict = {}
_MAX_CACHED_SCALARS = 256  # (a schedule that passes a new float every step must not grow the cache forever)


def cached_scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A 0-d tensor holding ``value`` as ``dtype`` on ``device``, made once per (value, dtype, device): a fixed
    variance passed as a float costs a new tensor per call otherwise (1.5 us here; a kernel launch on CUDA).
    A fresh one while torch.compile traces (a cached tensor would become a graph constant) or under FakeTensorMode
    (a fake one, which must not be cached for real calls; other dispatch modes, e.g. profilers, get the cached
    one: no extra fill op). The tensors are internal: never handed to users, never modified."""
    if torch.compiler.is_compiling() or (_dispatch_modes() and _fake_mode() is not None):
        return torch.full((), value, dtype=dtype, device=device)
    key = (value, dtype, device)  # callers pass a tensor's torch.device, or "cpu"
    scalar = _scalars.get(key)
    if scalar is None:
        if len(_scalars) >= _MAX_CACHED_SCALARS:
            _scalars.clear()
        with torch.inference_mode(False):  # (one made under inference_mode could not be saved for backward later)
            scalar = _scalars[key] = torch.full((), value, dtype=dtype, device=device)
    return scalar


def cached_zero(dtype: torch.dtype, device) -> torch.Tensor:
    """A 0-d zero of ``dtype`` on ``device`` (see :func:`cached_scalar`)."""
    return cached_scalar(0.0, dtype, device)


def _zero_like(t: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or not is_plain(t):  # (is_plain cannot be traced)
        return t.new_zeros(())
    return cached_zero(t.dtype, t.device)


def setup_saved_gradient(ctx, op_name: str, inputs, expected_index: int, saved, double_backward_inputs=None,
                         keep_inputs: bool = False, eager: bool = False) -> None:
    """The ctx state every saved-gradient op's backward reads, set in one call (it runs every step):
    the op's name (for errors), the expected upstream gradient its kernel pre-scaled by (input
    ``expected_index``, default 1.0), the ``inplace_backward`` setting at forward time, and the
    saved tensors: ``saved`` (the gradients computed in forward; read back with :func:`saved_and_inputs`)
    plus the op's ``double_backward_inputs`` if given, kept strongly (saved too) when first-order backward
    needs them (``keep_inputs``), inside ``vae_fast.save_inputs()`` or under torch.func transforms (whose
    ``grad`` runs backward with grad mode on and tracks only tensors saved this way), else weakly (InputRefs).
    ``eager``: the caller runs plain eager (no torch.compile tracing, no torch.func transform; the per-step
    paths), so neither needs testing here."""
    ctx.set_materialize_grads(False)
    ctx.op_name = op_name
    ctx.expected_upstream = inputs[expected_index] if len(inputs) > expected_index else 1.0
    ctx.inplace_backward = config.INPLACE_BACKWARD.get_eager() if eager else config.INPLACE_BACKWARD.get()
    ctx.num_saved = len(saved)
    if double_backward_inputs is None:
        ctx.save_for_backward(*saved)
        return
    if eager:
        strong = keep_inputs or config.SAVE_INPUTS.get_eager()
    else:
        strong = keep_inputs or config.SAVE_INPUTS.get() or torch._C._are_functorch_transforms_active()
    ctx.strong_inputs = strong
    if strong:
        ctx.save_for_backward(*saved, *double_backward_inputs)
    else:
        ctx.save_for_backward(*saved)
        ctx.inputs = InputRefs(double_backward_inputs, traced=False if eager else None)


def step_ctx_constants(function, **constants) -> None:
    """Give every ctx of the per-step ``autograd.Function`` ``function`` the attributes ``constants`` (the op's
    name, how many gradients it saves, ...), and the settings :func:`setup_step_gradient` reads at their built-in
    values (no in-place backward, inputs held weakly): set once on the ctx's class (the Function's backward class),
    which backward reads like attributes set on each ctx, instead of on every call (each set costs about 0.05 us,
    and each object a call touches costs more in a training step, whose large kernels leave the caches cold)."""
    constants = dict(inplace_backward=_INPLACE_BACKWARD.builtin, strong_inputs=_SAVE_INPUTS.builtin, **constants)
    for name, value in constants.items():
        setattr(function._backward_cls, name, value)


_INPLACE_BACKWARD, _SAVE_INPUTS, _Setting = config.INPLACE_BACKWARD, config.SAVE_INPUTS, config._Setting


def setup_step_gradient(ctx, expected_upstream: float, saved: tuple, inputs: tuple | None = None,
                        keep_inputs: bool = False) -> None:
    """:func:`setup_saved_gradient` of a per-step Function (plain eager, one tensor output, so no gradient to
    materialise): the same ctx state, set with as few Python operations as possible (it runs on every call of a
    training step). While every setting has its built-in value (no ``with`` override active, no process default
    changed) the ctx class's constants (:func:`step_ctx_constants`) hold the settings and nothing is read; else
    they are read as ``get_eager`` returns them. ``saved`` and ``inputs`` are tuples (two or three inputs, see
    :meth:`InputRefs.eager`); the op's name and ``num_saved`` (``len(saved)``) are the Function's
    :func:`step_ctx_constants`."""
    ctx.expected_upstream = expected_upstream
    if _Setting.active_overrides or _Setting.changed_defaults:
        ctx.inplace_backward = _INPLACE_BACKWARD.get_eager()
        keep_inputs = keep_inputs or _SAVE_INPUTS.get_eager()
    if inputs is None:
        ctx.save_for_backward(*saved)
    elif keep_inputs:
        ctx.strong_inputs = True
        ctx.save_for_backward(*saved, *inputs)
    else:
        ctx.save_for_backward(*saved)
        ctx.inputs = InputRefs.eager(*inputs)


def mark_non_differentiable(ctx, *outputs) -> None:
    """ctx.mark_non_differentiable for the outputs that are tensors (absent ones are None)."""
    tensors = []
    for output in outputs:  # (a loop: a comprehension is a function call of its own on Python 3.11)
        if isinstance(output, torch.Tensor):
            tensors.append(output)
    if tensors:
        ctx.mark_non_differentiable(*tensors)


def saved_gradients(ctx):
    """ctx.saved_tensors, after checking that no earlier in-place backward consumed them (whose
    version-counter error would not say why)."""
    if getattr(ctx, "saved_consumed", False):
        raise RuntimeError(
            f"vae_fast.{ctx.op_name}: the saved gradient was already scaled in place by an earlier backward "
            "pass (the op ran inside vae_fast.inplace_backward()); run it outside that context to "
            "backpropagate through it more than once (retain_graph=True, gradcheck)")
    return ctx.saved_tensors


_weak_ref = weakref.ref


_ABSENT = object()  # (InputRefs.eager's third input when there is none; None is an absent optional input)
_new_object = object.__new__


class InputRefs:
    """Weak references to an op's inputs for double backward (see the module docstring), with
    their versions, so an input modified in place after forward is detected."""

    __slots__ = ("entries",)  # (weak reference, version) per input, None for an absent one; None if traced

    def __init__(self, tensors, traced: bool | None = None):
        # traced graphs have no double backward (AOTAutograd does not support it); traced=None: find out
        if traced or (traced is None and torch.compiler.is_compiling()):
            self.entries = None
            return
        self.entries = entries = []
        for t in tensors:  # (a loop: a comprehension is a function call of its own on Python 3.11)
            if t is None:
                entries.append(None)
                continue
            try:
                version = t._version
            except RuntimeError:  # an inference tensor (torch.inference_mode) has no version counter
                version = None
            entries.append((_weak_ref(t), version))  # (a module global: weakref.ref is one more lookup per input)

    @classmethod
    def eager(cls, first: torch.Tensor, second: torch.Tensor, third: torch.Tensor | None = _ABSENT) -> InputRefs:
        """``InputRefs((first, second[, third]))`` for the per-step Functions (two tensors, and a third that may be
        None), spelled out without ``__init__``'s call and loop, which cost 0.4-0.8 us a call when a large kernel
        has just left the caches cold (a training step's usual state); inference tensors go through ``__init__``."""
        refs = _new_object(cls)
        try:  # (_weak_ref, a module global: weakref.ref is one more lookup per input)
            entries = [(_weak_ref(first), first._version), (_weak_ref(second), second._version)]
            if third is not _ABSENT:
                entries.append(None if third is None else (_weak_ref(third), third._version))
        except RuntimeError:  # an inference tensor (torch.inference_mode) has no version counter
            return cls((first, second) if third is _ABSENT else (first, second, third), traced=False)
        refs.entries = entries
        return refs

    def get(self, op_name: str, what: str):
        if self.entries is None:
            raise RuntimeError(f"vae_fast.{op_name}: double backward (create_graph=True) through a torch.compile'd "
                               "graph is not supported (AOTAutograd traces one backward); call the op eagerly")
        tensors = []
        for entry in self.entries:
            if entry is None:
                tensors.append(None)
                continue
            ref, version = entry
            t = ref()
            if t is None:
                raise RuntimeError(
                    f"vae_fast.{op_name}: double backward (create_graph=True) needs {what}, which was freed after "
                    "the forward pass (the fused op keeps only its gradient). Keep a reference to it until "
                    "backward, or run the forward pass inside `with vae_fast.save_inputs():`")
            if version is not None and t._version != version:
                raise RuntimeError(f"vae_fast.{op_name}: {what} was modified in place after the forward pass; "
                                   "double backward (create_graph=True) needs its original value")
            tensors.append(t)
        return tensors


def saved_and_inputs(ctx, what: str, want_inputs: bool):
    """(the saved tensors, the inputs or None) of an op set up by :func:`setup_saved_gradient`."""
    saved = saved_gradients(ctx)
    mine, rest = list(saved[:ctx.num_saved]), list(saved[ctx.num_saved:])
    if not want_inputs:
        return mine, None
    return mine, (rest if ctx.strong_inputs else ctx.inputs.get(ctx.op_name, what))


# The C implementation of ``autograd.Function.apply``, bound to a class below: the Python classmethod
# around it re-checks what :func:`fast_apply` has already checked (about 1 us a call).
_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]


def eager_function_apply(function):
    """``function.apply`` of a ctx-style ``autograd.Function`` for calls that passed :func:`eager_call`:
    the C implementation, without the Python classmethod's checks."""
    return _FUNCTION_APPLY.__get__(None, function)


_transforms_active, _dispatch_modes = torch._C._are_functorch_transforms_active, torch._C._len_torch_dispatch_stack


class _NoDualLevel:
    _current_level = -1


# ``FORWARD_AD._current_level >= 0`` while a ``torch.autograd.forward_ad.dual_level`` is open (forward-mode AD on
# dual tensors): those calls take the general entry points, whose Functions have jvp rules (the per-step Functions
# have none). Tested inline on the per-call paths (a function call costs more than the read). A torch without this
# private level: dual tensors then meet the per-step Functions' NotImplementedError, a clear error still.
FORWARD_AD = _forward_ad if hasattr(_forward_ad, "_current_level") else _NoDualLevel


def no_forward_ad(op_name: str):
    """A jvp rule (for :func:`fast_apply`) that raises: forward-mode AD (torch.func.jvp / jacfwd / hessian, dual
    tensors) is implemented for the latent op and the elementwise and categorical likelihoods only."""

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"vae_fast.{op_name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
            "implemented for this op; use reverse mode (torch.autograd.grad, torch.func.grad / jacrev)")

    return jvp


def tangent_sum(terms, like: torch.Tensor) -> torch.Tensor:
    """sum of derivative * tangent over ``terms`` (pairs; a None derivative or tangent contributes nothing), in
    ``like``'s shape and dtype: zeros when no term contributes, since torch.func wants a tangent for every
    differentiable output. The jvp rules' first-order Taylor term, before each sums it over its own dims."""
    total = torch.zeros_like(like)
    for derivative, tangent in terms:
        if derivative is not None and tangent is not None:
            total = total + derivative * tangent.to(like.dtype)
    return total


def save_for_jvp(ctx, *tensors) -> None:
    """``ctx.save_for_forward(*tensors)`` for the op's jvp rule (see :func:`fast_apply`), skipped while torch.compile
    traces (dynamo traces no forward-mode AD through an autograd.Function; nothing would read them)."""
    if not torch.compiler.is_compiling():
        ctx.save_for_forward(*tensors)


def _fake_mode():
    """The active FakeTensorMode, or None."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def eager_call(first: torch.Tensor) -> bool:
    """Whether a call whose first tensor is ``first`` runs plain eager: no torch.compile tracing, no
    torch.func transform, no dispatch mode, no forward-mode AD level, a real CPU/CUDA tensor. Exactly those calls
    take the eager entry points (:func:`fast_apply`, the per-step paths) and the host-side shortcuts."""
    # (is_compiling first: dynamo folds it to True and traces nothing after it)
    return not (torch.compiler.is_compiling() or _transforms_active() or _dispatch_modes()
                or FORWARD_AD._current_level >= 0) and is_plain(first)


def fast_apply(function, kernel, eager_outputs: tuple[int, ...] | None = None, jvp=None):
    """``function.apply`` for a setup_context-style ``autograd.Function``, with an eager fast path.

    torch.func needs the setup_context style, whose ``apply`` binds the arguments with
    ``inspect.signature`` on every call (about 60 us here, several times the kernel at 128 x 20).
    Plain eager calls (no torch.func transform, no torch.compile tracing, no dispatch mode, a real
    CPU/CUDA first tensor: exactly the calls for which :func:`vae_fast.ops._library.call` takes its
    shortcut to the kernel) therefore go through a ctx-style twin whose forward runs ``kernel`` (the
    function that ``function.forward`` reaches for such calls) and ``function.setup_context``, and
    whose backward *is* ``function.backward``: one autograd implementation, two entry points. Every
    other call uses ``function.apply``.

    ``eager_outputs``: the indices of the outputs the callers use; the eager twin returns None for
    the others (the saved gradients, which setup_context keeps in ctx anyway): each tensor output of
    an autograd.Function costs about 1 us per call to wrap, and backward receives None for them, as
    it does for unused outputs.

    ``jvp``: the op's forward-mode rule ``jvp(ctx, *input_tangents) -> output tangents`` (reading what setup_context
    saved with :func:`save_for_jvp`), for torch.func transforms (jvp, jacfwd, hessian) and dual tensors: those calls
    go through a subclass of ``function`` that has it. ``function`` itself has none, because dynamo does not trace
    an autograd.Function that defines jvp (torch.compile takes ``function.apply``)."""

    if eager_outputs is None:
        def forward(ctx, *args):
            output = kernel(*args)
            function.setup_context(ctx, args, output)
            return output
    else:
        keep = tuple(eager_outputs)

        def forward(ctx, *args):
            output = kernel(*args)
            function.setup_context(ctx, args, output)
            shown = [None] * len(output)
            for index in keep:
                shown[index] = output[index]
            return tuple(shown)

    eager = type(function.__name__, (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                  "__doc__": f"Eager entry point of :class:`{function.__qualname__}` (same backward)."})
    eager_apply = eager_function_apply(eager)
    with_jvp = function if jvp is None else type(
        f"{function.__name__}WithJvp", (function,),
        {"jvp": staticmethod(jvp), "__doc__": f":class:`{function.__qualname__}` with its forward-mode AD rule."})

    # function.forward's trailing defaults: the non-eager calls pass every parameter, because dynamo, tracing an apply
    # in which no input requires grad, drops the ctx it prepends only when the call has one argument per parameter
    # (torch/_dynamo/variables/misc.py); with fewer, ctx became the first tensor (an InternalTorchDynamoError)
    parameters = list(inspect.signature(function.forward).parameters.values())
    defaults = tuple(p.default for p in parameters if p.default is not inspect.Parameter.empty)

    def apply(first, *args):
        if eager_call(first):
            return eager_apply(first, *args)
        missing = len(parameters) - 1 - len(args)
        if 0 < missing <= len(defaults):
            args = (*args, *defaults[len(defaults) - missing:])
        if not torch.compiler.is_compiling() and (_transforms_active() or FORWARD_AD._current_level >= 0):
            return with_jvp.apply(first, *args)
        return function.apply(first, *args)

    apply.eager_function = eager
    return apply


def loop_vmap(fn):
    """A vmap rule ``(info, in_dims, *args) -> (outputs, out_dims)`` that maps ``fn`` over the
    batch one slice at a time and stacks the results along dim 0.

    Exact (each slice is one ordinary call, so ``vmap`` matches a Python loop over the batch) and
    general; the cost is one kernel call per slice."""

    def rule(info, in_dims, *args):
        outs = []
        for index in range(info.batch_size):
            sliced = [a.select(d, index) if d is not None else a for a, d in zip(args, in_dims)]
            outs.append(fn(*sliced))
        if isinstance(outs[0], tuple):
            stacked = tuple(torch.stack(list(parts)) for parts in zip(*outs))
            return stacked, (0,) * len(stacked)
        return torch.stack(outs), 0

    return rule
