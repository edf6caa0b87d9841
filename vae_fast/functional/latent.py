"""The latent block: reparameterised sampling and the analytic KL, fused (``ops/latent.py``)."""
from __future__ import annotations

import math

import torch

from .._validation import (STRIDED, check_broadcastable, check_choice, check_no_grad, check_positive_int,
                           check_same_device, check_same_dtype, check_tensor)
from ..ops.codes import SCALE_PARAMS
from ..ops._autograd import cached_zero
from ..ops._library import inverse_permutation
from ..ops.latent import SEED_BOUND, apply_latent, latent_step


def _draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # A 0-d int64 tensor drawn from torch's generator: torch.manual_seed reproduces it, each
    # call advances the generator, and torch.compile(fullgraph=True) traces it (a Generator
    # made here would not). The kernels turn it into a Philox key.
    if generator is None:
        return torch.randint(SEED_BOUND, (), device=device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = torch.randint(SEED_BOUND, (), device=generator.device, generator=generator)
    return seed if seed.device == device else seed.to(device)


def _unused_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of calls that draw no noise (KL only, explicit eps)."""
    return cached_zero(torch.int64, device)


def _as_rows(t: torch.Tensor | None, mu: torch.Tensor, rows: int) -> torch.Tensor | None:
    # priors broadcast against mu (*B, Z); the kernels take them broadcastable to (rows, Z)
    if t is None or mu.dim() <= 2:
        return t
    return t.expand(mu.shape).reshape(rows, mu.shape[-1])


_CPU = torch.device("cpu")


_PARAM_CODES = {name: int(code) for name, code in SCALE_PARAMS.items()}


def _common_call_code(mu, logvar, prior_mu, prior_logvar, eps, param) -> int | None:
    """The parameterisation's code if this is the per-step call (two plain (B, Z) CPU tensors of one floating
    dtype, no prior, no explicit noise, a named parameterisation), else None; recognised in one expression:
    every check of :func:`_latent` passes for it."""
    try:
        if (prior_mu is None and prior_logvar is None and eps is None and type(mu) is torch.Tensor
                and type(logvar) is torch.Tensor and mu.dim() == 2 and mu.is_cpu and logvar.is_cpu
                and mu.layout is STRIDED and logvar.layout is STRIDED
                and mu.dtype == logvar.dtype and mu.is_floating_point() and logvar.shape == mu.shape
                and type(param) is str):
            return _PARAM_CODES.get(param)
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        pass
    return None


def _latent(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, want_kl_per_dim,
            want_log_ratio=False):
    param_code = _common_call_code(mu, logvar, prior_mu, prior_logvar, eps, param)
    if param_code is not None:
        # this runs every training step: no further checks or reshapes are needed
        if generator is None and num_samples > 0 and not want_log_ratio:
            outs = latent_step(mu, logvar, param_code, num_samples, want_kl_per_dim)
            if outs is not None:
                return outs if want_kl_per_dim else (*outs, None)
        seed = _draw_seed(_CPU, generator) if num_samples > 0 else _unused_seed(_CPU)
        z, kl, kl_per_dim, log_ratio = apply_latent(mu, logvar, None, None, None, seed, param_code,
                                                    num_samples, want_kl_per_dim, want_log_ratio)
        if want_log_ratio:
            return z, kl, kl_per_dim, log_ratio
        return z, kl, kl_per_dim if want_kl_per_dim else None
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    if mu.dim() < 1:
        raise ValueError(f"mu must have shape (..., Z) with at least one dim, got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    param_code = SCALE_PARAMS.get(param) if isinstance(param, str) else None
    if param_code is None:
        check_choice("param", param, SCALE_PARAMS)
    param_code = int(param_code)
    if prior_mu is not None or prior_logvar is not None:
        # one given: the other defaults to the standard normal's value
        zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
        prior_mu = zero if prior_mu is None else prior_mu
        prior_logvar = zero if prior_logvar is None else prior_logvar
        for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
            check_tensor(name, t)
            check_broadcastable(name, t, mu.shape, "mu")
    if eps is not None:
        check_tensor("eps", eps)
        check_no_grad("eps", eps)
        expected = (num_samples, *mu.shape)
        if eps.shape != expected and not (num_samples == 1 and eps.shape == mu.shape):
            raise ValueError(f"eps must have shape {expected} (or mu's shape when num_samples=1), got {tuple(eps.shape)}")
    if logvar.dtype != mu.dtype or logvar.device != mu.device or prior_mu is not None or eps is not None:
        names = ("mu", "logvar", "prior_mu", "prior_logvar", "eps")
        tensors = (mu, logvar, prior_mu, prior_logvar, eps)
        check_same_device(names, tensors)
        check_same_dtype(names, tensors)

    samples = num_samples
    flat = mu.dim() != 2
    if flat:
        dim = mu.shape[-1]
        rows = math.prod(mu.shape[:-1])
        mu2, logvar2 = mu.reshape(rows, dim), logvar.reshape(rows, dim)
        prior_mu, prior_logvar = _as_rows(prior_mu, mu, rows), _as_rows(prior_logvar, mu, rows)
    else:
        rows, dim = mu.shape
        mu2, logvar2 = mu, logvar
    if eps is not None:
        seed = _unused_seed(mu.device)
        eps = eps.reshape(samples, rows, dim)
    elif samples > 0:
        seed = _draw_seed(mu.device, generator)
    else:
        seed = _unused_seed(mu.device)
    z, kl, kl_per_dim, log_ratio = apply_latent(
        mu2, logvar2, prior_mu, prior_logvar, eps, seed, param_code, samples, want_kl_per_dim, want_log_ratio)
    if flat:  # (z is (rows, Z) for one sample: the kernels give it mu's 2-D shape, no view node)
        z = z.view(mu.shape) if samples == 1 else z.view(samples, *mu.shape)
    if flat:
        kl = kl.view(mu.shape[:-1])
        kl_per_dim = kl_per_dim.view(mu.shape) if want_kl_per_dim else None
    elif not want_kl_per_dim:
        kl_per_dim = None
    if want_log_ratio:
        return z, kl, kl_per_dim, log_ratio.view(samples, *mu.shape[:-1])
    return z, kl, kl_per_dim


def latent_kl_dims(mu: torch.Tensor) -> int | tuple[int, ...]:
    """The dims a latent's KL sums over by default: the last of (B, Z), every non-batch dim of a convolutional
    (B, *latent) (its density is over all of them, as the ELBO and the IWAE bound take it)."""
    return -1 if mu.dim() <= 2 else tuple(range(1, mu.dim()))


def _normalize_dims(dim, ndim: int, name: str = "dim", of: str = "mu") -> tuple[int, ...]:
    """``dim`` (an int or a tuple, negative counting from the end, like torch reductions) as a
    sorted tuple of distinct non-negative dims of a tensor with ``ndim`` dims (errors name the
    argument ``name`` and the tensor ``of``)."""
    dims = (dim,) if isinstance(dim, int) and not isinstance(dim, bool) else dim
    if not isinstance(dims, (tuple, list)) or not dims or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints, got {dim!r}")
    if any(not -ndim <= d < ndim for d in dims):
        raise ValueError(f"{name} {dim!r} is out of range for {of} with {ndim} dims")
    normal = tuple(sorted({d % ndim for d in dims}))
    if len(normal) != len(dims):
        raise ValueError(f"{name} {dim!r} names a dim twice")
    return normal


def _latent_over(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, want_kl_per_dim,
                 want_log_ratio=False, dim=-1):
    """:func:`_latent` with the KL summed over ``dim`` (any dims of mu, e.g. (1, 2, 3) of a
    convolutional (B, C, H, W) latent) instead of the last one.

    The KL dims are moved last and flattened into one (a view when they already are the trailing
    dims of a contiguous mu, as for conv latents); z and kl_per_dim come back in mu's layout, kl
    with the remaining dims. The noise stream is indexed in that (batch dims, KL dims) order."""
    if isinstance(dim, int) and not isinstance(dim, bool) and (dim == -1 or dim == mu.dim() - 1):
        return _latent(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, want_kl_per_dim,
                       want_log_ratio)
    check_tensor("mu", mu)
    dims = _normalize_dims(dim, mu.dim())
    batch_dims = tuple(d for d in range(mu.dim()) if d not in dims)
    order = batch_dims + dims
    # the KL dims already trailing (a conv latent's (1, 2, 3)): no permute there and back, whose view ops and their
    # autograd nodes cost about 17 us a call here (five permutes forward, five PermuteBackward nodes)
    in_order = order == tuple(range(mu.dim()))
    batch_shape = tuple(mu.shape[d] for d in batch_dims)
    event_shape = tuple(mu.shape[d] for d in dims)
    flat = math.prod(event_shape)

    def to_rows(name, t, lead=0):
        # t laid out like mu (after `lead` leading sample dims; priors broadcast) -> (*lead, *batch, flat)
        if t is None:
            return None
        check_tensor(name, t)
        if lead == 0 and t.shape != mu.shape:
            check_broadcastable(name, t, mu.shape, "mu")
            t = t.expand(mu.shape)
        permuted = t if in_order else t.permute(*range(lead), *(lead + d for d in order))
        return permuted.reshape(*permuted.shape[:lead], *batch_shape, flat)

    check_tensor("logvar", logvar)
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if eps is not None:
        eps = to_rows("eps", eps, lead=1 if isinstance(eps, torch.Tensor) and eps.dim() == mu.dim() + 1 else 0)
    outs = _latent(to_rows("mu", mu), to_rows("logvar", logvar), to_rows("prior_mu", prior_mu),
                   to_rows("prior_logvar", prior_logvar), param, eps, generator, num_samples, want_kl_per_dim,
                   want_log_ratio)
    inverse = inverse_permutation(order)

    def back(t, lead):
        # (*lead, *batch, flat) -> mu's layout with the lead dims in front
        t = t.reshape(*t.shape[:lead], *batch_shape, *event_shape)
        return t if in_order else t.permute(*range(lead), *(lead + i for i in inverse))

    z = outs[0] if num_samples == 0 else back(outs[0], 1 if num_samples > 1 else 0)  # 0: KL only
    kl_per_dim = None if outs[2] is None else back(outs[2], 0)
    return (z, outs[1], kl_per_dim, *outs[3:])


def gaussian_sample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    param: str = "logvar",
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    dim: int | tuple[int, ...] = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample and analytic KL in one fused pass.

    ``z = mu + sigma * eps`` with ``sigma`` from ``logvar`` read as ``param``
    (``"logvar"``: log sigma^2, ``"logstd"``: log sigma, ``"softplus"``: sigma = softplus(raw)),
    and ``KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar)))`` summed over ``dim``.

    Args:
        mu, logvar: ``(*B, Z)``; any shape with ``dim`` naming the dims the KL sums over
            (an int or tuple, like torch reductions), e.g. ``dim=(1, 2, 3)`` for a convolutional
            ``(B, C, H, W)`` latent (views such as ``moments.chunk(2, dim=1)`` are fine).
        prior_mu, prior_logvar: a learned diagonal Gaussian prior, broadcastable to ``mu``
            (default N(0, I)); gradients flow to them.
        eps: explicit noise ``(K, *B, Z)`` (or ``(*B, Z)`` for K = 1); by default noise comes
            from an in-kernel Philox stream seeded from ``generator`` (or torch's default
            generator of mu's device) and is recomputed, not stored, for backward.
        num_samples: K.

    Returns:
        ``z`` of mu's shape (``(K, *mu.shape)`` for K > 1) and ``kl`` with the dims not in ``dim``.
    """
    if dim == -1 and generator is None and type(num_samples) is int and num_samples > 0:  # the per-step call
        param_code = _common_call_code(mu, logvar, prior_mu, prior_logvar, eps, param)
        outs = None if param_code is None else latent_step(mu, logvar, param_code, num_samples, False)
        if outs is not None:
            return outs
    check_positive_int("num_samples", num_samples)
    z, kl, _ = _latent_over(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, False, dim=dim)
    return z, kl


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    *,
    param: str = "logvar",
    reduce: bool = True,
    dim: int | tuple[int, ...] = -1,
) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar))), fused and overflow-safe.

    Per element, with lv = log sigma^2 and d = lv - prior_logvar:
    ``exp(d - ln 2) - (1 + d)/2 + ((mu - prior_mu) e^(-prior_logvar/2))^2 / 2``.
    Returns the sum over ``dim`` (default the last dim; e.g. ``(1, 2, 3)`` for a (B, C, H, W)
    latent) or, with ``reduce=False``, the per-element KL in mu's shape.
    """
    _, kl, kl_per_dim = _latent_over(mu, logvar, prior_mu, prior_logvar, param, None, None, 0, not reduce, dim=dim)
    return kl if reduce else kl_per_dim

