"""nn.Module forms of the fused ELBO."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .functional import elbo
from .functional.heads import HEAD_LIKELIHOODS, linear_log_prob


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


class FusedHead(torch.nn.Module):
    """The decoder's last Linear (``channel_dim=-1``) or 1x1 conv (``channel_dim=1``) fused with its
    likelihood: ``head.log_prob(h, x)`` is ``log p(x | head(h))`` per example without the output in
    memory (:func:`vae_fast.linear_log_prob`); ``head(h)`` gives the output itself when it is really
    needed (sampling, plots).

    ``weight`` (out_features, in_features) and ``bias`` are initialised as ``nn.Linear``'s (and, for
    a 1x1 conv, as ``nn.Conv2d``'s, which is the same). ``out_shape`` (channel_dim=-1 only) names the
    event shape the flat output is scored against, e.g. ``(1, 28, 28)`` for an MLP decoder on images.
    Pass the Gaussian's ``logvar`` or the Laplace's ``log_scale`` to :meth:`log_prob`, or to
    :func:`vae_fast.elbo` through ``head_kwargs``.
    """

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], likelihood: str, *,
                 channel_dim: int = -1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if likelihood not in HEAD_LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {sorted(HEAD_LIKELIHOODS)}, got {likelihood!r}")
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (Linear) or 1 (1x1 conv), got {channel_dim}")
        self.out_shape = None
        if isinstance(out_features, (tuple, list)):
            if channel_dim != -1:
                raise ValueError("out_shape (a tuple out_features) is for channel_dim=-1 heads")
            if likelihood in ("categorical", "dmol"):  # (their kernels score the head's output dim as one event)
                raise ValueError(f"out_shape (a tuple out_features) is for the elementwise likelihoods, got "
                                 f"likelihood={likelihood!r}: a {likelihood} head's out_features is its output dim "
                                 "(the classes / the packed mixture parameters), shared by h's positions")
            if not out_features or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                           for d in out_features):
                raise ValueError(f"out_shape must be a non-empty tuple of positive ints, got {tuple(out_features)}")
            self.out_shape = tuple(out_features)
            out_features = math.prod(self.out_shape)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.likelihood, self.channel_dim = likelihood, channel_dim
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=bias, device=device, dtype=dtype)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The head's output (the likelihood's parameters), materialised."""
        if self.channel_dim == 1:
            return F.conv2d(h, self.weight[:, :, None, None], self.bias) if h.dim() == 4 else \
                torch.movedim(F.linear(h.movedim(1, -1), self.weight, self.bias), -1, 1)
        out = F.linear(h, self.weight, self.bias)
        return out if self.out_shape is None else out.reshape(*out.shape[:-1], *self.out_shape)

    def log_prob(self, h: torch.Tensor, x: torch.Tensor, *, reduction: str = "none", max_chunk_bytes=None,
                 **likelihood_kwargs) -> torch.Tensor:
        """log p(x | self(h)) per example ``(B,)`` (``(K, B)`` for K-sample h), fused."""
        if self.out_shape is not None:
            event = len(self.out_shape)
            if tuple(x.shape[-event:]) != self.out_shape:
                raise ValueError(f"x of shape {tuple(x.shape)} must end with the head's out_shape {self.out_shape}")
            x = x.reshape(*x.shape[:-event], self.out_features)
        return linear_log_prob(h, self.weight, self.bias, x, likelihood=self.likelihood, channel_dim=self.channel_dim,
                               reduction=reduction, max_chunk_bytes=max_chunk_bytes, **likelihood_kwargs)

    def extra_repr(self) -> str:
        out = self.out_shape if self.out_shape is not None else self.out_features
        return (f"in_features={self.in_features}, out={out}, likelihood={self.likelihood!r}, "
                f"channel_dim={self.channel_dim}, bias={self.bias is not None}")
