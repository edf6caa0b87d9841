"""Shared fixtures: every kernel test runs on each available backend and is compared
with vae_fast.reference evaluated in float64.

Without CUDA, Triton kernels run on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1 must be set before triton compiles anything, hence here).
"""
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import vae_fast  # noqa: E402
from vae_fast import _backend  # noqa: E402

CUDA = torch.cuda.is_available()

# Property tests: a bounded number of examples by default (CI budget); run
# `pytest --hypothesis-profile=thorough` for a long fuzzing session.
settings.register_profile("default", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile("default")


def backend_cases():
    """(backend, device) pairs this machine can run."""
    cases = [("reference", "cpu")]
    if _backend._cpu_ext is not None:
        cases.append(("cpu", "cpu"))
    if _backend._triton_available():
        cases.append(("triton", "cuda" if CUDA else "cpu"))
    return cases


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def backend(request):
    """Yields the device to put tensors on, with the backend forced for the test."""
    name, device = request.param
    with vae_fast.use_backend(name):
        yield device


@pytest.fixture(params=[c for c in backend_cases() if c[0] != "reference"], ids=lambda c: f"{c[0]}-{c[1]}")
def kernel_backend(request):
    """Like ``backend`` but only the compiled kernels (C++, Triton)."""
    name, device = request.param
    with vae_fast.use_backend(name):
        yield device


# Tolerance policy (enforced by assert_matches_reference): results are compared with the
# float64 reference after summing over the event dims. float64 kernels must agree to
# 1e-10 relative (plus 1e-10 absolute per summed element); float32 to 2e-5 relative plus
# 2e-6 absolute per summed element; float16/bfloat16 outputs to their rounding (1e-2 / 2e-2).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def thread_counts(counts=(1, 2, 3)):
    """Yields each of ``counts`` with torch's intra-op thread count (the C++ kernels' OpenMP team) set to it; the
    previous count is restored when the loop ends, however it ends."""
    previous = torch.get_num_threads()
    try:
        for count in counts:
            torch.set_num_threads(count)
            yield count
    finally:
        torch.set_num_threads(previous)


def assert_matches_reference(actual, expected, dtype, terms=1, what=""):
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any() or torch.isnan(expected).any(), f"{what}: NaN in result"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(terms, 1), equal_nan=True, msg=lambda m: f"{what}: {m}")


class OpRecorder(TorchDispatchMode):
    """A dispatch mode (``with OpRecorder() as mode``) recording the names of the ops that reach the
    dispatcher in ``mode.ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))
