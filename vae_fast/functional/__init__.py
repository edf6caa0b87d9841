"""Functional API: the fused latent and reconstruction ops, and the ELBO assembled from them.

One module per family: :mod:`.latent` (sampling + KL), :mod:`.likelihoods` (elementwise and
categorical reconstruction terms), :mod:`.dmol` (discretised logistic mixtures) and
:mod:`.objectives` (ELBO, IWAE, the likelihood registry).

Shapes: the encoder gives ``mu``, ``logvar`` of shape ``(*B, Z)``; the decoder output
has the data's shape ``(B, *event)``, or ``(K, B, *event)`` for K latent samples.
Log-likelihoods are summed over every event dim.
"""
from .. import ops  # noqa: F401  (registers torch.ops.vae_fast)
from ._common import REDUCTIONS
from .dmol import DMOLParams, discretized_logistic_mixture_log_prob, dmol_from_packed, dmol_packed_log_prob
from .latent import gaussian_kl, gaussian_sample_kl
from .likelihoods import (bernoulli_log_prob, categorical_log_prob, continuous_bernoulli_log_prob, gaussian_log_prob,
                          laplace_log_prob, mse_log_prob)
from .heads import linear_log_prob
from .objectives import LIKELIHOODS, OBJECTIVES, ELBOResult, elbo, register_likelihood

__all__ = [
    "REDUCTIONS", "DMOLParams", "discretized_logistic_mixture_log_prob", "dmol_from_packed", "dmol_packed_log_prob",
    "gaussian_kl", "gaussian_sample_kl", "bernoulli_log_prob", "categorical_log_prob",
    "continuous_bernoulli_log_prob", "gaussian_log_prob", "laplace_log_prob", "mse_log_prob", "LIKELIHOODS", "OBJECTIVES", "ELBOResult", "elbo",
    "register_likelihood", "linear_log_prob",
]
