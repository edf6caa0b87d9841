"""vae_fast: fused ELBO kernels for PyTorch.

ELBO = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)) = log p(x) - KL(q(z|x) || p(z|x)).
The latent block (sampling + KL) and the reconstruction term each run as one fused
kernel: Triton on CUDA, C++ on CPU, with :mod:`vae_fast.reference` as the oracle.
"""
from ._backend import (BACKENDS, backend, buffer_cache_bytes, release_buffer_cache, set_buffer_cache_limit,
                       use_backend)
from ._validation import check_pending_errors
from .config import inplace_backward, save_inputs, set_inplace_backward, set_validate_args, validate_args
from .functional import (
    LIKELIHOODS,
    DMOLParams,
    ELBOResult,
    bernoulli_log_prob,
    categorical_log_prob,
    continuous_bernoulli_log_prob,
    discretized_logistic_mixture_log_prob,
    dmol_from_packed,
    dmol_packed_log_prob,
    elbo,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_sample_kl,
    laplace_log_prob,
    linear_log_prob,
    mse_log_prob,
    register_likelihood,
)
from . import diagnostics, nn
from .distributions import DiagonalGaussian
from .diagnostics import iwae_bound
from .schedules import KLWarmup

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "backend", "use_backend", "validate_args", "set_validate_args", "inplace_backward",
    "set_inplace_backward", "save_inputs", "check_pending_errors", "LIKELIHOODS", "ELBOResult", "KLWarmup", "nn",
    "buffer_cache_bytes", "release_buffer_cache", "set_buffer_cache_limit",
    "bernoulli_log_prob", "categorical_log_prob", "continuous_bernoulli_log_prob", "elbo", "gaussian_kl",
    "gaussian_log_prob", "gaussian_sample_kl", "laplace_log_prob", "linear_log_prob", "mse_log_prob", "register_likelihood", "iwae_bound", "diagnostics",
    "DMOLParams", "discretized_logistic_mixture_log_prob", "dmol_from_packed", "dmol_packed_log_prob",
    "DiagonalGaussian",
]
