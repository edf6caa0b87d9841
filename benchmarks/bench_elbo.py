"""Whole ELBO loss (decoder excluded: a stand-in decoder that costs the same in both) and the
whole training step of the classic 784-400-20 MLP VAE, forward + backward (CPU)."""
import pytest
import torch

from benchmarks import impls

SHAPES = [(128, 32, 784), (1024, 64, 3072), (4096, 128, 3072)]
IMPLS = {"vae_fast": impls.elbo_fused, "eager": impls.elbo_eager,
         "torch.compile": torch.compile(impls.elbo_eager, dynamic=False)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_elbo_loss(run_fwd_bwd, impl, shape):
    run_fwd_bwd(IMPLS[impl], impls.elbo_inputs(shape, "cpu"), f"elbo loss {shape}")


@pytest.mark.parametrize("impl", ["vae_fast", "eager"])
def test_mlp_vae_training_step(run_fwd_bwd, impl):
    """Amdahl: the encoder/decoder matmuls dominate a 784-400-20 MLP VAE step."""
    from examples.train_mnist import MLPVAE, eager_loss, fused_loss

    torch.manual_seed(0)
    model = MLPVAE()
    x = torch.bernoulli(torch.rand(128, 784))
    loss = fused_loss if impl == "vae_fast" else eager_loss
    params = list(model.parameters())
    run_fwd_bwd(lambda x, *p: loss(model, x, "bernoulli"), [x, *params], "MLP VAE step 128x784")
