"""Reconstruction likelihoods, forward + backward: vae_fast vs eager vs torch.compile (CPU)."""
import pytest
import torch

from benchmarks import impls

SHAPES = [(128, 784), (1024, 3072), (4096, 3072)]
KINDS = ["bernoulli", "continuous_bernoulli", "gaussian"]


def implementations(kind):
    eager = impls.likelihood_step(impls.EAGER_LIKELIHOOD[kind])
    return {"vae_fast": impls.likelihood_step(impls.FUSED_LIKELIHOOD[kind]), "eager": eager,
            "torch.compile": torch.compile(eager, dynamic=False)}


@pytest.mark.parametrize("impl", ["vae_fast", "eager", "torch.compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_elementwise(run_fwd_bwd, kind, shape, impl):
    run_fwd_bwd(implementations(kind)[impl], impls.likelihood_inputs(shape, "cpu", kind), f"{kind} {shape}")


@pytest.mark.parametrize("impl", ["vae_fast", "eager", "torch.compile"])
def test_categorical(run_fwd_bwd, impl):
    shape = (64, 3, 32, 32, 256)
    run_fwd_bwd(implementations("categorical")[impl], impls.likelihood_inputs(shape, "cpu", "categorical"),
                f"categorical {shape}")


@pytest.mark.parametrize("impl", ["vae_fast", "eager", "torch.compile"])
def test_dmol(run_fwd_bwd, impl):
    """Discretised logistic mixture, B x C x H x W = 16 x 3 x 32 x 32, M = 10, packed NVAE-style output;
    eager = NVAE's DiscMixLogistic.log_prob."""
    shape = (16, 3, 32, 32, 10)
    fns = {"vae_fast": impls.dmol_fused, "eager": impls.dmol_eager,
           "torch.compile": torch.compile(impls.dmol_eager, dynamic=False)}
    run_fwd_bwd(fns[impl], impls.dmol_inputs(shape, "cpu"), f"dmol {shape}")
