"""Backend registry and selection.

Three backends serve the same ops:

* ``"triton"``: Triton kernels, for CUDA tensors (and for CPU tensors under
  ``TRITON_INTERPRET=1``, which is how CI exercises them);
* ``"cpu"``: the C++ extension ``vae_fast._C`` (vectorised, OpenMP);
* ``"reference"``: :mod:`vae_fast.reference` evaluated in float64 — always available.

``VAE_FAST_BACKEND=reference|cpu|triton`` forces one. An automatically chosen
backend that cannot load falls back to ``"reference"`` with one warning; an
explicitly requested one raises ``ImportError`` saying why.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings

import torch

from . import config

BACKENDS = ("reference", "cpu", "triton")

_cpu_ext = None
_cpu_error: str | None = None
try:
    from . import _C as _cpu_ext  # type: ignore[no-redef]
except ImportError as exc:  # pragma: no cover - exercised by the fallback test in a subprocess
    try:
        _built = importlib.util.find_spec(f"{__package__}._C") is not None
    except (ImportError, ValueError):
        _built = True
    if not _built:
        # Python's own message here ("partially initialized module ... circular import") misleads
        _cpu_error = "no compiled extension vae_fast/_C*.so was found (build it: pip install . or make test)"
    elif "GOMP_" in str(exc) or "omp_" in str(exc):
        _cpu_error = (f"{type(exc).__name__}: {exc}. vae_fast._C uses the OpenMP runtime that torch loads "
                      "(libgomp in torch's wheels); this torch build provides none: rebuild vae_fast with "
                      "-DVAE_FAST_LINK_OPENMP=ON (pip install . with CMAKE_ARGS) to bring its own")
    else:
        _cpu_error = f"{type(exc).__name__}: {exc}"

_triton_error: str | None = None
_triton_checked = False


def _triton_available() -> bool:
    global _triton_checked, _triton_error
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error is None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _validate_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _require(name: str) -> None:
    if name == "cpu" and _cpu_ext is None:
        raise ImportError(f"vae_fast backend 'cpu' was requested but vae_fast._C failed to import ({_cpu_error})")
    if name == "triton" and not _triton_available():
        raise ImportError(f"vae_fast backend 'triton' was requested but triton failed to import ({_triton_error})")


_env_backend = os.environ.get("VAE_FAST_BACKEND") or None
if _env_backend is not None:
    _require(_validate_name(_env_backend, "VAE_FAST_BACKEND"))
elif _cpu_ext is None:
    warnings.warn(
        f"vae_fast: the C++ extension vae_fast._C could not be imported ({_cpu_error}); "
        "CPU tensors use the (slow) reference backend.",
        RuntimeWarning,
        stacklevel=2,
    )

def backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend that serves tensors on ``device``.

    ``"triton"`` for CUDA, ``"cpu"`` (the C++ extension) for CPU, ``"reference"`` as
    the fallback; :func:`use_backend` or ``VAE_FAST_BACKEND`` override the choice.
    """
    forced = config.BACKEND.get() or _env_backend
    if forced is not None:
        return forced
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "triton" if _triton_available() else "reference"
    if device_type == "cpu" and _cpu_ext is not None:
        return "cpu"
    return "reference"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend (``"reference"``, ``"cpu"`` or ``"triton"``) for every device inside the
    ``with`` block (this thread / task only: see :mod:`vae_fast.config`)."""
    _require(_validate_name(name, "backend name"))
    with config.BACKEND.override(name):
        yield


def cpu_extension():
    """The loaded ``vae_fast._C`` module (raises ImportError if it failed to import)."""
    _require("cpu")
    return _cpu_ext


# ----------------------------------------------------------------------------------------
# The C++ backend's cache of large output buffers (csrc/buffer_pool.h)
# ----------------------------------------------------------------------------------------


def buffer_cache_bytes() -> int:
    """Bytes of freed kernel output buffers the CPU backend keeps for reuse (0 without the
    extension). Outputs of 4 MiB and more (gradients of decoder-sized tensors, z) come from
    this cache, so a training step does not fault in and zero them afresh."""
    return 0 if _cpu_ext is None else int(_cpu_ext.buffer_cache_bytes())


def set_buffer_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed output buffers for reuse (default 1 GiB; also
    ``VAE_FAST_BUFFER_CACHE_MB``); 0 returns every freed buffer to the OS at once. Releases the
    current cache."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if _cpu_ext is not None:
        _cpu_ext.set_buffer_cache_limit(nbytes)


def release_buffer_cache() -> None:
    """Return every cached (currently unused) output buffer to the OS, like
    ``torch.cuda.empty_cache()`` does for the CUDA caching allocator."""
    if _cpu_ext is not None:
        _cpu_ext.release_buffer_cache()


_cache_mb = os.environ.get("VAE_FAST_BUFFER_CACHE_MB")
if _cache_mb is not None:
    try:
        set_buffer_cache_limit(int(_cache_mb) << 20)
    except ValueError as exc:
        raise ValueError(f"VAE_FAST_BUFFER_CACHE_MB must be a non-negative integer (MiB), got {_cache_mb!r}") from exc
