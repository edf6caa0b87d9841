"""Kernel backends. Each module implements the same four functions on prepared inputs
(see :mod:`vae_fast.ops`): ``latent_forward``, ``latent_backward``,
``elementwise_log_prob`` and ``categorical_log_prob``."""
import importlib

_MODULES = {"cpu": "vae_fast.kernels.cpu", "triton": "vae_fast.kernels.triton", "reference": "vae_fast.kernels.reference"}
_loaded = {}


def get(name: str):
    """The kernel module of backend ``name`` (imported on first use)."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module
