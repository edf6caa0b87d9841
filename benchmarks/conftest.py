"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-enable`` (the repo's pytest.ini disables
benchmarks during ``make test``). Each file times forward + backward of vae_fast against eager
PyTorch and torch.compile of the eager code on CPU; ``python -m benchmarks.report`` runs the same
comparisons in one process and writes the results tables."""
import pytest

from benchmarks.timing import fwd_bwd_step


@pytest.fixture
def run_fwd_bwd(benchmark):
    def measure(step, inputs, group):
        benchmark.group = group
        benchmark(fwd_bwd_step(step, inputs))

    return measure
