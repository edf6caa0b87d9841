"""vae_fast.elbo, ELBOLoss and KLWarmup: assembly checked against the reference and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vae_fast
from vae_fast import reference as ref
from vae_fast.nn import ELBOLoss

from .conftest import assert_matches_reference

REF_LOG_PROB = {
    "bernoulli": lambda out, x: ref.bernoulli_log_prob(out, x, batch_dims=out.dim() - x.dim() + 1),
    "continuous_bernoulli": lambda out, x: ref.continuous_bernoulli_log_prob(out, x, batch_dims=out.dim() - x.dim() + 1),
    "gaussian": lambda out, x: ref.gaussian_log_prob(out[0], x, out[1], batch_dims=out[0].dim() - x.dim() + 1),
    "categorical": lambda out, x: ref.categorical_log_prob(out, x, batch_dims=out.dim() - x.dim()),
}


def setup(likelihood, device, batch=4, latent=3, pixels=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, latent, generator=gen, dtype=torch.float64).to(device)
    lv = torch.randn(batch, latent, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(latent, pixels * (5 if likelihood == "categorical" else 1), generator=gen, dtype=torch.float64).to(device)
    log_scale = torch.randn(pixels, generator=gen, dtype=torch.float64).to(device)
    if likelihood == "categorical":
        x = torch.randint(0, 5, (batch, pixels), generator=gen).to(device)
        decode = lambda z: (z @ weight).reshape(*z.shape[:-1], pixels, 5)  # noqa: E731
    elif likelihood == "gaussian":
        x = torch.randn(batch, pixels, generator=gen, dtype=torch.float64).to(device)
        decode = lambda z: (z @ weight, log_scale)  # noqa: E731
    else:
        x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).to(device)
        decode = lambda z: z @ weight  # noqa: E731
    return x, mu, lv, decode


def to_cpu(out):
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("likelihood", list(REF_LOG_PROB))
@pytest.mark.parametrize("samples", [1, 3])
def test_elbo_matches_reference_for_every_likelihood(backend, likelihood, samples):
    x, mu, lv, decode = setup(likelihood, backend)
    eps = torch.randn(samples, *mu.shape, dtype=torch.float64, device=backend)
    result = vae_fast.elbo(x, mu, lv, decode, likelihood=likelihood, eps=eps, num_samples=samples, reduction="none")
    z = ref.reparameterize(mu.cpu(), lv.cpu(), eps.cpu())
    log_lik = REF_LOG_PROB[likelihood](to_cpu(decode(z.to(backend))), x.cpu())
    log_lik = log_lik.mean(0) if samples > 1 else log_lik[0]
    kl = ref.gaussian_kl(mu.cpu(), lv.cpu())
    assert_matches_reference(result.log_likelihood, log_lik, torch.float64, terms=30, what="log_likelihood")
    assert_matches_reference(result.kl, kl, torch.float64, terms=3, what="kl")
    assert_matches_reference(result.elbo, log_lik - kl, torch.float64, terms=30, what="elbo")
    assert_matches_reference(result.loss, -(log_lik - kl), torch.float64, terms=30, what="loss")
    assert result.kl_per_dim.shape == mu.shape and result.z.shape == eps.shape[int(samples == 1):]


def test_beta_free_bits_and_reductions_by_hand(backend):
    x, mu, lv, decode = setup("bernoulli", backend, batch=5, latent=4)
    mu = mu.clone()
    mu[:, 0] = 0.0  # dim 0 has a small KL ...
    lv = lv.clone()
    lv[:, 0] = 0.0  # ... exactly 0: below any free-bits threshold
    eps = torch.randn(5, 4, dtype=torch.float64, device=backend)
    beta, lam = 0.3, 0.25
    r = vae_fast.elbo(x, mu, lv, decode, eps=eps, beta=beta, free_bits=lam, reduction="none")
    kl_dims = ref.gaussian_kl(mu.cpu(), lv.cpu(), reduce=False)
    log_lik = ref.bernoulli_log_prob(decode(ref.reparameterize(mu, lv, eps)).cpu(), x.cpu())
    batch_mean = kl_dims.mean(0)
    kl_term = torch.where(batch_mean >= lam, kl_dims, torch.full_like(kl_dims, lam)).sum(-1)
    torch.testing.assert_close(r.loss.cpu(), -(log_lik - beta * kl_term))
    torch.testing.assert_close(r.elbo.cpu(), log_lik - kl_dims.sum(-1))  # never altered by beta / free bits
    mean = vae_fast.elbo(x, mu, lv, decode, eps=eps, beta=beta, free_bits=lam).loss
    total = vae_fast.elbo(x, mu, lv, decode, eps=eps, beta=beta, free_bits=lam, reduction="sum").loss
    expected_mean = -log_lik.mean() + beta * torch.clamp(batch_mean, min=lam).sum()
    torch.testing.assert_close(mean.cpu(), expected_mean)
    torch.testing.assert_close(total.cpu(), expected_mean * 5)
    # free bits: a dim whose batch-mean KL is below lambda gets no KL gradient
    leaf = lv.clone().requires_grad_()
    vae_fast.elbo(x, mu, leaf, lambda z: decode(z).detach() * 0, eps=eps, free_bits=lam).loss.backward()
    assert torch.all(leaf.grad[:, 0] == 0) and torch.any(leaf.grad[:, 1:] != 0)


class ClassicVAE(nn.Module):
    """The 784-400-20 MLP VAE of the PyTorch examples repository (sigmoid decoder output)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode_logits(self, z):  # the drop-in change: return logits, not sigmoid(logits)
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z):
        return torch.sigmoid(self.decode_logits(z))


def classic_loss(model, x, eps):
    mu, logvar = model.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)  # reparameterize with the given noise
    recon = model.decode(z)
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def test_drop_in_replacement_for_the_classic_mnist_vae(backend):
    torch.manual_seed(0)
    model = ClassicVAE().double().to(backend)
    x = torch.bernoulli(torch.rand(16, 784, dtype=torch.float64)).to(backend)
    eps = torch.randn(16, 20, dtype=torch.float64, device=backend)
    loss_classic = classic_loss(model, x, eps)
    grads_classic = torch.autograd.grad(loss_classic, list(model.parameters()))
    mu, logvar = model.encode(x)
    loss_fused = vae_fast.elbo(x, mu, logvar, model.decode_logits, eps=eps, reduction="sum").loss
    grads_fused = torch.autograd.grad(loss_fused, list(model.parameters()))
    torch.testing.assert_close(loss_fused, loss_classic, rtol=1e-9, atol=0)
    for a, b in zip(grads_fused, grads_classic):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_gaussian_decoder_with_learned_variance_and_learned_prior(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(backend)
    mu = torch.randn(3, 2, dtype=torch.float64, generator=gen).to(backend).requires_grad_()
    lv = torch.randn(3, 2, dtype=torch.float64, generator=gen).to(backend).requires_grad_()
    weight = torch.randn(2, 5, dtype=torch.float64, generator=gen).to(backend).requires_grad_()
    log_sigma2 = torch.zeros((), dtype=torch.float64, device=backend, requires_grad=True)
    prior_mu = torch.randn(2, dtype=torch.float64, generator=gen).to(backend).requires_grad_()
    prior_lv = torch.randn(3, 2, dtype=torch.float64, generator=gen).to(backend).requires_grad_()
    eps = torch.randn(3, 2, dtype=torch.float64, generator=gen).to(backend)

    def loss(mu, lv, weight, log_sigma2, prior_mu, prior_lv):
        return vae_fast.elbo(x, mu, lv, lambda z: (z @ weight, log_sigma2), likelihood="gaussian", eps=eps,
                             prior_mu=prior_mu, prior_logvar=prior_lv).loss

    assert torch.autograd.gradcheck(loss, (mu, lv, weight, log_sigma2, prior_mu, prior_lv))


def test_custom_likelihood_callable_and_registry(backend):
    x, mu, lv, decode = setup("bernoulli", backend)
    eps = torch.randn_like(mu)
    custom = vae_fast.elbo(x, mu, lv, decode, likelihood=lambda out, x: -((out - x) ** 2).sum(-1), eps=eps)
    z = mu + torch.exp(0.5 * lv) * eps
    expected = (((decode(z) - x) ** 2).sum(-1) + ref.gaussian_kl(mu, lv)).mean()
    torch.testing.assert_close(custom.loss, expected)
    assert {"bernoulli", "continuous_bernoulli", "gaussian", "categorical"} <= set(vae_fast.LIKELIHOODS)


def test_elbo_rejects_bad_arguments():
    x, mu, lv, decode = setup("bernoulli", "cpu")
    with pytest.raises(ValueError, match="beta"):
        vae_fast.elbo(x, mu, lv, decode, beta=-1.0)
    with pytest.raises(ValueError, match="free_bits"):
        vae_fast.elbo(x, mu, lv, decode, free_bits=-0.1)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        vae_fast.elbo(x, mu, lv, decode, likelihood="poisson")
    with pytest.raises(ValueError, match="num_samples"):
        vae_fast.elbo(x, mu, lv, decode, num_samples=0)
    with pytest.raises(ValueError, match="reduction"):
        vae_fast.elbo(x, mu, lv, decode, reduction="avg")
    with pytest.raises(ValueError, match="logits of shape"):
        vae_fast.elbo(x, mu, lv, lambda z: decode(z)[:, :3])
    with pytest.raises(TypeError, match="decode must be callable"):
        vae_fast.elbo(x, mu, lv, None)
    with pytest.raises(ValueError, match="batch size"):
        vae_fast.elbo(x[:2], mu, lv, decode)


def test_elbo_loss_module_and_kl_warmup():
    x, mu, lv, decode = setup("bernoulli", "cpu")
    eps = torch.randn_like(mu)
    module = ELBOLoss(beta=0.5, free_bits=0.1, reduction="sum")
    expected = vae_fast.elbo(x, mu, lv, decode, beta=0.5, free_bits=0.1, reduction="sum", eps=eps).loss
    torch.testing.assert_close(module(x, mu, lv, decode, eps=eps), expected)
    assert "beta=0.5" in repr(module)
    linear = vae_fast.KLWarmup(warmup_steps=10)
    assert [linear(s) for s in (0, 5, 10, 100)] == [0.0, 0.5, 1.0, 1.0]
    cyclical = vae_fast.KLWarmup(mode="cyclical", cycle_steps=8, ratio=0.5, stop=2.0)
    assert [cyclical(s) for s in (0, 2, 4, 7, 8, 10)] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="cycle_steps"):
        vae_fast.KLWarmup(mode="cyclical")
    for kwargs, error in (({"warmup_steps": True}, "warmup_steps must be an int"),
                          ({"warmup_steps": "10"}, "warmup_steps must be an int"),
                          ({"stop": "1"}, "stop must be a float"),
                          ({"stop": float("inf")}, r"need 0 <= start <= stop < inf")):
        with pytest.raises((TypeError, ValueError), match=error):
            vae_fast.KLWarmup(**kwargs)


def test_registered_likelihoods_are_used_by_elbo_and_checked():
    from vae_fast.functional.objectives import LIKELIHOODS

    @vae_fast.register_likelihood("test_half_bernoulli")
    def half_bernoulli(output, x):
        return 0.5 * vae_fast.bernoulli_log_prob(output, x)

    try:
        x, mu, lv, decode = setup("bernoulli", "cpu")
        eps = torch.randn_like(mu)
        custom = vae_fast.elbo(x, mu, lv, decode, likelihood="test_half_bernoulli", eps=eps)
        builtin = vae_fast.elbo(x, mu, lv, decode, eps=eps)
        torch.testing.assert_close(custom.log_likelihood, 0.5 * builtin.log_likelihood)
    finally:
        del LIKELIHOODS["test_half_bernoulli"]
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        vae_fast.register_likelihood(3)
    with pytest.raises(TypeError, match=r"register_likelihood\('x'\) decorates a callable"):
        vae_fast.register_likelihood("x")(3)
    assert "x" not in LIKELIHOODS


def test_compiled_training_step_fullgraph(kernel_backend):
    from vae_fast import _backend

    if kernel_backend == "cpu" and _backend.backend("cpu") == "triton":
        pytest.skip("inductor does not compile for the Triton interpreter")
    torch.manual_seed(0)
    model = ClassicVAE().to(kernel_backend)
    x = torch.bernoulli(torch.rand(8, 784)).to(kernel_backend)

    def step(x):
        mu, logvar = model.encode(x)
        return vae_fast.elbo(x, mu, logvar, model.decode_logits, free_bits=0.01).loss

    compiled = torch.compile(step, fullgraph=True)
    # inductor replaces torch.randint (which draws the kernels' seed) with its own generator;
    # fallback_random keeps torch's, so that compiled and eager draw the same noise
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(1)
        loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    eager = step(x)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-4)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def _load_example(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_smoke_run(tmp_path):
    demo = _load_example("train_mnist")
    history = demo.main(["--epochs", "1", "--subset", "256", "--out", str(tmp_path)])
    assert math.isfinite(history[0]["test_elbo"]) and history[0]["test_elbo"] < 0
    for name in ("elbo_kl.png", "reconstructions.png", "samples.png", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_with_a_fused_output_layer_trains_the_same_model(tmp_path):
    """--fused-head: the decoder's output layer as a FusedHead through elbo(head=...). Same initial weights and
    noise as the plain run, so the first epoch's losses agree up to rounding (the logits never materialised)."""
    demo = _load_example("train_mnist")
    args = ["--epochs", "1", "--subset", "256", "--no-eager", "--iwae-k", "0"]
    plain = demo.main(args + ["--out", str(tmp_path / "plain")])
    fused = demo.main(args + ["--out", str(tmp_path / "head"), "--fused-head"])
    for key in ("train_loss", "test_elbo", "test_kl"):
        assert fused[0][key] == pytest.approx(plain[0][key], rel=1e-4), key


def test_dmol_example_smoke_run():
    # conv VAE with the packed logistic-mixture likelihood on real 8-bit digits: it trains
    history = _load_example("train_dmol").main(["--epochs", "2", "--subset", "512", "--timing-steps", "1",
                                               "--iwae-k", "8"])
    first, last = history[0], history[-1]
    assert all(math.isfinite(row["test_bpd"]) and 0 < row["test_bpd"] < 8 for row in history)
    assert last["train_bpd"] < first["train_bpd"]
    # IWAE-8 is a tighter bound than the ELBO (smaller NLL), up to Monte Carlo noise
    assert last["test_iwae_bpd"] < last["test_bpd"] + 0.01


def test_hierarchical_example_fused_model_equals_its_eager_twin():
    """The example's fused model (gaussian_sample_kl on chunked conv moments with learned top-down
    priors, bernoulli_log_prob) and its eager torch twin give the same loss and gradients for the
    same noise, in float64."""
    example = _load_example("train_hierarchical")
    torch.manual_seed(0)
    model = example.HierarchicalVAE(width=8, latent_channels=2).double()
    for p in model.parameters():  # perturb the zero-initialised heads too: q != p from the start
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.bernoulli(torch.rand(3, 1, 28, 28, dtype=torch.float64))
    eps = [torch.randn(3, 2, r, r, dtype=torch.float64) for r in model.resolutions]
    losses, grads = [], []
    for fused in (True, False):
        loss, kls = example.negative_elbo(model, x, fused, eps)
        assert len(kls) == 3 and all(kl.shape == (3,) for kl in kls)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_hierarchical_example_quick_run(tmp_path):
    history = _load_example("train_hierarchical").main(["--quick", "--out", str(tmp_path)])
    last = history[-1]
    assert all(math.isfinite(row["test_elbo"]) and row["test_elbo"] < 0 for row in history)
    assert last["test_iwae"] >= last["test_elbo"] - 1.0  # IWAE-8 is the tighter bound, up to MC noise
    assert {"kl_1", "kl_2", "kl_3", "active_3", "mi_top", "step_fused_ms", "step_eager_ms"} <= set(last)
    assert last["mi_top"] <= math.log(500) + 1e-6
    for name in ("hierarchy.png", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0
