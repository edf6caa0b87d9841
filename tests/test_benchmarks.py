"""The benchmark scripts import and handle their arguments without a GPU (they are run, not
tested for speed, elsewhere)."""
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_roofline_without_cuda_exits_with_a_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_roofline.py"), "--quick"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr


def test_gpu_roofline_arguments():
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_roofline

    args = gpu_roofline.parse_args(["--quick", "--out", "somewhere"])
    assert args.quick and args.out == "somewhere" and not args.no_compile
    with pytest.raises(SystemExit):
        gpu_roofline.parse_args(["--no-such-flag"])
    assert gpu_roofline.QUICK <= set(gpu_roofline.CASES) and gpu_roofline.COMPILE <= set(gpu_roofline.CASES)


def test_cpu_report_helpers_measure_something():
    sys.path.insert(0, str(ROOT))
    from benchmarks import impls
    from benchmarks.timing import saved_bytes, time_fwd_bwd

    inputs = impls.latent_inputs((8, 4), "cpu")
    assert time_fwd_bwd(impls.latent_fused, inputs, inputs[:2], budget_s=0.01) > 0
    # the fused latent op saves mu, logvar and the 8-byte seed; eager saves more
    assert saved_bytes(impls.latent_fused, inputs) < saved_bytes(impls.latent_eager, inputs)


@pytest.mark.parametrize("op,shape", [("latent", (8, 4)), ("bernoulli", (4, 6)), ("categorical", (2, 3, 2, 2, 5)),
                                      ("elbo_loss", (4, 3, 6)), ("dmol", (2, 3, 2, 2, 2))])
def test_gpu_roofline_cases_run_at_small_shapes_on_cpu(op, shape):
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_roofline
    from benchmarks.timing import fwd_bwd_step

    assert op in {o for o, _ in gpu_roofline.CASES}
    inputs, fns, nbytes = gpu_roofline.make_case(op, shape, "cpu")
    assert nbytes > 0 or op == "elbo_loss"
    values = {name: fn(*inputs) for name, fn in fns.items()}
    for value in values.values():  # the same loss (up to the noise draws of the latent ops)
        if op in ("latent", "elbo_loss"):
            assert torch.isfinite(value)
            continue
        torch.testing.assert_close(value, values["eager"], rtol=1e-4, atol=1e-3 * abs(values["eager"].item()))
    fwd_bwd_step(fns["vae_fast"], inputs)()


def test_step_benchmark_models_train_with_every_loss():
    """Every model of benchmarks/bench_steps.py takes one training step with its eager, fused and
    network-only losses (finite losses; the two ELBOs reach every parameter), and the step timer alternates."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_steps

    for name, factory, x, losses, batch in bench_steps.model_cases(quick=False):
        for kind, loss_fn in zip(("eager", "fused", "network only"), losses):
            torch.manual_seed(0)
            model = factory()
            loss = loss_fn(model, x)
            assert loss.dim() == 0 and torch.isfinite(loss), name
            loss.backward()
            if kind != "network only":  # (a trivial loss need not touch e.g. a learned output scale)
                assert all(p.grad is not None for p in model.parameters() if p.requires_grad), (name, kind)
    calls = []
    times = bench_steps.time_steps({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2,
                                   steps=1)
    assert set(times) == {"a", "b"} and calls[-4:] == ["a", "b", "a", "b"]


def test_overhead_benchmark_measures_every_quantity():
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_overhead

    rows = bench_overhead.measure(rounds=1, calls=3)
    assert [r["op"] for r in rows] == [
        "latent 128x20", "bernoulli 128x784", "continuous bernoulli 128x784", "gaussian (fixed scalar variance) 128x784",
        "gaussian (learned scalar variance) 128x784", "laplace (learned scalar scale) 128x784", "mse 128x784",
        "categorical 16x64x256", "logistic mixture (packed) 16x3x8x8, M=5"]
    for row in rows:
        assert row["kernel_fwd"] > 0 and row["public_fwd"] > 0 and row["node_bwd"] > 0
    assert rows[0]["kernel_bwd"] > 0 and rows[0]["seed_draw"] > 0
    # the in-call measure timed the kernel inside the public calls (it is most of them for the large likelihoods)
    # and gave the extension its entry points back
    assert all(row["in_call_overhead"] > 0 for row in rows)
    assert all(row["in_call_overhead"] < row["public_fwd"] / 2 for row in rows[-2:])
    for entry in ("latent_step_forward", "elementwise_step", "categorical_step", "dmol_packed_step"):
        assert type(getattr(bench_overhead._C, entry)).__name__ == "builtin_function_or_method"
    assert "in-call forward overhead" in bench_overhead.markdown(rows)
    # the empty Function timed after each op's kernel (a difference of two timings of three calls: finite)
    assert all(math.isfinite(row["floor_after_kernel"]) for row in rows)
    assert "after the op's kernel" in bench_overhead.markdown(rows)
    # main() fixes glibc's malloc thresholds first (a page-faulting run is not overhead): it must take on glibc
    assert bench_overhead.steady_malloc() == (platform.libc_ver()[0] == "glibc")
