"""``DiagonalGaussian``: the diffusers / LDM ``DiagonalGaussianDistribution`` on fused kernels.

The SD/LDM autoencoder's encoder emits moments (B, 2C, H, W); diffusers splits them along dim 1
into mean and log-variance, clamps the log-variance to [-30, 20] and samples / evaluates the KL
with eager elementwise ops. Swapping it in a diffusers/LDM training loop::

    # before: posterior = DiagonalGaussianDistribution(moments)
    posterior = vae_fast.DiagonalGaussian(moments)          # same attributes and methods
    z = posterior.sample(generator=generator)                # fused reparameterised sample
    kl_loss = posterior.kl().mean()                          # fused, overflow-safe KL

Numbers: the KL and sample are the same formulas (tested against diffusers' own class where it is
installed); without ``logvar_clamp`` the log-variance is used as given (the kernels are overflow-safe
without a clamp); ``logvar_clamp=(-30.0, 20.0)`` reproduces diffusers bit for bit in the inputs.
The noise comes from vae_fast's Philox stream (seeded from ``generator``), not from ``torch.randn``.
"""
from __future__ import annotations

import math

import torch

from ._validation import check_tensor
from .functional.latent import _normalize_dims, gaussian_kl, gaussian_sample_kl

DIFFUSERS_LOGVAR_CLAMP = (-30.0, 20.0)


class DiagonalGaussian:
    """A diagonal Gaussian posterior over a latent of shape (B, *latent), e.g. (B, C, H, W).

    Args:
        parameters: moments ``(B, 2C, ...)``, split along dim 1 into mean and log-variance (as
            diffusers does); or give ``mean=`` and ``logvar=`` instead.
        deterministic: sample() returns the mean and kl() is 0 (diffusers' flag).
        logvar_clamp: ``(low, high)`` to clamp the log-variance, e.g. :data:`DIFFUSERS_LOGVAR_CLAMP`.

    Attributes: ``mean``, ``logvar``, ``std``, ``var`` (tensors of the latent's shape).
    """

    def __init__(self, parameters: torch.Tensor | None = None, deterministic: bool = False, *,
                 mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                 logvar_clamp: tuple[float, float] | None = None):
        if parameters is not None:
            if mean is not None or logvar is not None:
                raise ValueError("give parameters or mean= and logvar=, not both")
            check_tensor("parameters", parameters)
            if parameters.dim() < 2 or parameters.shape[1] % 2:
                raise ValueError(f"parameters must have shape (B, 2C, ...) with an even channel count, "
                                 f"got {tuple(parameters.shape)}")
            mean, logvar = torch.chunk(parameters, 2, dim=1)
        elif mean is None or logvar is None:
            raise ValueError("DiagonalGaussian needs parameters, or both mean= and logvar=")
        check_tensor("mean", mean)
        check_tensor("logvar", logvar)
        if mean.shape != logvar.shape or mean.dim() < 2:
            raise ValueError(f"mean and logvar must have one shape (B, *latent), got {tuple(mean.shape)} and "
                             f"{tuple(logvar.shape)}")
        if logvar_clamp is not None:
            low, high = logvar_clamp
            logvar = torch.clamp(logvar, low, high)
        self.parameters = parameters
        self.mean, self.logvar = mean, logvar
        self.deterministic = bool(deterministic)
        self.latent_dims = tuple(range(1, mean.dim()))

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, reparameterised (gradients reach mean and logvar), fused."""
        if self.deterministic:
            return self.mean
        z, _ = gaussian_sample_kl(self.mean, self.logvar, generator=generator, dim=self.latent_dims)
        return z

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) summed over every non-batch dim, (B,); ``other`` defaults to N(0, I).
        A learned prior's gradients flow to ``other.mean`` / ``other.logvar``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        if other is None:
            return gaussian_kl(self.mean, self.logvar, dim=self.latent_dims)
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"other must be a DiagonalGaussian or None, got {type(other).__name__}")
        return gaussian_kl(self.mean, self.logvar, other.mean, other.logvar, dim=self.latent_dims)

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mean, var) summed over ``dims`` (diffusers' default (1, 2, 3))."""
        check_tensor("sample", sample)
        try:
            shape = torch.broadcast_shapes(sample.shape, self.mean.shape)
        except RuntimeError:
            raise ValueError(f"sample of shape {tuple(sample.shape)} must broadcast with the mean's shape "
                             f"{tuple(self.mean.shape)}") from None
        dims = _normalize_dims(dims, len(shape), "dims", "sample")
        if self.deterministic:
            return torch.zeros(sample.shape[0], dtype=sample.dtype, device=sample.device)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, dim=dims)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(latent shape {tuple(self.mean.shape)}, dtype {self.mean.dtype})"
