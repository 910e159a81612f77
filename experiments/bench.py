"""Benchmarks: how fast our UNet runs next to diffusers', and how much memory a DUGE step costs.

    python -m experiments.bench speed  [--threads N] [--repeats R]   # UNet forward and one guided DDIM step
    python -m experiments.bench memory [--threads N]                 # peak memory: DUGE step vs plain fine-tuning

Benchmarks are not tests: they print RATIOS against a reference measured in the same run, on
the same machine, so a busy or slow machine shifts both sides alike.

- speed: full-size SD v1 UNet with random weights, built by diffusers' UNet2DConditionModel and
  loaded into our unet.UNet through unet.diffusers_key_map (strict), so both run identical tensors.
  The DDIM step is sample.guided_eps + sample.ddim_sample (steps=1) against diffusers'
  DDIMScheduler configured as CompVis (Song et al. 2021; Ho & Salimans 2022 for the guidance).
- memory: one step of DUGE's loss (theta call on 3 images, phi_0 call on 2 with the original
  tensors swapped in) against one plain diffusion-loss step on 3 images, and against a naive
  phi_0 that deep-copies the UNet, as ESD's code (Gandikota et al. 2023) holds a frozen second
  model. (Concept Ablation's code, Kumari et al. 2023, takes its target from the same UNet.)

Every measured model runs in its own subprocess (`python -m experiments.bench _one ...`), so each peak is that
process's alone: on CPU the growth of its resident set (max RSS), with the high-water mark reset
after the weights are built so a construction transient does not count; on CUDA
torch.cuda.max_memory_allocated. diffusers is a reference, as in tests/: it is imported only here,
inside the functions that need it, never by the project's runtime files.
"""
import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import checkpoint
import duge
import sample
import trainer
from unet import UNet, UNetConfig

SD = UNetConfig()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GUIDANCE = 7.5


# -----------------------------------------------------------------------------------------------
# Measuring: time and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats, warmup, device):
    """Median wall time of `repeats` calls after `warmup` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), times


def rss_mb():
    """Resident memory now (Linux /proc), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def memory_now(device):
    return torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()


def reset_peak(device):
    """Start a new high-water mark. On Linux, writing 5 to clear_refs resets the process's peak
    RSS (VmHWM, which getrusage's ru_maxrss reports) to its current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False  # the peak then includes building the model


def peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_gflops(dtype, n, device, repeats=3):
    """The machine's practical peak: GFLOP/s of one n x n matmul (2 n^3 FLOPs), median of repeats.
    F.linear (a @ b^T), as nn.Linear runs it: on a CPU without bf16 units, bf16 `a @ b` takes a
    fallback 10x slower than the oneDNN path F.linear uses."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    ms, _ = median_ms(lambda: F.linear(a, b), repeats, 1, device)
    return 2 * n**3 / (ms / 1000) / 1e9


def unet_gflop(size, batch=2):
    """FLOPs of one forward of our UNet (FlopCounterMode: matmuls, convs and attention), counted on
    the meta device so no memory or time is spent."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet(SD)
        x, t, c = torch.empty(batch, 4, size, size), torch.zeros(batch, dtype=torch.long), torch.empty(batch, 77, 768)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, c)
    return counter.get_total_flops() / 1e9


# -----------------------------------------------------------------------------------------------
# The models

def diffusers_sd_unet():
    """diffusers' UNet2DConditionModel with the SD v1 config and a seeded random init."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(checkpoint.unet_config_to_diffusers(SD, 64)).eval()


def random_sd_unet(seed=0):
    """Our full-size UNet with random weights everywhere. CompVis zero-inits the last conv of every
    block, which would make every gradient reaching attn2 exactly zero; fill those too."""
    torch.manual_seed(seed)
    unet = UNet(SD)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return unet


class CopiedOriginal:
    """The naive phi_0: a deep copy of the whole UNet, frozen. The forward pre-hooks that
    duge.AttentionRecorder puts on the live UNet's attn2.to_out are shared with the copy's, so
    DUGE's loss records A^l from it and runs unchanged."""

    def __init__(self, unet):
        self.unet = unet
        self.copy = copy.deepcopy(unet).requires_grad_(False)
        self.tensors = {}  # only read by R_pr when gamma > 0

    @torch.no_grad()
    def __call__(self, x, t, context):
        pairs = [(live.to_out, frozen.to_out) for (_, live), (_, frozen)
                 in zip(self.unet.cross_attentions(), self.copy.cross_attentions())]
        for live, frozen in pairs:
            frozen._forward_pre_hooks = live._forward_pre_hooks
        try:
            return self.copy(x, t, context)
        finally:
            for _, frozen in pairs:
                frozen._forward_pre_hooks = type(frozen._forward_pre_hooks)()


# -----------------------------------------------------------------------------------------------
# Part 1, one subprocess per (implementation, dtype): forward, then one guided DDIM step

def speed_inputs(size, device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)              # (a): UNet batch 2
    t = torch.tensor([981, 501])
    context = torch.randn(2, 77, 768, generator=g)
    latent = torch.randn(1, 4, size, size, generator=g)         # (b): one image, so UNet batch 2
    cond, uncond = torch.randn(2, 1, 77, 768, generator=g)
    cast = lambda v: v.to(device, dtype)                        # noqa: E731
    return cast(x), t.to(device), cast(context), cast(latent), cast(cond), cast(uncond)


def run_speed_one(impl, dtype_name, size, repeats, warmup, device, out_path):
    dtype = DTYPES[dtype_name]
    base = memory_now(device)
    ref = diffusers_sd_unet()
    if impl == "ours":
        model = checkpoint.unet_from_diffusers_tensors(SD, ref.state_dict())
        del ref
    else:
        model = ref
    gc.collect()
    model.to(device, dtype)
    x, t, context, latent, cond, uncond = speed_inputs(size, device, dtype)

    if impl == "ours":
        def forward():
            return model(x, t, context)
        eps_fn = sample.guided_eps(model, cond, uncond, GUIDANCE)

        def ddim_step():
            return sample.ddim_sample(eps_fn, latent, steps=1)
    else:
        from diffusers import DDIMScheduler
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading")
        scheduler.set_timesteps(1)
        step_t = scheduler.timesteps[0]

        def forward():
            return model(x, t, encoder_hidden_states=context).sample

        def ddim_step():
            e_u, e_c = model(torch.cat([latent, latent]), step_t,
                             encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            return scheduler.step(e_u + GUIDANCE * (e_c - e_u), step_t, latent).prev_sample

    result, outputs = {}, {}
    with torch.no_grad():
        for case, fn in (("unet_forward", forward), ("ddim_cfg_step", ddim_step)):
            gc.collect()
            before = memory_now(device)
            clean = reset_peak(device)
            ms, times = median_ms(fn, repeats, warmup, device)
            top = peak(device)
            outputs[case] = fn().float().cpu()
            result[case] = {"ms": ms, "times": times, "peak_mb": top - base, "work_mb": top - before,
                            "clean_peak": clean}
    torch.save(outputs, out_path)
    result["threads"] = torch.get_num_threads()
    return result


# -----------------------------------------------------------------------------------------------
# Part 2, one subprocess per variant: one training step of the same UNet and trained tensors

def train_batch(n, generator, size=32):
    return torch.randn(n, 4, size, size, generator=generator), torch.randn(n, 77, 768, generator=generator)


def run_step_one(variant, device):
    base = memory_now(device)
    unet = random_sd_unet().to(device)
    gc.collect()
    before = memory_now(device)
    clean = reset_peak(device)
    t0 = time.perf_counter()

    names = trainer.trainable_names(unet, "kv")
    named = dict(unet.named_parameters())
    unet.requires_grad_(False)
    params = {n: named[n] for n in names}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    logs = {}
    if variant == "plain":
        x0, c = train_batch(3, g)                                       # as many images as DUGE's theta call
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sample.NUM_TRAIN_TIMESTEPS, (3,), generator=g)
        x0, c, noise, t = x0.to(device), c.to(device), noise.to(device), t.to(device)
        loss = F.mse_loss(unet(sample.add_noise(x0, noise, t), t, c), noise)
    else:
        if variant == "duge":
            attn2 = trainer.trainable_names(unet, "attn2")
            phi0 = trainer.Original(unet, {n: p for n, p in unet.named_parameters() if n in attn2})
        else:
            phi0 = CopiedOriginal(unet)
        (x_a, c_target), (_, c_anchor) = train_batch(1, g), train_batch(1, g)
        x_r, c_r = train_batch(1, g)
        x_m, c_m = train_batch(1, g)
        data = {"unlearn": {"x": x_a, "c_target": c_target, "c_anchor": c_anchor}, "prior": {"x": x_r, "c": c_r},
                "memory": {"x": x_m, "c": c_m}}
        data = {k: {n: v.to(device) for n, v in d.items()} for k, d in data.items()}
        batch = trainer.draw_batch(data, 1, torch.Generator().manual_seed(0))
        loss, logs = duge.Duge(duge.DugeConfig()).loss(unet, phi0, batch)
    loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in params.values()]).norm().item()
    opt.step()
    sync(device)
    top = peak(device)
    return {"peak_mb": top - base, "unet_mb": before - base, "step_mb": top - before, "clean_peak": clean,
            "loss": loss.item(), "logs": logs, "grad_norm": grad_norm, "trained": sum(p.numel() for p in params.values()),
            "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


# -----------------------------------------------------------------------------------------------
# Part 3, one subprocess per configuration: the real SD request's shapes (64x64 latents, 512 px)

def run_request_one(config, device):
    """Peak memory of one phase of a real-SD request, full-size random weights:
    "generate": phi_0's training images (2 per prompt, guidance: a UNet batch of 4) and their
    decoding, as train.py draws them (2 DDIM steps: the peak is per step);
    "train:B:MB:CKPT:AUTOCAST": one trainer.unlearn step of DUGE, B images per group, micro-batches of MB
    (0: all), gradient checkpointing 0/1, autocast ''/bf16."""
    base = memory_now(device)
    torch.manual_seed(0)
    if config == "generate":
        from clip_text import TextConfig, TextEncoder, Tokenizer
        from vae import VAE, VAEConfig
        model = checkpoint.StableDiffusion(Tokenizer.from_openai_gz(), TextEncoder(TextConfig()), random_sd_unet(),
                                           VAE(VAEConfig())).to(device=device)
        gc.collect()
        before, clean = memory_now(device), reset_peak(device)
        t0 = time.perf_counter()
        sample.generate(model, ["a painting in the style of van gogh"] * 2, steps=2, guidance=GUIDANCE)
        out = {"what": "generate"}
    else:
        _, b, mb, ckpt, autocast = config.split(":")
        unet = random_sd_unet().to(device)
        gc.collect()
        before, clean = memory_now(device), reset_peak(device)
        t0 = time.perf_counter()
        attn2 = trainer.trainable_names(unet, "attn2")
        phi0 = trainer.Original(unet, {n: p for n, p in unet.named_parameters() if n in attn2})
        g, n = torch.Generator().manual_seed(0), int(b)
        x = lambda: torch.randn(n, 4, 64, 64, generator=g).to(device)
        c = lambda: torch.randn(n, 77, 768, generator=g).to(device)
        data = {"unlearn": {"x": x(), "c_target": c(), "c_anchor": c()}, "prior": {"x": x(), "c": c()},
                "memory": {"x": x(), "c": c()}}
        cfg = trainer.TrainConfig(steps=1, lr=1e-5, batch=n, micro_batch=int(mb), checkpointing=ckpt == "1",
                                  autocast=autocast)
        out = trainer.unlearn(unet, duge.Duge(duge.DugeConfig()), phi0, data, cfg, progress=False)[0]
    sync(device)
    top = peak(device)
    return {**out, "peak_mb": top - base, "resident_mb": before - base, "clean_peak": clean,
            "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def request(args):
    """The table of the README's "Real SD on one GPU": every phase of the SD preset's request."""
    device = torch.device(args.device)
    print(f"request: full-size SD v1 (random weights), fp32 weights, 64x64 latents (512 px), contexts 77x768; "
          f"device {device.type}, {args.threads} thread(s); peak = "
          f"{'max RSS growth' if device.type == 'cpu' else 'max allocated'} over the process after imports")
    rows = []
    for config in args.configs:
        r = child(args, "request", config)
        rows.append((config, r))
        print(f"  ran {config}: {r['seconds']:.0f} s, peak {r['peak_mb']:.0f} MiB", flush=True)
    print("\n| phase | images per group | micro-batch | checkpointing | autocast | peak MiB | seconds | time vs "
          "unbounded, same images | L_U |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config, r in rows:
        if config == "generate":
            print(f"| phi_0 images / grid: 2 images, guidance, decode | - | - | - | - | {r['peak_mb']:.0f} | "
                  f"{r['seconds']:.0f} (2 DDIM steps) | - | - |")
            continue
        _, b, mb, ckpt, autocast = config.split(":")
        same = next((x for c, x in rows if c == f"train:{b}:0:0:"), None)
        ratio = f"{r['seconds'] / same['seconds']:.2f}x" if same else "-"
        print(f"| training step | {b} | {mb if mb != '0' else 'all'} | {'yes' if ckpt == '1' else 'no'} | "
              f"{autocast or 'no'} | {r['peak_mb']:.0f} | {r['seconds']:.0f} | {ratio} | {r['L_U']:.5f} |")


# -----------------------------------------------------------------------------------------------
# The parent: runs the subprocesses and prints the tables

def child(args, *extra):
    """Run `python -m experiments.bench _one ...` and return the JSON dict it prints on its last line."""
    cmd = [sys.executable, "-m", "experiments.bench", "_one", *map(str, extra),
           "--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, cwd=checkpoint.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"subprocess failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(args):
    device = torch.device(args.device)
    bf16_size = args.bf16_size or (args.size if device.type == "cuda" else 8)
    sizes = {"fp32": args.size, "bf16": bf16_size}
    print(f"speed: SD v1 UNet (859.5 M params, random weights), device {device.type}, "
          f"{args.threads} thread(s), median of {args.repeats} after {args.warmup} warm-up")
    print(f"  latents: fp32 {sizes['fp32']}x{sizes['fp32']}, bf16 {bf16_size}x{bf16_size}"
          + ("  (bf16 is emulated on this CPU: no native bf16 units, so a smaller latent)"
             if device.type == "cpu" and bf16_size != args.size else ""))
    t_start = time.perf_counter()
    # the machine's matmul peak first, before the models take the memory
    mm_n = {"fp32": 2048, "bf16": 2048 if device.type == "cuda" else 1024}
    mm = {d: matmul_gflops(DTYPES[d], mm_n[d], device) for d in args.dtypes}
    res, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dtypes:
            for impl in ("ours", "diffusers"):
                path = os.path.join(tmp, f"{impl}_{d}.pt")
                res[impl, d] = child(args, "speed", impl, d, "--size", sizes[d], "--repeats", args.repeats,
                                     "--warmup", args.warmup, "--out", path)
                outs[impl, d] = torch.load(path)
                print(f"  ran {impl} {d}: " + ", ".join(f"{c} {r['ms']:.0f} ms" for c, r in res[impl, d].items()
                                                         if isinstance(r, dict)), flush=True)

    mem = "max RSS growth" if device.type == "cpu" else "max allocated"
    print(f"\n| case | dtype | latent | ours ms | diffusers ms | ours/diffusers | ours peak MiB | "
          f"diffusers peak MiB | ours work MiB | diffusers work MiB | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in ("unet_forward", "ddim_cfg_step"):
        for d in args.dtypes:
            o, r = res["ours", d][case], res["diffusers", d][case]
            diff = (outs["ours", d][case] - outs["diffusers", d][case]).abs().max().item()
            print(f"| {case} | {d} | {sizes[d]}x{sizes[d]} | {o['ms']:.0f} | {r['ms']:.0f} | {o['ms'] / r['ms']:.3f} | "
                  f"{o['peak_mb']:.0f} | {r['peak_mb']:.0f} | {o['work_mb']:.0f} | {r['work_mb']:.0f} | {diff:.2e} |")
    print(f"\npeak = {mem} over the process after imports (weights + working memory); work = over the "
          f"resident weights. Each (implementation, dtype) ran in its own process; the high-water mark "
          f"was reset before each case{'' if all(r[c]['clean_peak'] for r in res.values() for c in ('unet_forward', 'ddim_cfg_step')) else ' (RESET FAILED: peaks include model construction)'}.")
    print("max abs diff: ours vs diffusers output (eps for the forward, x_prev for the step), same weights and "
          "inputs; for scale, the std of diffusers' outputs: " + ", ".join(
              f"{c} {d} {outs['diffusers', d][c].std().item():.3g}" for c in ("unet_forward", "ddim_cfg_step")
              for d in args.dtypes))
    print("every timed run (ms): " + "; ".join(
        f"{impl} {d} {c}: {', '.join(f'{t:.0f}' for t in r[c]['times'])}" for (impl, d), r in res.items()
        for c in ("unet_forward", "ddim_cfg_step")))

    print("\nachieved throughput of our UNet forward (batch 2), FLOPs from torch.utils.flop_counter:")
    for d in args.dtypes:
        gflop = unet_gflop(sizes[d])
        ours_g = gflop / (res["ours", d]["unet_forward"]["ms"] / 1000)
        ref_g = gflop / (res["diffusers", d]["unet_forward"]["ms"] / 1000)
        print(f"  {d}: {gflop:.1f} GFLOP per forward; ours {ours_g:.1f} GFLOP/s, diffusers {ref_g:.1f} GFLOP/s; "
              f"{d} matmul peak ({mm_n[d]}x{mm_n[d]}) {mm[d]:.1f} GFLOP/s -> ours at {100 * ours_g / mm[d]:.0f}% of peak")
    print(f"\nthreads: {args.threads} (torch.get_num_threads in the subprocesses: "
          f"{sorted({r['threads'] for r in res.values()})}); wall time {time.perf_counter() - t_start:.0f} s")


def memory(args):
    device = torch.device(args.device)
    mem = "max RSS growth" if device.type == "cpu" else "max allocated"
    print(f"memory: one training step of the full-size SD v1 UNet (random weights), fp32, latents 4x32x32, "
          f"contexts 77x768, trained: attn2 to_k/to_v; device {device.type}, {args.threads} thread(s)")
    t_start = time.perf_counter()
    res = {}
    for variant in ("plain", "duge", "naive"):
        res[variant] = child(args, "memory", variant)
        print(f"  ran {variant}: {res[variant]['seconds']:.0f} s", flush=True)
    what = {"plain": "plain kv fine-tuning, 3 images: mse(unet(x_t, t, c), eps)",
            "duge": "DUGE (duge.Duge.loss): theta on 3 images, phi_0 swapped in on 2",
            "naive": "DUGE with phi_0 = deep copy of the UNet"}
    print(f"\n| step | peak MiB | UNet MiB | step MiB | vs plain (peak) | vs plain (step) | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    p = res["plain"]
    for v, r in res.items():
        print(f"| {what[v]} | {r['peak_mb']:.0f} | {r['unet_mb']:.0f} | {r['step_mb']:.0f} | "
              f"{r['peak_mb'] / p['peak_mb']:.3f}x | {r['step_mb'] / p['step_mb']:.3f}x | {r['loss']:.4f} | {r['grad_norm']:.3e} |")
    ratio = res["duge"]["peak_mb"] / p["peak_mb"]
    print(f"\npeak = {mem} of the process after imports; UNet = the weights resident before the step; "
          f"step = peak over those weights (phi_0 setup, activations, gradients, AdamW state).")
    print(f"trained tensors: {p['trained'] / 1e6:.1f} M parameters")
    print(f"DUGE / plain peak: {ratio:.3f}x (target <= 1.25x): {'OK' if ratio <= 1.25 else 'ABOVE TARGET'}")
    print(f"swapping phi_0 in instead of copying saves {res['naive']['peak_mb'] - res['duge']['peak_mb']:.0f} MiB")
    print(f"threads: {args.threads}; wall time {time.perf_counter() - t_start:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["speed", "memory", "request", "_one"])
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)  # _one: speed IMPL DTYPE | memory VARIANT
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="latent size of the speed benchmark (64 = 512 px)")
    ap.add_argument("--bf16-size", type=int, default=None, help="latent size for bf16 (default: --size on "
                    "CUDA, 8 on CPU, where bf16 is emulated and about 50x slower)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=["generate", "train:1:0:0:", "train:2:0:0:", "train:2:1:1:",
                                                     "train:2:2:1:", "train:8:2:1:"],
                    help="request: 'generate' and/or train:IMAGES_PER_GROUP:MICRO_BATCH:CHECKPOINTING:AUTOCAST")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "speed":
        speed(args)
    elif args.part == "memory":
        memory(args)
    elif args.part == "request":
        request(args)
    elif args.rest[0] == "request":
        print(json.dumps(run_request_one(args.rest[1], torch.device(args.device))))
    elif args.rest[0] == "speed":
        _, impl, d = args.rest
        r = run_speed_one(impl, d, args.size, args.repeats, args.warmup, torch.device(args.device), args.out)
        print(json.dumps(r))
    else:
        print(json.dumps(run_step_one(args.rest[1], torch.device(args.device))))


if __name__ == "__main__":
    main()
