"""A convolutional VAE on 8-bit MNIST digits with a discretised logistic mixture likelihood
(the PixelCNN++ / NVAE / VDVAE output layer), trained with ``vae_fast.elbo(likelihood="dmol")``.

    .venv/bin/python examples/train_dmol.py --epochs 5

The decoder returns the packed (B, 3M, 28, 28) parameter tensor (NVAE's layout for one
channel: M mixture logits, M means, M log-scales); the fused kernel reads it in place and
writes its gradient in the same layout. Each epoch reports the test negative ELBO in bits per
dimension (the unit image models use), and the step time of the fused loss against NVAE's
published eager log-likelihood on the same model and batch; at the end, the IWAE-k estimate
of the test negative log-likelihood (``vae_fast.iwae_bound(..., likelihood="dmol")``).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import vae_fast
from vae_fast.data import load_mnist


class ConvVAE(nn.Module):
    """28x28x1 -> 7x7 conv encoder -> Z; Z -> 7x7 -> 28x28 with 3M output channels."""

    def __init__(self, latent_dim: int = 16, mixtures: int = 5, width: int = 32):
        super().__init__()
        self.mixtures = mixtures
        self.enc = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(2 * width * 49, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, 2 * width * 49)
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(width, 3 * mixtures, 4, 2, 1))
        self.width = width

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        lead = z.shape[:-1]
        h = self.dec_in(z.reshape(-1, z.shape[-1])).reshape(-1, 2 * self.width, 7, 7)
        return self.dec(h).reshape(*lead, 3 * self.mixtures, 28, 28)


def nvae_log_prob(params, x, mixtures):
    """NVAE's DiscMixLogistic.log_prob for one channel (PixelCNN++'s 1-d loss in NCHW): per-example
    log-likelihood with every term a full (B, M, H, W) temporary."""
    logit_probs, means, log_scales = params[:, :mixtures], params[:, mixtures:2 * mixtures], params[:, 2 * mixtures:]
    log_scales = torch.clamp(log_scales, min=-7.0)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255)
    min_in = inv_stdv * (centered - 1.0 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_prob_mid = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)), log_pdf_mid - math.log(127.5))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.99, log_one_minus_cdf_min, log_prob_mid))
    return torch.logsumexp(log_probs + F.log_softmax(logit_probs, dim=1), dim=1).flatten(1).sum(-1)


def fused_loss(model, x):
    mu, logvar = model.encode(x)
    return vae_fast.elbo(x, mu, logvar, model.decode, likelihood="dmol")


def eager_loss(model, x):
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    return -(nvae_log_prob(model.decode(z), x, model.mixtures) - kl).mean()


def bits_per_dim(neg_elbo_nats: float) -> float:
    return neg_elbo_nats / (784 * math.log(2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mixtures", type=int, default=5)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--subset", type=int, default=None, help="use only this many training digits (smoke tests)")
    parser.add_argument("--timing-steps", type=int, default=10, help="steps timed per implementation each epoch")
    parser.add_argument("--iwae-k", type=int, default=64, help="importance samples for the final test NLL (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = load_mnist()
    if args.subset:
        train, test = train[:args.subset], test[:max(args.subset // 4, args.batch_size)]
    # 8-bit pixels p -> p / 127.5 - 1, the discretised likelihood's grid
    to_x = lambda pixels: (pixels.float() / 127.5 - 1).reshape(-1, 1, 28, 28)  # noqa: E731
    model = ConvVAE(args.latent_dim, args.mixtures)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)  # (one pass over the parameters)
    history = []
    print(f"{'epoch':>5} {'train bits/dim':>14} {'test bits/dim':>13} {'fused ms/step':>13} {'NVAE eager ms/step':>18}")
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(train.shape[0])
        total, count = 0.0, 0
        model.train()
        for start in range(0, train.shape[0], args.batch_size):
            x = to_x(train[order[start:start + args.batch_size]])
            out = fused_loss(model, x)
            optimiser.zero_grad(set_to_none=True)
            out.loss.backward()
            optimiser.step()
            total += out.loss.item() * x.shape[0]
            count += x.shape[0]
        # step time of both losses on the same batch and weights (forward + backward, no update)
        x = to_x(train[:args.batch_size])
        timings = {}
        for name, loss_fn in (("fused", lambda: fused_loss(model, x).loss), ("eager", lambda: eager_loss(model, x))):
            loss_fn().backward()
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(args.timing_steps):
                loss_fn().backward()
                model.zero_grad(set_to_none=True)
            timings[name] = (time.perf_counter() - t0) / args.timing_steps * 1e3
        model.eval()
        with torch.no_grad():
            xt = to_x(test)
            test_nll = -fused_loss(model, xt).elbo.mean().item()
        row = {"epoch": epoch, "train_bpd": bits_per_dim(total / count), "test_bpd": bits_per_dim(test_nll),
               "fused_ms": timings["fused"], "eager_ms": timings["eager"]}
        history.append(row)
        print(f"{epoch:5d} {row['train_bpd']:14.3f} {row['test_bpd']:13.3f} {row['fused_ms']:13.1f} {row['eager_ms']:18.1f}",
              flush=True)
    if args.iwae_k:
        # the IWAE-k bound (Burda et al.) is a far tighter estimate of the test NLL than the ELBO
        with torch.no_grad():
            xt = to_x(test)
            mu, logvar = model.encode(xt)
            log_px = vae_fast.iwae_bound(xt, mu, logvar, model.decode, k=args.iwae_k, likelihood="dmol", chunk_size=16)
        history[-1]["test_iwae_bpd"] = bits_per_dim(-log_px.mean().item())
        print(f"test NLL, IWAE-{args.iwae_k}: {history[-1]['test_iwae_bpd']:.3f} bits/dim "
              f"(ELBO: {history[-1]['test_bpd']:.3f})")
    return history


if __name__ == "__main__":
    main()
