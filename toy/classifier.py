"""The toy world's concept classifier: which shape, colour and style is in a 64x64 image.

It scores the images of the toy diffusion model in the evaluation (forget accuracy, retained
accuracy, erosion), the way the DUGE evaluation scores Stable Diffusion's images with an
ImageNet ResNet-50. A small CNN, four stride-2 convolutions (64 -> 4 pixels) and a shared
hidden layer, with one linear head per concept kind.

It is trained on images drawn fresh from the generator at every step (world.sample_batch),
so it never sees the same image twice and cannot overfit. Half of them pass through the toy
model's autoencoder first (every image the diffusion model draws does, and the autoencoder washes
out some textures), and light augmentation (noise, blur, small colour shifts) makes it tolerant of
the slightly soft, slightly off images a small diffusion model produces. So it is trained after
the toy model (python -m toy.train), whose autoencoder it reads.

Images go in as float tensors (B, 3, 64, 64) in [-1, 1]: the range of world.to_tensor and
of VAE.decode (values outside are clamped).

    python -m toy.classifier --out weights/toy_classifier.safetensors      # after python -m toy.train
"""

import argparse
import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoint import atomic_path
from toy import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
DEFAULT_PATH = os.path.join(ROOT, "weights", "toy_classifier.safetensors")
HEADS = ("shape", "colour", "style")
TRAIN_SEED = 0  # the generator stream the shipped weights were trained on
HELDOUT_SEED = 20_250_317  # held-out images for the accuracy check; never used in training


@dataclass
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128, 128)  # channels after each stride-2 conv: 32, 16, 8, 4 px
    hidden: int = 128


def _labels() -> dict[str, list[str]]:
    return {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLE_LABELS}


class ConceptClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig, labels: dict[str, list[str]]):
        super().__init__()
        self.cfg, self.labels = cfg, labels
        layers, c_in = [], 3
        for i, c in enumerate(cfg.widths):
            k = 5 if i == 0 else 3  # a wider first kernel sees edges before the first stride
            layers += [nn.Conv2d(c_in, c, k, stride=2, padding=k // 2), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        # flatten instead of global pooling: circle vs oval needs the whole outline at once
        self.hidden = nn.Linear(c_in * 4 * 4, cfg.hidden)
        self.heads = nn.ModuleDict({h: nn.Linear(cfg.hidden, len(labels[h])) for h in HEADS})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The shared hidden layer (B, hidden): what the evaluation's quality proxy compares."""
        h = self.features(images.clamp(-1, 1))  # (B, C, 4, 4)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, images: torch.Tensor, with_features: bool = False):
        """-> logits (B, n_classes) per head; with_features: (logits, the hidden features) from one pass."""
        h = self.embed(images)
        logits = {name: head(h) for name, head in self.heads.items()}
        return (logits, h) if with_features else logits


# ------------------------------------------------------------------------------------------
# Augmentation: what a diffusion model's images get wrong, a little


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    blurred = torch.rand(b, generator=gen) < 0.5
    sigma = 0.3 + 0.9 * torch.rand(1, generator=gen).item()
    x = torch.where(blurred[:, None, None, None], _gaussian_blur(x, sigma), x)
    gain = 1 + 0.06 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)  # small per-channel colour shifts
    shift = 0.06 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    noise = 0.1 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (x * gain + shift + noise).clamp(-1, 1)


# ------------------------------------------------------------------------------------------
# Training, saving, loading


def _targets(labels: dict[str, list[str]], names: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {h: torch.tensor([labels[h].index(n) for n in names[h]]) for h in HEADS}


@torch.no_grad()
def through_vae(x: torch.Tensor, vae, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """A random share p of the images encoded and decoded by the toy model's autoencoder: every image
    the diffusion model draws passes through it, and it washes out some textures (monet's pastel
    blobs come back close to a plain photo background), so the classifier must know that look."""
    pick = torch.rand(x.shape[0], generator=gen) < p
    if vae is None or not pick.any():
        return x
    mean, _ = vae.posterior(x[pick])
    x = x.clone()
    x[pick] = vae.decode(mean * vae.cfg.scale_factor).clamp(-1, 1)
    return x


def train_classifier(out: str = DEFAULT_PATH, steps: int = 1000, batch: int = 128, lr: float = 2e-3,
                     seed: int = TRAIN_SEED, cfg: ClassifierConfig = ClassifierConfig(), vae=None,
                     threads: int = 1) -> ConceptClassifier:
    """vae: the toy model's autoencoder (half the training images pass through it), or None."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    labels = _labels()
    model = ConceptClassifier(cfg, labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        images, _, names = world.sample_batch(batch, rng)  # fresh images every step
        logits = model(augment(through_vae(images, vae, gen), gen))
        targets = _targets(labels, names)
        loss = sum(F.cross_entropy(logits[h], targets[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            acc = {h: (logits[h].argmax(1) == targets[h]).float().mean().item() for h in HEADS}
            bar.set_postfix(loss=f"{loss.item():.3f}", **{h: f"{a:.2f}" for h, a in acc.items()})
    model.eval()
    save_classifier(model, out)
    return model


def save_classifier(model: ConceptClassifier, path: str) -> None:
    meta = {"config": json.dumps(asdict(model.cfg)), "labels": json.dumps(model.labels)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # a crash never leaves a half-written file under the real name
        save_file(state, str(tmp), metadata=meta)


def load_classifier(path: str = DEFAULT_PATH) -> ConceptClassifier:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg = ClassifierConfig(widths=tuple(cfg["widths"]), hidden=cfg["hidden"])
    labels = json.loads(meta["labels"])  # the file's own label order decides what an output means
    model = ConceptClassifier(cfg, labels)
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _default_classifier() -> ConceptClassifier:
    return load_classifier(DEFAULT_PATH)


@torch.no_grad()
def classify(images: torch.Tensor, model: ConceptClassifier | None = None) -> dict[str, list[str]]:
    """images (B, 3, 64, 64) in [-1, 1] -> {"shape", "colour", "style"} -> B label names."""
    model = _default_classifier() if model is None else model
    logits = model(images.float())
    return {h: [model.labels[h][i] for i in logits[h].argmax(1).tolist()] for h in HEADS}


def heldout_accuracy(model: ConceptClassifier | None = None, n: int = 400, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Per-head accuracy on n fresh generator images from a seed never used in training."""
    correct = {h: 0 for h in HEADS}
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100):
        images, _, names = world.sample_batch(min(100, n - start), rng)
        pred = classify(images, model)
        for h in HEADS:
            correct[h] += sum(p == t for p, t in zip(pred[h], names[h]))
    return {h: correct[h] / n for h in HEADS}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_PATH)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--vae-of", default=os.path.join(ROOT, "weights", "toy_sd.safetensors"),
                   help="the toy model whose autoencoder half the training images pass through ('' for none)")
    args = p.parse_args()
    t0 = time.time()
    vae = None
    if args.vae_of:
        from checkpoint import load
        vae = load(args.vae_of).vae.requires_grad_(False)
    model = train_classifier(args.out, args.steps, args.batch, args.lr, args.seed, vae=vae, threads=args.threads)
    minutes = (time.time() - t0) / 60
    acc = heldout_accuracy(model, n=1000)
    print(f"trained in {minutes:.1f} min; held-out accuracy (1000 images): "
          + ", ".join(f"{h} {a:.3f}" for h, a in acc.items()))
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
