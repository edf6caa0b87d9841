"""The contract every kernel backend (``cpu``, ``triton``, ``reference``) satisfies.

Inputs arrive prepared by :mod:`vae_fast.ops`: row-major 2-D/3-D/4-D views (rows first), one
floating dtype, priors and log-variances as broadcast (stride-0) views, codes from
:mod:`vae_fast.ops.codes`. Outputs not asked for are None; out-of-support counts are ints or
integer tensors of any shape (0-d, or per row / per block as the Triton kernels write them, so that
no reduction is launched; ``raise_if_invalid`` and the op wrappers accept both). Reductions (log-likelihoods, KL) are returned in float32 for half
inputs, float64 for float64; gradients and z in the input dtype. ``tests/test_contracts.py``
checks that each backend module has these functions with these parameters.

A backend may also offer per-step entry points for the calls a training step repeats (the CPU
extension does: ``step_fits``, ``latent_step_forward``, ``latent_step_backward``,
``elementwise_step_log_prob``, see kernels/cpu.py); the ops use them when ``step_fits`` says so
(``ops/_library.py`` ``step_kernels_for``) and the general functions below otherwise.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

Tensor = torch.Tensor


@runtime_checkable
class KernelBackend(Protocol):
    def latent_forward(self, mu: Tensor, scale: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
                       eps: Tensor | None, seed: Tensor, param: int, num_samples: int, want_kl_per_dim: bool,
                       want_log_ratio: bool = False):
        """mu, scale (B, Z) -> z (K, B, Z) ((B, Z) when K = 1: the sample has mu's shape without a view, which
        would cost an autograd node per call), kl (B,), kl_per_dim (B, Z) | None, log_ratio (K, B) | None."""

    def latent_backward(self, mu: Tensor, scale: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
                        eps: Tensor | None, seed: Tensor, grad_z: Tensor | None, grad_kl: Tensor | None,
                        grad_kl_per_dim: Tensor | None, param: int, num_samples: int, want_prior_grad: bool):
        """grad_z: K*B*Z contiguous values ((K, B, Z) or (B, Z)) -> grad_mu, grad_scale (B, Z), grad_prior_mu,
        grad_prior_logvar (B, Z) | None."""

    def elementwise_log_prob(self, theta: Tensor, x: Tensor, logvar: Tensor | None, likelihood: int, want_grad: bool,
                             want_logvar_grad: bool, expected_upstream: float = 1.0,
                             logvar_grad_per_row: bool = False):
        """theta (N, D), x (Bx, D) (row r scored against x row r % Bx) -> log_prob (N,),
        grad_theta (N, D) | None, grad_logvar (N, D) | None, num_invalid; gradients times expected_upstream.
        ``logvar_grad_per_row`` (logvar constant along each row, column stride 0): grad_logvar (N,) holds each
        row's sum instead, unscaled (not times expected_upstream: backward multiplies these N values by the
        upstream gradient it gets) and in the accumulation dtype (float32 for half inputs: a row's sum may
        exceed float16's range)."""

    def categorical_log_prob(self, logits: Tensor, target: Tensor, want_grad: bool, expected_upstream: float = 1.0):
        """logits (N, P, C), target (Bx, P) int64 or uint8 (8-bit pixels, read as they are) -> log_prob (N,),
        grad_logits | None, num_invalid."""

    def dmol_log_prob(self, x: Tensor, logit_probs: Tensor, means: Tensor, log_scales: Tensor, coeffs: Tensor | None,
                      num_bits: int, log_scale_min: float, coeffs_tanh: bool, grads, expected_upstream: float = 1.0):
        """x (Bx, C, P), logit_probs (N, M, P), means/log_scales/coeffs (N, C, M, P) -> log_prob (N,),
        num_invalid; fills ``grads`` (four views or None) with the gradients times expected_upstream."""
