"""Latent block op: ``z = mu + sigma * eps`` for K samples and KL(q || p), fused.

Op schemas (``torch.ops.vae_fast``)::

    latent_forward(mu (B,Z), scale (B,Z), prior_mu?, prior_logvar?  [broadcastable to (B,Z)],
                   eps? (K,B,Z), seed () int64, param, num_samples K, want_kl_per_dim)
        -> z (K,B,Z), kl (B,), kl_per_dim (B,Z) or (0,),
           log_ratio (K,B) or (0,): log q(z_k|x) - log p(z_k) per sample, if want_log_ratio
    latent_backward(..., grad_z?, grad_kl?, grad_kl_per_dim?, param, K, want_prior_grad)
        -> grad_mu, grad_scale, grad_prior_mu (B,Z) or (0,), grad_prior_logvar (B,Z) or (0,)

Only mu, scale, the prior and the 0-d seed are saved for backward: eps is
recomputed from the Philox stream, and sigma from the scale.
"""
from __future__ import annotations

import torch

from ._library import LIB, call, kernels_for, optional_contiguous, present, register_kernel

LIB.define(
    "latent_forward(Tensor mu, Tensor scale, Tensor? prior_mu, Tensor? prior_logvar, Tensor? eps, Tensor seed, "
    "int param, int num_samples, bool want_kl_per_dim, bool want_log_ratio=False) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "latent_backward(Tensor mu, Tensor scale, Tensor? prior_mu, Tensor? prior_logvar, Tensor? eps, Tensor seed, "
    "Tensor? grad_z, Tensor? grad_kl, Tensor? grad_kl_per_dim, int param, int num_samples, bool want_prior_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _expand_prior(prior: torch.Tensor | None, mu: torch.Tensor) -> torch.Tensor | None:
    # a (B, Z) view with stride 0 along broadcast dims: the kernels read it through its strides
    return None if prior is None else prior.to(mu.dtype).expand(mu.shape)


def _forward_kernel(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                    want_log_ratio=False):
    mu = mu.contiguous()
    return kernels_for(mu).latent_forward(
        mu, scale.contiguous(), _expand_prior(prior_mu, mu), _expand_prior(prior_logvar, mu),
        optional_contiguous(eps), seed, param, num_samples, want_kl_per_dim, want_log_ratio,
    )


def _backward_kernel(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                     num_samples, want_prior_grad):
    mu = mu.contiguous()
    return kernels_for(mu).latent_backward(
        mu, scale.contiguous(), _expand_prior(prior_mu, mu), _expand_prior(prior_logvar, mu),
        optional_contiguous(eps), seed, optional_contiguous(present(grad_z)), optional_contiguous(present(grad_kl)),
        optional_contiguous(present(grad_kl_per_dim)), param, num_samples, want_prior_grad and prior_mu is not None,
    )


register_kernel("latent_forward", _forward_kernel)
register_kernel("latent_backward", _backward_kernel)


@torch.library.register_fake("vae_fast::latent_forward")
def _forward_fake(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                  want_log_ratio=False):
    batch, dim = mu.shape
    kl_per_dim = mu.new_empty((batch, dim)) if want_kl_per_dim else mu.new_empty(0)
    log_ratio = mu.new_empty((num_samples, batch)) if want_log_ratio else mu.new_empty(0)
    return mu.new_empty((num_samples, batch, dim)), mu.new_empty((batch,)), kl_per_dim, log_ratio


@torch.library.register_fake("vae_fast::latent_backward")
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
    grad_mu, grad_scale, grad_pm, grad_plv = call(
        torch.ops.vae_fast.latent_backward.default, _backward_kernel, mu, scale, prior_mu, prior_logvar, eps, seed,
        grad_z, grad_kl, grad_kl_per_dim, param, num_samples, want_prior,
    )
    grad_pm = grad_pm.sum_to_size(prior_mu.shape) if want_prior and needs_input_grad[2] else None
    grad_plv = grad_plv.sum_to_size(prior_logvar.shape) if want_prior and needs_input_grad[3] else None
    return (grad_mu if needs_input_grad[0] else None, grad_scale if needs_input_grad[1] else None, grad_pm, grad_plv)


class LatentFunction(torch.autograd.Function):
    """Autograd wiring only: forward and backward are the ops above.

    forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, K, want_kl_per_dim, want_log_ratio)
        -> z (K,B,Z), kl (B,), kl_per_dim (B,Z) or None/empty, log_ratio (K,B) or None/empty

    log_ratio (the IWAE log-weights' latent part) is for evaluation: it is not differentiable here
    (``vae_fast.elbo(objective="iwae")`` forms differentiable log-weights from z).
    """

    @staticmethod
    def forward(ctx, mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                want_log_ratio=False):
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        z, kl, kl_per_dim, log_ratio = call(
            torch.ops.vae_fast.latent_forward.default, _forward_kernel, mu, scale, prior_mu, prior_logvar, eps, seed,
            param, num_samples, want_kl_per_dim, want_log_ratio)
        ctx.save_for_backward(mu, scale, prior_mu, prior_logvar, eps, seed)
        ctx.param, ctx.num_samples = param, num_samples
        if log_ratio is not None:
            ctx.mark_non_differentiable(log_ratio)
        return z, kl, kl_per_dim, log_ratio

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_kl_per_dim, _grad_log_ratio=None):
        grads = latent_gradients(ctx.saved_tensors, ctx.param, ctx.num_samples, ctx.needs_input_grad,
                                 grad_z, grad_kl, grad_kl_per_dim)
        return (*grads, None, None, None, None, None, None)


# The same backward on the op itself, so torch.ops.vae_fast.latent_forward is differentiable.
def _setup_context(ctx, inputs, output):
    mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples = inputs[:8]
    ctx.save_for_backward(mu, scale, prior_mu, prior_logvar, eps, seed)
    ctx.param, ctx.num_samples = param, num_samples


def _op_backward(ctx, grad_z, grad_kl, grad_kl_per_dim, grad_log_ratio):
    return LatentFunction.backward(ctx, grad_z, grad_kl, grad_kl_per_dim, grad_log_ratio)


torch.library.register_autograd("vae_fast::latent_forward", _op_backward, setup_context=_setup_context)
