"""nn.Module forms of the fused ELBO."""
from __future__ import annotations

import torch

from .functional import elbo


class ELBOLoss(torch.nn.Module):
    """``loss = ELBOLoss(likelihood="bernoulli")(x, mu, logvar, decode)``: the negative ELBO
    (with beta and free bits) of :func:`vae_fast.elbo`, reduced by ``reduction``.

    ``beta`` may be changed between steps (e.g. from :class:`vae_fast.KLWarmup`)."""

    def __init__(self, likelihood="bernoulli", *, beta: float = 1.0, free_bits: float = 0.0, reduction: str = "mean",
                 num_samples: int = 1, param: str = "logvar"):
        super().__init__()
        self.likelihood, self.beta, self.free_bits = likelihood, beta, free_bits
        self.reduction, self.num_samples, self.param = reduction, num_samples, param

    def forward(self, x, mu, logvar, decode, eps=None, prior_mu=None, prior_logvar=None):
        return elbo(
            x, mu, logvar, decode, likelihood=self.likelihood, beta=self.beta, free_bits=self.free_bits,
            num_samples=self.num_samples, param=self.param, reduction=self.reduction, eps=eps,
            prior_mu=prior_mu, prior_logvar=prior_logvar,
        ).loss

    def extra_repr(self) -> str:
        return (f"likelihood={self.likelihood!r}, beta={self.beta}, free_bits={self.free_bits}, "
                f"reduction={self.reduction!r}, num_samples={self.num_samples}")
