"""Kernel launches per op and direction, counted under the Triton interpreter.

On a GPU each Triton kernel and each torch op that computes or fills memory is one launch; a
small training step is launch-bound, so the ops' launch counts are part of their contract.
Counted here without a GPU: Triton launches through the backend's launcher, torch ops through a
``TorchFunctionMode`` (Python-level calls; calls made inside a Triton kernel's interpretation,
and ops that only allocate or reshape, do not count)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vae_fast
from vae_fast import _backend

pytestmark = pytest.mark.skipif(not _backend._triton_available() or torch.cuda.is_available(),
                                reason="counts launches under the Triton interpreter (CPU tensors)")

# calls that allocate, view or inspect: no kernel on a GPU
_NO_LAUNCH = {"view", "reshape", "expand", "unsqueeze", "squeeze", "select", "t", "transpose", "permute", "detach",
              "new_empty", "empty", "empty_like", "size", "stride", "dim", "numel", "data_ptr", "is_contiguous",
              "__get__", "storage_offset", "untyped_storage", "set_", "element_size", "chunk", "split", "flatten",
              "is_floating_point", "is_complex", "requires_grad_", "__getitem__", "__len__", "__bool__",
              "sum_to_size", "backward", "__int__", "tolist"}  # (tolist, __int__: host reads of CPU tensors)
# calls that copy only when the layout or dtype asks for it: count them when they did
_MAYBE_COPY = {"contiguous", "to", "reshape"}


class LaunchCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.launches = []
        self.inside_kernel = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if self.inside_kernel or name in _NO_LAUNCH and name not in _MAYBE_COPY:
            return out
        if name in _MAYBE_COPY:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if source is None or not isinstance(out, torch.Tensor) or out.data_ptr() == source.data_ptr():
                return out
        self.launches.append(name)
        return out


class AtenLaunchCounter(TorchDispatchMode):
    """The same count at the aten level, for backward passes (the autograd engine runs backward
    functions outside Python torch-function modes, but inside dispatch modes)."""

    _NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "expand",
                  "as_strided", "detach", "alias", "t", "transpose", "permute", "squeeze", "unsqueeze", "select",
                  "slice", "_reshape_alias", "set_", "lift_fresh", "split", "chunk", "unbind", "_local_scalar_dense"}

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # vae_fast's own ops are seen here as dispatcher calls; their kernels are counted by the launcher hook
        if not self.counter.inside_kernel and name not in self._NO_LAUNCH and func.namespace != "vae_fast":
            self.counter.launches.append(name)
        return out


@pytest.fixture
def counter(monkeypatch):
    import vae_fast.kernels.triton as tri

    counter = LaunchCounter()
    original = tri._FixedConfig.__getitem__

    def launch(self, grid):
        run = original(self, grid)

        def counted(*args, **kwargs):
            counter.launches.append(self.fn.__name__)
            counter.inside_kernel = True
            try:
                return run(*args, **kwargs)
            finally:
                counter.inside_kernel = False
        return counted

    monkeypatch.setattr(tri._FixedConfig, "__getitem__", launch)
    with vae_fast.use_backend("triton"):
        yield counter


def _count(counter, fn, warm_up=True, backward=False):
    """(fn's result, the launches it made): Python-level torch calls, or aten ops for a backward pass."""
    if warm_up:  # steady state: the launcher's cached constants exist after the first call
        fn()
    counter.launches.clear()
    with (AtenLaunchCounter(counter) if backward else counter):
        out = fn()
    launches = list(counter.launches)
    counter.launches.clear()
    return out, launches


def test_latent_op_is_one_kernel_per_direction_plus_the_seed_draw(counter):
    mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    (z, kl), forward = _count(counter, lambda: vae_fast.gaussian_sample_kl(mu, logvar))
    assert forward == ["randint", "latent_forward_kernel"]
    grads = (torch.ones_like(z), torch.ones_like(kl))
    _, backward = _count(counter, lambda: torch.autograd.grad((z, kl), (mu, logvar), grads, retain_graph=True),
                         backward=True)
    assert backward == ["latent_backward_kernel"]
    # chunked moments: still no copy kernel
    moments = torch.randn(2, 8, 3, 3, requires_grad=True)
    _, forward = _count(counter, lambda: vae_fast.gaussian_kl(*moments.chunk(2, dim=1), dim=(1, 2, 3)))
    assert forward == ["latent_forward_kernel"]


def test_bernoulli_op_is_one_kernel_forward_and_one_pass_backward(counter):
    logits, x = torch.randn(4, 6, requires_grad=True), torch.rand(4, 6)
    log_prob, forward = _count(counter, lambda: vae_fast.bernoulli_log_prob(logits, x))
    # the kernel only: its per-row support counts reach the host unreduced (on CUDA by one non-blocking
    # copy, no reduction kernel; on CPU tensors by a host read)
    assert forward == ["elementwise_kernel"]
    # an upstream gradient other than the expected one: one fused rescaling pass (addcmul)
    upstream = torch.full_like(log_prob, 0.5)
    _, backward = _count(counter, lambda: torch.autograd.grad(log_prob, logits, upstream, retain_graph=True),
                         backward=True)
    assert backward == ["addcmul"]
    # the upstream it expects (a mean NLL loss, -1/B per row): no pass at all on CPU above 16K elements
    # (a host check); on CUDA, where that check would sync, the same single rescaling pass


def test_elbo_step_launches(counter):
    """elbo forward: seed, latent kernel, decoder (the user's matmul), likelihood kernel,
    the loss assembly (sub, mean) and the reported elbo (sub); backward: the mean's and the sub's
    gradient nodes are torch's own, the ops' are one kernel (latent) and one rescale (likelihood, whose
    upstream -1/B arrives exactly as expected: on CPU no pass at all beyond 16K elements)."""
    torch.manual_seed(0)
    x = torch.rand(4, 6)
    mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(3, 6, requires_grad=True)
    out, forward = _count(counter, lambda: vae_fast.elbo(x, mu, logvar, lambda z: z @ weight))
    assert forward == ["randint", "latent_forward_kernel", "matmul", "elementwise_kernel", "sub", "mean", "sub"]
    _, backward = _count(counter, lambda: torch.autograd.grad(out.loss, (mu, logvar, weight), retain_graph=True),
                         backward=True)
    kernels = [name for name in backward if name.endswith("_kernel")]
    assert kernels == ["latent_backward_kernel"]
    # torch's own nodes (mean, sub, the decoder's matmul) plus one rescale of the likelihood gradient
    assert backward.count("addcmul") == 1


def test_mse_and_learned_scalar_variances_are_one_kernel_forward(counter):
    mean, x = torch.randn(4, 6, requires_grad=True), torch.rand(4, 6)
    # the mean squared error's 1/D is applied inside the kernel: no division launch
    _, forward = _count(counter, lambda: vae_fast.mse_log_prob(mean, x))
    assert forward == ["elementwise_kernel"]
    # a learned scalar log-variance (LDM's): the kernel writes each row's d log p / d logvar (unscaled), so
    # backward takes one dot product of B values with the upstream gradient, not a (B, D) gradient
    logvar = torch.zeros((), requires_grad=True)
    log_prob, forward = _count(counter, lambda: vae_fast.gaussian_log_prob(mean, x, logvar))
    assert forward == ["elementwise_kernel"]
    upstream = torch.full_like(log_prob, 0.5)
    _, backward = _count(counter, lambda: torch.autograd.grad(log_prob, (mean, logvar), upstream, retain_graph=True),
                         backward=True)
    # the mean's gradient rescaled (one pass) and the scale's gradient as one dot product (it was a per-element
    # buffer, then B per-row values rescaled and summed: addcmul and sum)
    assert backward == ["addcmul", "dot"]


def test_long_rows_add_one_reduction_of_the_chunk_sums(counter, monkeypatch):
    # rows longer than a chunk (8192 elements on a GPU; 64 here) are split over several programs; their partial
    # sums take one reduction launch, rows of one chunk none (the tests above)
    import vae_fast.kernels.triton as tri

    monkeypatch.setattr(tri, "ROW_CHUNK", 64)
    mu, logvar = torch.randn(2, 200, requires_grad=True), torch.randn(2, 200, requires_grad=True)
    (z, kl), forward = _count(counter, lambda: vae_fast.gaussian_sample_kl(mu, logvar))
    assert forward == ["randint", "latent_forward_kernel", "sum"]
    grads = (torch.ones_like(z), torch.ones_like(kl))
    _, backward = _count(counter, lambda: torch.autograd.grad((z, kl), (mu, logvar), grads, retain_graph=True),
                         backward=True)
    assert backward == ["latent_backward_kernel"]  # (no sums: one program per chunk, nothing to add)
    logits, x = torch.randn(2, 200, requires_grad=True), torch.rand(2, 200)
    _, forward = _count(counter, lambda: vae_fast.bernoulli_log_prob(logits, x))
    assert forward == ["elementwise_kernel", "sum"]
