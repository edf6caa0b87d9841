"""Latent block (sampling + KL), forward + backward: vae_fast vs eager vs torch.compile (CPU)."""
import pytest
import torch

from benchmarks import impls

SHAPES = [(128, 32), (1024, 256), (4096, 512)]
IMPLS = {"vae_fast": impls.latent_fused, "eager": impls.latent_eager, "distributions": impls.latent_distributions,
         "torch.compile": torch.compile(impls.latent_eager, dynamic=False)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_latent(run_fwd_bwd, impl, shape):
    run_fwd_bwd(IMPLS[impl], impls.latent_inputs(shape, "cpu"), f"latent {shape}")


CONV_SHAPES = [(8, 4, 32, 32)]  # an SD-like latent from (B, 2C, H, W) moments
CONV_IMPLS = {"vae_fast": impls.conv_latent_fused, "DiagonalGaussian": impls.conv_latent_posterior,
              "eager": impls.conv_latent_eager, "torch.compile": torch.compile(impls.conv_latent_eager, dynamic=False)}


@pytest.mark.parametrize("impl", list(CONV_IMPLS))
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_latent(run_fwd_bwd, impl, shape):
    run_fwd_bwd(CONV_IMPLS[impl], impls.conv_latent_inputs(shape, "cpu"), f"conv latent {shape}")
