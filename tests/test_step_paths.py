"""The per-step paths (ops/latent.py ``latent_step``, ops/likelihood.py ``elementwise_step``, kernels/cpu.py
``*_step*``): the plain eager calls a training step makes every iteration skip the general entry points'
layers. They must give exactly what the general paths give, keep every contract (they share the one
backward), and leave every call that does not qualify to the general paths."""
from __future__ import annotations

import contextlib
import threading
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vae_fast
import vae_fast.functional.latent as functional_latent
import vae_fast.ops.dmol as dmol_ops
import vae_fast.ops.likelihood as likelihood_ops
from vae_fast import _backend

from .conftest import OpRecorder

pytestmark = pytest.mark.skipif(_backend._cpu_ext is None, reason="the step entry points are the C++ backend's")


_KERNEL_ENTRY_POINTS = {"latent_forward", "latent_backward", "elementwise_likelihood", "latent_step_forward",
                        "latent_step_backward", "elementwise_step", "categorical", "categorical_step", "dmol",
                        "dmol_packed_step"}


class _Recorder:
    """Stands in for vae_fast._C in the CPU backend, recording the names (``calls``) and arguments
    (``arguments``) of the entry points in ``names`` called: by default the kernels' (not the helpers: the
    upstream-gradient check, the buffer pool)."""

    def __init__(self, real, names=_KERNEL_ENTRY_POINTS):
        self.real, self.names, self.calls, self.arguments = real, names, [], []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name not in self.names:
            return fn

        def record(*args):
            self.calls.append(name)
            self.arguments.append(args)
            return fn(*args)

        return record


@pytest.fixture
def recorder(monkeypatch):
    from vae_fast.kernels import cpu

    recording = _Recorder(cpu._C)
    monkeypatch.setattr(cpu, "_C", recording)
    with vae_fast.use_backend("cpu"):
        yield recording


@pytest.fixture
def general_paths():
    """``use()``: from then on until the test ends, every call takes the general path (see :func:`_general_paths_only`)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(_general_paths_only())


def _mlp_step(mu, logvar, logits_weight, x, **elbo_kwargs):
    out = vae_fast.elbo(x, mu, logvar, lambda z: z @ logits_weight, **elbo_kwargs)
    grads = torch.autograd.grad(out.loss, (mu, logvar, logits_weight))
    return out, grads


def test_plain_eager_training_calls_take_the_step_entry_points(recorder):
    mu, logvar = torch.randn(16, 6, requires_grad=True), torch.randn(16, 6, requires_grad=True)
    weight = torch.randn(6, 10, requires_grad=True)
    x = torch.rand(16, 10).round()
    _mlp_step(mu, logvar, weight, x)
    assert recorder.calls == ["latent_step_forward", "elementwise_step", "latent_step_backward"]
    recorder.calls.clear()
    z, kl = vae_fast.gaussian_sample_kl(mu, logvar, num_samples=3)
    (z.sum() + kl.sum()).backward()
    samples = z.detach().requires_grad_()
    vae_fast.mse_log_prob(samples[0], x[:, :6].contiguous()).sum().backward()
    vae_fast.continuous_bernoulli_log_prob(samples[1], x[:, :6].contiguous()).sum().backward()
    images = torch.randn(4, 1, 5, 5, requires_grad=True)  # a conv decoder's (B, C, H, W) logits
    vae_fast.bernoulli_log_prob(images, torch.rand(4, 1, 5, 5).round()).mean().backward()
    # a scalar log-variance / log-scale: a float, a 0-d tensor that gets no gradient, a learned one (the LDM
    # autoencoder's: the kernel writes its per-row gradients)
    vae_fast.gaussian_log_prob(images, torch.rand(4, 1, 5, 5)).mean().backward()
    vae_fast.laplace_log_prob(images, torch.rand(4, 1, 5, 5), torch.tensor(-0.5)).mean().backward()
    learned = torch.zeros((), requires_grad=True)
    vae_fast.gaussian_log_prob(images, torch.rand(4, 1, 5, 5), learned).mean().backward()
    vae_fast.laplace_log_prob(images, torch.rand(4, 1, 5, 5), learned).mean().backward()
    parameter = torch.nn.Parameter(torch.zeros(()))  # as LDM's autoencoder holds it (self.logvar)
    mu4, logvar4 = mu[:4].detach().requires_grad_(), logvar[:4].detach().requires_grad_()
    vae_fast.elbo(images.detach(), mu4, logvar4, lambda z: (images * z.mean(), parameter),
                  likelihood="laplace").loss.backward()
    assert parameter.grad is not None
    assert recorder.calls == (["latent_step_forward", "latent_step_backward"] + ["elementwise_step"] * 7
                              + ["latent_step_forward", "elementwise_step", "latent_step_backward"])
    recorder.calls.clear()
    # a per-pixel or per-example log-variance: the general path
    vae_fast.gaussian_log_prob(images, torch.rand(4, 1, 5, 5), torch.zeros(1, 5, 5)).mean().backward()
    vae_fast.laplace_log_prob(images, torch.rand(4, 1, 5, 5), torch.zeros(4, 1, 1, 1)).mean().backward()
    assert recorder.calls == ["elementwise_likelihood"] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("param", ["logvar", "logstd", "softplus"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_step_paths_give_exactly_the_general_paths_results(general_paths, dtype, param, num_samples):
    def run():
        torch.manual_seed(0)
        moments = torch.randn(32, 2 * 7, dtype=dtype, requires_grad=True)
        mu, logvar = moments.chunk(2, dim=-1)  # unit column stride, row stride 14: read in place
        weight = torch.randn(7, 12, dtype=dtype, requires_grad=True)
        learned = torch.tensor(0.1, dtype=dtype, requires_grad=True)  # a learned scalar log-variance / log-scale
        x = torch.rand(32, 12, dtype=dtype).round()
        torch.manual_seed(1)
        out = vae_fast.elbo(x, mu, logvar, lambda z: z @ weight, param=param, num_samples=num_samples)
        z, kl = vae_fast.gaussian_sample_kl(mu, logvar, param=param, num_samples=num_samples)
        logits = (z if num_samples == 1 else z[-1]) @ weight
        images = logits.view(32, 3, 2, 2)  # (B, C, H, W) as a conv decoder gives them
        loss = (out.loss + (z * z).mean() + kl.mean() - vae_fast.bernoulli_log_prob(logits, x).mean()
                - vae_fast.continuous_bernoulli_log_prob(images, x.view(32, 3, 2, 2)).sum()
                + vae_fast.mse_log_prob(images, x.view(32, 3, 2, 2), reduction="mean")
                - vae_fast.gaussian_log_prob(images, x.view(32, 3, 2, 2), 0.3).mean()
                - vae_fast.laplace_log_prob(logits, x, torch.tensor(-0.2, dtype=dtype), reduction="sum")
                - vae_fast.gaussian_log_prob(images, x.view(32, 3, 2, 2), learned).mean()
                - vae_fast.laplace_log_prob(logits, x, 2 * learned).mean()
                - vae_fast.elbo(x, mu, logvar, lambda z: (z @ weight, learned), likelihood="laplace").elbo.sum())
        return (*out, z, kl, *torch.autograd.grad(loss, (moments, weight, learned)))

    step = run()
    general_paths()
    general = run()
    for got, want in zip(step, general):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_calls_that_do_not_qualify_take_the_general_paths(recorder):
    x = torch.rand(8, 5).round()
    # a half dtype, a transposed (column-strided) latent, explicit noise, an own generator, outputs above the
    # buffer pool's size: the general entry points
    half = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    vae_fast.gaussian_sample_kl(half, half.detach())
    vae_fast.bernoulli_log_prob(half, x.bfloat16())
    wide = torch.randn(5, 8, requires_grad=True).t()
    vae_fast.gaussian_sample_kl(wide, wide.detach())
    vae_fast.gaussian_sample_kl(wide.detach(), wide.detach(), eps=torch.randn(8, 5))
    vae_fast.gaussian_sample_kl(wide.detach(), wide.detach(), generator=torch.Generator().manual_seed(0))
    big = torch.zeros(1024, 1024)
    vae_fast.gaussian_sample_kl(big, big)
    vae_fast.bernoulli_log_prob(big, big)
    assert "latent_step_forward" not in recorder.calls and "elementwise_step" not in recorder.calls
    assert recorder.calls.count("latent_forward") == 5 and recorder.calls.count("elementwise_likelihood") == 2
    recorder.calls.clear()
    with vae_fast.use_backend("reference"):  # another backend serves the CPU tensors
        vae_fast.gaussian_sample_kl(big[:4], big[:4])
        vae_fast.bernoulli_log_prob(big[:4], big[:4])
    assert recorder.calls == []


def test_step_nodes_keep_the_op_contracts():
    F64 = torch.float64
    mu = torch.randn(3, 4, dtype=F64, requires_grad=True)
    logvar = (0.3 * torch.randn(3, 4, dtype=F64)).requires_grad_()

    def reseeded(m, lv):  # the default generator, reseeded so that every call draws the same noise
        torch.manual_seed(5)
        z, kl = vae_fast.gaussian_sample_kl(m, lv)
        return z * z, kl

    assert torch.autograd.gradcheck(reseeded, (mu, logvar))
    assert torch.autograd.gradgradcheck(reseeded, (mu, logvar))  # create_graph through LatentStep nodes
    theta, x = torch.randn(3, 5, dtype=F64, requires_grad=True), torch.rand(3, 5, dtype=F64).round()
    assert torch.autograd.gradcheck(lambda t: vae_fast.bernoulli_log_prob(t, x), (theta,))
    assert torch.autograd.gradgradcheck(lambda t: vae_fast.bernoulli_log_prob(t, x), (theta,))
    data = torch.rand(3, 5, dtype=F64, requires_grad=True)  # the Gaussian's gradient reaches x too
    assert torch.autograd.gradcheck(lambda t, d: vae_fast.gaussian_log_prob(t, d, 0.4), (theta, data))
    for log_prob in (vae_fast.gaussian_log_prob, vae_fast.laplace_log_prob):  # a fixed scale given as a float
        assert torch.autograd.gradgradcheck(lambda t, d: log_prob(t, d, 0.4), (theta, data))
    assert torch.autograd.gradgradcheck(lambda t, d: vae_fast.gaussian_log_prob(t, d), (theta, data))
    learned = torch.tensor(0.3, dtype=F64, requires_grad=True)  # a learned scalar: its per-row gradients, summed
    for log_prob in (vae_fast.gaussian_log_prob, vae_fast.laplace_log_prob):
        assert torch.autograd.gradcheck(lambda t, d, s: log_prob(t, d, s), (theta, data, learned))
        assert torch.autograd.gradgradcheck(lambda t, d, s: log_prob(t, d, s), (theta, data, learned))
    # several backward passes, and a backward pass under a dispatch mode (which the step kernels leave to the
    # general backward, through torch.ops.vae_fast) all give the same gradients
    z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
    loss = (z * z).sum() + kl.sum()
    first = torch.autograd.grad(loss, (mu, logvar), retain_graph=True)
    second = torch.autograd.grad(loss, (mu, logvar), retain_graph=True)
    with OpRecorder() as mode:
        in_mode = torch.autograd.grad(loss, (mu, logvar))
    assert "vae_fast::latent_backward" in mode.ops
    for a, b, c in zip(first, second, in_mode):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_step_seeds_follow_torch_manual_seed_in_other_threads():
    # the seed is drawn into a per-thread buffer: a thread's first draw creates its own
    mu = torch.zeros(64, 8)
    torch.manual_seed(7)
    expected = vae_fast.gaussian_sample_kl(mu, mu)[0]
    lock, results = threading.Lock(), []

    def draw():
        with lock:  # (the default generator is process-wide: seed and draw together)
            torch.manual_seed(7)
            results.append(vae_fast.gaussian_sample_kl(mu, mu)[0])

    threads = [threading.Thread(target=draw) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for z in results:
        torch.testing.assert_close(z, expected, rtol=0, atol=0)


@pytest.mark.parametrize("contiguous", [True, False], ids=["step path", "general path"])
def test_inference_mode_and_no_grad_evaluate_without_a_graph(contiguous):
    # evaluation loops run the model under torch.inference_mode() or torch.no_grad(): the decoder output is then an
    # inference tensor (no version counter) or a tensor without grad_fn
    mu, logvar = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(4, 10, requires_grad=True)
    x = torch.rand(8, 10).round()
    x = x if contiguous else torch.rand(10, 8).round().t()
    torch.manual_seed(2)
    expected = vae_fast.elbo(x, mu, logvar, lambda z: z @ weight)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            torch.manual_seed(2)
            out = vae_fast.elbo(x, mu, logvar, lambda z: z @ weight)
            z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
            log_p = vae_fast.bernoulli_log_prob(z @ weight, x)
        assert out.loss.grad_fn is None and z.grad_fn is None and log_p.grad_fn is None
        for got, want in zip(out, expected):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def test_step_paths_write_only_the_gradients_autograd_will_ask_for(recorder):
    # the per-step kernels write a gradient (a decoder-sized pass) only for inputs that require grad with grad mode on,
    # as the Function's needs_input_grad says: none under no_grad / inference_mode (evaluation loops), theta's when x
    # alone requires grad for the Gaussian (d/dx = -d/dmean), none for the Bernoulli then (d/dx is theta itself)
    recorder.names = {"elementwise_step", "categorical_step"}
    theta, x = torch.randn(4, 6), torch.rand(4, 6).round()
    learned = torch.zeros((), requires_grad=True)

    def written(fn, *args):
        recorder.arguments.clear()
        fn(*args)
        (arguments,) = recorder.arguments
        return [address != 0 for address in arguments[11:13]]  # the gradient and the per-row scale gradient

    assert written(vae_fast.gaussian_log_prob, theta.requires_grad_(), x, learned) == [True, True]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert written(vae_fast.gaussian_log_prob, theta, x, learned) == [False, False]
    theta.requires_grad_(False)
    assert written(vae_fast.gaussian_log_prob, theta, x.clone().requires_grad_(), 0.5) == [True, False]
    assert written(vae_fast.bernoulli_log_prob, theta, x.clone().requires_grad_()) == [False, False]
    assert written(vae_fast.gaussian_log_prob, theta, x, learned) == [False, True]
    logits, target = torch.randn(2, 3, 5, requires_grad=True), torch.randint(0, 5, (2, 3))
    recorder.arguments.clear()
    vae_fast.categorical_log_prob(logits, target)
    with torch.no_grad():
        vae_fast.categorical_log_prob(logits, target)
    assert [arguments[10] != 0 for arguments in recorder.arguments] == [True, False]


def test_training_after_a_first_call_under_inference_mode():
    # an evaluation (or Lightning's sanity check) before training: the thread's first latent call and a float
    # variance's first use happen under inference_mode; the cached seed buffer and 0-d scale are normal tensors,
    # so later training calls can update and save them (they raised "Inplace update to inference tensor" and
    # "Inference tensors cannot be saved for backward")
    errors = []

    def run():
        try:
            mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
            mean, x = torch.randn(4, 5), torch.rand(4, 5)
            with torch.inference_mode():
                vae_fast.gaussian_sample_kl(mu, logvar)
                vae_fast.gaussian_log_prob(mean, x, -0.123)
            trained = mu.clone().requires_grad_()
            z, kl = vae_fast.gaussian_sample_kl(trained, logvar)
            (z.sum() + kl.sum()).backward()
            theta = mean.clone().requires_grad_()
            with vae_fast.save_inputs():
                log_p = vae_fast.gaussian_log_prob(theta, x, -0.123)
            (grad,) = torch.autograd.grad(log_p.sum(), theta, create_graph=True)
            torch.testing.assert_close(grad, (x - theta) * torch.tensor(0.123).exp())  # (x - mean) e^-lv
        except Exception as error:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(error)

    thread = threading.Thread(target=run)  # a fresh thread: its own, not yet created, seed buffer
    thread.start()
    thread.join()
    assert not errors, errors


# ------------------------------------------------------------------ the heads: categorical, packed logistic mixture


def _packed_dmol(batch, channels, mixtures, pixels=(3, 4), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = mixtures * (1 + channels * (3 if channels == 3 else 2))
    params = torch.randn(batch, packed, *pixels, generator=gen, dtype=dtype).requires_grad_()
    x = (torch.randint(0, 256, (batch, channels, *pixels), generator=gen) / 127.5 - 1).to(dtype)
    return x, params


def test_head_training_calls_take_the_step_entry_points(recorder):
    logits = torch.randn(4, 3, 5, 7, requires_grad=True)  # (B, *pixels, C)
    target = torch.randint(0, 7, (4, 3, 5))
    vae_fast.categorical_log_prob(logits, target).mean().backward()
    vae_fast.categorical_log_prob(logits, target.to(torch.uint8)).mean().backward()  # 8-bit pixels as they come
    x, params = _packed_dmol(4, 3, 2)
    vae_fast.dmol_packed_log_prob(x, params, reduction="mean").backward()
    x1, params1 = _packed_dmol(4, 1, 3)
    vae_fast.dmol_packed_log_prob(x1, params1, 3, log_scale_min=-5.0).sum().backward()
    assert recorder.calls == ["categorical_step", "categorical_step", "dmol_packed_step", "dmol_packed_step"]
    recorder.calls.clear()
    # int32 targets, K decoder samples, transposed logits, an int log_scale_min, x of another dtype, split
    # parameters: the general entry points
    vae_fast.categorical_log_prob(logits, target.int())
    vae_fast.categorical_log_prob(torch.randn(2, 4, 3, 5, 7), target)
    vae_fast.categorical_log_prob(torch.randn(4, 3, 7, 5).transpose(-1, -2), target)
    vae_fast.dmol_packed_log_prob(x, params, log_scale_min=-7)
    vae_fast.dmol_packed_log_prob(x.double(), params)
    vae_fast.discretized_logistic_mixture_log_prob(x1, *vae_fast.dmol_from_packed(params1, 3, 1))
    assert recorder.calls == ["categorical"] * 3 + ["dmol"] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_step_paths_give_exactly_the_general_paths_results(general_paths, dtype):
    def run():
        logits = torch.randn(6, 2, 3, 9, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        target = torch.randint(0, 9, (6, 2, 3), generator=torch.Generator().manual_seed(2))
        x, params = _packed_dmol(6, 3, 4, dtype=dtype)
        x1, params1 = _packed_dmol(6, 1, 2, dtype=dtype, seed=3)
        values = (vae_fast.categorical_log_prob(logits, target), vae_fast.dmol_packed_log_prob(x, params),
                  vae_fast.dmol_packed_log_prob(x1, params1, log_scale_min=float("-inf"), num_bits=5),
                  vae_fast.categorical_log_prob(logits, target.to(torch.uint8)))
        loss = (-values[0].mean() - values[1].sum() + 0.5 * values[2].mean() - 2 * values[3].mean()
                - vae_fast.categorical_log_prob(logits, target, reduction="sum")
                - vae_fast.dmol_packed_log_prob(x, params, reduction="mean"))
        return (*values, *torch.autograd.grad(loss, (logits, params, params1)))

    step = run()
    general_paths()
    general = run()
    for got, want in zip(step, general):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_head_step_nodes_keep_the_op_contracts():
    F64 = torch.float64
    logits = torch.randn(3, 4, 6, dtype=F64, requires_grad=True)
    target = torch.randint(0, 6, (3, 4))
    assert torch.autograd.gradcheck(lambda t: vae_fast.categorical_log_prob(t, target), (logits,))
    assert torch.autograd.gradgradcheck(lambda t: vae_fast.categorical_log_prob(t, target), (logits,))
    x, params = _packed_dmol(2, 3, 2, pixels=(2,), dtype=F64)
    assert torch.autograd.gradcheck(lambda p: vae_fast.dmol_packed_log_prob(x, p), (params,))
    log_p = vae_fast.dmol_packed_log_prob(x, params)
    first = torch.autograd.grad(log_p.sum(), params, retain_graph=True)[0]
    again = torch.autograd.grad(log_p.sum(), params, create_graph=False)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(vae_fast.dmol_packed_log_prob(x, params).sum(), params, create_graph=True)


def test_head_step_paths_reject_what_the_general_paths_reject():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        vae_fast.categorical_log_prob(logits, torch.tensor([[0, 1, 4], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        vae_fast.categorical_log_prob(logits, torch.tensor([[0, 1, 2], [-1, 0, 0]]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        vae_fast.categorical_log_prob(logits, torch.tensor([[0, 1, 2], [255, 0, 0]], dtype=torch.uint8))
    x, params = _packed_dmol(2, 3, 2)
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        vae_fast.dmol_packed_log_prob(x * 1.5, params)
    with pytest.raises(ValueError, match="x is treated as data and must not require grad"):
        vae_fast.dmol_packed_log_prob(x.requires_grad_(), params)
    with pytest.raises(ValueError, match="params must have shape"):
        vae_fast.dmol_packed_log_prob(x.detach(), params[:, :-1])
    with pytest.raises(TypeError, match="dense"):
        vae_fast.categorical_log_prob(logits.to_sparse(), torch.zeros(2, 3, dtype=torch.int64))


def test_head_step_paths_serve_large_gradients_from_the_buffer_pool(monkeypatch):
    # a 256-way likelihood's gradient is megabytes: the step path takes it from the pool, as the general path does
    from vae_fast.kernels import cpu

    recording = _Recorder(cpu._C, names={"pooled_tensor"})
    monkeypatch.setattr(cpu, "_C", recording)
    logits = torch.randn(4, 32, 32, 256, requires_grad=True)  # 4 MiB of float32: the pool's smallest buffer
    target = torch.randint(0, 256, (4, 32, 32))
    log_p = vae_fast.categorical_log_prob(logits, target)
    (grad,) = torch.autograd.grad(-log_p.mean(), logits)
    assert recording.calls == ["pooled_tensor"] and tuple(recording.arguments[0][1]) == tuple(logits.shape)
    expected = torch.log_softmax(logits.detach().double(), -1)
    torch.testing.assert_close(log_p.double(), expected.gather(-1, target[..., None]).sum((1, 2, 3)), rtol=1e-5,
                               atol=1e-3)
    onehot = torch.nn.functional.one_hot(target, 256).double()
    torch.testing.assert_close(grad.double(), (expected.exp() - onehot) / 4, rtol=1e-4, atol=1e-7)


def test_fixed_float_variances_equal_0d_tensors_and_the_scalar_cache_stays_bounded(recorder):
    from vae_fast.ops import _autograd

    gen = torch.Generator().manual_seed(3)
    mean, x = torch.randn(3, 4, generator=gen), torch.rand(3, 4, generator=gen)
    for log_scale in (-0.5, 2, 0.0):  # floats and ints: the same as the 0-d tensor, call after call
        want = vae_fast.laplace_log_prob(mean, x, torch.tensor(float(log_scale)))
        for _ in range(2):
            torch.testing.assert_close(vae_fast.laplace_log_prob(mean, x, log_scale), want, rtol=0, atol=0)
    # the step kernel takes a float as a number (no tensor made per call); the general path (here a transposed
    # mean) caches a 0-d tensor per value, and a schedule passing a new float every step must not grow that cache
    assert recorder.calls == ["elementwise_step"] * 9
    for step in range(2 * _autograd._MAX_CACHED_SCALARS):
        vae_fast.gaussian_log_prob(mean.t(), x.t(), -1.0 - step / 1000)
    assert recorder.calls.count("elementwise_likelihood") == 2 * _autograd._MAX_CACHED_SCALARS
    assert len(_autograd._scalars) <= _autograd._MAX_CACHED_SCALARS
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor"):
        vae_fast.gaussian_log_prob(mean, x, True)
    # shape inference under FakeTensorMode first: nothing fake is cached for the real calls after it
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vae_fast.gaussian_log_prob(torch.randn(3, 4), torch.rand(3, 4), -0.25)
    assert all(type(t) is torch.Tensor for t in _autograd._scalars.values())
    parameter = torch.nn.Parameter(mean.clone())  # (a subclass: the general path and its device-keyed lookup)
    torch.testing.assert_close(vae_fast.gaussian_log_prob(parameter, x, -0.25),  # (both with a gradient: the
                               vae_fast.gaussian_log_prob(mean.requires_grad_(), x, torch.tensor(-0.25)),  # same code)
                               rtol=0, atol=0)



@contextlib.contextmanager
def _general_paths_only():
    """Every call takes the general path (the step entry points decline)."""
    with contextlib.ExitStack() as stack:
        for module, name in ((functional_latent, "latent_step"), (likelihood_ops, "elementwise_step"),
                             (likelihood_ops, "categorical_step"), (dmol_ops, "dmol_packed_step")):
            stack.enter_context(mock.patch.object(module, name, lambda *args: None))
        yield


def _both_paths(run):
    step = run()
    with _general_paths_only():
        general = run()
    for got, want in zip(step, general):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_channels_last_decoder_outputs_take_the_step_path_without_copies(recorder):
    gen = torch.Generator().manual_seed(2)
    cl = torch.channels_last
    theta = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=cl).requires_grad_()
    x = torch.rand(4, 3, 5, 5, generator=gen).to(memory_format=cl)
    learned = torch.zeros((), requires_grad=True)

    def run():
        log_p = (vae_fast.bernoulli_log_prob(theta, x.round()).sum() + vae_fast.gaussian_log_prob(theta, x).sum()
                 + vae_fast.laplace_log_prob(theta, x, learned).mean())
        return (log_p, *torch.autograd.grad(log_p, (theta, learned)))

    _both_paths(run)  # (the general path runs on the permuted operands: the same kernels, the same values)
    assert recorder.calls[:3] == ["elementwise_step"] * 3
    recorder.calls.clear()
    # the gradient is written in theta's layout: no copy of theta, x or the gradient on the way
    log_p = vae_fast.gaussian_log_prob(theta, x)
    (grad,) = torch.autograd.grad(-log_p.mean(), theta)
    assert grad.stride() == theta.stride() and recorder.calls == ["elementwise_step"]
    recorder.calls.clear()
    vae_fast.gaussian_log_prob(theta, x.contiguous())  # mixed layouts: the general path
    assert recorder.calls == ["elementwise_likelihood"]


@settings(deadline=None)
@given(batch=st.integers(1, 5), event=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       likelihood=st.sampled_from(["bernoulli", "continuous_bernoulli", "mse", "gaussian", "laplace"]),
       scale=st.sampled_from(["none", "float", "fixed", "learned"]), double=st.booleans(), seed=st.integers(0, 99))
def test_elementwise_step_path_equals_the_general_path_property(batch, event, likelihood, scale, double, seed):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    theta = (3 * torch.randn(batch, *event, generator=gen, dtype=dtype)).requires_grad_()
    x = torch.rand(batch, *event, generator=gen, dtype=dtype)
    learned = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    fn = getattr(vae_fast, f"{likelihood}_log_prob")
    args = {"none": (), "float": (-0.7,), "fixed": (torch.tensor(0.4, dtype=dtype),), "learned": (learned,)}[scale]
    if likelihood not in ("gaussian", "laplace"):
        args = ()

    def run():
        log_p = fn(theta, x, *args)
        wrt = (theta, learned) if args and args[0] is learned else (theta,)
        return (log_p, *torch.autograd.grad((log_p * torch.linspace(-1, 1, batch, dtype=dtype)).sum(), wrt))

    _both_paths(run)


@settings(deadline=None)
@given(batch=st.integers(1, 4), pixels=st.lists(st.integers(0, 4), min_size=0, max_size=2),
       classes=st.integers(1, 9), channels=st.sampled_from([1, 2, 3]), mixtures=st.integers(1, 4),
       double=st.booleans(), seed=st.integers(0, 99))
def test_head_step_paths_equal_the_general_paths_property(batch, pixels, classes, channels, mixtures, double, seed):
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, *pixels, classes, generator=gen, dtype=dtype).requires_grad_()
    target = torch.randint(0, classes, (batch, *pixels), generator=gen)
    packed = mixtures * (1 + channels * (3 if channels == 3 else 2))
    params = torch.randn(batch, packed, *pixels, generator=gen, dtype=dtype).requires_grad_()
    x = (torch.randint(0, 256, (batch, channels, *pixels), generator=gen) / 127.5 - 1).to(dtype)
    upstream = torch.linspace(-1, 1, batch, dtype=dtype)

    def run():
        cat = vae_fast.categorical_log_prob(logits, target)
        dmol = vae_fast.dmol_packed_log_prob(x, params)
        return (cat, dmol, *torch.autograd.grad(((cat + dmol) * upstream).sum(), (logits, params)))

    _both_paths(run)


def test_step_paths_prescale_by_the_public_functions_guess(recorder):
    # the step functions spell default_expected_upstream's rule inline (a call costs more): the guesses must agree
    from vae_fast.ops._autograd import default_expected_upstream

    theta, x = torch.randn(5, 7, requires_grad=True), torch.rand(5, 7)
    logits, target = torch.randn(5, 3, 4, requires_grad=True), torch.randint(0, 4, (5, 3))
    learned = torch.zeros((), requires_grad=True)
    for reduction in ("none", "mean", "sum"):
        for out in (vae_fast.bernoulli_log_prob(theta, x, reduction=reduction),
                    vae_fast.gaussian_log_prob(theta, x, learned, reduction=reduction),
                    vae_fast.categorical_log_prob(logits, target, reduction=reduction)):
            node = out.grad_fn if reduction == "none" else out.grad_fn.next_functions[0][0]
            assert node.expected_upstream == default_expected_upstream(reduction, 5), (reduction, node)
    assert recorder.calls == ["elementwise_step", "elementwise_step", "categorical_step"] * 3
