"""Latent block op: ``z = mu + sigma * eps`` for K samples and KL(q || p), fused.

Op schemas (``torch.ops.vae_fast``)::

    latent_forward(mu (B,Z), scale (B,Z), prior_mu?, prior_logvar?  [broadcastable to (B,Z)],
                   eps? (K,B,Z), seed () int64, param, num_samples K, want_kl_per_dim)
        -> z (K,B,Z) or (B,Z) for K = 1, kl (B,), kl_per_dim (B,Z) or (0,),
           log_ratio (K,B) or (0,): log q(z_k|x) - log p(z_k) per sample, if want_log_ratio
    latent_backward(..., grad_z?, grad_kl?, grad_kl_per_dim?, param, K, want_prior_grad)
        -> grad_mu, grad_scale, grad_prior_mu (B,Z) or (0,), grad_prior_logvar (B,Z) or (0,)

Only mu, scale, the prior and the 0-d seed are saved for backward: eps is
recomputed from the Philox stream, and sigma from the scale.
"""
from __future__ import annotations

import threading

import torch

from .._validation import is_legacy_batched
from ._autograd import _dispatch_modes, eager_function_apply, fast_apply, save_for_jvp, tangent_sum
from ._library import acc_dtype, call, kernels_for, optional_contiguous, present, register_op, step_kernels_for
from .codes import ScaleParam

def _expand_prior(prior: torch.Tensor | None, mu: torch.Tensor) -> torch.Tensor | None:
    # a (B, Z) view with stride 0 along broadcast dims: the kernels read it through its strides
    return None if prior is None else prior.to(mu.dtype).expand(mu.shape)


def unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t (rows, cols) itself when its columns are adjacent in memory (any row stride: the halves of
    ``moments.chunk(2, dim=1)`` or of ``h.chunk(2, dim=-1)``, read in place by the kernels), else a
    contiguous copy."""
    return t if t.stride()[-1] == 1 or t.shape[-1] <= 1 else t.contiguous()


def _kernel_layouts(mu, scale, prior_mu, prior_logvar, eps):
    """The operands as the kernels take them: mu and scale with unit column stride, the priors as (B, Z)
    views, eps contiguous. (Not called for the per-step call, whose operands already are.)"""
    mu, scale = unit_columns(mu), unit_columns(scale)
    if prior_mu is not None:
        prior_mu, prior_logvar = _expand_prior(prior_mu, mu), _expand_prior(prior_logvar, mu)
    return mu, scale, prior_mu, prior_logvar, optional_contiguous(eps)


def _forward_kernel(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                    want_log_ratio=False):
    if prior_mu is not None or eps is not None or mu.stride()[-1] != 1 or scale.stride()[-1] != 1:
        mu, scale, prior_mu, prior_logvar, eps = _kernel_layouts(mu, scale, prior_mu, prior_logvar, eps)
    return kernels_for(mu).latent_forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples,
                                          want_kl_per_dim, want_log_ratio)


def _present_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else t.contiguous()


def _backward_kernel(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                     num_samples, want_prior_grad):
    if prior_mu is not None or eps is not None or mu.stride()[-1] != 1 or scale.stride()[-1] != 1:
        mu, scale, prior_mu, prior_logvar, eps = _kernel_layouts(mu, scale, prior_mu, prior_logvar, eps)
    return kernels_for(mu).latent_backward(
        mu, scale, prior_mu, prior_logvar, eps, seed, _present_contiguous(grad_z), _present_contiguous(grad_kl),
        _present_contiguous(grad_kl_per_dim), param, num_samples, want_prior_grad and prior_mu is not None,
    )


def _forward_fake(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                  want_log_ratio=False):
    batch, dim = mu.shape
    acc = acc_dtype(mu.dtype)
    kl_per_dim = mu.new_empty((batch, dim), dtype=acc) if want_kl_per_dim else mu.new_empty(0)
    log_ratio = mu.new_empty((num_samples, batch), dtype=acc) if want_log_ratio else mu.new_empty(0)
    z = mu.new_empty((batch, dim) if num_samples == 1 else (num_samples, batch, dim))
    return z, mu.new_empty((batch,), dtype=acc), kl_per_dim, log_ratio


def _backward_fake(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                   num_samples, want_prior_grad):
    want = want_prior_grad and prior_mu is not None
    prior_grad = (lambda: mu.new_empty(mu.shape)) if want else (lambda: mu.new_empty(0))
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape), prior_grad(), prior_grad()


def latent_gradients(saved, param, num_samples, needs_input_grad, grad_z, grad_kl, grad_kl_per_dim):
    """Gradients w.r.t. (mu, scale, prior_mu, prior_logvar) from the backward kernel.

    Prior gradients come back at (B, Z) and are summed to the prior's own shape."""
    mu, scale, prior_mu, prior_logvar, eps, seed = saved
    want_prior = prior_mu is not None and (needs_input_grad[2] or needs_input_grad[3])
    op = torch.ops.vae_fast.latent_backward.default
    args = (mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param, num_samples,
            want_prior)
    if any(g is not None and is_legacy_batched(g) for g in (grad_z, grad_kl, grad_kl_per_dim)):
        grad_mu, grad_scale, grad_pm, grad_plv = op(*args)  # (is_grads_batched: see _validation.is_legacy_batched)
    else:
        grad_mu, grad_scale, grad_pm, grad_plv = call(op, _backward_kernel, *args)
    grad_pm = grad_pm.sum_to_size(prior_mu.shape) if want_prior and needs_input_grad[2] else None
    grad_plv = grad_plv.sum_to_size(prior_logvar.shape) if want_prior and needs_input_grad[3] else None
    return (grad_mu if needs_input_grad[0] else None, grad_scale if needs_input_grad[1] else None, grad_pm, grad_plv)


def _latent_noise(mu, eps, seed, num_samples):
    """The K x (B, Z) noise of a call: eps, or the Philox stream of ``seed`` (a forward call with
    mu = 0, sigma = 1 returns it exactly)."""
    if eps is not None:
        return eps.detach().reshape(num_samples, *mu.shape)
    zeros = torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device)
    z, *_ = call(torch.ops.vae_fast.latent_forward.default, _forward_kernel, zeros, zeros, None, None, None,
                 seed.detach(), int(ScaleParam.LOGVAR), num_samples, False, False)
    return z.reshape(num_samples, *mu.shape)


def _sigma_and_log_variance(scale, param):
    """(sigma, d sigma / d scale, log sigma^2, d log sigma^2 / d scale) in differentiable torch ops."""
    if param == ScaleParam.LOGVAR:
        sigma = torch.exp(0.5 * scale)
        return sigma, 0.5 * sigma, scale, torch.ones_like(scale)
    if param == ScaleParam.LOGSTD:
        sigma = torch.exp(scale)
        return sigma, sigma, 2 * scale, torch.full_like(scale, 2.0)
    sigma = torch.nn.functional.softplus(scale)
    d_sigma = torch.sigmoid(scale)
    return sigma, d_sigma, 2 * torch.log(sigma), 2 * d_sigma / sigma


def _kl_partials(mu, scale, prior_mu, prior_logvar, param):
    """(sigma, d sigma / d scale, dKL_j/dmu, dKL_j/dlv, d lv / d scale, dKL_j/dplv) in differentiable torch ops,
    shared by backward's create_graph path and the jvp rule (dKL_j/dscale = dKL_j/dlv dlv/dscale, dKL_j/dpmu =
    -dKL_j/dmu): dKL_j/dmu = (mu - pmu) e^-plv;  dKL_j/dlv = 1/2 (e^(lv-plv) - 1);
    dKL_j/dplv = -[1/2 (e^(lv-plv) - 1) + 1/2 (mu - pmu)^2 e^-plv]."""
    sigma, d_sigma, lv, d_lv = _sigma_and_log_variance(scale, param)
    pm = torch.zeros_like(mu) if prior_mu is None else prior_mu.to(mu.dtype)
    plv = torch.zeros_like(mu) if prior_logvar is None else prior_logvar.to(mu.dtype)
    inv_prior_std = torch.exp(-0.5 * plv)
    scaled_diff = (mu - pm) * inv_prior_std
    dkl_dmu = scaled_diff * inv_prior_std
    dkl_dlv = 0.5 * (torch.exp(lv - plv) - 1)
    return sigma, d_sigma, dkl_dmu, dkl_dlv, d_lv, -(dkl_dlv + 0.5 * scaled_diff ** 2)


def _differentiable_latent_backward(mu, scale, prior_mu, prior_logvar, noise, param, needs, grad_z, grad_kl,
                                    grad_kl_per_dim):
    """The latent backward by its closed form in differentiable torch ops (create_graph, torch.func):
    dL/dmu = sum_k gz_k + g dKL_j/dmu;  dL/dscale = sum_k gz_k eps_k dsigma + g dKL_j/dlv dlv;
    dL/dpmu = -g dKL_j/dmu;  dL/dplv = g dKL_j/dplv (see :func:`_kl_partials`), g = dL/dKL + dL/dKL_j."""
    _, d_sigma, dkl_dmu, dkl_dlv, d_lv, dkl_dplv = _kl_partials(mu, scale, prior_mu, prior_logvar, param)
    g = torch.zeros_like(mu)
    if grad_kl is not None:
        g = g + grad_kl.to(mu.dtype).unsqueeze(-1)
    if grad_kl_per_dim is not None:
        g = g + grad_kl_per_dim.to(mu.dtype)
    grad_mu = g * dkl_dmu
    grad_scale = g * dkl_dlv * d_lv
    if grad_z is not None:
        grad_z = grad_z.to(mu.dtype).reshape(noise.shape)  # (K, B, Z); z is (B, Z) for K = 1
        grad_mu = grad_mu + grad_z.sum(0)
        grad_scale = grad_scale + (grad_z * noise).sum(0) * d_sigma
    grad_pm = (-g * dkl_dmu).sum_to_size(prior_mu.shape) if prior_mu is not None and needs[2] else None
    grad_plv = (g * dkl_dplv).sum_to_size(prior_logvar.shape) if prior_logvar is not None and needs[3] else None
    return grad_mu if needs[0] else None, grad_scale if needs[1] else None, grad_pm, grad_plv


class LatentFunction(torch.autograd.Function):
    """``torch.ops.vae_fast.latent_forward`` with its autograd (one implementation for both).

    forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, K, want_kl_per_dim, want_log_ratio)
        -> z (K,B,Z) or (B,Z) for K = 1, kl (B,), kl_per_dim (B,Z) or None/empty, log_ratio (K,B) or None/empty

    log_ratio (the IWAE log-weights' latent part) is for evaluation: it is not differentiable here
    (``vae_fast.elbo(objective="iwae")`` forms differentiable log-weights from z). Backward with grad
    mode on (``create_graph=True``, torch.func) is the closed form in differentiable torch ops, from
    the saved inputs and the same noise, so higher derivatives are exact.
    """

    @staticmethod
    def forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                want_log_ratio=False):
        return call(torch.ops.vae_fast.latent_forward.default, _forward_kernel, mu, scale, prior_mu, prior_logvar, eps,
                    seed, param, num_samples, want_kl_per_dim, want_log_ratio)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim = inputs[:9]
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        ctx.save_for_backward(mu, scale, prior_mu, prior_logvar, eps, seed)
        save_for_jvp(ctx, mu, scale, prior_mu, prior_logvar, eps, seed)
        ctx.param, ctx.num_samples, ctx.step_kernels, ctx.want_kl_per_dim = param, num_samples, None, want_kl_per_dim
        if output[3] is not None:
            ctx.mark_non_differentiable(output[3])
        if num_samples == 0 and output[0] is not None:  # (no sample: z is empty)
            ctx.mark_non_differentiable(output[0])

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_kl_per_dim=None, _grad_log_ratio=None):
        step_kernels = ctx.step_kernels  # set by LatentStep (the per-step call), else None
        grad_mode = torch.is_grad_enabled()
        if step_kernels is not None and not grad_mode and _plain_gradients(grad_z, grad_kl, grad_kl_per_dim):
            mu, scale = ctx.saved_tensors
            grad_mu, grad_scale = step_kernels.latent_step_backward(
                mu, scale, ctx.seed, optional_contiguous(grad_z), optional_contiguous(grad_kl),
                optional_contiguous(grad_kl_per_dim), ctx.param,
                ctx.num_samples)
            needs = ctx.needs_input_grad
            return grad_mu if needs[0] else None, grad_scale if needs[1] else None, None
        if grad_mode:  # create_graph=True, torch.func
            grad_z, grad_kl, grad_kl_per_dim = present(grad_z), present(grad_kl), present(grad_kl_per_dim)
            mu, scale, prior_mu, prior_logvar, eps, seed = _saved_inputs(ctx)
            noise = _latent_noise(mu, eps, seed, ctx.num_samples) if grad_z is not None else None
            grads = _differentiable_latent_backward(mu, scale, prior_mu, prior_logvar, noise, ctx.param,
                                                    ctx.needs_input_grad, grad_z, grad_kl, grad_kl_per_dim)
        else:  # (the kernel skips absent upstream gradients: None or empty placeholders)
            grads = latent_gradients(_saved_inputs(ctx), ctx.param, ctx.num_samples, ctx.needs_input_grad,
                                     grad_z, grad_kl, grad_kl_per_dim)
        if step_kernels is not None:  # LatentStep's inputs: mu, scale, plan
            return grads[0], grads[1], None
        return (*grads, None, None, None, None, None, None)


def _latent_jvp(ctx, tangent_mu, tangent_scale, tangent_prior_mu, tangent_prior_logvar, tangent_eps, *_):
    """:class:`LatentFunction`'s forward-mode AD (torch.func.jvp / jacfwd / hessian, dual tensors; see
    ``fast_apply``), by the closed forms of backward:
    z' = mu' + eps_k dsigma/dscale scale' + sigma eps'_k, and KL_j' = dKL_j/dmu mu' + dKL_j/dscale scale'
    + dKL_j/dpmu pmu' + dKL_j/dplv plv' (the same noise: eps, or the seed's Philox stream recomputed)."""
    mu, scale, prior_mu, prior_logvar, eps, seed = ctx.saved_tensors
    sigma, d_sigma, dkl_dmu, dkl_dlv, d_lv, dkl_dplv = _kl_partials(mu, scale, prior_mu, prior_logvar, ctx.param)
    kl_terms = ((dkl_dmu, tangent_mu), (dkl_dlv * d_lv, tangent_scale), (-dkl_dmu, tangent_prior_mu),
                (dkl_dplv, tangent_prior_logvar))
    # (as forward gives KL: in the accumulation dtype)
    tangent_kl_per_dim = tangent_sum(kl_terms, mu).to(acc_dtype(mu.dtype))
    tangent_kl = tangent_kl_per_dim.sum(-1)
    tangent_z = None
    samples = ctx.num_samples
    if samples > 0:
        tangent_z = torch.zeros((samples, *mu.shape), dtype=mu.dtype, device=mu.device)
        if tangent_mu is not None:
            tangent_z = tangent_z + tangent_mu.to(mu.dtype)
        if tangent_scale is not None:
            tangent_z = tangent_z + _latent_noise(mu, eps, seed, samples) * (d_sigma * tangent_scale.to(mu.dtype))
        if tangent_eps is not None:
            tangent_z = tangent_z + sigma * tangent_eps.to(mu.dtype).reshape(samples, *mu.shape)
        if samples == 1:
            tangent_z = tangent_z.reshape(mu.shape)
    return (tangent_z, tangent_kl, tangent_kl_per_dim if ctx.want_kl_per_dim else None, None)


apply_latent = fast_apply(LatentFunction, _forward_kernel, jvp=_latent_jvp)


SEED_BOUND = 2**62  # seeds are drawn in [0, 2^62) (int64, randint's default dtype: no dtype argument to parse)

_seed_buffers = threading.local()


def _plain_gradients(grad_z, grad_kl, grad_kl_per_dim) -> bool:
    """Upstream gradients the step kernels can read: plain tensors (or None), no dispatch mode active."""
    return ((grad_z is None or type(grad_z) is torch.Tensor) and (grad_kl is None or type(grad_kl) is torch.Tensor)
            and (grad_kl_per_dim is None or type(grad_kl_per_dim) is torch.Tensor)
            and not _dispatch_modes())


def _saved_inputs(ctx):
    """(mu, scale, prior_mu, prior_logvar, eps, seed) of a LatentFunction or LatentStep node."""
    if ctx.step_kernels is None:
        return ctx.saved_tensors
    mu, scale = ctx.saved_tensors
    return mu, scale, None, None, None, torch.tensor(ctx.seed, dtype=torch.int64, device=mu.device)


class LatentStep(torch.autograd.Function):
    """The per-step call of :class:`LatentFunction`, through the backend's step kernels (see :func:`latent_step`).

    forward(mu, scale, (kernels, param, K, want_kl_per_dim)) -> z, kl (, kl_per_dim if asked for); the
    non-tensor arguments come as one tuple (each argument of ``Function.apply`` costs about 0.06 us). The
    seed is drawn here from torch's default generator: the value ``torch.randint(SEED_BOUND, ())`` would
    give (randint is ``empty(()).random_(0, high)``), into a per-thread 0-d buffer (0.4 us cheaper), and
    kept in ctx as a Python int, not a saved tensor. Backward *is* ``LatentFunction.backward`` (one
    autograd implementation), which calls the step backward kernel.
    """

    @staticmethod
    def forward(ctx, mu, scale, plan):
        kernels, param, num_samples, want_kl_per_dim = plan
        seed_buffer = getattr(_seed_buffers, "buffer", None)
        if seed_buffer is None:
            # a normal tensor even when the thread's first call runs under torch.inference_mode() (an evaluation
            # or a Lightning sanity check before training): an inference tensor could not be updated outside it
            with torch.inference_mode(False):
                seed_buffer = _seed_buffers.buffer = torch.empty((), dtype=torch.int64, device="cpu")  # (CPU generator)
        seed = seed_buffer.random_(0, SEED_BOUND).item()
        z, kl, kl_per_dim = kernels.latent_step_forward(mu, scale, seed, param, num_samples, want_kl_per_dim)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mu, scale)
        ctx.param, ctx.num_samples, ctx.step_kernels, ctx.seed = param, num_samples, kernels, seed
        return (z, kl, kl_per_dim) if want_kl_per_dim else (z, kl)

    backward = staticmethod(LatentFunction.backward)


_apply_step = eager_function_apply(LatentStep)


def latent_step(mu, scale, param, num_samples, want_kl_per_dim):
    """The per-step latent call: (z, kl[, kl_per_dim]) as ``apply_latent(mu, scale, None, None, None, seed,
    param, K, want_kl_per_dim)`` gives them for a seed from torch's default generator, through the
    backend's step kernels; None when the call does not qualify (the caller then uses :data:`apply_latent`).

    Qualifies: a plain eager call (see :func:`step_kernels_for`) on (B, Z) tensors of one dtype with unit column
    stride (any row stride: the halves of ``h.chunk(2, dim=-1)``), K >= 1, on a backend with step
    kernels for them. The caller has checked the arguments (shapes, dtypes, devices, the code)."""
    kernels = step_kernels_for(mu, (num_samples + 2) * mu.numel())
    if kernels is not None and (mu.is_contiguous() or mu.stride()[1] == 1) and \
            (scale.is_contiguous() or scale.stride()[1] == 1):
        return _apply_step(mu, scale, (kernels, param, num_samples, want_kl_per_dim))
    return None


register_op(
    "latent_forward",
    "(Tensor mu, Tensor scale, Tensor? prior_mu, Tensor? prior_logvar, Tensor? eps, Tensor seed, "
    "int param, int num_samples, bool want_kl_per_dim, bool want_log_ratio=False) -> (Tensor, Tensor, Tensor, Tensor)",
    _forward_kernel, _forward_fake, LatentFunction)
register_op(
    "latent_backward",
    "(Tensor mu, Tensor scale, Tensor? prior_mu, Tensor? prior_logvar, Tensor? eps, Tensor seed, "
    "Tensor? grad_z, Tensor? grad_kl, Tensor? grad_kl_per_dim, int param, int num_samples, bool want_prior_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _backward_kernel, _backward_fake, None)
