"""Sampling from Stable Diffusion: the noise schedule, DDIM and DDPM, classifier-free guidance.

    python sample.py "a red circle in the style of van gogh"          # the toy model in weights/
    python sample.py "an astronaut riding a horse" --weights sd-v1-5.safetensors -n 4
    python sample.py "a castle on a hill" --weights v2-1_512-ema-pruned.safetensors --prediction-type epsilon

This file is the one place the diffusion schedule lives; the training loop (trainer.py), the toy
world's training and the probes import `add_noise` (and `training_target`, eps or v) from here.

References
- DDPM: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (Algorithm 2, ancestral sampling).
- DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models" (eq. 12).
- Classifier-free guidance: Ho & Salimans 2022.
- v-prediction: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  (section 4, v = alpha eps - sigma x0), as SD 2.x's 768-v models use it (Stability-AI/stablediffusion
  configs/stable-diffusion/v2-inference-v.yaml, parameterization "v"). The samplers work in eps; a
  v model's output is turned into eps where the model is called (guided_eps).
- Conventions (schedule, timestep grid, final alpha) follow CompVis ldm/models/diffusion/ddim.py, the
  code SD v1 was released with; diffusers' DDIMScheduler reproduces them with
  timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False.
"""
import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import distributed

# -----------------------------------------------------------------------------------------------
# The noise schedule. SD (v1 and 2.x) trains on T=1000 steps with "scaled linear" betas: linear in sqrt(beta).
# Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  abar_t = prod_{s<=t} (1 - beta_s).

NUM_TRAIN_TIMESTEPS = 1000


def make_alphas_cumprod(beta_start=0.00085, beta_end=0.012, T=NUM_TRAIN_TIMESTEPS):
    """abar_t for t = 0..T-1, computed in float64 (as CompVis does) and returned as float32."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas)).float()  # (T,)


alphas_cumprod = make_alphas_cumprod()


def abar_at(t, like):
    """abar_t for an int or (B,) tensor of timesteps, shaped to broadcast over `like` (B, C, H, W)."""
    return alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)


def add_noise(x0, noise, t):
    """q(x_t | x_0): the training-time forward process. t is a (B,) LongTensor of timesteps."""
    abar = abar_at(t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def v_target(x0, noise, t):
    """What a v-prediction model is trained to output at x_t = add_noise(x0, noise, t):
    v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), where an eps model's target is the noise."""
    abar = abar_at(t, x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


PREDICTION_TYPES = ("epsilon", "v_prediction")   # diffusers' names, stored in unet.UNetConfig.prediction_type


def eps_from_output(out, x, t, prediction_type):
    """A model's output at (x_t, t) as the noise eps the samplers use. From v:
    eps = sqrt(1 - abar) x_t + sqrt(abar) v, and so x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        abar = abar_at(t, x)
        return (1 - abar).sqrt() * x + abar.sqrt() * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")


def training_target(x0, noise, t, prediction_type):
    """What the UNet is trained to output at x_t = add_noise(x0, noise, t): the noise for an eps model,
    v for a v-prediction one (SD 2.x's 768-v). Every loss that targets the noise reads this instead."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(x0, noise, t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")


def noised_rows(x0, n, generator, prediction_type):
    """n random rows of x0 noised at random timesteps, drawn in this order: rows, eps, t.
    -> (idx, x_t, target, t): what a diffusion loss on a batch of latents needs, the target the noise
    or v as the model predicts (training_target)."""
    idx = torch.randint(0, len(x0), (n,), generator=generator)
    noise = torch.randn(x0[idx].shape, generator=generator).to(x0)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator).to(x0.device)
    return idx, add_noise(x0[idx], noise, t), training_target(x0[idx], noise, t, prediction_type), t


def timestep_grid(steps):
    """CompVis "uniform" grid, ascending: steps=50 gives 1, 21, ..., 981 (c = 1000 // steps)."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    c = NUM_TRAIN_TIMESTEPS // steps
    return [i * c + 1 for i in range(steps)]


def per_image_noise(shape, generators, device, dtype):
    """One standard-normal draw per image, each from its own generator, so image i of a batch
    never depends on how many other images share the batch."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
                     ).to(device=device, dtype=dtype)


# -----------------------------------------------------------------------------------------------
# Samplers. `eps_fn(x, t) -> eps` is the (guided) noise prediction; each sampler walks the grid
# from t = 981 down to t = 1 (for 50 steps).

def ddim_sample(eps_fn, x, steps=50, eta=0.0, generators=None, progress=False, callback=None, start=None):
    """DDIM (Song et al. eq. 12). eta = 0 is deterministic; eta = 1 behaves like DDPM.
    As in CompVis, the "previous" alpha of the final step is abar_0 = 0.99915, not 1.
    start: a timestep of the grid where x already is (an image noised to it), instead of the top."""
    ts = timestep_grid(steps)
    if start is not None and start not in ts:
        raise ValueError(f"start {start} is not on the {steps}-step grid ({ts[0]}, {ts[1]}, ..., {ts[-1]})")
    ac = alphas_cumprod.double()
    for i in tqdm(range(steps - 1 if start is None else ts.index(start), -1, -1), desc="ddim", disable=not progress):
        t = ts[i]
        a, a_prev = ac[t], (ac[ts[i - 1]] if i > 0 else ac[0])
        eps = eps_fn(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # predicted clean latent
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            x = x + sigma * per_image_noise(x.shape, generators, x.device, x.dtype)
        x = x.to(eps.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def ddpm_sample(eps_fn, x, steps=50, generators=None, progress=False, callback=None):
    """DDPM ancestral sampling (Ho et al. Algorithm 2) on the same strided grid: each step draws
    x_prev ~ q(x_prev | x_t, x0_hat), the true posterior between two grid points, with the
    "fixed small" variance. The final step (t=1) goes to abar = 1 and adds no noise."""
    ts = timestep_grid(steps)
    ac = alphas_cumprod.double()
    for i in tqdm(range(steps - 1, -1, -1), desc="ddpm", disable=not progress):
        t = ts[i]
        a = ac[t]
        a_prev = ac[ts[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        alpha = a / a_prev  # alpha of this stride: 1 - beta_t in the paper when steps = 1000
        beta = 1 - alpha
        eps = eps_fn(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        # posterior mean  mu = c0 x0 + ct x_t  and variance  beta * (1 - a_prev) / (1 - a)
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a)) * x
        x = mean
        if i > 0:
            var = (beta * (1 - a_prev) / (1 - a)).clamp(min=1e-20)
            x = x + var.sqrt() * per_image_noise(x.shape, generators, x.device, x.dtype)
        x = x.to(eps.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def dpmpp_2m_sample(eps_fn, x, steps=50, generators=None, progress=False, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep
    solver of the diffusion ODE in the data prediction x0 = (x - sigma eps) / alpha, on the same
    grid as DDIM. With lambda = log(alpha / sigma) and h = lambda_next - lambda_now:

        x_next = (sigma_next / sigma_now) x - alpha_next (e^-h - 1) D,
        D = (1 + 1/(2r)) x0_now - 1/(2r) x0_prev,   r = h_prev / h   (D = x0_now on the first step)

    The last step goes to sigma = 0 at first order, so it returns the final x0 prediction (diffusers'
    DPMSolverMultistepScheduler with final_sigmas_type="zero"). Measured on the toy model (README,
    "How the toy evaluation measures"): no better than DDIM at 6-10 steps there."""
    ts = timestep_grid(steps)
    ac = alphas_cumprod.double()
    x0_prev = h_prev = None
    for i in tqdm(range(steps - 1, -1, -1), desc="dpm++2m", disable=not progress):
        t = ts[i]
        alpha, sigma = ac[t].sqrt(), (1 - ac[t]).sqrt()
        eps = eps_fn(x, t)
        x0 = (x - sigma * eps) / alpha
        if i == 0:
            x = x0
        else:
            alpha_next, sigma_next = ac[ts[i - 1]].sqrt(), (1 - ac[ts[i - 1]]).sqrt()
            h = torch.log(alpha_next / sigma_next) - torch.log(alpha / sigma)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - alpha_next * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        x = x.to(eps.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpm++2m": dpmpp_2m_sample}


def guided_eps(unet, cond, uncond, guidance):
    """Classifier-free guidance: eps = eps_u + s (eps_c - eps_u), one batched UNet call on [u, c].
    A v model is guided in v (as diffusers does) and the result turned into eps: the same thing, since
    eps is affine in v with the same x_t for both branches."""
    both = None if guidance == 1.0 else torch.cat([uncond, cond])   # one tensor for every step (reusing_text)
    prediction_type = unet.cfg.prediction_type

    def eps_fn(x, t):
        if guidance == 1.0:
            out = unet(x, t, cond)
        else:
            out_u, out_c = unet(torch.cat([x, x]), t, both).chunk(2)
            out = out_u + guidance * (out_c - out_u)
        return eps_from_output(out, x, t, prediction_type)
    return eps_fn


# -----------------------------------------------------------------------------------------------
# The API train.py, evaluate.py and the tests use.

@torch.no_grad()
def encode_prompts(model, prompts):
    """Text -> CLIP context (B, 77, width) on the text encoder's device and dtype. Each distinct prompt is
    encoded once (a guided batch's B empty prompts are one)."""
    p = next(model.text_encoder.parameters())
    unique = list(dict.fromkeys(prompts))
    ctx = model.text_encoder(model.tokenizer(unique).to(p.device))
    if len(unique) == len(prompts):
        return ctx
    row = {q: i for i, q in enumerate(unique)}
    return ctx[torch.tensor([row[q] for q in prompts], device=ctx.device)]


def check_numbers(guidance, eta):
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")


@torch.no_grad()
def generate(model, prompts, *, steps=50, guidance=7.5, seed=0, sampler="ddim", eta=0.0,
             height=None, width=None, negative="", latents=None, dtype=None, progress=False,
             callback=None, decode=True, seeds=None):
    """prompts -> images (B, 3, H, W) in [0, 1]. `model` is a checkpoint.StableDiffusion.
    With decode=False, the final latents x_0 instead (what training on latents needs).

    Image i starts from noise drawn with seed `seed + i` (or `seeds[i]`), so it does not change with the batch
    size. height/width default to the model's native resolution (512 for SD v1 and 2.x-base, 768 for
    2.x-v, 64 for the toy model). `latents` overrides the initial noise. `dtype` casts the models for this call.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompt given: pass at least one prompt")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    timestep_grid(steps)  # validates steps
    check_numbers(guidance, eta)
    height = model.image_size if height is None else height
    width = model.image_size if width is None else width
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    f = model.vae.downscale
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} must be divisible by {f} (the VAE's downscale)")
    if dtype is not None:
        model.to(dtype=dtype)
    device = next(model.unet.parameters()).device
    mdtype = next(model.unet.parameters()).dtype
    B = len(prompts)

    cond = encode_prompts(model, prompts)                                      # (B, 77, D)
    uncond = encode_prompts(model, [negative] * B if isinstance(negative, str) else negative)
    if seeds is not None and len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    generators = [torch.Generator().manual_seed(s) for s in (seeds if seeds is not None else range(seed, seed + B))]
    if latents is None:
        shape = (B, model.unet.cfg.in_channels, height // f, width // f)
        latents = per_image_noise(shape, generators, device, mdtype)          # x_T ~ N(0, I)
    x = latents.to(device=device, dtype=mdtype)
    eps_fn = guided_eps(model.unet, cond, uncond, guidance)
    kwargs = dict(eta=eta) if sampler == "ddim" else {}
    with model.unet.reusing_text():   # the prompts' attn2 keys and values computed once, not at every step
        x0 = SAMPLERS[sampler](eps_fn, x, steps, generators=generators, progress=progress,
                               callback=callback, **kwargs)
    if not decode:
        return x0                                                              # (B, 4, H/f, W/f)
    images = model.vae.decode(x0)                                              # (B, 3, H, W) in ~[-1, 1]
    return ((images.float() + 1) / 2).clamp(0, 1)


def generate_cached(model, prompts, per_prompt, folder, desc="images", batch=64, **kwargs):
    """Latents x_0 for each prompt (seeds 0..per_prompt-1 each, generate(..., decode=False)), cached in
    `folder` by prompt and settings: name the folder after the model, as train.py does. The prompts
    not cached yet are drawn together, `batch` images at a time (the same latents as one by one)."""
    from safetensors.torch import load_file, save_file

    from checkpoint import atomic_path
    files = [Path(folder) / (hashlib.sha1(json.dumps([p, per_prompt, sorted(kwargs.items())]).encode()).hexdigest()[:20]
                             + ".safetensors") for p in prompts]
    todo = list(dict.fromkeys(p for p, f in zip(prompts, files) if not f.exists()))
    where, drawn = dict(zip(prompts, files)), {}
    mine, step = distributed.shard(todo), max(1, batch // per_prompt)   # under torchrun: this rank's share
    for i in tqdm(range(0, len(mine), step), desc=desc, unit="batch", disable=not todo):
        part = mine[i:i + step]
        x0 = generate(model, [p for p in part for _ in range(per_prompt)], decode=False,
                      seeds=[k for _ in part for k in range(per_prompt)], **kwargs)
        drawn |= dict(zip(part, x0.cpu().split(per_prompt)))
    if distributed.size() > 1 and todo:
        rows = distributed.gather_rows(torch.stack([drawn[p] for p in mine]) if mine else None)
        drawn = dict(zip(todo, rows))
    for p in todo if distributed.is_main() else ():
        with atomic_path(where[p]) as tmp:
            save_file({"latents": drawn[p].contiguous()}, str(tmp), metadata={"prompt": p})
    distributed.barrier()  # the next call's ranks must see the same files
    return torch.cat([drawn[p] if p in drawn else load_file(str(f))["latents"] for p, f in zip(prompts, files)])


# -----------------------------------------------------------------------------------------------
# Image grids (also used by train.py and evaluate.py for before/after pictures).

def before_after(model, before, prompts, n=2, **kwargs):
    """For each prompt, n images with the model as it was (inside the context manager `before()`)
    then the same seeds with the model as it is: one grid row (2n, 3, H, W) per prompt."""
    rows = []
    for p in tqdm(distributed.shard(prompts), desc="before/after grid", unit="prompt"):  # torchrun: this rank's
        with before():
            old = generate(model, [p] * n, **kwargs)
        rows.append(torch.cat([old, generate(model, [p] * n, **kwargs)]))
    return list(distributed.gather_rows(torch.stack(rows) if rows else None)) if distributed.size() > 1 else rows


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(rows, labels=None, pad=2, label_height=None):
    """rows: list of (N, 3, H, W) tensors, one row each; labels: one caption per row, drawn below it
    (the grid widens to the longest caption, so none is cut)."""
    from PIL import Image, ImageDraw
    H, W = rows[0].shape[-2:]
    ncol = max(r.shape[0] for r in rows)
    lh = 0 if labels is None else (label_height or max(12, H // 8))
    text = max((ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s) for s in labels or []), default=0)
    grid = Image.new("RGB", (max(ncol * (W + pad), int(text) + pad) + pad, len(rows) * (H + pad + lh) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (H + pad + lh)
        for c, im in enumerate(to_pil(row)):
            grid.paste(im, (pad + c * (W + pad), y))
        if labels is not None:
            draw.text((pad, y + H + 1), labels[r], fill="black")
    return grid


def save_image(image, path):
    """Write a PIL image as PNG; an interrupted run leaves no half-written file."""
    from checkpoint import atomic_path  # file I/O stays out of the import path of duge.py
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# -----------------------------------------------------------------------------------------------
# The command line.

def pick_device(name=None):
    if name:
        ok = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not ok.get(name.split(":")[0], False):
            raise ValueError(f"device {name!r} is not available here; use one of "
                             f"{', '.join(k for k, v in ok.items() if v)}")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def main(argv=None):
    import checkpoint
    ap = argparse.ArgumentParser(description="Sample images from a Stable Diffusion v1 / 2.x model "
                                             "(the toy model in weights/ by default).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", nargs="*", help="one or more prompts; each gives one row of the grid")
    ap.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    ap.add_argument("--weights", default=str(checkpoint.TOY_WEIGHTS),
                    help="CompVis .safetensors/.ckpt file or diffusers folder")
    ap.add_argument("--prediction-type", default="auto", choices=["auto", *PREDICTION_TYPES],
                    help="what the UNet predicts (auto: what the file says; an official SD 2.x file: v, as the "
                         "768-v models; 2.x-base needs epsilon)")
    ap.add_argument("-n", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=50, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (None: the model's own, "
                                                                 "7.5 for SD, 3 for the toy model)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    ap.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (None: the model's)")
    ap.add_argument("--negative", default="", help="negative prompt (replaces the empty unconditional prompt)")
    ap.add_argument("--out", default="out/sample.png", help="the grid (PNG)")
    ap.add_argument("--separate", action="store_true", help="also write one PNG per image")
    ap.add_argument("--dtype", default=None, choices=sorted(checkpoint.DTYPES), help="compute dtype (None: fp32 "
                                                                          "on CPU, fp16 on GPU)")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (None: autodetect)")
    args = ap.parse_args(argv)
    try:
        prompts = list(args.prompt)
        if args.prompts:
            with open(args.prompts, encoding="utf-8") as fh:
                prompts += [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise ValueError('no prompt given: pass one, e.g. python sample.py "a red circle in the style of '
                             'van gogh", or --prompts FILE')
        if args.n < 1:
            raise ValueError(f"-n must be at least 1, got {args.n}")
        if args.size is not None and args.size < 1:
            raise ValueError(f"--size must be positive, got {args.size}")
        check_numbers(args.guidance if args.guidance is not None else 1.0, args.eta)
        checkpoint.check_writable(args.out)  # before any work
        device = pick_device(args.device)
        dtype = checkpoint.DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.float16)
        model = checkpoint.load(args.weights, device=device, dtype=dtype, prediction_type=args.prediction_type)
        guidance = args.guidance if args.guidance is not None else model.guidance
        rows = []
        for k, p in enumerate(prompts):
            rows.append(generate(model, [p] * args.n, steps=args.steps, guidance=guidance,
                                 seed=args.seed + k * args.n, sampler=args.sampler, eta=args.eta,
                                 height=args.size, width=args.size, negative=args.negative,
                                 progress=True))
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_image(make_grid(rows, labels=prompts), args.out)
    if args.separate:
        stem, _ = os.path.splitext(args.out)
        for k, row in enumerate(rows):
            for j, im in enumerate(to_pil(row)):
                tmp = f"{stem}_{k}_{j}.png"
                save_image(im, tmp)
    print(f"wrote {args.out} ({len(prompts)} prompt(s) x {args.n} image(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
