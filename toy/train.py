"""Train the toy text-to-image model from scratch on the procedural toy world (toy/world.py).

    python -m toy.train --threads 2     # writes weights/toy_sd.safetensors (84 minutes on 2 CPU cores)
    python -m toy.classifier            # then the classifier, which reads this model's autoencoder

The toy model is Stable Diffusion v1 in miniature: the SAME classes (clip_text.TextEncoder,
unet.UNet, vae.VAE) at small configurations, stored in the same CompVis single-file layout, so
sample.py and train.py run on it unchanged. It is trained in three stages, as SD was built:
  1. a BPE vocabulary learned on the captions (the toy "CLIP" tokenizer: same algorithm and file
     format as OpenAI's, ~600 tokens instead of 49,408);
  2. the autoencoder (VAE), images 3x64x64 <-> latents 4x16x16, with a small KL term;
  3. the text encoder and UNet together on the eps-prediction loss of DDPM (Ho et al. 2020),
     with 10% of captions dropped to "" so classifier-free guidance works. (In real SD the CLIP
     text encoder was pre-trained and frozen; here nothing exists to pre-train it on, so it learns
     jointly with the UNet.)
Everything is seeded; samples and losses are written to runs/toy/ as it goes.
"""
import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import sample
from toy import world
from clip_text import TextConfig, TextEncoder, Tokenizer
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

# Sized for a 2-core CPU: about 0.6 s per UNet + text step at batch 32, 0.5 s per VAE step at batch 16.
TOY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4),
                      num_res_blocks=1, attention_levels=(1, 2), num_heads=4, context_dim=128,
                      norm_groups=16)
TOY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)
TOY_TEXT_WIDTH, TOY_TEXT_LAYERS, TOY_TEXT_HEADS = 128, 3, 4
TOY_GUIDANCE = 3.0   # the default CFG scale stored in the toy checkpoint


def train_vae(vae, steps, batch, lr, seed, log):
    """Stage 2: reconstruction (L2 + L1) plus a tiny KL to N(0, I), as LDM's KL-f8 (without the GAN)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        x, _, _ = world.sample_batch(batch, seed * 1_000_003 + step)           # (B, 3, 64, 64) in [-1, 1]
        mean, logvar = vae.posterior(x)                                            # (B, 4, 16, 16) each
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
        if step % 200 == 0:
            log({"stage": "vae", "step": step, "loss": loss.item(), "kl": kl.item()})
    vae.eval()


@torch.no_grad()
def latent_scale(vae, seed, n=512):
    """SD's 0.18215 was chosen so latents have unit variance; we measure ours the same way."""
    x, _, _ = world.sample_batch(n, seed)
    mean, _ = vae.posterior(x)
    return 1.0 / mean.std().item()


@torch.no_grad()
def encode_dataset(vae, n, seed, batch=250):
    """Render n images once and keep their latent posteriors (mean, std): the VAE encoder at 64x64
    costs more than a toy UNet step, so the diffusion stage never runs it. Captions are drawn
    afresh at every step from the labels, so the model still sees every phrasing."""
    means, stds, labels = [], [], {"shape": [], "colour": [], "style": []}
    for i in tqdm(range(0, n, batch), desc="encode"):
        x, _, lab = world.sample_batch(min(batch, n - i), seed * 1_000_003 + i)
        mean, logvar = vae.posterior(x)
        means.append(mean), stds.append((0.5 * logvar).exp())
        for k in labels:
            labels[k] += lab[k]
    return torch.cat(means), torch.cat(stds), labels


def train_diffusion(model, data, steps, batch, lr, seed, p_uncond, log, sample_every, outdir, focus=None):
    """Stage 3: L = || eps - eps_theta(x_t, t, c) ||^2 with t ~ U{0..999} (DDPM Algorithm 1).
    focus: {style: w}, that style's images drawn w times as often as the others (None: uniformly)."""
    means, stds, labels = data
    weights = torch.tensor([focus.get(s, 1.0) for s in labels["style"]]) if focus else None
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema = [p.detach().clone() for p in params]
    model.unet.train(), model.text_encoder.train()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scale = model.vae.cfg.scale_factor
    bar = tqdm(range(steps), desc="unet+text")
    for step in bar:
        idx = (torch.multinomial(weights, batch, replacement=True, generator=g) if weights is not None else
               torch.randint(0, len(means), (batch,), generator=g))
        z0 = scale * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g))   # (B, 4, 16, 16)
        caps = ["" if rng.random() < p_uncond else
                world.caption(labels["shape"][i], labels["colour"][i], labels["style"][i], rng) for i in idx.tolist()]
        t = torch.randint(0, sample.NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        ctx = model.text_encoder(model.tokenizer(caps))                               # (B, 77, 128)
        loss = F.mse_loss(model.unet(sample.add_noise(z0, noise, t), t, ctx), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0:
            log({"stage": "diffusion", "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
        if sample_every and (step + 1) % sample_every == 0:
            preview(model, ema, params, os.path.join(outdir, f"samples_{step + 1:06d}", ))
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.unet.eval(), model.text_encoder.eval()


PREVIEW_PROMPTS = ["a red circle in the style of van gogh", "a blue star by monet", "a green square",
                   "a yellow triangle in the style of mondrian"]


def preview(model, ema, params, stem):
    """A sample grid and a snapshot of the EMA model, so progress can be seen (and used) early."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.unet.eval(), model.text_encoder.eval()
    rows = [sample.generate(model, [p] * 4, steps=20, guidance=TOY_GUIDANCE, seed=0) for p in PREVIEW_PROMPTS]
    sample.save_image(sample.make_grid(rows, labels=PREVIEW_PROMPTS), stem + ".png")
    checkpoint.save(model, stem + ".safetensors", format="compvis", dtype=torch.float16)
    with torch.no_grad():
        for b, p in zip(backup, params):
            p.copy_(b)
    model.unet.train(), model.text_encoder.train()


def main():
    ap = argparse.ArgumentParser(description="Train the toy SD model from scratch (CPU, about an hour).")
    ap.add_argument("--out", default=str(checkpoint.TOY_WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merges", type=int, default=400, help="at most this many BPE merges, learned on the captions")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6000, help="UNet + text encoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=30000, help="images rendered and encoded for stage 3")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--rundir", default="runs/toy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--init", default=None, help="continue stage 3 from this toy model instead of starting over")
    ap.add_argument("--focus", default="", metavar="STYLE:W,...",
                    help="draw these styles' images W times as often in stage 3, e.g. 'matisse:4'")
    args = ap.parse_args()
    focus = {}
    for part in filter(None, (p.strip() for p in args.focus.split(","))):
        style, _, w = part.rpartition(":")
        if style not in world.STYLE_LABELS or not w.replace(".", "", 1).isdigit() or float(w) <= 0:
            ap.error(f"--focus wants STYLE:WEIGHT pairs of the world's styles, e.g. matisse:4; got {part!r}")
        focus[style] = float(w)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.rundir, exist_ok=True)
    logf = open(os.path.join(args.rundir, "log.jsonl"), "a")
    t0 = time.time()

    def log(d):
        d["elapsed_s"] = round(time.time() - t0, 1)
        logf.write(json.dumps(d) + "\n")
        logf.flush()

    torch.manual_seed(args.seed)
    if args.init:  # continue stage 3 from a saved toy model (its tokenizer, VAE and latent scale)
        model = checkpoint.load(args.init)
        model.unet.requires_grad_(True), model.text_encoder.requires_grad_(True)
        log({"stage": "init_from", "path": args.init})
        data = encode_dataset(model.vae, args.images, args.seed + 3)
        train_diffusion(model, data, args.steps, args.batch, args.lr, args.seed + 5, 0.1, log, args.sample_every,
                        args.rundir, focus=focus)
        checkpoint.save(model, args.out, format="compvis", dtype=torch.float16)
        print(f"wrote {args.out} in {(time.time() - t0) / 60:.1f} min")
        return
    merges = world.train_bpe(world.corpus(), args.merges)
    tok = Tokenizer(merges)
    text = TextEncoder(TextConfig(vocab_size=tok.vocab_size, max_length=77, width=TOY_TEXT_WIDTH,
                                  layers=TOY_TEXT_LAYERS, heads=TOY_TEXT_HEADS))
    vae, unet = VAE(copy.deepcopy(TOY_VAE)), UNet(TOY_UNET)
    model = checkpoint.StableDiffusion(tok, text, unet, vae, image_size=64, guidance=TOY_GUIDANCE)
    log({"stage": "init", "vocab": tok.vocab_size,
         "params": {n: sum(p.numel() for p in m.parameters()) for n, m in
                    (("unet", unet), ("vae", vae), ("text", text))}})

    train_vae(vae, args.vae_steps, args.vae_batch, 1e-3, args.seed + 1, log)
    vae.requires_grad_(False)
    scale = latent_scale(vae, args.seed + 2)
    vae.cfg.scale_factor = scale
    log({"stage": "latent_scale", "scale_factor": scale})
    data = encode_dataset(vae, args.images, args.seed + 3)
    train_diffusion(model, data, args.steps, args.batch, args.lr, args.seed + 4, 0.1, log, args.sample_every, args.rundir)
    checkpoint.save(model, args.out, format="compvis", dtype=torch.float16)
    log({"stage": "done", "bytes": os.path.getsize(args.out)})
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
