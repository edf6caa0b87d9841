"""The PyTorch contracts of every public op, with default settings (no switches).

One test per contract: several backward passes, gradcheck / gradgradcheck, create_graph,
torch.func (vmap, grad, jacrev, vmap(grad)), forward-mode AD (jvp, jacfwd, hessian, dual tensors), autocast,
meta and fake tensors, gradients w.r.t. x, the learned-variance requires_grad patterns, narrow priors, API
hygiene, thread-safe settings, the deferred CUDA support check, and the codes shared with the C++ kernels.
Each runs on the reference, C++ and Triton (interpreter on CPU) backends where it applies.
"""
import contextlib
import inspect
import math
import re
import threading
from pathlib import Path

import pytest
import torch
from torch.func import grad, jacrev, vmap

import vae_fast
from vae_fast import reference as ref
from vae_fast._validation import DeferredChecks
from vae_fast.kernels import protocol

from .conftest import OpRecorder, assert_matches_reference

F64 = torch.float64


def _elementwise_cases(device, batch=3, dim=5, dtype=F64, seed=0):
    """(name, fn(theta, x), theta, x) for each elementwise likelihood, x differentiable-friendly."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(batch, dim, generator=gen, dtype=dtype).to(device)
    x = (torch.rand(batch, dim, generator=gen, dtype=dtype) * 0.8 + 0.1).to(device)
    lv = (0.3 * torch.randn(1, dim, generator=gen, dtype=dtype)).to(device)
    return [
        ("bernoulli", lambda t, xx: vae_fast.bernoulli_log_prob(t, xx), theta, x),
        ("continuous_bernoulli", lambda t, xx: vae_fast.continuous_bernoulli_log_prob(t, xx), theta, x),
        ("gaussian", lambda t, xx: vae_fast.gaussian_log_prob(t, xx, lv), theta, x),
        ("laplace", lambda t, xx: vae_fast.laplace_log_prob(t, xx, lv), theta, x),
    ]


def _categorical_args(device, dtype=F64):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=gen, dtype=dtype).to(device)
    target = torch.randint(0, 4, (2, 3), generator=gen).to(device)
    return logits, target


def _dmol_args(device, dtype=F64):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randint(0, 256, (2, 1, 2, 2), generator=gen).to(dtype) / 127.5 - 1).to(device)
    params = (0.5 * torch.randn(2, 6, 2, 2, generator=gen, dtype=dtype)).to(device)  # M = 2, C = 1
    return x, params


# --------------------------------------------------------------------------------------------
# nn is reachable as documented
# --------------------------------------------------------------------------------------------


def test_nn_module_is_an_attribute_of_the_package():
    loss = vae_fast.nn.ELBOLoss(likelihood="bernoulli")
    x = torch.rand(4, 6)
    mu, logvar = torch.zeros(4, 2, requires_grad=True), torch.zeros(4, 2)
    loss(x, mu, logvar, lambda z: z.sum(-1, keepdim=True).expand(4, 6)).backward()
    assert mu.grad is not None


# --------------------------------------------------------------------------------------------
# several backward passes, gradcheck, gradgradcheck
# --------------------------------------------------------------------------------------------


def test_every_op_backpropagates_any_number_of_times(backend):
    for name, fn, theta, x in _elementwise_cases(backend):
        theta = theta.requires_grad_()
        for loss in (-fn(theta, x).mean(), fn(theta, x).sum() * 3.0):  # expected upstream, then another
            first, = torch.autograd.grad(loss, theta, retain_graph=True)
            second, = torch.autograd.grad(loss, theta, retain_graph=True)
            loss.backward(retain_graph=True)
            loss.backward()
            torch.testing.assert_close(first, second, msg=name)
            torch.testing.assert_close(theta.grad, 2 * first, msg=name)
            theta.grad = None
    mu = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    x = torch.rand(4, 6, dtype=F64, device=backend)
    w = torch.randn(3, 6, dtype=F64, device=backend, requires_grad=True)
    out = vae_fast.elbo(x, mu, logvar, lambda z: z @ w, eps=torch.randn(4, 3, dtype=F64, device=backend))
    g1 = torch.autograd.grad(out.loss, [mu, logvar, w], retain_graph=True)
    g2 = torch.autograd.grad(out.loss, [mu, logvar, w])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_outputs_can_be_modified_in_place_like_a_torch_ops(backend):
    # an autograd.Function output that is a view (say a kernel's (B, 1) buffer squeezed) raises on an in-place op,
    # which a torch op's output allows; the gradient then follows the modified value
    mu = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    logits, target = _categorical_args(backend)
    logits.requires_grad_()
    noise = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same noise for both calls)
    outputs = {  # name -> (a function giving one output, the leaves it depends on)
        "z": (lambda: vae_fast.gaussian_sample_kl(mu, logvar, generator=noise())[0], (mu, logvar)),
        "kl": (lambda: vae_fast.gaussian_sample_kl(mu, logvar, generator=noise())[1], (mu, logvar)),
        "kl per dim": (lambda: vae_fast.gaussian_kl(mu, logvar, reduce=False), (mu, logvar)),
        "z of a conv latent": (lambda: vae_fast.gaussian_sample_kl(mu.view(4, 3, 1, 1), logvar.view(4, 3, 1, 1),
                                                                  dim=(1, 2, 3), generator=noise())[0], (mu, logvar)),
        "categorical": (lambda: vae_fast.categorical_log_prob(logits, target), (logits,)),
        "categorical, K = 2 samples": (lambda: vae_fast.categorical_log_prob(logits.expand(2, *logits.shape), target),
                                       (logits,)),
    }
    for name, fn, theta, x in _elementwise_cases(backend):
        theta.requires_grad_()
        outputs[name] = (lambda fn=fn, theta=theta, x=x: fn(theta, x), (theta,))
        outputs[f"{name}, K = 2 samples"] = (lambda fn=fn, theta=theta, x=x: fn(theta.expand(2, *theta.shape), x),
                                             (theta,))
    for name, (output, leaves) in outputs.items():
        plain = output()
        want = torch.autograd.grad(3.0 * plain.sum(), leaves)
        modified = output()
        modified.mul_(3.0)
        got = torch.autograd.grad(modified.sum(), leaves)
        torch.testing.assert_close(modified.detach(), 3.0 * plain.detach(), msg=name)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_values_and_gradients(backend, reentrant):
    # torch.utils.checkpoint (diffusers' gradient checkpointing, NVAE's) reruns the forward pass in backward with the
    # RNG state restored: the in-kernel noise, the saved gradients and the support checks must come out the same
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(4, 3, generator=gen).to(backend).requires_grad_() for _ in range(2))
    w = torch.randn(3, 2 * 3 * 5, generator=gen).to(backend).requires_grad_()
    learned = torch.zeros((), device=backend, requires_grad=True)
    x = torch.rand(4, 2 * 3 * 5, generator=gen).to(backend)
    images = (torch.randint(0, 256, (4, 1, 2, 5), generator=gen) / 127.5 - 1).to(backend)
    target = torch.randint(0, 6, (4, 5), generator=gen).to(backend)
    leaves = (mu, logvar, w, learned)

    def block(mu, logvar, w, learned):
        z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
        out = z @ w
        return (kl - vae_fast.bernoulli_log_prob(out, x.round()) - vae_fast.laplace_log_prob(out, x, learned)
                - vae_fast.categorical_log_prob(out.view(4, 5, 6), target)
                - vae_fast.dmol_packed_log_prob(images, out.view(4, 3, 2, 5))  # one mixture component
                + vae_fast.elbo(x, mu, logvar, lambda z: (z @ w, learned), likelihood="gaussian").loss).mean()

    def gradients(run):
        for leaf in leaves:
            leaf.grad = None
        torch.manual_seed(1)
        run().backward()  # (reentrant checkpointing supports .backward() only)
        return [leaf.grad.clone() for leaf in leaves]

    want = gradients(lambda: block(*leaves))
    got = gradients(lambda: checkpoint(block, *leaves, use_reentrant=reentrant))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_saved_tensor_hooks_and_anomaly_mode_see_the_same_gradients(backend):
    # activation offloading (saved_tensors_hooks, save_on_cpu) packs what the ops save, the saved gradients
    # included; anomaly mode checks every backward output
    mu, logvar = (torch.randn(8, 4, device=backend, requires_grad=True) for _ in range(2))
    w = torch.randn(4, 10, device=backend, requires_grad=True)
    learned = torch.zeros((), device=backend, requires_grad=True)
    x = torch.rand(8, 10, device=backend)

    def gradients():
        torch.manual_seed(1)
        out = vae_fast.elbo(x, mu, logvar, lambda z: (z @ w, learned), likelihood="laplace")
        return torch.autograd.grad(out.loss - vae_fast.bernoulli_log_prob(x @ w.t() @ w, x.round()).mean(),
                                   (mu, logvar, w, learned))

    want = gradients()
    packed = []
    offload = torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t.clone(), lambda t: t)
    for context in (offload, torch.autograd.graph.save_on_cpu(), torch.autograd.set_detect_anomaly(True)):
        with context:
            got = gradients()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert packed  # the hooks saw what the ops saved


def test_a_default_device_does_not_leak_into_cpu_calls():
    # torch.set_default_device / `with torch.device(...)` (common on GPU machines) must not move what the ops
    # create for CPU tensors: the step path's seed buffer (made on a thread's first call: a fresh thread here),
    # half-precision mixture gradients, the reference backend's noise, the dispatcher path's support count
    errors, devices = [], []

    def run():
        try:
            mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
            x, w = torch.rand(4, 6), torch.randn(3, 6, requires_grad=True)
            params = torch.randn(2, 9, 2, 2, dtype=torch.bfloat16, requires_grad=True)
            images = (torch.randint(0, 256, (2, 1, 2, 2)) / 127.5 - 1).to(torch.bfloat16)
            with torch.device("meta"):
                z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
                vae_fast.elbo(x, mu, logvar, lambda z: z @ w).loss.backward()
                log_p = vae_fast.dmol_packed_log_prob(images, params)
                log_p.sum().backward()
                with vae_fast.use_backend("reference"):
                    vae_fast.gaussian_sample_kl(mu, logvar)
                with OpRecorder():
                    vae_fast.bernoulli_log_prob(x @ w.t() @ w, x.round())
            devices.extend(t.device.type for t in (z, kl, log_p, params.grad, mu.grad))
        except Exception as error:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors, errors
    assert devices == ["cpu"] * 5


def test_batched_gradients_match_one_backward_per_row(backend):
    # torch.autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run backward once under torch's
    # (legacy) vmap: the upstream gradients arrive batched, tensors without storage that no kernel can read
    # (a RuntimeError before); each result must equal the loop of plain backward passes
    mu = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=F64, device=backend, requires_grad=True)
    logits, target = _categorical_args(backend)
    x_mix, params = _dmol_args(backend)
    h = torch.randn(4, 2, 5, dtype=F64, device=backend, requires_grad=True)
    weight = torch.randn(6, 5, dtype=F64, device=backend, requires_grad=True)
    x_head = torch.rand(4, 2, 6, dtype=F64, device=backend)
    noise = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cases = {  # name -> (a function of the leaves giving a (rows,) output, the leaves)
        "kl": (lambda m, v: vae_fast.gaussian_kl(m, v), (mu, logvar)),
        "z": (lambda m, v: vae_fast.gaussian_sample_kl(m, v, generator=noise())[0][:, 0], (mu, logvar)),
        "kl with a prior": (lambda m, v: vae_fast.gaussian_kl(m, v, m.detach().flip(0), v.detach() * 0.5),
                            (mu, logvar)),
        "categorical": (lambda l: vae_fast.categorical_log_prob(l, target), (logits.requires_grad_(),)),
        "mixture": (lambda p: vae_fast.dmol_packed_log_prob(x_mix, p), (params.requires_grad_(),)),
        "gaussian, learned scalar logvar": (lambda t, lv: vae_fast.gaussian_log_prob(t, x_head[:, 0], lv),
                                            (x_head[:, 1].clone().requires_grad_(),
                                             torch.tensor(0.3, dtype=F64, device=backend, requires_grad=True))),
        "bernoulli head": (lambda hh, w: vae_fast.linear_log_prob(hh, w, None, x_head, likelihood="bernoulli"),
                           (h, weight)),
        "elbo": (lambda m, v: vae_fast.elbo(torch.rand(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
                                            .to(backend), m, v, lambda z: z.repeat(1, 2), generator=noise()).elbo,
                 (mu, logvar)),
    }
    for name, fn, theta, x in _elementwise_cases(backend):
        cases[name] = (lambda t, fn=fn, x=x: fn(t, x), (theta.requires_grad_(),))
    for name, (fn, leaves) in cases.items():
        out = fn(*leaves)
        basis = torch.eye(out.numel(), dtype=out.dtype, device=backend).view(-1, *out.shape)
        batched = torch.autograd.grad(out, leaves, basis, is_grads_batched=True, retain_graph=True)
        rows = [torch.autograd.grad(fn(*leaves), leaves, e) for e in basis]
        for i, got in enumerate(batched):
            torch.testing.assert_close(got, torch.stack([r[i] for r in rows]), msg=name)
    jacobian = torch.autograd.functional.jacobian(lambda t: vae_fast.bernoulli_log_prob(t, x_head[:, 0]), h[:, 0, :5]
                                                  .detach().repeat(1, 2)[:, :6], vectorize=True)
    assert jacobian.shape == (4, 4, 6)


def test_gradcheck_and_gradgradcheck_with_default_settings(backend):
    for name, fn, theta, x in _elementwise_cases(backend):
        theta = theta.requires_grad_()
        assert torch.autograd.gradcheck(lambda t: fn(t, x), (theta,)), name
        assert torch.autograd.gradgradcheck(lambda t: fn(t, x), (theta,)), name
    logits, target = _categorical_args(backend)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda lg: vae_fast.categorical_log_prob(lg, target), (logits,))
    assert torch.autograd.gradgradcheck(lambda lg: vae_fast.categorical_log_prob(lg, target), (logits,))
    mu = torch.randn(3, 4, dtype=F64, device=backend, requires_grad=True)
    logvar = (0.5 * torch.randn(3, 4, dtype=F64, device=backend)).requires_grad_()
    prior_mu = torch.randn(1, 4, dtype=F64, device=backend, requires_grad=True)
    prior_logvar = (0.3 * torch.randn(4, dtype=F64, device=backend)).requires_grad_()
    eps = torch.randn(2, 3, 4, dtype=F64, device=backend)

    def latent(m, lv, pm, plv):
        z, kl = vae_fast.gaussian_sample_kl(m, lv, prior_mu=pm, prior_logvar=plv, eps=eps, num_samples=2)
        return (z * z).sum(0), kl  # a non-linear use of z, so second derivatives are not trivially 0

    inputs = (mu, logvar, prior_mu, prior_logvar)
    assert torch.autograd.gradcheck(latent, inputs)
    assert torch.autograd.gradgradcheck(latent, inputs)
    # the in-kernel noise: the same stream is recomputed for every backward pass
    seeded = lambda m, lv: vae_fast.gaussian_sample_kl(m, lv, generator=torch.Generator(m.device).manual_seed(5))[0]  # noqa: E731
    assert torch.autograd.gradcheck(seeded, (mu, logvar))
    assert torch.autograd.gradgradcheck(seeded, (mu, logvar))
    x, params = _dmol_args(backend)
    params.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: vae_fast.dmol_packed_log_prob(x, p), (params,))


def test_create_graph_gives_exact_second_derivatives_or_a_clear_error(backend):
    # gradient penalty / Hessian-vector product: d/dtheta of ||d log p / d theta||^2
    theta = torch.randn(3, 5, dtype=F64, device=backend, requires_grad=True)
    x = torch.rand(3, 5, dtype=F64, device=backend)
    g, = torch.autograd.grad(vae_fast.bernoulli_log_prob(theta, x).sum(), theta, create_graph=True)
    assert g.requires_grad
    hvp, = torch.autograd.grad((g * g).sum(), theta)
    s = torch.sigmoid(theta.detach())
    torch.testing.assert_close(hvp, 2 * (x - s) * (-s * (1 - s)))  # d/dl (x - s)^2 = -2 (x - s) s (1 - s)
    # latent: d^2/dmu^2 of sum z^2 is 2 per element; d/dlogvar of the KL's mu-gradient is 0
    mu = torch.randn(2, 3, dtype=F64, device=backend, requires_grad=True)
    lv = torch.zeros(2, 3, dtype=F64, device=backend, requires_grad=True)
    z, kl = vae_fast.gaussian_sample_kl(mu, lv)
    g_mu, = torch.autograd.grad((z * z).sum() + kl.sum(), mu, create_graph=True)
    h, = torch.autograd.grad(g_mu.sum(), mu)
    torch.testing.assert_close(h, torch.full_like(h, 3.0))  # 2 from z^2, 1 from the KL's mu^2 / 2
    # the decoder output freed before backward: a clear error, never a silently constant gradient
    h_in = torch.randn(3, 4, dtype=F64, device=backend, requires_grad=True)
    w = torch.randn(4, 5, dtype=F64, device=backend)
    loss = vae_fast.bernoulli_log_prob(h_in @ w, x).sum()  # h_in @ w dies here
    with pytest.raises(RuntimeError, match="elementwise_log_prob.*save_inputs"):
        torch.autograd.grad(loss, h_in, create_graph=True)
    with vae_fast.save_inputs():
        loss = vae_fast.bernoulli_log_prob(h_in @ w, x).sum()
    g_h, = torch.autograd.grad(loss, h_in, create_graph=True)
    assert g_h.requires_grad
    x_img, params = _dmol_args(backend)
    params.requires_grad_()
    with pytest.raises(RuntimeError, match="dmol_packed_log_prob: double backward"):
        torch.autograd.grad(vae_fast.dmol_packed_log_prob(x_img, params).sum(), params, create_graph=True)


# --------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------


def test_torch_func_vmap_grad_jacrev_match_loops(backend):
    for name, fn, theta, x in _elementwise_cases(backend, batch=4):
        # vmap over a leading dim of (4, 1, 5) slices: each slice is a batch of one example
        t3, x3 = theta.unsqueeze(1), x.unsqueeze(1)
        loop = torch.stack([fn(t3[i], x3[i]) for i in range(4)])
        torch.testing.assert_close(vmap(fn)(t3, x3), loop, msg=name)
        scalar = lambda t, xx: fn(t, xx).sum()  # noqa: E731
        per_example = vmap(grad(scalar))(t3, x3)  # per-sample gradients (DP-SGD, Fisher)
        loop_grads = torch.stack([_autograd_grad(scalar, t3[i], x3[i]) for i in range(4)])
        torch.testing.assert_close(per_example, loop_grads, msg=name)
        jac = jacrev(lambda t: fn(t, x))(theta)  # (B, B, D): block diagonal
        torch.testing.assert_close(jac.diagonal(dim1=0, dim2=1).T, _autograd_grad(scalar, theta, x), msg=name)
    logits, target = _categorical_args(backend)
    lp = lambda lg, tg: vae_fast.categorical_log_prob(lg, tg)  # noqa: E731
    torch.testing.assert_close(vmap(lp)(logits.unsqueeze(1), target.unsqueeze(1)).squeeze(1), lp(logits, target))
    mu = torch.randn(4, 2, 3, dtype=F64, device=backend)
    lv = torch.randn(4, 2, 3, dtype=F64, device=backend)
    eps = torch.randn(4, 2, 3, dtype=F64, device=backend)
    z, kl = vmap(lambda m, l, e: vae_fast.gaussian_sample_kl(m, l, eps=e))(mu, lv, eps)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps)
    torch.testing.assert_close(kl, ref.gaussian_kl(mu, lv))
    loss = lambda m, l, e: (lambda out: (out[0] ** 2).sum() + out[1].sum())(vae_fast.gaussian_sample_kl(m, l, eps=e))  # noqa: E731
    g_mu, g_lv = vmap(grad(loss, argnums=(0, 1)))(mu, lv, eps)
    for i in range(4):
        m, l = mu[i].clone().requires_grad_(), lv[i].clone().requires_grad_()
        em, el = torch.autograd.grad(loss(m, l, eps[i]), [m, l])
        torch.testing.assert_close(g_mu[i], em)
        torch.testing.assert_close(g_lv[i], el)
    x_img, params = _dmol_args(backend)
    dm = lambda xx, p: vae_fast.dmol_packed_log_prob(xx, p)  # noqa: E731
    torch.testing.assert_close(vmap(dm)(x_img.unsqueeze(1), params.unsqueeze(1)).squeeze(1), dm(x_img, params))


def _autograd_grad(scalar_fn, theta, x):
    t = theta.detach().clone().requires_grad_()
    return torch.autograd.grad(scalar_fn(t, x), t)[0]


def test_vmap_of_in_kernel_noise_follows_torch_randomness_modes(backend):
    mu = torch.zeros(3, 2, 4, dtype=F64, device=backend)
    sample = lambda m: vae_fast.gaussian_sample_kl(m, m)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(sample)(mu)  # torch's default: random ops inside vmap are an error
    same = vmap(sample, randomness="same")(mu)
    torch.testing.assert_close(same[0], same[1])
    different = vmap(sample, randomness="different")(mu)
    assert not torch.equal(different[0], different[1])


# --------------------------------------------------------------------------------------------
# forward-mode AD: torch.func.jvp / jacfwd / hessian and dual tensors
# --------------------------------------------------------------------------------------------


def _dual_tangents(fn, primals, tangents):
    """The output tangents of fn on dual tensors (torch.autograd.forward_ad), as torch.func.jvp gives them."""
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        out = fn(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(forward_ad.unpack_dual(o).tangent for o in outs)


def test_forward_mode_ad_matches_the_reference(backend):
    """jvp (torch.func and dual tensors: the latter would meet the per-step Functions, which have no jvp rule, so
    they take the general ones), jacfwd against jacrev and hessian against the reference's, for the latent op (all
    three parameterisations, explicit and in-kernel noise, KL only), the elementwise and categorical likelihoods;
    the logistic mixture and the fused heads raise NotImplementedError naming the op and reverse mode."""
    from torch.func import hessian, jacfwd, jvp

    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64).to(backend)  # noqa: E731
    cases = []  # (name, fused fn, reference fn, primals)
    for name, fn, theta, x in _elementwise_cases(backend):
        oracle = {"bernoulli": ref.bernoulli_log_prob, "continuous_bernoulli": ref.continuous_bernoulli_log_prob,
                  "gaussian": ref.gaussian_log_prob, "laplace": ref.laplace_log_prob}[name]
        if name in ("gaussian", "laplace"):  # tangents for the mean, x and a learned per-pixel scale
            cases.append((name, getattr(vae_fast, f"{name}_log_prob"), oracle, (theta, x, 0.3 * rand(1, 5))))
        else:
            cases.append((name, fn, oracle, (theta, x)))
    cases.append(("mse", vae_fast.mse_log_prob, ref.mean_squared_error_log_prob, (rand(3, 5), rand(3, 5))))
    logits, target = _categorical_args(backend)
    cases.append(("categorical", lambda lg: vae_fast.categorical_log_prob(lg, target),
                  lambda lg: ref.categorical_log_prob(lg, target), (logits,)))
    mu, scale, eps = rand(3, 4), rand(3, 4), rand(2, 3, 4)
    prior_mu, prior_logvar = rand(1, 4), 0.5 * rand(4)
    for param in ("logvar", "logstd", "softplus"):
        cases.append((f"latent {param}",
                      lambda m, s, pm, plv, param=param: vae_fast.gaussian_sample_kl(
                          m, s, prior_mu=pm, prior_logvar=plv, eps=eps, num_samples=2, param=param),
                      lambda m, s, pm, plv, param=param: (m + ref.std_from_scale(s, param) * eps, ref.gaussian_kl(
                          m, ref.logvar_from_scale(s, param), pm.expand(3, 4), plv.expand(3, 4))),
                      (mu, scale, prior_mu, prior_logvar)))
    cases.append(("kl", lambda m, s: vae_fast.gaussian_kl(m, s), lambda m, s: ref.gaussian_kl(m, s), (mu, scale)))
    for name, fused, oracle, primals in cases:
        tangents = tuple(rand(*p.shape) for p in primals)
        got, want = jvp(fused, primals, tangents)[1], jvp(oracle, primals, tangents)[1]
        dual = _dual_tangents(fused, primals, tangents)
        as_tuple = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
        for g, d, w in zip(as_tuple(got), dual, as_tuple(want)):
            torch.testing.assert_close(g, w, msg=name)
            torch.testing.assert_close(d, w, msg=name)
        first = lambda p, fused=fused, primals=primals: fused(p, *primals[1:])  # noqa: E731
        forward, reverse = jacfwd(first)(primals[0]), jacrev(first)(primals[0])
        for f, r in zip(forward if isinstance(forward, tuple) else (forward,),
                        reverse if isinstance(reverse, tuple) else (reverse,)):
            torch.testing.assert_close(f, r, msg=name)
    total = lambda m: vae_fast.gaussian_kl(m, scale, prior_mu=prior_mu, prior_logvar=prior_logvar).sum()  # noqa: E731
    torch.testing.assert_close(hessian(total)(mu), hessian(lambda m: ref.gaussian_kl(
        m, scale, prior_mu.expand(3, 4), prior_logvar.expand(3, 4)).sum())(mu))
    theta, data = rand(3, 5), torch.rand(3, 5, generator=gen, dtype=F64).to(backend)
    torch.testing.assert_close(hessian(lambda t: vae_fast.continuous_bernoulli_log_prob(t, data).sum())(theta),
                               hessian(lambda t: ref.continuous_bernoulli_log_prob(t, data).sum())(theta))

    def seeded(m, s):  # in-kernel noise: one draw per call, the same for both modes
        torch.manual_seed(7)
        return vae_fast.gaussian_sample_kl(m, s, num_samples=2)

    for f, r in zip(jacfwd(seeded, argnums=(0, 1), randomness="same")(mu, scale)[0],
                    jacrev(seeded, argnums=(0, 1))(mu, scale)[0]):
        torch.testing.assert_close(f, r)
    x_img, params = _dmol_args(backend)
    with pytest.raises(NotImplementedError, match="dmol_packed_log_prob: forward-mode AD .* use reverse mode"):
        jvp(lambda p: vae_fast.dmol_packed_log_prob(x_img, p), (params,), (params,))
    h, weight = rand(3, 4), rand(5, 4)
    with pytest.raises(NotImplementedError, match="linear_log_prob: forward-mode AD"):
        jvp(lambda w: vae_fast.linear_log_prob(h, w, None, data, likelihood="bernoulli"), (weight,), (weight,))


# --------------------------------------------------------------------------------------------
# autocast, meta, fake
# --------------------------------------------------------------------------------------------


def test_autocast_gives_float32_losses_and_gradients_in_each_inputs_dtype(backend):
    torch.manual_seed(0)
    enc = torch.nn.Linear(12, 8).to(backend)
    dec = torch.nn.Linear(4, 12).to(backend)
    x = torch.rand(6, 12, device=backend)
    with torch.autocast(device_type=torch.device(backend).type, dtype=torch.bfloat16):
        mu, logvar = enc(x).chunk(2, dim=-1)
        assert mu.dtype == torch.bfloat16
        out = vae_fast.elbo(x, mu, logvar, dec)
    for name in ("loss", "elbo", "kl", "log_likelihood"):
        assert getattr(out, name).dtype == torch.float32, name
    assert out.z.dtype == torch.bfloat16
    out.loss.backward()
    assert enc.weight.grad.dtype == torch.float32 and dec.weight.grad.dtype == torch.float32
    # the float32 loss is the exact loss of the bf16 values (no bf16 rounding of a 580-nat sum)
    logits = torch.randn(4, 784, device=backend).to(torch.bfloat16)
    xb = torch.rand(4, 784, device=backend).round()
    got = vae_fast.bernoulli_log_prob(logits, xb)
    assert_matches_reference(got, ref.bernoulli_log_prob(logits.double(), xb.double()), torch.float32, terms=784)


def test_torch_export_captures_the_ops_and_reproduces_the_module():
    # torch.export (deployment, AOTInductor): the ops appear as torch.ops.vae_fast nodes with their seed draw, and the
    # exported module gives the eager module's values for the same seed
    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = torch.nn.Linear(6, 8), torch.nn.Linear(4, 6)

        def forward(self, x):
            z, kl = vae_fast.gaussian_sample_kl(*self.enc(x).chunk(2, -1))
            return (kl - vae_fast.bernoulli_log_prob(self.dec(z), x)).mean(), z

    model, x = VAE(), torch.rand(5, 6).round()
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"vae_fast.latent_forward.default", "vae_fast.elementwise_log_prob.default"} <= targets
    torch.manual_seed(0)
    got = exported.module()(x)
    torch.manual_seed(0)
    want = model(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compiled_graphs_call_the_traced_twins_of_the_ops():
    # torch.compile records torch.ops.vae_fast.<op>_traced (the same kernels, no autograd layer: the autograd.Function
    # being traced is the autograd) so that the compiled step does not run the op's Python autograd layer at every
    # call; values and gradients are the eager ones (torch.export keeps the ops themselves: the test above)
    from torch._dynamo.backends.common import aot_autograd

    targets = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    mu, lv = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    x = torch.rand(6, 5).round()
    decoder = torch.nn.Linear(3, 5)
    eps = torch.randn(6, 3)

    def loss(mu, lv):
        z, kl = vae_fast.gaussian_sample_kl(mu, lv, eps=eps)
        return (kl - vae_fast.bernoulli_log_prob(decoder(z), x)).mean()

    compiled = torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    got = compiled(mu, lv)
    got_grads = torch.autograd.grad(got, (mu, lv))
    for name in ("latent_forward", "latent_backward", "elementwise_log_prob"):
        assert f"vae_fast.{name}_traced.default" in targets, name
        assert f"vae_fast.{name}.default" not in targets, name
    want = loss(mu, lv)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, torch.autograd.grad(want, (mu, lv))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["inputs without grad", "no_grad", "inference_mode"])
def test_compiled_evaluation_without_gradients(mode):
    # evaluation of a compiled model: no input requires grad, or grad mode is off. Dynamo then inlines each
    # autograd.Function's forward and drops the ctx it prepends only if every forward parameter is passed: the fused
    # head (called with its trailing defaults left out) raised an InternalTorchDynamoError
    gen = torch.Generator().manual_seed(3)
    mu, lv = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    x = torch.rand(4, 6, generator=gen)
    h, weight = torch.randn(4, 2, 5, generator=gen), torch.randn(6, 5, generator=gen)
    target = torch.randint(0, 6, (4, 2), generator=gen)
    images, features = torch.rand(4, 3, 2, 2, generator=gen) * 2 - 1, torch.randn(4, 5, 2, 2, generator=gen)
    mixture_weight = torch.randn(30, 5, generator=gen)
    eps = torch.randn(4, 3, generator=gen)
    calls = {
        "latent": lambda: vae_fast.gaussian_sample_kl(mu, lv, eps=eps),
        "kl": lambda: vae_fast.gaussian_kl(mu, lv, mu * 0.5, lv * 0.5),
        "bernoulli": lambda: vae_fast.bernoulli_log_prob(x - 0.5, x),
        "gaussian, learned logvar": lambda: vae_fast.gaussian_log_prob(x, x * 0.9, torch.tensor(0.1)),
        "categorical": lambda: vae_fast.categorical_log_prob(h @ weight.t(), target),
        "mixture": lambda: vae_fast.dmol_packed_log_prob(images, torch.einsum("oc,bchw->bohw", mixture_weight, features)),
        "elbo": lambda: vae_fast.elbo(x, mu, lv, lambda z: z.repeat(1, 2), eps=eps).loss,
        "bernoulli head": lambda: vae_fast.linear_log_prob(h, weight, None, x.view(4, 1, 6).expand(4, 2, 6).round(),
                                                           likelihood="bernoulli"),
        "categorical head": lambda: vae_fast.linear_log_prob(h, weight, None, target, likelihood="categorical"),
        "mixture head": lambda: vae_fast.linear_log_prob(features, mixture_weight, None, images, likelihood="dmol",
                                                         channel_dim=1),
    }
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    for name, call in calls.items():
        torch._dynamo.reset()
        with context():
            got, want = torch.compile(call, fullgraph=True)(), call()
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            torch.testing.assert_close(a, b, msg=name)


def test_torch_compile_of_torch_func_transforms():
    # torch.compile of torch.func.grad / vmap over the ops: the transforms differentiate and batch the ops themselves
    # (a twin, which has no autograd of its own, gave a silently wrong gradient here; before the twins this raised)
    theta = torch.randn(4, 5, dtype=F64)
    x = torch.rand(4, 5, dtype=F64).round()

    def loss(t):
        return vae_fast.bernoulli_log_prob(t, x).sum()

    gradient = torch.func.grad(loss)
    torch.testing.assert_close(torch.compile(gradient, backend="aot_eager")(theta), gradient(theta))
    torch.testing.assert_close(torch.compile(gradient, backend="aot_eager")(theta), torch.sigmoid(-theta) - 1 + x)
    batched = vmap(lambda t: vae_fast.bernoulli_log_prob(t[None], x[:1]).sum())
    torch.testing.assert_close(torch.compile(batched, backend="aot_eager")(theta), batched(theta))


def test_traced_twins_match_their_ops():
    # each twin is its op's kernels and fake implementation under another name: same values, same fake shapes
    from torch._subclasses.fake_tensor import FakeTensorMode

    theta, x = torch.randn(4, 6), torch.rand(4, 6).round()
    args = (theta, x, None, 0, 1, True, False, -0.25)
    for got, want in zip(torch.ops.vae_fast.elementwise_log_prob_traced.default(*args),
                         torch.ops.vae_fast.elementwise_log_prob.default(*args)):
        torch.testing.assert_close(got, want)
    with FakeTensorMode() as mode:
        fake = (mode.from_tensor(theta), mode.from_tensor(x), *args[2:])
        shapes = [t.shape for t in torch.ops.vae_fast.elementwise_log_prob_traced.default(*fake)]
    assert shapes == [t.shape for t in torch.ops.vae_fast.elementwise_log_prob.default(*args)]


def test_meta_tensors_and_fake_tensor_mode(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device):
        mu = torch.randn(5, 3, device=device, requires_grad=True)
        lv = torch.randn(5, 3, device=device, requires_grad=True)
        x = torch.rand(5, 8, device=device)
        out = vae_fast.elbo(x, mu, lv, lambda z: z.repeat(1, 3)[:, :8], prior_mu=torch.zeros(3, device=device))
        out.loss.backward()
        cat = vae_fast.categorical_log_prob(torch.randn(5, 8, 4, device=device), torch.zeros(5, 8, dtype=torch.long,
                                                                                             device=device))
        gauss = vae_fast.gaussian_log_prob(torch.randn(5, 8, device=device), x, torch.zeros(8, device=device))
        img = torch.zeros(5, 1, 2, 2, device=device)
        dm = vae_fast.dmol_packed_log_prob(img, torch.randn(5, 6, 2, 2, device=device))
        return out.loss.shape, out.kl.shape, out.z.shape, mu.grad.shape, cat.shape, gauss.shape, dm.shape

    expected = ((), (5,), (5, 3), (5, 3), (5,), (5,), (5,))
    assert run("meta") == expected
    with FakeTensorMode():
        assert run(backend) == expected


# --------------------------------------------------------------------------------------------
# gradients w.r.t. x; learned variance with any requires_grad pattern
# --------------------------------------------------------------------------------------------


def test_gradients_with_respect_to_x_where_the_density_is_differentiable(backend):
    for name, fn, theta, x in _elementwise_cases(backend):
        x = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda xx: fn(theta, xx), (x,)), name
        both = theta.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, xx: fn(t, xx), (both, x)), name
        # K decoder samples share x: its gradient sums over them
        theta_k = torch.stack([theta, theta * 0.5])
        assert torch.autograd.gradcheck(lambda xx: fn(theta_k, xx), (x,)), name
    x_img, params = _dmol_args(backend)
    with pytest.raises(ValueError, match="x is treated as data"):
        vae_fast.dmol_packed_log_prob(x_img.requires_grad_(), params)


@pytest.mark.parametrize("pattern", ["mean", "logvar", "neither", "both", "no_grad"])
def test_gaussian_learned_variance_with_any_requires_grad_pattern(backend, pattern):
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 6, generator=gen, dtype=F64).to(backend).requires_grad_(pattern in ("mean", "both", "no_grad"))
    logvar = torch.tensor(0.3, dtype=F64, device=backend).requires_grad_(pattern in ("logvar", "both", "no_grad"))
    x = torch.randn(4, 6, generator=gen, dtype=F64).to(backend)
    expected = ref.gaussian_log_prob(mean.detach(), x, logvar.detach())
    if pattern == "no_grad":
        with torch.no_grad():
            got = vae_fast.gaussian_log_prob(mean, x, logvar)
        assert not got.requires_grad
    else:
        got = vae_fast.gaussian_log_prob(mean, x, logvar)
    assert_matches_reference(got, expected, F64, terms=6)
    if pattern in ("mean", "logvar", "both"):
        wanted = [t for t in (mean, logvar) if t.requires_grad]
        assert torch.autograd.gradcheck(lambda *ts: vae_fast.gaussian_log_prob(
            ts[0] if mean.requires_grad else mean, x, ts[-1] if logvar.requires_grad else logvar), tuple(wanted))
    # the evaluation recipes that used to crash on the C++ backend
    with torch.no_grad():
        vae_fast.iwae_bound(x, torch.zeros(4, 2, dtype=F64, device=backend), torch.zeros(4, 2, dtype=F64, device=backend),
                            lambda z: (z.sum(-1, keepdim=True).expand(*z.shape[:-1], 6), logvar), likelihood="gaussian",
                            k=3)


# --------------------------------------------------------------------------------------------
# narrow learned priors (hierarchical VAEs): the prior side of the KL is overflow-safe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_logvar", [-100.0, -90.0, -60.0])
def test_kl_is_finite_and_accurate_against_narrow_priors_in_float32(kernel_backend, prior_logvar):
    dev = kernel_backend
    plv = torch.full((3, 4), prior_logvar, device=dev, requires_grad=True)
    pm = torch.zeros(3, 4, device=dev, requires_grad=True)
    # q = p exactly: KL 0 with zero gradients (was NaN: 0 * e^100 overflowed)
    mu = torch.zeros(3, 4, device=dev, requires_grad=True)
    lv = torch.full((3, 4), prior_logvar, device=dev, requires_grad=True)
    kl = vae_fast.gaussian_kl(mu, lv, pm, plv)
    assert torch.equal(kl, torch.zeros_like(kl))
    kl.sum().backward()
    for t in (mu, lv, pm, plv):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max() == 0
    # q close to p: a large but representable KL, accurate to float32 rounding
    offset = math.exp(0.5 * prior_logvar) * 1e3  # 1000 prior standard deviations
    mu2 = torch.full((3, 4), offset, device=dev, requires_grad=True)
    kl2 = vae_fast.gaussian_kl(mu2, lv.detach(), pm, plv.detach())
    expected = ref.gaussian_kl(mu2.double().detach(), lv.double().detach(), pm.double().detach(),
                               plv.double().detach())
    assert torch.isfinite(kl2).all()
    torch.testing.assert_close(kl2.double(), expected, rtol=1e-5, atol=0)
    kl2.sum().backward()
    assert torch.isfinite(mu2.grad).all() and torch.isfinite(pm.grad).all()
    # the sample path (log q - log p of each sample, IWAE) too
    z, kl3, _, log_ratio = vae_fast.functional.latent._latent(mu.detach(), lv.detach(), pm.detach(), plv.detach(),
                                                             "logvar", None, None, 2, False, want_log_ratio=True)
    assert torch.isfinite(kl3).all() and torch.isfinite(log_ratio).all()


# --------------------------------------------------------------------------------------------
# API hygiene, settings, codes, backend contract
# --------------------------------------------------------------------------------------------


def test_public_signatures_have_no_underscore_parameters():
    for name in vae_fast.__all__:
        obj = getattr(vae_fast, name)
        targets = [obj] if callable(obj) and not inspect.isclass(obj) else []
        if inspect.isclass(obj):
            targets = [getattr(obj, m) for m in ("__init__", "forward", "__call__") if m in vars(obj)]
        for fn in targets:
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            private = [p for p in params if p.startswith("_")]
            assert not private, f"vae_fast.{name} has private parameters {private}"


def test_settings_are_per_thread_context_managers():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other_thread():
        inside.wait()
        seen["backend"] = vae_fast.backend("cpu")
        seen["validate"] = vae_fast.config.VALIDATE_ARGS.get()
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    default = vae_fast.backend("cpu")
    with vae_fast.use_backend("reference"), vae_fast.validate_args(False):
        assert vae_fast.backend("cpu") == "reference"
        # settings are read without the contextvar while no override is active anywhere
        assert vae_fast.config._Setting.active_overrides == 2
        inside.set()
        release.wait(10)
    thread.join(10)
    assert seen == {"backend": default, "validate": True}
    assert vae_fast.backend("cpu") == default
    assert vae_fast.config._Setting.active_overrides == 0
    with pytest.raises(RuntimeError, match="left by an exception"):
        with vae_fast.validate_args(False):
            assert vae_fast.config.VALIDATE_ARGS.get() is False
            raise RuntimeError("left by an exception")
    assert vae_fast.config._Setting.active_overrides == 0 and vae_fast.config.VALIDATE_ARGS.get() is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        vae_fast.validate_args("no")


def test_deferred_support_check_raises_on_a_later_call_without_waiting():
    class Event:  # stands in for torch.cuda.Event
        def __init__(self):
            self.done = False

        def record(self):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    events = []

    def make_event():
        events.append(Event())
        return events[-1]

    checks = DeferredChecks(make_event=make_event, copy_to_host=lambda t: t.clone())
    checks.add(torch.tensor(0), "first")
    checks.add(torch.tensor(2), "x must lie in [0, 1]")  # not complete yet: nothing raised, nothing waited for
    assert len(checks.pending) == 2
    events[0].done = True
    checks.add(torch.tensor(0), "third")  # the first one completed with 0: fine
    events[1].done = True
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*deferred.*call 2"):
        checks.add(torch.tensor(0), "fourth")
    checks.add(torch.tensor(1), "fifth")
    with pytest.raises(ValueError, match="fifth"):
        checks.raise_completed(wait=True)  # what vae_fast.check_pending_errors() does
    # per-row / per-block counts as the Triton kernels write them (no reduction launched)
    checks.add(torch.zeros(4, 3, dtype=torch.int32), "sixth")
    checks.add(torch.tensor([0, 0, 1, 0], dtype=torch.int32), "seventh")
    with pytest.raises(ValueError, match="seventh"):
        checks.raise_completed(wait=True)
    vae_fast.check_pending_errors()  # nothing pending on CPU: a no-op


@pytest.mark.parametrize("counts", [3, torch.tensor(3), torch.tensor([0, 3, 0], dtype=torch.int32),
                                    torch.tensor([[0, 0], [0, 1]], dtype=torch.int32)])
def test_support_counts_of_any_form_raise_and_become_the_schema_count(counts):
    """The kernels' out-of-support counts: an int (C++), 0-d, per row or per block (Triton). The eager
    check reads any of them; the registered op reduces them to the schema's 0-d int64 count."""
    from vae_fast._validation import raise_if_invalid
    from vae_fast.ops._library import _schema_output

    with pytest.raises(ValueError, match="bad x"):
        raise_if_invalid(counts, "bad x")
    zero = counts * 0
    raise_if_invalid(zero, "bad x")
    first = torch.zeros(2)
    schema = _schema_output(first, counts)
    assert schema.dim() == 0 and schema.dtype == torch.int64 and int(schema) == (3 if not isinstance(counts, torch.Tensor)
                                                                                 or counts.dim() < 2 else 1)


def test_codes_match_the_cpp_enums():
    header = (Path(__file__).resolve().parents[1] / "csrc" / "kernels.h").read_text()
    from vae_fast.ops.codes import Likelihood, ScaleParam, TargetDtype

    for enum_type, cpp_name in ((ScaleParam, "ScaleParam"), (Likelihood, "Likelihood"), (TargetDtype, "TargetDtype")):
        body = re.search(rf"enum class {cpp_name} : int \{{([^}}]*)\}}", header).group(1)
        # kLogVar <-> LOGVAR, kContinuousBernoulli <-> CONTINUOUS_BERNOULLI
        cpp = {k.strip()[1:].lower(): int(v) for k, v in (item.split("=") for item in body.split(","))}
        assert cpp == {m.name.lower().replace("_", ""): m.value for m in enum_type}, cpp_name


def test_every_backend_satisfies_the_kernel_protocol():
    from vae_fast import _backend, kernels

    names = ["reference"] + (["cpu"] if _backend._cpu_ext is not None else []) + \
        (["triton"] if _backend._triton_available() else [])
    members = [m for m in vars(protocol.KernelBackend) if not m.startswith("_")]
    for name in names:
        module = kernels.get(name)
        assert isinstance(module, protocol.KernelBackend), name
        for member in members:
            want = list(inspect.signature(getattr(protocol.KernelBackend, member)).parameters)[1:]
            assert list(inspect.signature(getattr(module, member)).parameters) == want, (name, member)


def test_the_ops_themselves_vmap_like_the_public_functions(backend):
    # torch.ops.vae_fast.* carry the same vmap rule as the public functions' autograd.Functions
    theta = torch.randn(3, 2, 5, dtype=F64, device=backend)
    x = torch.rand(3, 2, 5, dtype=F64, device=backend)
    op = torch.ops.vae_fast.elementwise_log_prob.default
    batched = vmap(lambda t, xx: op(t, xx, None, 0, 1, False, False)[0])(theta, x)
    torch.testing.assert_close(batched, torch.stack([op(theta[i], x[i], None, 0, 1, False, False)[0] for i in range(3)]))
    torch.testing.assert_close(batched, ref.bernoulli_log_prob(theta.reshape(6, 5), x.reshape(6, 5)).reshape(3, 2))


def test_plain_eager_calls_skip_the_dispatcher_and_dispatch_modes_see_the_ops():
    # plain eager calls go straight to the op's kernel (ops/_autograd.py fast_apply); with a dispatch mode
    # active (FlopCounterMode, a user's TorchDispatchMode) the calls go through torch.ops.vae_fast, forward
    # and backward, so the mode sees them
    from torch.profiler import profile
    mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    logits, x = torch.randn(4, 5, requires_grad=True), torch.rand(4, 5).round()

    def step():
        z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
        (z.sum() + kl.sum() - vae_fast.bernoulli_log_prob(logits, x).sum()).backward()

    with profile() as prof:
        step()
    assert not [e.name for e in prof.events() if e.name.startswith("vae_fast::")]
    with OpRecorder() as recorder:
        step()
    assert {"vae_fast::latent_forward", "vae_fast::latent_backward", "vae_fast::elementwise_log_prob"} <= \
        set(recorder.ops)
