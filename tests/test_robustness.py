"""Robustness: clear errors for bad input, property tests against the reference, edge shapes,
determinism, thread safety and DDP.

Hypothesis runs a bounded number of examples by default; ``--hypothesis-profile=thorough``
runs many more (see tests/conftest.py). Tolerances follow the policy in conftest.py."""
import math
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vae_fast
from vae_fast import _backend
from vae_fast import reference as ref

from .conftest import assert_matches_reference, backend_cases

KERNEL_BACKENDS = [c for c in backend_cases() if c[0] != "reference"]


# ------------------------------------------------------------------ bad input


def test_latent_argument_errors_name_the_argument():
    mu = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="logvar must have mu's shape"):
        vae_fast.gaussian_sample_kl(mu, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"eps must have shape \(2, 3, 4\)"):
        vae_fast.gaussian_sample_kl(mu, mu, eps=torch.zeros(3, 4), num_samples=2)
    with pytest.raises(ValueError, match="prior_mu of shape"):
        vae_fast.gaussian_sample_kl(mu, mu, prior_mu=torch.zeros(5))
    with pytest.raises(TypeError, match="mu must be a floating-point tensor"):
        vae_fast.gaussian_sample_kl(torch.zeros(3, 4, dtype=torch.int64), mu)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor"):
        vae_fast.gaussian_kl(mu, [[0.0] * 4] * 3)
    with pytest.raises(TypeError, match="logvar has dtype torch.float64 but mu has torch.float32"):
        vae_fast.gaussian_kl(mu, mu.double())
    with pytest.raises(ValueError, match="logvar is on meta but mu is on cpu"):
        vae_fast.gaussian_kl(mu, torch.zeros(3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"param must be one of \['logstd', 'logvar', 'softplus'\]"):
        vae_fast.gaussian_kl(mu, mu, param="log_sigma")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        vae_fast.gaussian_sample_kl(mu, mu, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        vae_fast.gaussian_sample_kl(mu, mu, num_samples=2.0)
    with pytest.raises(ValueError, match="eps is treated as data"):
        vae_fast.gaussian_sample_kl(mu, mu, eps=torch.zeros(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match="mu must have shape"):
        vae_fast.gaussian_kl(torch.tensor(1.0), torch.tensor(1.0))


def test_likelihood_argument_errors_name_the_argument():
    logits = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"logits of shape \(3, 5\) must have x's shape"):
        vae_fast.bernoulli_log_prob(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        vae_fast.bernoulli_log_prob(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="x is treated as data"):  # binned pixels: no gradient w.r.t. x
        vae_fast.dmol_packed_log_prob(torch.zeros(3, 1, 2, 2, requires_grad=True), torch.zeros(3, 6, 2, 2))
    with pytest.raises(ValueError, match="logvar of shape"):
        vae_fast.gaussian_log_prob(logits, torch.zeros(3, 4), torch.zeros(5))
    # None is no scale: an error naming the operand, on the per-step path's inputs too (not a unit scale)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor, got NoneType"):
        vae_fast.gaussian_log_prob(logits, torch.zeros(3, 4), None)
    with pytest.raises(TypeError, match="log_scale must be a torch.Tensor, got NoneType"):
        vae_fast.laplace_log_prob(logits, torch.zeros(3, 4), None)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor, got NoneType"):
        vae_fast.elbo(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(3, 2),
                      lambda z: (torch.zeros(3, 4), None), likelihood="gaussian")
    with pytest.raises(TypeError, match="x must be an integer tensor of class indices"):
        vae_fast.categorical_log_prob(torch.zeros(3, 4, 6), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="x is on meta but logits is on cpu"):
        vae_fast.bernoulli_log_prob(logits, torch.zeros(3, 4, device="meta"))
    with pytest.raises(ValueError, match="x must have a leading batch dim"):
        vae_fast.bernoulli_log_prob(torch.zeros(()), torch.zeros(()))


def test_objective_argument_errors_name_the_argument():
    x, mu, logvar = torch.rand(4, 6).round(), torch.randn(4, 3), torch.randn(4, 3)
    weight = torch.randn(3, 6)
    for beta in (math.inf, -1.0, math.nan):  # (an infinite weight would turn a zero KL into NaN)
        with pytest.raises(ValueError, match="beta must be a finite float >= 0"):
            vae_fast.elbo(x, mu, logvar, lambda z: z @ weight, beta=beta)
    with pytest.raises(ValueError, match="free_bits must be a finite float >= 0"):
        vae_fast.elbo(x, mu, logvar, lambda z: z @ weight, free_bits=math.inf)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        vae_fast.elbo(x, mu, logvar, lambda z: z @ weight, generator=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vae_fast.gaussian_sample_kl(mu, logvar, generator="seed")
    with pytest.raises(ValueError, match=r"decode must return mean or \(mean, logvar\) for likelihood 'gaussian', "
                                         "got a tuple of 3"):
        vae_fast.elbo(x, mu, logvar, lambda z: (z @ weight, z, z), likelihood="gaussian")
    with pytest.raises(ValueError, match=r"\(mean, log_scale\) for likelihood 'laplace', got a list of 1"):
        vae_fast.elbo(x, mu, logvar, lambda z: [z @ weight], likelihood="laplace")
    with pytest.raises(ValueError, match="max_chunk_bytes must be >= 1, got 0"):
        vae_fast.linear_log_prob(mu, weight.t(), None, x, likelihood="bernoulli", max_chunk_bytes=0)
    with pytest.raises(TypeError, match="max_chunk_bytes must be an int"):
        vae_fast.linear_log_prob(mu, weight.t(), None, x, likelihood="bernoulli", max_chunk_bytes=1.5)


def _layout_cases():
    """(op name, function, its tensor arguments, their names): every public op on the shapes a training step sends,
    which take the per-step paths, and on a per-pixel scale and K samples, which take the general paths."""
    gen = torch.Generator().manual_seed(0)
    batch = 4
    theta, grey, binary = torch.randn(batch, 6, generator=gen), torch.rand(batch, 6, generator=gen), \
        torch.rand(batch, 6, generator=gen).round()
    weight, bias = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
    h = torch.randn(batch, 5, generator=gen)
    image = torch.rand(batch, 3, 2, 2, generator=gen) * 2 - 1
    mixture = [torch.randn(batch, *shape, 2, 2, generator=gen) for shape in ((2,), (3, 2), (3, 2), (3, 2))]
    decoder = torch.randn(6, 6, generator=gen)
    return [
        ("bernoulli", vae_fast.bernoulli_log_prob, (theta, binary), ("logits", "x")),
        ("bernoulli K samples", vae_fast.bernoulli_log_prob, (theta.expand(2, batch, 6), binary), ("logits", "x")),
        ("continuous bernoulli", vae_fast.continuous_bernoulli_log_prob, (theta, grey), ("logits", "x")),
        ("mse", vae_fast.mse_log_prob, (theta, grey), ("mean", "x")),
        ("gaussian scalar", vae_fast.gaussian_log_prob, (theta, grey, torch.tensor(0.3)), ("mean", "x", "logvar")),
        ("gaussian per pixel", vae_fast.gaussian_log_prob, (theta, grey, torch.zeros(6)), ("mean", "x", "logvar")),
        ("laplace scalar", vae_fast.laplace_log_prob, (theta, grey, torch.tensor(0.3)), ("mean", "x", "log_scale")),
        ("categorical", vae_fast.categorical_log_prob, (theta.view(batch, 3, 2), binary[:, :3].long()),
         ("logits", "x")),
        ("packed mixture", vae_fast.dmol_packed_log_prob, (image, torch.randn(batch, 20, 2, 2, generator=gen)),
         ("x", "params")),
        ("mixture", vae_fast.discretized_logistic_mixture_log_prob, (image, *mixture),
         ("x", "logit_probs", "means", "log_scales", "coeffs")),
        ("latent", vae_fast.gaussian_sample_kl, (theta, grey), ("mu", "logvar")),
        ("kl", vae_fast.gaussian_kl, (theta, grey), ("mu", "logvar")),
        ("elbo", lambda x, mu, lv: vae_fast.elbo(x, mu, lv, lambda z: z @ decoder), (binary, theta, grey),
         ("x", "mu", "logvar")),
        ("head", lambda *args: vae_fast.linear_log_prob(*args, likelihood="bernoulli"), (h, weight, bias, binary),
         ("h", "weight", "bias", "x")),
        ("head categorical", lambda *args: vae_fast.linear_log_prob(*args, likelihood="categorical"),
         (h, weight, bias, binary[:, 0].long()), ("h", "weight", "bias", "x")),
    ]


def _non_strided(t: torch.Tensor, layout: str) -> torch.Tensor | None:
    if layout == "sparse_coo":
        return t.to_sparse()
    if layout == "sparse_csr":
        return t.to_sparse_csr() if t.dim() == 2 else None
    if layout == "nested":  # (layout torch.strided, but no shape)
        return torch.nested.nested_tensor([t[0], t[0]]) if t.dim() > 0 else None
    return t.to_mkldnn() if t.dtype == torch.float32 and t.dim() > 0 else None


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn", "nested"])
def test_non_strided_tensors_are_rejected_by_name(layout):
    # (they are torch.Tensor too: the per-step paths' one-expression checks test the layout and catch the nested
    # tensor's shape error, or the kernels would be handed tensors without strides or storage)
    tried = 0
    for op, fn, args, names in _layout_cases():
        for index, name in enumerate(names):
            bad = _non_strided(args[index], layout)
            if bad is None:
                continue
            tried += 1
            learned = 1 if names[0] == "x" else 0  # the first parameter (x is data)
            for requires_grad in (False, True):
                call_args = [a.detach().requires_grad_(requires_grad and i == learned and a.is_floating_point())
                             if i != index else bad for i, a in enumerate(args)]
                with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor"):
                    fn(*call_args)
    assert tried >= 20, (layout, tried)


@pytest.mark.parametrize("kind", ["None", "list", "numpy array", "str"])
def test_non_tensor_arguments_are_rejected_by_name(kind):
    optional = {"coeffs", "bias"}  # (None is their default; a 0-d scale's tolist() is a float, which is allowed)
    for op, fn, args, names in _layout_cases():
        for index, name in enumerate(names):
            if (kind == "None" and name in optional) or (kind == "list" and args[index].dim() == 0):
                continue
            bad = {"None": None, "list": args[index].tolist(), "numpy array": args[index].numpy(), "str": "x"}[kind]
            call_args = [bad if i == index else a for i, a in enumerate(args)]
            with pytest.raises(TypeError, match=f"{name} must be"):
                fn(*call_args)


def test_nan_and_inf_propagate_like_torch():
    mu = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [0.0, 0.0]])
    lv = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float("inf"), 0.0]])
    kl = vae_fast.gaussian_kl(mu, lv)
    eager = -0.5 * (1 + lv - mu.pow(2) - lv.exp()).sum(-1)  # nan, inf, nan (inf - inf)
    torch.testing.assert_close(kl, eager, equal_nan=True)
    logits = torch.tensor([[float("nan"), 0.0]])
    out = vae_fast.bernoulli_log_prob(logits, torch.tensor([[1.0, 0.0]]))
    assert math.isnan(out.item())


# ------------------------------------------------------------------ property tests vs the reference

dims = st.integers(min_value=0, max_value=37)
finite = dict(allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
@settings(deadline=None)
@given(batch=st.integers(0, 9), dim=dims, samples=st.integers(1, 3), param=st.sampled_from(["logvar", "logstd", "softplus"]),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_latent_against_reference(case, batch, dim, samples, param, transposed, seed):
    name, device = case
    gen = torch.Generator().manual_seed(seed)
    shape = (dim, batch) if transposed else (batch, dim)
    mu = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10)
    lv = (torch.rand(shape, generator=gen, dtype=torch.float64) * 60 - 30)
    if transposed:  # non-contiguous views
        mu, lv = mu.t(), lv.t()
    eps = torch.randn(samples, batch, dim, generator=gen, dtype=torch.float64)
    with vae_fast.use_backend(name):
        z, kl = vae_fast.gaussian_sample_kl(mu.to(device), lv.to(device), param=param, eps=eps.to(device), num_samples=samples)
    z_ref = ref.reparameterize(mu, lv, eps, param)
    # z = mu + sigma * eps may cancel: its error is relative to the larger of the two terms
    magnitude = max(1.0, mu.abs().max().item() if mu.numel() else 0.0,
                    (ref.std_from_scale(lv, param) * eps).abs().max().item() if eps.numel() else 0.0)
    assert_matches_reference(z if samples > 1 else z.unsqueeze(0), z_ref, torch.float64, terms=magnitude)
    assert_matches_reference(kl, ref.gaussian_kl(mu, lv, param=param), torch.float64, terms=max(dim, 1) * 1e6)


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
@settings(deadline=None)
@given(batch=st.integers(0, 6), dim=dims, samples=st.sampled_from([None, 2]),
       likelihood=st.sampled_from(["bernoulli", "continuous_bernoulli", "gaussian"]),
       scale=st.sampled_from([1e-6, 1.0, 30.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_elementwise_likelihoods_against_reference(case, batch, dim, samples, likelihood, scale, seed):
    name, device = case
    gen = torch.Generator().manual_seed(seed)
    lead = (samples, batch) if samples else (batch,)
    theta = torch.randn(*lead, dim, generator=gen, dtype=torch.float64) * scale
    x = torch.rand(batch, dim, generator=gen, dtype=torch.float64)
    fused = {"bernoulli": vae_fast.bernoulli_log_prob, "continuous_bernoulli": vae_fast.continuous_bernoulli_log_prob,
             "gaussian": vae_fast.gaussian_log_prob}[likelihood]
    oracle = {"bernoulli": ref.bernoulli_log_prob, "continuous_bernoulli": ref.continuous_bernoulli_log_prob,
              "gaussian": ref.gaussian_log_prob}[likelihood]
    with vae_fast.use_backend(name):
        got = fused(theta.to(device), x.to(device))
    expected = oracle(theta, x, batch_dims=len(lead))
    # relative to the size of the summed terms: e.g. a Gaussian with mean 1e4 sums terms ~1e8
    magnitude = max(1.0, float(scale) ** 2 if likelihood == "gaussian" else float(scale))
    assert_matches_reference(got, expected, torch.float64, terms=max(dim, 1) * magnitude)


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
@settings(deadline=None)
@given(batch=st.integers(0, 5), pixels=st.integers(0, 9), classes=st.integers(1, 40), samples=st.sampled_from([None, 2]),
       scale=st.sampled_from([1e-3, 1.0, 50.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_categorical_against_reference(case, batch, pixels, classes, samples, scale, seed):
    name, device = case
    gen = torch.Generator().manual_seed(seed)
    lead = (samples, batch) if samples else (batch,)
    logits = torch.randn(*lead, pixels, classes, generator=gen, dtype=torch.float64) * scale
    x = torch.randint(0, classes, (batch, pixels), generator=gen)
    with vae_fast.use_backend(name):
        got = vae_fast.categorical_log_prob(logits.to(device), x.to(device))
    expected = ref.categorical_log_prob(logits, x, batch_dims=len(lead))
    assert_matches_reference(got, expected, torch.float64, terms=max(pixels, 1) * max(1.0, scale))


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
@settings(deadline=None)
@given(batch=st.integers(0, 3), channels=st.sampled_from([1, 2, 3]), coupled=st.booleans(), mixtures=st.integers(1, 5),
       pixels=st.integers(1, 19), samples=st.sampled_from([None, 2]), log_scale_shift=st.sampled_from([-8.0, -3.0, 0.0, 6.0]),
       num_bits=st.sampled_from([1, 5, 8, 12]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_discretized_logistic_mixture_against_reference(case, batch, channels, coupled, mixtures, pixels, samples,
                                                             log_scale_shift, num_bits, seed):
    name, device = case
    gen = torch.Generator().manual_seed(seed)
    lead = (samples, batch) if samples else (batch,)
    levels = 2**num_bits - 1
    x = torch.randint(0, levels + 1, (batch, channels, 1, pixels), generator=gen).double() * (2 / levels) - 1
    logits = torch.randn(*lead, mixtures, 1, pixels, generator=gen, dtype=torch.float64) * 3
    means = torch.randn(*lead, channels, mixtures, 1, pixels, generator=gen, dtype=torch.float64)
    log_scales = torch.randn(*lead, channels, mixtures, 1, pixels, generator=gen, dtype=torch.float64) * 2 + log_scale_shift
    coeffs = torch.tanh(torch.randn_like(means)) if coupled and channels == 3 else None
    with vae_fast.use_backend(name):
        got = vae_fast.discretized_logistic_mixture_log_prob(
            x.to(device), logits.to(device), means.to(device), log_scales.to(device),
            None if coeffs is None else coeffs.to(device), num_bits=num_bits)
    flat = [None if t is None else t.reshape(-1, *t.shape[len(lead):]) for t in (logits, means, log_scales, coeffs)]
    expected = ref.discretized_logistic_mixture_log_prob(
        x.repeat(len(flat[0]) // max(batch, 1) if batch else 1, 1, 1, 1), *flat, num_bits=num_bits).reshape(lead)
    # far-tail log masses reach -(x - mean) / s ~ e^8: compare relative to that size
    magnitude = max(1.0, math.exp(-min(log_scale_shift - 4, 0.0)) if log_scale_shift > -7 else math.exp(7))
    assert_matches_reference(got, expected, torch.float64, terms=channels * pixels * magnitude)


# ------------------------------------------------------------------ edge shapes and big offsets


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_zero_stride_views(case):
    # expanded (stride-0) inputs are read correctly; torch has no negative strides to reject
    name, device = case
    row = torch.randn(1, 9, dtype=torch.float64)
    logits, x = row.expand(5, 9), torch.rand(1, 9, dtype=torch.float64).expand(5, 9)
    mu, lv = torch.randn(1, 4, dtype=torch.float64).expand(3, 4), torch.zeros(3, 1, dtype=torch.float64).expand(3, 4)
    with vae_fast.use_backend(name):
        got = vae_fast.bernoulli_log_prob(logits.to(device), x.to(device))
        kl = vae_fast.gaussian_kl(mu.to(device), lv.to(device))
    assert_matches_reference(got, ref.bernoulli_log_prob(logits, x), torch.float64, terms=9)
    assert_matches_reference(kl, ref.gaussian_kl(mu, lv), torch.float64, terms=4)


def test_very_long_rows():
    # one row of 3 million pixels and a latent row of 100k dims (several tiles / column chunks)
    logits = torch.randn(1, 3_000_000, dtype=torch.float64)
    x = torch.rand(1, 3_000_000, dtype=torch.float64)
    assert_matches_reference(vae_fast.continuous_bernoulli_log_prob(logits, x),
                             ref.continuous_bernoulli_log_prob(logits, x), torch.float64, terms=3e6)
    mu = torch.randn(2, 100_000, dtype=torch.float64)
    lv = torch.randn(2, 100_000, dtype=torch.float64)
    assert_matches_reference(vae_fast.gaussian_kl(mu, lv), ref.gaussian_kl(mu, lv), torch.float64, terms=1e5)


@pytest.mark.parametrize("case", KERNEL_BACKENDS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_empty_and_single_element_batches(case):
    name, device = case
    with vae_fast.use_backend(name):
        for shape in [(0, 784), (1, 784), (3, 1)]:
            logits = torch.randn(shape, device=device, requires_grad=True)
            out = vae_fast.bernoulli_log_prob(logits, torch.rand(shape, device=device))
            assert out.shape == shape[:1]
            out.sum().backward()
            assert logits.grad.shape == shape
        out = vae_fast.categorical_log_prob(torch.randn(0, 5, 7, device=device), torch.zeros(0, 5, dtype=torch.long, device=device))
        assert out.shape == (0,)
        # rows with no pixels: a zero-size logvar view may have no storage (found by the fuzzer)
        for _ in range(20):
            out = vae_fast.gaussian_log_prob(torch.randn(2, 3, 0, device=device), torch.rand(3, 0, device=device))
            assert out.shape == (2, 3) and torch.all(out == 0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VAE_FAST_BIG_TESTS") != "1",
                    reason="needs ~20 GiB of memory: set VAE_FAST_BIG_TESTS=1 to run")
def test_more_than_two_to_the_31_elements():
    rows, dim = 2**21 + 3, 1024  # 2^31 + 3072 elements, offsets past int32
    logits = torch.zeros(rows, dim)
    logits[-1, -1] = 5.0
    x = torch.ones(1, dim).expand(rows, dim)
    out = vae_fast.bernoulli_log_prob(logits, x)
    expected_last = -(dim - 1) * math.log(2) - math.log1p(math.exp(-5.0))
    assert out[-1].item() == pytest.approx(expected_last, rel=1e-5)
    assert out[0].item() == pytest.approx(-dim * math.log(2), rel=1e-5)


# ------------------------------------------------------------------ determinism and concurrency


def test_deterministic_algorithms_mode():
    torch.use_deterministic_algorithms(True)
    try:
        mu = torch.randn(16, 8, requires_grad=True)
        z, kl = vae_fast.gaussian_sample_kl(mu, torch.zeros(16, 8), generator=torch.Generator().manual_seed(0))
        (z.sum() + kl.sum()).backward()
        out = vae_fast.bernoulli_log_prob(torch.randn(4, 9), torch.rand(4, 9))
        assert torch.isfinite(out).all()
    finally:
        torch.use_deterministic_algorithms(False)


def test_concurrent_calls_from_python_threads_are_correct():
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(257, 300, generator=gen, dtype=torch.float64), torch.rand(257, 300, generator=gen, dtype=torch.float64))
              for _ in range(8)]
    expected = [ref.continuous_bernoulli_log_prob(t, x) for t, x in inputs]
    results = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = vae_fast.continuous_bernoulli_log_prob(*inputs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        assert_matches_reference(got, want, torch.float64, terms=300)


# ------------------------------------------------------------------ DistributedDataParallel


class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(12, 6)
        self.dec = torch.nn.Linear(3, 12)

    def forward(self, x, eps=None, generator=None):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        out = vae_fast.elbo(x, mu, logvar, self.dec, eps=eps, generator=generator)
        return out.loss, out.z


def _ddp_worker(rank, world, state, x, eps, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # a file rendezvous: no TCP port to race for; gloo then talks over loopback
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = TinyVAE().double()
        model.load_state_dict(state)
        ddp = DistributedDataParallel(model)
        shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        loss, _ = ddp(x[shard], eps[shard])
        loss.backward()  # DDP averages the per-rank mean-loss gradients = the full-batch mean's
        torch.manual_seed(1000 + rank)  # per-rank seeds: each rank must draw different noise
        zeros = torch.zeros(4, 3, dtype=torch.float64)
        z, _ = vae_fast.gaussian_sample_kl(zeros, zeros)  # z = eps
        gathered = [torch.zeros_like(z) for _ in range(world)]
        dist.all_gather(gathered, z)
        if rank == 0:
            torch.save({"grads": [p.grad for p in model.parameters()], "z": gathered}, os.path.join(out_dir, "ddp.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown on success: gloo's background threads have been seen to abort
    # ("terminate called without an active exception") in static destructors at exit, after
    # all work was done. Failures above still raise and fail the spawn.
    os._exit(0)


def test_ddp_gradients_equal_single_process_full_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = TinyVAE().double()
    x = torch.rand(8, 12, dtype=torch.float64).bernoulli()
    eps = torch.randn(8, 3, dtype=torch.float64)
    loss, _ = model(x, eps)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ddp_worker, args=(2, state, x, eps, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt")
    for got, want in zip(result["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    z0, z1 = result["z"]
    assert not torch.allclose(z0, z1)


# ------------------------------------------------------------------ the C++ entry points check what they are given


def test_cpp_entry_points_reject_bad_sizes_and_short_buffers():
    C = _backend._cpu_ext
    if C is None:
        pytest.skip("needs the C++ extension")
    theta, x, out, grad = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4), torch.zeros(4, 8)
    ok = (0, 0, 4, 4, 8, theta.data_ptr(), x.data_ptr(), 0, 0, 0, out.data_ptr(), grad.data_ptr(), 0, False, 1.0, 1)
    assert C.elementwise_likelihood(*ok, [32, 32, 0, 4, 32, 0]) == 0
    with pytest.raises(ValueError, match="theta holds 31 elements but the kernel would touch 32"):
        C.elementwise_likelihood(*ok, [31, 32, 0, 4, 32, 0])
    with pytest.raises(ValueError, match="grad_theta holds 8 elements"):
        C.elementwise_likelihood(*ok, [32, 32, 0, 4, 8, 0])
    with pytest.raises(ValueError, match="expected 6 buffer extents"):
        C.elementwise_likelihood(*ok, [32, 32])
    with pytest.raises(ValueError, match="rows must be a multiple of x_rows"):
        C.elementwise_likelihood(0, 0, 4, 3, 8, *ok[5:], [32, 32, 0, 4, 32, 0])
    with pytest.raises(ValueError, match="dtype code"):
        C.elementwise_likelihood(7, *ok[1:], [32, 32, 0, 4, 32, 0])
    with pytest.raises(ValueError, match="sizes must be non-negative"):
        C.elementwise_likelihood(0, 0, -4, 4, 8, *ok[5:], [32, 32, 0, 4, 32, 0])
    for bad_scale in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="expected_upstream must be finite and non-zero"):
            C.elementwise_likelihood(*ok[:14], bad_scale, 1, [32, 32, 0, 4, 32, 0])
    # the step entry: a fixed Gaussian / Laplace scale given as a number has no gradient, and is read in the
    # kernel's dtype exactly as a 0-d tensor of it would be
    mean, data = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    for dtype, code in ((torch.float32, 0), (torch.float64, 1)):
        m, d = mean.to(dtype), data.to(dtype)
        for likelihood in (2, 4):
            by_number, by_tensor = torch.empty(4, dtype=dtype), torch.empty(4, dtype=dtype)
            scale = torch.tensor(0.1, dtype=dtype)
            step = (code, likelihood, 4, 8, m.data_ptr(), 32, d.data_ptr(), 32)
            C.elementwise_step(*step, 0, 0.1, by_number.data_ptr(), 0, 0, 1.0, 1)
            C.elementwise_step(*step, scale.data_ptr(), 123.0, by_tensor.data_ptr(), 0, 0, 1.0, 1)
            torch.testing.assert_close(by_number, by_tensor, rtol=0, atol=0)
            with pytest.raises(ValueError, match="a fixed scale has no gradient"):
                C.elementwise_step(*step, 0, 0.1, by_number.data_ptr(), 0, out.data_ptr(), 1.0, 1)
    mu, z, kl = torch.zeros(2, 3), torch.zeros(1, 2, 3), torch.zeros(2)
    ratio = torch.zeros(1, 2)
    # (dtype, param, batch, dim, samples, mu, mu row stride, scale, scale row stride, ...)
    args = (0, 0, 2, 3, 1, mu.data_ptr(), 3, mu.data_ptr(), 3, 0, 0, 0, 0, 0, 0, 0, 5, 0, z.data_ptr(),
            kl.data_ptr(), 0, ratio.data_ptr(), 1)
    C.latent_forward(*args, [6, 6, 0, 0, 0, 6, 2, 0, 2])
    # a row stride reaches further: (2 - 1) * 4 + 3 = 7 elements of mu
    with pytest.raises(ValueError, match="mu holds 6 elements but the kernel would touch 7"):
        C.latent_forward(*args[:6], 4, *args[7:], [6, 6, 0, 0, 0, 6, 2, 0, 2])
    with pytest.raises(ValueError, match="row strides must be non-negative"):
        C.latent_forward(*args[:8], -3, *args[9:], [6, 6, 0, 0, 0, 6, 2, 0, 2])
    with pytest.raises(ValueError, match="z holds 5 elements"):
        C.latent_forward(*args, [6, 6, 0, 0, 0, 5, 2, 0, 2])
    with pytest.raises(ValueError, match="log_ratio holds 1 elements"):
        C.latent_forward(*args, [6, 6, 0, 0, 0, 6, 2, 0, 1])
    with pytest.raises(ValueError, match="param code"):
        C.latent_forward(0, 9, *args[2:], [6, 6, 0, 0, 0, 6, 2, 0, 2])
    logits, target = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64)
    cat = (0, 2, 2, 3, 5, logits.data_ptr(), target.data_ptr(), 0, kl.data_ptr(), 0, 1.0, 1)
    C.categorical(*cat, [30, 6, 2, 0])
    with pytest.raises(ValueError, match="target holds 5 elements"):
        C.categorical(*cat, [30, 5, 2, 0])
    with pytest.raises(ValueError, match="target_code must be 0"):
        C.categorical(*cat[:7], 2, *cat[8:], [30, 6, 2, 0])
    # discretised logistic mixture: operands are (pointer, row, channel, mixture strides)
    xs, lp, dm = torch.zeros(2, 3, 4), torch.zeros(2, 2, 4), torch.zeros(2, 3, 2, 4)
    view = (dm.data_ptr(), 24, 8, 4)
    none = (0, 0, 0, 0)
    dmol = (0, 2, 2, 3, 2, 4, xs.data_ptr(), (lp.data_ptr(), 8, 0, 4), view, view, none, False, 1 / 255, -7.0,
            kl.data_ptr(), none, none, none, none, 1.0, 1)
    C.dmol(*dmol, [24, 16, 48, 48, 0, 2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="means holds 47 elements but the kernel would touch 48"):
        C.dmol(*dmol, [24, 16, 47, 48, 0, 2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="coeffs need exactly 3 channels"):
        C.dmol(0, 2, 2, 2, 2, 4, *dmol[6:10], view, *dmol[11:], [16, 16, 48, 48, 48, 2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="gradient outputs must be all given or all absent"):
        C.dmol(*dmol[:15], none, view, none, none, 1.0, 1, [24, 16, 48, 48, 0, 2, 0, 48, 0, 0])
    with pytest.raises(ValueError, match="half_bin"):
        C.dmol(*dmol[:12], 0.0, *dmol[13:], [24, 16, 48, 48, 0, 2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="strides must be non-negative"):
        C.dmol(*dmol[:8], (dm.data_ptr(), -24, 8, 4), *dmol[9:], [24, 16, 48, 48, 0, 2, 0, 0, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_values_within_matches_torch(dtype):
    # the host check of the likelihoods' upstream gradient (kernels/cpu.py values_within)
    from vae_fast.kernels import cpu as cpu_kernels

    if _backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 128, 1000):
        values = -1 / 128 + 1e-9 * torch.randn(n, generator=gen, dtype=torch.float64)
        values = values.to(dtype)
        for low, high in ((-1 / 128 - 1e-8, -1 / 128 + 1e-8), (-1 / 128 - 1e-12, -1 / 128 + 1e-12), (0.0, 1.0)):
            expected = bool(((values >= low) & (values <= high)).all())
            assert cpu_kernels.values_within(values, low, high) is expected
    base = torch.full((12,), 0.5, dtype=dtype)
    base[5] = 2.0
    assert cpu_kernels.values_within(base[::2], 0.0, 1.0) is True  # stride 2 skips index 5
    assert cpu_kernels.values_within(base[1::2], 0.0, 1.0) is False
    assert cpu_kernels.values_within(base[:1].expand(50), 0.0, 1.0) is True  # stride 0
    assert cpu_kernels.values_within(base.view(3, 4), 0.0, 1.0) is False  # contiguous 2-D
    assert cpu_kernels.values_within(base.view(3, 4).t(), 0.0, 1.0) is None  # not read here
    assert cpu_kernels.values_within(torch.full((3,), math.nan, dtype=dtype), -1.0, 1.0) is False
    assert cpu_kernels.values_within(base.half(), 0.0, 1.0) is None
    code = 0 if dtype == torch.float32 else 1
    with pytest.raises(ValueError, match="values hold 11 elements but the check would read 12"):
        _backend._cpu_ext.values_within(code, base.data_ptr(), 12, 1, 0.0, 1.0, 11)
    with pytest.raises(ValueError, match="dtype code"):
        _backend._cpu_ext.values_within(5, base.data_ptr(), 12, 1, 0.0, 1.0, 12)
