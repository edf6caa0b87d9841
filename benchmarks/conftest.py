"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-enable`` (the repo's pytest.ini disables
benchmarks during ``make test``). Each file times forward + backward of vae_fast against eager
PyTorch and torch.compile of the eager code on CPU; ``python -m benchmarks.report`` runs the same
comparisons in one process and writes the results tables."""
import pytest
import torch


def fwd_bwd(step, inputs):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for leaf in leaves:
            leaf.grad = None
        step(*inputs).backward()

    return run


@pytest.fixture
def run_fwd_bwd(benchmark):
    def measure(step, inputs, group):
        benchmark.group = group
        benchmark(fwd_bwd(step, inputs))

    return measure
