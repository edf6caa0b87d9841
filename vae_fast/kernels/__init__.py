"""Kernel backends. Each module satisfies :class:`vae_fast.kernels.protocol.KernelBackend`
(latent forward/backward, elementwise, categorical and logistic-mixture log-likelihoods on
inputs prepared by :mod:`vae_fast.ops`)."""
import importlib

_MODULES = {"cpu": "vae_fast.kernels.cpu", "triton": "vae_fast.kernels.triton", "reference": "vae_fast.kernels.reference"}
_loaded = {}


def get(name: str):
    """The kernel module of backend ``name`` (imported on first use)."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module
