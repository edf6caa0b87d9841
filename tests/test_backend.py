"""Backend selection, the reference fallback when vae_fast._C is missing, and the wheel."""
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import vae_fast

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "VAE_FAST_BACKEND"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def test_default_backends():
    assert vae_fast.backend("cpu") == "cpu"
    assert vae_fast.backend("cuda") in ("triton", "reference")
    with vae_fast.use_backend("reference"):
        assert vae_fast.backend("cpu") == "reference"
    with pytest.raises(ValueError, match="backend name must be one of"):
        with vae_fast.use_backend("numpy"):
            pass


def test_missing_extension_falls_back_to_reference_with_one_warning():
    result = run_python("""
        import sys, warnings
        sys.modules["vae_fast._C"] = None  # makes `from . import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vae_fast
        messages = [str(w.message) for w in caught if "vae_fast" in str(w.message)]
        assert len(messages) == 1 and "could not be imported" in messages[0], messages
        assert vae_fast.backend("cpu") == "reference"
        import torch
        from vae_fast import reference as ref
        mu, lv = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
        torch.testing.assert_close(vae_fast.gaussian_kl(mu, lv), ref.gaussian_kl(mu, lv))
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_forcing_a_missing_backend_raises_import_error_that_says_why():
    result = run_python("""
        import sys
        sys.modules["vae_fast._C"] = None
        import vae_fast
    """, {"VAE_FAST_BACKEND": "cpu"})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "vae_fast._C failed to import" in result.stderr


def test_environment_variable_forces_and_validates_the_backend():
    ok = run_python("import vae_fast; print(vae_fast.backend('cpu'))", {"VAE_FAST_BACKEND": "reference"})
    assert ok.returncode == 0 and ok.stdout.strip() == "reference"
    bad = run_python("import vae_fast", {"VAE_FAST_BACKEND": "fortran"})
    assert bad.returncode != 0 and "VAE_FAST_BACKEND must be one of" in bad.stderr


def test_triton_backend_on_cpu_tensors_needs_the_interpreter():
    result = run_python("""
        import torch, vae_fast
        try:
            vae_fast.gaussian_kl(torch.zeros(2, 2), torch.zeros(2, 2))
        except RuntimeError as e:
            print("raised", e)
    """, {"VAE_FAST_BACKEND": "triton", "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


@pytest.mark.slow
def test_manylinux_wheel_of_this_python_has_no_openmp_runtime_and_passes_the_smoke_test(tmp_path):
    # what `make wheels` does for one interpreter, then `auditwheel show` and packaging/smoke_test.py
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "VAE_FAST_PYTHONS": version, "VAE_FAST_DIST": str(tmp_path), "VAE_FAST_NO_SDIST": "1",
           "VAE_FAST_TOOLS_PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "packaging" / "build_wheels.sh")], check=True, timeout=900, env=env, cwd=ROOT)
    wheels = list(tmp_path.glob("vae_fast-*manylinux_2_28_x86_64.whl"))
    assert len(wheels) == 1, list(tmp_path.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("vae_fast/_C") and n.endswith(".so") for n in names), names
    assert not [n for n in names if "gomp" in n or "omp" in n.rsplit("/", 1)[-1]], names  # no OpenMP runtime inside
    assert "vae_fast/functional/objectives.py" in names
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheels[0])], capture_output=True, text=True,
                          check=True)
    print(show.stdout)
    assert "manylinux_2_28_x86_64" in show.stdout.replace("\n", " ")
    smoke = subprocess.run([sys.executable, str(ROOT / "packaging" / "smoke_test.py"), str(wheels[0])],
                           capture_output=True, text=True, timeout=1500)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "smoke test passed" in smoke.stdout


def test_extension_without_an_openmp_runtime_fails_to_import_with_a_clear_error():
    # vae_fast._C shares torch's OpenMP runtime: loaded in a process without one (no torch), the
    # import fails naming the missing symbol (-z now) instead of crashing at the first kernel call
    so = next((ROOT / "vae_fast").glob("_C*.so"), None)
    if so is None:
        pytest.skip("needs the built extension")
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("vae_fast._C", {str(so)!r})
        try:
            importlib.util.module_from_spec(spec)
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert result.returncode == 0, result.stderr
    assert "ImportError" in result.stdout and ("GOMP_" in result.stdout or "omp_" in result.stdout), result.stdout


needs_extension = pytest.mark.skipif(vae_fast._backend._cpu_ext is None, reason="needs the C++ extension")


@needs_extension
def test_large_outputs_come_from_the_buffer_cache_and_behave_like_torch_tensors():
    # 1024 x 1024 float32 = 4 MiB: the likelihood's gradient buffer is pooled
    from vae_fast import reference as ref

    C = vae_fast._backend._cpu_ext
    vae_fast.release_buffer_cache()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1024, 1024, generator=gen, requires_grad=True)
    x = torch.rand(1024, 1024, generator=gen)
    expected = torch.autograd.grad(-ref.bernoulli_log_prob(logits.double(), x.double()).mean(), logits)[0].double()
    with vae_fast.use_backend("cpu"):
        for _ in range(2):  # two backward passes accumulate into the (pooled) .grad
            (-vae_fast.bernoulli_log_prob(logits, x).mean()).backward()
        torch.testing.assert_close(logits.grad.double(), 2 * expected, rtol=1e-5, atol=1e-9)
        logits.grad.zero_()  # in-place ops on a pooled tensor
        (-vae_fast.bernoulli_log_prob(logits, x).mean()).backward()
        torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-9)
        logits.grad = None  # freed: back to the cache, not to the OS
        cached = vae_fast.buffer_cache_bytes()
        assert cached >= 4 << 20
        (-vae_fast.bernoulli_log_prob(logits, x).mean()).backward()
        assert vae_fast.buffer_cache_bytes() == cached - (4 << 20)  # the new gradient reuses a cached buffer
        logits.grad = None
    vae_fast.release_buffer_cache()
    assert vae_fast.buffer_cache_bytes() == 0
    try:
        vae_fast.set_buffer_cache_limit(0)
        C.pooled_tensor(0, [1024, 1024])  # an unconsumed capsule still returns its buffer
        assert vae_fast.buffer_cache_bytes() == 0  # ... straight to the OS with a zero limit
    finally:
        vae_fast.set_buffer_cache_limit(1 << 30)
    assert torch.from_dlpack(C.pooled_tensor(1, [3, 5])).shape == (3, 5)
    with pytest.raises(ValueError, match="negative size"):
        C.pooled_tensor(0, [2, -1])
    with pytest.raises(ValueError, match="dtype code"):
        C.pooled_tensor(3, [2])
    with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
        vae_fast.set_buffer_cache_limit(-1)


@needs_extension
def test_buffer_cache_limit_from_the_environment():
    ok = run_python("import vae_fast; print(vae_fast._backend._cpu_ext.buffer_cache_limit())",
                    {"VAE_FAST_BUFFER_CACHE_MB": "3"})
    assert ok.returncode == 0 and ok.stdout.strip() == str(3 << 20), ok.stderr
    bad = run_python("import vae_fast", {"VAE_FAST_BUFFER_CACHE_MB": "lots"})
    assert bad.returncode != 0 and "VAE_FAST_BUFFER_CACHE_MB must be a non-negative integer" in bad.stderr


@needs_extension
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_buffer_cache_works_in_a_forked_child():
    # DataLoader workers fork: a child must be able to use (and refill) the inherited cache
    logits = torch.randn(1024, 1024)
    x = torch.rand(1024, 1024)
    with vae_fast.use_backend("cpu"):
        logits.requires_grad_()
        (-vae_fast.bernoulli_log_prob(logits, x).mean()).backward()
        logits.grad = None  # a 4 MiB buffer now sits in the cache
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                torch.set_num_threads(1)  # OpenMP thread pools do not survive fork
                (-vae_fast.bernoulli_log_prob(logits, x).mean()).backward()
                code = 0 if torch.isfinite(logits.grad).all() else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_ISA_CHECK = textwrap.dedent("""
    import torch, vae_fast
    from vae_fast import reference as ref
    from vae_fast.kernels import cpu
    print(cpu._C.isa())
    g = torch.Generator().manual_seed(0)
    F64 = torch.float64
    with vae_fast.use_backend("cpu"):
        for dtype, tol in ((F64, 1e-10), (torch.float32, 2e-5)):
            mu = torch.randn(37, 19, generator=g, dtype=F64)
            lv = torch.randn(37, 19, generator=g, dtype=F64)
            eps = torch.randn(37, 19, generator=g, dtype=F64)
            z, kl = vae_fast.gaussian_sample_kl(mu.to(dtype), lv.to(dtype), eps=eps.to(dtype))
            torch.testing.assert_close(kl.double(), ref.gaussian_kl(mu, lv), rtol=tol, atol=tol * 19)
            torch.testing.assert_close(z.double(), ref.reparameterize(mu, lv, eps), rtol=tol, atol=tol)
            torch.manual_seed(3)  # the in-kernel Philox noise (drawn in float32): mu = 0, sigma = 1 gives it
            z, _ = vae_fast.gaussian_sample_kl(torch.zeros(37, 19, dtype=dtype), torch.zeros(37, 19, dtype=dtype))
            torch.manual_seed(3)
            noise = ref.latent_noise(torch.randint(2**62, ()).item(), 1, 37, 19)[0]
            torch.testing.assert_close(z.double(), noise, rtol=0, atol=2e-6)
            logits = torch.randn(37, 53, generator=g, dtype=F64) * 4
            x = torch.rand(37, 53, generator=g, dtype=F64)
            for public, oracle in ((vae_fast.bernoulli_log_prob, ref.bernoulli_log_prob),
                                   (vae_fast.continuous_bernoulli_log_prob, ref.continuous_bernoulli_log_prob),
                                   (vae_fast.gaussian_log_prob, ref.gaussian_log_prob),
                                   (vae_fast.laplace_log_prob, ref.laplace_log_prob)):
                torch.testing.assert_close(public(logits.to(dtype), x.to(dtype)).double(), oracle(logits, x),
                                           rtol=tol * 10, atol=tol * 53)
            images = torch.rand(2, 3, 4, 5, generator=g, dtype=F64) * 2 - 1
            images = torch.round((images + 1) * 127.5) / 127.5 - 1
            params = torch.randn(2, 10 * 3, 4, 5, generator=g, dtype=F64)
            got = vae_fast.dmol_packed_log_prob(images.to(dtype), params.to(dtype), 3)
            want = ref.discretized_logistic_mixture_log_prob(images, *vae_fast.dmol_from_packed(params, 3, 3))
            torch.testing.assert_close(got.double(), want, rtol=tol * 100, atol=tol * 100)
""")


@pytest.mark.skipif(vae_fast._backend._cpu_ext is None, reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set_build_matches_the_reference(isa):
    # the extension holds one kernel build per instruction set and runs the CPU's best; VAE_FAST_ISA selects a
    # lower one, so that each build is tested on this machine (and can be compared in benchmarks)
    result = subprocess.run([sys.executable, "-c", _ISA_CHECK], env={**os.environ, "VAE_FAST_ISA": isa},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    active = result.stdout.split()[0]
    assert active == isa or (isa == "avx2" and active == "baseline"), active  # (a CPU without AVX2 runs baseline)
