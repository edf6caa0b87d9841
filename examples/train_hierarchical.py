"""A small NVAE / VDVAE-style hierarchical VAE on the offline MNIST digits, on vae_fast's fused ops.

    .venv/bin/python examples/train_hierarchical.py --epochs 10
    .venv/bin/python examples/train_hierarchical.py --quick        # CI smoke run, under two minutes

Model: a bottom-up conv encoder (28x28 -> 14x14 -> 7x7 features) and a top-down decoder with three
convolutional latent groups at two resolutions: z1, z2 (4x7x7) then, after upsampling the decoder
state, z3 (4x14x14). Each group's prior is learned and top-down: ``p(z_i | z_<i)`` is a conv of the
decoder state (z1's from a learned constant state, VDVAE's bias input), its posterior
``q(z_i | x, z_<i)`` a conv of the decoder state and the encoder features at that resolution. The
output is a Bernoulli over dynamically binarised pixels. The ELBO is

    log p(x | z) - sum_i KL(q(z_i | x, z_<i) || p(z_i | z_<i)),

each group's sample and KL from one fused ``vae_fast.gaussian_sample_kl(mu, logvar, prior_mu=...,
prior_logvar=..., dim=(1, 2, 3))`` call on the halves of ``conv(...).chunk(2, dim=1)`` (read in place,
no copy), the reconstruction from ``vae_fast.bernoulli_log_prob``. The eager version of the same model
(same weights) writes these in torch ops; its step time is measured next to the fused one in
alternated rounds (medians).

Each epoch: the test ELBO, per-group KL and active units (latent elements whose posterior mean
varies over the test set, Cov_x E_q[z] > 0.01), and the mutual information I(x; z1) of the top
group. At the end: IWAE-k log p(x) with the hierarchical importance weights
``log p(x|z) + sum_i [log p(z_i|z_<i) - log q(z_i|x, z_<i)]``. Writes ``metrics.csv`` and
``hierarchy.png`` to ``--out``.

The MI estimate uses the aggregate posterior of the N test images, q(z) = (1/N) sum_n q(z|x_n), so it
can never exceed log N (log 500 = 6.21 nats here): once the top group separates the test digits it
sits at that ceiling, whatever the true I(x; z1). The plot draws the ceiling; a larger evaluation set
raises it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import vae_fast
from vae_fast import diagnostics
from vae_fast.data import load_mnist

LATENT_DIMS = (1, 2, 3)  # (C, H, W) of a conv latent: the KL sums over all three


def fused_latent(mu, logvar, prior_mu, prior_logvar, eps=None):
    """z and KL(q || p) per example for one group, fused (C++ on CPU, Triton on CUDA)."""
    return vae_fast.gaussian_sample_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, eps=eps,
                                       dim=LATENT_DIMS)


def eager_latent(mu, logvar, prior_mu, prior_logvar, eps=None):
    """The same in torch ops: the reparameterised sample and the analytic Gaussian KL."""
    eps = torch.randn_like(mu) if eps is None else eps
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1)
    return z, kl.sum(LATENT_DIMS)


def fused_log_likelihood(logits, x):
    return vae_fast.bernoulli_log_prob(logits, x)


def eager_log_likelihood(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def _zero_init(conv: nn.Conv2d) -> nn.Conv2d:
    # VDVAE / NVAE start every group at q = p = N(0, I) (or the learned prior): a zero last layer
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LatentGroup(nn.Module):
    """One group: prior p(z | state), posterior q(z | state, features), and z's way back into the state."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.prior = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.SiLU(),
                                   _zero_init(nn.Conv2d(width, 2 * channels, 1)))
        self.posterior = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), nn.SiLU(),
                                       _zero_init(nn.Conv2d(width, 2 * channels, 1)))
        self.project = nn.Conv2d(channels, width, 3, 1, 1)


class HierarchicalVAE(nn.Module):
    """Three conv latent groups (two at 7x7, one at 14x14) with learned top-down priors."""

    resolutions = (7, 7, 14)

    def __init__(self, width: int = 32, latent_channels: int = 4):
        super().__init__()
        w = width
        self.enc14 = nn.Sequential(nn.Conv2d(1, w, 4, 2, 1), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU())
        self.enc7 = nn.Sequential(nn.Conv2d(w, w, 4, 2, 1), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU())
        self.top_state = nn.Parameter(torch.zeros(1, w, 7, 7))
        self.groups = nn.ModuleList(LatentGroup(w, latent_channels) for _ in self.resolutions)
        self.up = nn.Sequential(nn.ConvTranspose2d(w, w, 4, 2, 1), nn.SiLU())
        self.out = nn.Sequential(nn.ConvTranspose2d(w, w, 4, 2, 1), nn.SiLU(), nn.Conv2d(w, 1, 3, 1, 1))
        self.latent_channels = latent_channels

    def forward(self, x, latent=fused_latent, eps=None, record=None):
        """Decoder logits (B, 1, 28, 28) and the per-group KLs [(B,), ...]. ``latent`` is
        :func:`fused_latent` or :func:`eager_latent`; ``eps`` optional noise per group; ``record``
        a list that receives (mu, logvar, prior_mu, prior_logvar, z) per group (evaluation)."""
        features = {14: self.enc14(x)}
        features[7] = self.enc7(features[14])
        state = self.top_state.expand(x.shape[0], -1, -1, -1)
        kls = []
        for i, (group, res) in enumerate(zip(self.groups, self.resolutions)):
            if state.shape[-1] != res:
                state = self.up(state)
            prior_mu, prior_logvar = group.prior(state).chunk(2, dim=1)
            mu, logvar = group.posterior(torch.cat([state, features[res]], dim=1)).chunk(2, dim=1)
            z, kl = latent(mu, logvar, prior_mu, prior_logvar, None if eps is None else eps[i])
            if record is not None:
                record.append((mu, logvar, prior_mu, prior_logvar, z))
            kls.append(kl)
            state = state + group.project(z)
        return self.out(state), kls


def negative_elbo(model, x, fused: bool = True, eps=None):
    """The loss, -mean_b ELBO_b, with the per-group KLs (B,) for logging."""
    logits, kls = model(x, fused_latent if fused else eager_latent, eps)
    log_lik = (fused_log_likelihood if fused else eager_log_likelihood)(logits, x)
    return -(log_lik - torch.stack(kls).sum(0)).mean(), kls


def binarise(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.bernoulli((pixels.float() / 255).view(-1, 1, 28, 28), generator=generator)


def _log_normal(z, mu, logvar):
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp())).flatten(1).sum(1)


@torch.no_grad()
def iwae(model, x, k: int, chunk: int = 2000) -> torch.Tensor:
    """IWAE-k log p(x) per example: log mean_k exp(log p(x|z) + sum_i [log p(z_i|z_<i) - log q(z_i|x,z_<i)])."""
    x_rep = x.repeat_interleave(k, dim=0)
    weights = []
    for start in range(0, x_rep.shape[0], chunk):
        xs = x_rep[start:start + chunk]
        record = []
        logits, _ = model(xs, fused_latent, record=record)
        log_w = fused_log_likelihood(logits, xs)
        for mu, logvar, prior_mu, prior_logvar, z in record:
            log_w = log_w + _log_normal(z, prior_mu, prior_logvar) - _log_normal(z, mu, logvar)
        weights.append(log_w)
    log_w = torch.cat(weights).view(x.shape[0], k)
    return torch.logsumexp(log_w, dim=1) - math.log(k)


@torch.no_grad()
def evaluate(model, test_x, iwae_k: int, generator):
    model.eval()
    record = []
    logits, kls = model(test_x, fused_latent, record=record)
    elbo = fused_log_likelihood(logits, test_x) - torch.stack(kls).sum(0)
    row = {"test_elbo": elbo.mean().item()}
    for i, (kl, (mu, logvar, *_)) in enumerate(zip(kls, record), start=1):
        row[f"kl_{i}"] = kl.mean().item()
        row[f"active_{i}"] = diagnostics.active_units(mu.flatten(1))
        row[f"units_{i}"] = mu[0].numel()
    top_mu, top_logvar = record[0][0].flatten(1), record[0][1].flatten(1)
    row["mi_top"] = diagnostics.mutual_information(top_mu, top_logvar, generator=generator).item()
    if iwae_k:
        row["test_iwae"] = iwae(model, test_x, iwae_k).mean().item()
    model.train()
    return row


def step_times(model, x, rounds: int, steps: int):
    """Median seconds per training step (forward, backward, Adam) of the fused and the eager loss on
    copies of ``model``, alternating rounds of ``steps`` steps (the machine's noise hits both)."""
    runs = {}
    for fused in (True, False):
        replica = copy.deepcopy(model)
        runs[fused] = (replica, torch.optim.Adam(replica.parameters(), lr=1e-3, fused=True))

    def step(fused):
        replica, optimizer = runs[fused]
        optimizer.zero_grad(set_to_none=True)
        negative_elbo(replica, x, fused)[0].backward()
        optimizer.step()

    for fused in (True, False):  # warm-up: allocator, kernels, OpenMP pool
        step(fused)
    times = {True: [], False: []}
    for _ in range(rounds):
        for fused in (True, False):
            start = time.perf_counter()
            for _ in range(steps):
                step(fused)
            times[fused].append((time.perf_counter() - start) / steps)
    return statistics.median(times[True]), statistics.median(times[False])


def save_plot(path: Path, history, test_size: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    groups = sorted(int(k.split("_")[1]) for k in history[0] if k.startswith("kl_"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for g in groups:
        axes[0].plot(epochs, [h[f"kl_{g}"] for h in history], marker="o", label=f"group {g} ({history[0][f'units_{g}']} units)")
        axes[1].plot(epochs, [h[f"active_{g}"] / h[f"units_{g}"] for h in history], marker="o", label=f"group {g}")
    axes[0].set(xlabel="epoch", ylabel="nats per image", title="KL(q(z_i | x, z_<i) || p(z_i | z_<i))")
    axes[1].set(xlabel="epoch", ylabel="fraction of units", title="active units (Cov_x E_q[z] > 0.01)", ylim=(0, 1.05))
    ceiling = math.log(test_size)
    axes[2].plot(epochs, [h["mi_top"] for h in history], marker="o", label="I(x; z1) estimate")
    axes[2].axhline(ceiling, color="grey", linestyle="--",
                    label=f"estimator ceiling log N = {ceiling:.2f} (N = {test_size} test images)")
    axes[2].set(xlabel="epoch", ylabel="nats", title="mutual information of the top group")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--subset", type=int, default=None, help="use only this many training digits")
    parser.add_argument("--iwae-k", type=int, default=50)
    parser.add_argument("--timing-rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 short epochs, small IWAE, few timing rounds")
    parser.add_argument("--out", default="runs/hierarchical")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.subset, args.iwae_k, args.timing_rounds = 2, args.subset or 768, min(args.iwae_k, 8), 3

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_mnist()
    if args.subset:
        train = train[:args.subset]
    test_x = binarise(test, generator)
    model = HierarchicalVAE(args.width, args.latent_channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)  # (one pass over the parameters)
    print(f"vae_fast {vae_fast.__version__}, backend '{vae_fast.backend('cpu')}': {train.shape[0]} train / "
          f"{test.shape[0]} test digits; groups {[f'{args.latent_channels}x{r}x{r}' for r in model.resolutions]}")
    history = []
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(train.shape[0], generator=generator)
        total, count, start = 0.0, 0, time.perf_counter()
        for i in range(0, train.shape[0], args.batch_size):
            x = binarise(train[order[i:i + args.batch_size]], generator)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = negative_elbo(model, x)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * x.shape[0], count + x.shape[0]
        row = {"epoch": epoch, "train_elbo": -total / count, "seconds": time.perf_counter() - start,
               **evaluate(model, test_x, args.iwae_k if epoch == args.epochs else 0, generator)}
        history.append(row)
        groups = "  ".join(f"KL{g} {row[f'kl_{g}']:5.2f} ({row[f'active_{g}']}/{row[f'units_{g}']} active)"
                           for g in range(1, len(model.resolutions) + 1))
        print(f"epoch {epoch:>3}: train ELBO {row['train_elbo']:8.2f}  test ELBO {row['test_elbo']:8.2f}  {groups}  "
              f"I(x;z1) {row['mi_top']:.2f} (<= log {test.shape[0]} = {math.log(test.shape[0]):.2f})  {row['seconds']:.1f} s")
    last = history[-1]
    if "test_iwae" in last:
        print(f"test IWAE-{args.iwae_k} log p(x) {last['test_iwae']:.2f} nats >= test ELBO {last['test_elbo']:.2f}")
    x = binarise(train[:args.batch_size], generator)
    fused_s, eager_s = step_times(model, x, args.timing_rounds, 2 if args.quick else 5)
    last.update(step_fused_ms=fused_s * 1e3, step_eager_ms=eager_s * 1e3)
    print(f"training step (encoder + 3 groups + decoder + loss + Adam, B={x.shape[0]}): fused {fused_s * 1e3:.2f} ms "
          f"vs eager {eager_s * 1e3:.2f} ms ({eager_s / fused_s:.2f}x; medians of {args.timing_rounds} alternated rounds)")
    fields = list(dict.fromkeys(k for h in history for k in h))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    save_plot(out_dir / "hierarchy.png", history, test.shape[0])
    print(f"wrote {out_dir}/metrics.csv, hierarchy.png")
    return history


if __name__ == "__main__":
    main()
