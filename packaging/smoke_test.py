"""Installs one vae_fast wheel into a fresh venv of its own CPython, with torch from the package
registry, and checks it the way a user would: import, the backend name, one fused ``elbo`` against
the float64 reference, one Triton-interpreter call, and that one OpenMP runtime is loaded.

    python packaging/smoke_test.py dist/vae_fast-0.1.0-cp312-cp312-manylinux_2_28_x86_64.whl
    VAE_FAST_SMOKE_TORCH=2.5.1 VAE_FAST_SMOKE_TRITON=0 python packaging/smoke_test.py WHEEL
        # another torch version, C++ backend only (torch 2.5's triton 3.1 interpreter cannot run
        # the kernels' loops over runtime bounds)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECK = r'''
import os, re
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
import vae_fast
from vae_fast import reference as ref

assert vae_fast.backend("cpu") == "cpu", f"C++ extension not used: backend {vae_fast.backend('cpu')!r}"
gen = torch.Generator().manual_seed(0)
x = torch.rand(64, 300, generator=gen, dtype=torch.float64).round()
mu = torch.randn(64, 16, generator=gen, dtype=torch.float64)
logvar = 0.3 * torch.randn(64, 16, generator=gen, dtype=torch.float64)
eps = torch.randn(64, 16, generator=gen, dtype=torch.float64)
w = torch.randn(16, 300, generator=gen, dtype=torch.float64)
z = mu + torch.exp(0.5 * logvar) * eps
expected = -(ref.bernoulli_log_prob(z @ w, x) - ref.gaussian_kl(mu, logvar)).mean()
torch.set_num_threads(2)
got = vae_fast.elbo(x, mu, logvar, lambda z: z @ w, eps=eps).loss
torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
big = torch.randn(2048, 1024)
vae_fast.bernoulli_log_prob(big, torch.rand(2048, 1024))  # large enough for an OpenMP region
runtimes = sorted({line.split()[-1] for line in open("/proc/self/maps") if re.search(r"lib(g|i)omp[^/]*\.so", line)})
assert len(runtimes) == 1, f"expected one OpenMP runtime, found {runtimes}"
try:
    if os.environ.get("VAE_FAST_SMOKE_TRITON", "1") != "1":
        raise ImportError("skipped")
    import triton  # noqa: F401
    with vae_fast.use_backend("triton"):
        tri = vae_fast.elbo(x[:4, :8], mu[:4, :2], logvar[:4, :2], lambda z: z @ w[:2, :8], eps=eps[:4, :2]).loss
    z4 = mu[:4, :2] + torch.exp(0.5 * logvar[:4, :2]) * eps[:4, :2]
    want = -(ref.bernoulli_log_prob(z4 @ w[:2, :8], x[:4, :8]) - ref.gaussian_kl(mu[:4, :2], logvar[:4, :2])).mean()
    torch.testing.assert_close(tri, want, rtol=1e-10, atol=1e-10)
    triton_note = f"triton {triton.__version__} interpreter ok"
except ImportError:
    triton_note = "Triton interpreter call skipped (triton not installed, or VAE_FAST_SMOKE_TRITON=0)"
print(f"smoke test passed: torch {torch.__version__}, vae_fast {vae_fast.__version__} from "
      f"{os.path.dirname(vae_fast.__file__)}, OpenMP runtime {runtimes[0]}, {triton_note}")
'''


def find_python(minor: str) -> str:
    candidates = [shutil.which(f"python{minor}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{minor}.*/bin/python{minor}"))
    for candidate in filter(None, candidates):
        out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == minor:
            return candidate
    raise SystemExit(f"smoke test: no CPython {minor} found for this wheel")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    wheel = Path(argv[0]).resolve()
    match = re.search(r"-cp3(\d+)-", wheel.name)
    if not wheel.is_file() or match is None:
        raise SystemExit(f"smoke test: {wheel} is not a CPython wheel file")
    python = find_python(f"3.{match.group(1)}")
    torch_spec = f"torch=={os.environ.get('VAE_FAST_SMOKE_TORCH', '2.13.0')}"
    with tempfile.TemporaryDirectory(prefix="vae_fast_smoke_") as tmp:
        env_dir = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(env_dir)], check=True)
        pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, torch_spec], check=True)
        subprocess.run([*pip, str(wheel)], check=True)
        if os.environ.get("VAE_FAST_SMOKE_TRITON", "1") == "1":
            subprocess.run([*pip, "triton"], check=True)
        # run outside the source tree, so the installed package is the one imported
        return subprocess.run([str(env_dir / "bin" / "python"), "-c", CHECK], cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
