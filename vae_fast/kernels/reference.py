"""Reference backend: the same kernel interface, evaluated with :mod:`vae_fast.reference`
in float64 (gradients by autograd). Slow but always available; used when the C++
extension is missing and as ``VAE_FAST_BACKEND=reference``."""
from __future__ import annotations

import contextlib

import torch

from .. import reference as ref

_PARAM_NAMES = ref.SCALE_PARAMS


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside an op's kernel: when the op's registered autograd formula
    runs it, the dispatcher has excluded the autograd keys (AutoDispatchBelowAutograd)."""
    keys = torch._C.DispatchKey
    with torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False), torch.enable_grad():
        yield


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f64(t):
    return None if t is None else t.detach().double()


def _noise(mu, eps, seed, num_samples):
    if eps is not None:
        return eps.double()
    batch, dim = mu.shape
    return ref.latent_noise(int(seed), num_samples, batch, dim).to(mu.device)


def latent_forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                   want_log_ratio=False):
    name = _PARAM_NAMES[param]
    mu64, s64 = _f64(mu), _f64(scale)
    z = ref.reparameterize(mu64, s64, _noise(mu, eps, seed, num_samples), name)
    kl_dims = ref.gaussian_kl(mu64, s64, _f64(prior_mu), _f64(prior_logvar), name, reduce=False)
    kl_per_dim = kl_dims if want_kl_per_dim else None
    log_ratio = None
    if want_log_ratio:
        pm = torch.zeros_like(mu64) if prior_mu is None else _f64(prior_mu)
        plv = torch.zeros_like(mu64) if prior_logvar is None else _f64(prior_logvar)
        log_q = ref.gaussian_log_density(z, mu64, ref.logvar_from_scale(s64, name))
        log_ratio = log_q - ref.gaussian_log_density(z, pm, plv)
    acc = _acc(mu.dtype)
    if num_samples == 1:  # (a copy, not a view: an autograd.Function's view outputs cannot be modified in place)
        z = z.reshape(mu.shape).clone()
    return z.to(mu.dtype), kl_dims.sum(-1).to(acc), None if kl_per_dim is None else kl_per_dim.to(acc), \
        None if log_ratio is None else log_ratio.to(acc)


def latent_backward(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                    num_samples, want_prior_grad):
    name = _PARAM_NAMES[param]
    inputs = [_f64(mu).requires_grad_(), _f64(scale).requires_grad_()]
    if prior_mu is not None:
        inputs += [_f64(prior_mu).requires_grad_(), _f64(prior_logvar).requires_grad_()]
    with _autograd_inside_op():
        z = ref.reparameterize(inputs[0], inputs[1], _noise(mu, eps, seed, num_samples), name)
        kl_dims = ref.gaussian_kl(*inputs[:2], *(inputs[2:] or (None, None)), name, reduce=False)
        objective = kl_dims.new_zeros(())
        if grad_z is not None:
            objective = objective + (z * grad_z.double()).sum()
        if grad_kl is not None:
            objective = objective + (kl_dims.sum(-1) * grad_kl.double()).sum()
        if grad_kl_per_dim is not None:
            objective = objective + (kl_dims * grad_kl_per_dim.double()).sum()
        grads = torch.autograd.grad(objective, inputs, allow_unused=True) if objective.requires_grad else [None] * len(inputs)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    grad_mu, expected_upstream = grads[0].to(mu.dtype), grads[1].to(mu.dtype)
    if want_prior_grad:
        # the kernels return prior gradients at the expanded (batch, dim) shape
        return grad_mu, expected_upstream, grads[2].expand_as(mu).to(mu.dtype), grads[3].expand_as(mu).to(mu.dtype)
    return grad_mu, expected_upstream, None, None


_ELEMENTWISE = {
    0: lambda t, x, lv: ref.bernoulli_log_prob(t, x),
    1: lambda t, x, lv: ref.continuous_bernoulli_log_prob(t, x),
    2: lambda t, x, lv: ref.gaussian_log_prob(t, x, lv),
    3: lambda t, x, lv: ref.mean_squared_error_log_prob(t, x),
    4: lambda t, x, lv: ref.laplace_log_prob(t, x, lv),
}


def _x_rows(x, rows):
    return x.repeat(rows // max(x.shape[0], 1), *([1] * (x.dim() - 1))) if x.shape[0] else x


def _num_invalid(x, likelihood):
    """x outside the support: [0, 1] for the Bernoulli family, NaN for every likelihood."""
    if likelihood in (2, 3, 4):
        return x.isnan().sum().cpu()
    return (~((x >= 0) & (x <= 1))).sum().cpu()


def elementwise_log_prob(theta, x, logvar, likelihood, want_grad, want_logvar_grad, expected_upstream=1.0,
                         logvar_grad_per_row=False):
    theta64 = _f64(theta).requires_grad_(want_grad)
    lv64 = None if logvar is None else _f64(logvar).requires_grad_(want_logvar_grad)
    with _autograd_inside_op():
        log_prob = _ELEMENTWISE[likelihood](theta64, _x_rows(x, theta.shape[0]).double(), lv64 if lv64 is not None else 0.0)
        wanted = [t for t, w in ((theta64, want_grad), (lv64, want_logvar_grad)) if w]
        grads = list(torch.autograd.grad(log_prob.sum(), wanted)) if wanted and log_prob.numel() else [torch.zeros_like(t) for t in wanted]
    grad = (grads.pop(0) * expected_upstream).to(theta.dtype) if want_grad else None
    grad_lv = grads.pop(0).expand_as(theta) if want_logvar_grad else None
    if grad_lv is not None:  # per row: each row's sum, unscaled, in the accumulation dtype (kernels/protocol.py)
        grad_lv = (grad_lv.sum(1).to(_acc(theta.dtype)) if logvar_grad_per_row
                   else (grad_lv * expected_upstream).to(theta.dtype).contiguous())
    return log_prob.detach().to(_acc(theta.dtype)), grad, grad_lv, _num_invalid(x, likelihood)


def categorical_log_prob(logits, target, want_grad, expected_upstream=1.0):
    classes = logits.shape[-1]
    target = target.long()  # (a uint8 tensor would index as a mask)
    valid = (target >= 0) & (target < classes)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logits64 = _f64(logits).requires_grad_(want_grad)
    with _autograd_inside_op():
        log_prob = ref.categorical_log_prob(logits64, _x_rows(safe_target, logits.shape[0]))
        grad = (torch.autograd.grad(log_prob.sum() * expected_upstream, logits64)[0].to(logits.dtype)
                if want_grad and log_prob.numel() else (torch.zeros_like(logits) if want_grad else None))
    return log_prob.detach().to(_acc(logits.dtype)), grad, (~valid).sum().cpu()


def dmol_log_prob(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, coeffs_tanh, grads,
                  expected_upstream=1.0):
    """Views (N, M, P) / (N, C, M, P) as in the C++ backend; fills ``grads`` (four views or None)."""
    leaves = [None if t is None else _f64(t).requires_grad_(grads is not None) for t in (logit_probs, means, log_scales, coeffs)]
    x_rows = _x_rows(x, means.shape[0]).double()
    with _autograd_inside_op():
        coeff_values = leaves[3]
        if coeff_values is not None and coeffs_tanh:
            coeff_values = torch.tanh(coeff_values)
        # the reference takes (B, C, H, W) images: view the P pixels as H = 1, W = P
        log_prob = ref.discretized_logistic_mixture_log_prob(
            x_rows.unsqueeze(2), leaves[0].unsqueeze(2), leaves[1].unsqueeze(3), leaves[2].unsqueeze(3),
            None if coeff_values is None else coeff_values.unsqueeze(3), num_bits=num_bits, log_scale_min=log_scale_min)
        if grads is not None:
            wanted = [t for t in leaves if t is not None]
            values = torch.autograd.grad(log_prob.sum() * expected_upstream, wanted) if log_prob.numel() else [torch.zeros_like(t) for t in wanted]
            for target, value in zip([g for g in grads if g is not None], values):
                target.copy_(value)
    bad = (~((x >= -1) & (x <= 1))).sum().cpu()  # (NaN too)
    return log_prob.detach().to(_acc(means.dtype)), bad
