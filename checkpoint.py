"""Reading and writing Stable Diffusion v1 and 2.x checkpoints, in both layouts people download.

- CompVis single file (`sd-v1-4.ckpt`, `v1-5-pruned-emaonly.safetensors`, ...): one flat dict with
  the prefixes `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and
  `cond_stage_model.transformer.` (CLIP text). Our modules are named after these keys, so loading is
  a prefix strip. This is also the format of the toy model in weights/. SD 2.x files
  (`v2-1_768-ema-pruned.safetensors`, ...; Stability-AI/stablediffusion) hold an OpenCLIP text tower
  under `cond_stage_model.model.` instead, renamed by clip_text.from_open_clip / to_open_clip.
- diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, ...): loaded through the renaming
  tables that unet.py and vae.py own.

    model = checkpoint.load("v1-5-pruned-emaonly.safetensors")   # -> StableDiffusion
    checkpoint.save(model, "out.safetensors")                     # or a folder: format="diffusers"

    python -m checkpoint convert sd-v1-4.ckpt sd-v1-4.safetensors  # a pickle, once, into a clean file
    python -m checkpoint convert stable-diffusion-v1-5/ sd15.safetensors --dtype fp16

Loading is strict: every tensor of the file is used, or is one of the extras official files carry
(SCHEDULE_BUFFERS, model_ema.*, position_ids, below); anything missing, unexpected or misshaped is
a CheckpointError whose one-line message names it. The extras a model file needs and training
cannot make stale (the schedule buffers, an SD 2.x file's unused OpenCLIP tensors) are kept in
StableDiffusion.extras and written back, so a single file we write has every tensor the original
code loads; the EMA bookkeeping and position_ids are not (an EMA copy would be read instead of the
trained UNet). Nothing here executes a pickle: .safetensors is read directly and .ckpt / .bin go
through safe_pickle (a restricted unpickler).

SDXL, SD 3 and inpainting checkpoints are refused with one line.

References: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (the single-file
layout); Stability-AI/stablediffusion configs/stable-diffusion/v2-inference{,-v}.yaml (SD 2.x);
diffusers loaders/single_file_utils.py.
"""
import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import safe_pickle
from clip_text import EOT, TextConfig, TextEncoder, Tokenizer, from_open_clip, open_clip_unused, to_open_clip
from unet import UNet, UNetConfig
from unet import diffusers_key_map as unet_diffusers_key_map
from vae import VAE, VAEConfig
from vae import diffusers_key_map as vae_diffusers_key_map
from vae import from_diffusers_tensor, normalize_legacy_diffusers_key, to_diffusers_tensor

ROOT = Path(__file__).resolve().parent
TOY_WEIGHTS = ROOT / "weights" / "toy_sd.safetensors"

UNET, VAE_, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x's text encoder (OpenCLIP ViT-H/14)

# Tensors an official file may hold that we do not use: the DDPM schedule (recomputed in
# sample.py; kept and written back, StableDiffusion.extras), EMA bookkeeping and the EMA copy itself
# (used instead of the UNet when present, see _use_ema), and the CLIP position_ids buffer (always arange(77)).
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
POSITION_IDS = "text_model.embeddings.position_ids"


class CheckpointError(Exception):
    """A file we cannot or will not load; the message is one line that says what to do."""


# -----------------------------------------------------------------------------------------------
# The one way this project writes a file: under a temporary name, renamed at the end

@contextmanager
def atomic_path(path, mode=0o644):
    """Yield a temporary path beside `path` to write a file or a folder to; only when the block
    finishes is it renamed to `path` (replacing what was there), so an interrupted or failed
    write leaves the old file and no half-written one. The folder is made if missing; files get
    `mode` (safetensors' own default, 0600, would hide models from other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        for f in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
            if f.is_file():
                os.chmod(f, mode)
        if path.is_dir():  # a folder cannot be replaced in one step: swap, then delete the old one
            old = path.with_name(path.name + ".old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p):
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def save_training_state(path, tensors, optimizer, meta):
    """A resume point: named tensors, an optimizer's state and string metadata, in one
    safetensors file (no pickle: the optimizer's per-parameter tensors are stored by index)."""
    state = optimizer.state_dict()
    tensors = dict(tensors)
    for i, s in state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in s.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, "param_groups": json.dumps(state["param_groups"])})


def load_training_state(path):
    """-> (tensors without the optimizer's, optimizer state dict, metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for k in [k for k in tensors if k.startswith("opt.")]:
        _, i, name = k.split(".", 2)
        state.setdefault(int(i), {})[name] = tensors.pop(k)
    return tensors, {"state": state, "param_groups": json.loads(meta["param_groups"])}, meta


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}   # --dtype names


def read_ledger(model):
    """Every unlearning request the model went through, stored as JSON in its file's metadata:
    {"steps": [{"concept", "kind", "anchor", "retain", "hparams", "metrics", "delta"}, ...]}."""
    return json.loads(model.meta.get("duge.ledger", '{"steps": []}'))


def forgotten(model):
    """The concepts the model was asked to forget, in order."""
    return [s["concept"] for s in read_ledger(model)["steps"]]


def check_writable(path):
    """Fail before any work if the output folder cannot be made or written (nothing is created)."""
    folder = Path(path).resolve().parent
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK) or (
            existing != folder and not os.access(existing, os.W_OK)):
        raise CheckpointError(f"cannot write to {folder}; choose another output path")
    try:  # /proc and similar refuse even when os.access says yes
        probe = existing / f".duge-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to {folder} ({e.strerror}); choose another output path") from None


@dataclass
class StableDiffusion:
    """The four parts of SD (v1 or 2.x) plus the file's metadata (configs, the unlearning ledger, ...)."""
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    meta: dict = field(default_factory=dict)  # str -> str, as stored in the file
    image_size: int = 512                      # native resolution in pixels
    guidance: float = 7.5                      # default classifier-free guidance scale
    source: str = ""                           # the path it was loaded from
    format: str = "compvis"                    # "compvis" or "diffusers": how it was stored
    extras: dict = field(default_factory=dict)  # a CompVis file's tensors no module holds, by their key in
    # the file, written back as read (schedule buffers; SD 2.x: resblock 23, text_projection, logit_scale)

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def configs(self):
        return {"unet": asdict(self.unet.cfg), "vae": asdict(self.vae.cfg), "text": asdict(self.text_encoder.cfg),
                "image_size": self.image_size, "guidance": self.guidance}

    @property
    def open_clip(self):
        """An OpenCLIP text tower (SD 2.x), told by its GELU: stored in OpenCLIP's layout, padded with 0."""
        return self.text_encoder.cfg.hidden_act == "gelu"


# -----------------------------------------------------------------------------------------------
# Reading raw tensors

def read_safetensors(path):
    """-> (state dict, metadata). A truncated or foreign file is a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable .safetensors file ({first}); "
                              "the file may be truncated: download it again") from None
    return sd, meta


PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def read_any(path):
    """A .safetensors, .ckpt/.pt or .bin file -> (flat state dict, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder; expected a Stable Diffusion checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    # a torch.save zip or a legacy raw pickle; safe_pickle also explains what a mislabelled file is
    if path.suffix in PICKLE_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        try:
            obj = safe_pickle.load(path)
        except safe_pickle.UnsafePickleError as e:
            raise CheckpointError(str(e)) from None
        while isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: holds no state dict of tensors; is it a model checkpoint?")
        return obj, {}
    raise CheckpointError(f"{path}: unknown file type; expected .safetensors, .ckpt or a diffusers folder")


# -----------------------------------------------------------------------------------------------
# Recognising what a file is

def check_supported(sd, path):
    """Refuse, with one line, the checkpoints that look like SD but are not SD v1 / 2.x txt2img.
    -> "v1" or "v2" (an OpenCLIP text tower or a 1024-wide cross-attention: weight_formats.md §2.3)."""
    keys = sd.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path}: this is an SDXL checkpoint; only Stable Diffusion v1.x and 2.x are supported")
    if any(k.startswith(UNET + "joint_blocks.") for k in keys):
        raise CheckpointError(f"{path}: this is a Stable Diffusion 3 checkpoint (MMDiT); "
                              "only Stable Diffusion v1.x and 2.x are supported")
    if not any(k.startswith(UNET) for k in keys):
        raise CheckpointError(f"{path}: no Stable Diffusion UNet inside (no '{UNET}*' tensors); "
                              "is this a model checkpoint?")
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 9:
        raise CheckpointError(f"{path}: this is an inpainting checkpoint (9 input channels); "
                              "only the txt2img v1.x and 2.x models are supported")
    wide = any(k.startswith(UNET) and k.endswith("attn2.to_k.weight") and v.ndim == 2 and v.shape[1] == 1024
               for k, v in sd.items())
    return "v2" if wide or any(k.startswith(OPEN_CLIP) for k in keys) else "v1"


def _use_ema(sd, path):
    """Full-EMA files keep a flattened copy of every UNet weight under model_ema.*; that copy is what
    CompVis samples with. model.diffusion_model.a.b.weight <-> model_ema.diffusion_modelabweight."""
    ema = {k for k in sd if k.startswith("model_ema.")}
    if len(ema) <= 100:  # the diffusers heuristic: only decay/num_updates -> no EMA copy
        return sd, False
    out = dict(sd)
    for k in sd:
        if k.startswith(UNET):
            e = "model_ema." + "".join(k[len("model."):].split("."))
            if e not in sd:
                raise CheckpointError(f"{path}: the EMA copy of the UNet is incomplete ({e} missing)")
            out[k] = sd[e]
    return out, True


def split_compvis(sd, path, text_layers=None):
    """Flat CompVis dict -> (unet, vae, text) dicts without prefixes, the text in our names whichever
    tower it is (an OpenCLIP one cut to text_layers, None: SD 2.x's penultimate), and the extras to write
    back (StableDiffusion.extras): the schedule buffers and the OpenCLIP tensors cut. Strict about the rest."""
    text = OPEN_CLIP if any(k.startswith(OPEN_CLIP) for k in sd) else TEXT
    parts = {UNET: {}, VAE_: {}, text: {}}
    unexpected, extras = [], {}
    for k, v in sd.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is not None:
            parts[prefix][k[len(prefix):]] = v
        elif k in SCHEDULE_BUFFERS:
            extras[k] = v
        elif not k.startswith("model_ema."):
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {_some(unexpected)}; not a plain SD v1 / 2.x checkpoint")
    for p, name in ((VAE_, "VAE"), (text, "text encoder")):
        if not parts[p]:
            raise CheckpointError(f"{path}: the {name} is missing (no '{p}*' tensors); "
                                  "a UNet-only file cannot be sampled from")
    if text == OPEN_CLIP:
        extras |= {OPEN_CLIP + k: parts[text][k] for k in open_clip_unused(parts[text], text_layers)}
    text_sd = from_open_clip(parts[text], text_layers) if text == OPEN_CLIP else text_model_keys(parts[text])
    return parts[UNET], parts[VAE_], text_sd, {k: v.clone() for k, v in extras.items()}   # not the file's memory


def text_model_keys(sd):
    """CLIPTextModel keys as our TextEncoder names them. transformers >= 5 writes them without the
    'text_model.' level; older files have it, and an int64 position_ids buffer (always arange(77))."""
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    sd.pop(POSITION_IDS, None)
    return sd


def _some(keys):
    return f"{keys[:3]}{'...' if len(keys) > 3 else ''} ({len(keys)} in all)"


# -----------------------------------------------------------------------------------------------
# Configs: from the file's metadata when we wrote it, else inferred from tensor shapes. Head counts
# and GroupNorm groups leave no trace in shapes; official SD v1 uses 8 heads and 32 groups, SD 2.x
# heads of 64 channels. Nor does the prediction type: SD 2.x files are read as v-prediction (the
# 768-v models, as diffusers guesses), unless load(prediction_type="epsilon") says (512-base).

def infer_unet_config(sd, version="v1"):
    mc = sd["input_blocks.0.0.weight"].shape[0]
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = 1 + sum(1 for k in sd if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
    nrb = (n_in - levels) // levels
    first = [1 + i * (nrb + 1) for i in range(levels)]  # first ResBlock of each level
    mult = tuple(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] // mc for b in first)
    attn = tuple(i for i, b in enumerate(first) if f"input_blocks.{b}.1.norm.weight" in sd)
    ctx = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    linear = next(v.ndim == 2 for k, v in sd.items() if k.endswith(".proj_in.weight"))
    v2 = dict(num_head_channels=64, upcast_attention=True, prediction_type="v_prediction") if version == "v2" else {}
    return UNetConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
                      model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_levels=attn,
                      context_dim=ctx, use_linear_projection=linear, **v2)


def infer_vae_config(sd):
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    nrb = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                     ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=sd["decoder.conv_in.weight"].shape[1],
                     embed_dim=sd["post_quant_conv.weight"].shape[0])


def infer_text_config(sd, open_clip=False):
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    return TextConfig(vocab_size=vocab, max_length=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                      width=width, layers=layers, heads=max(1, width // 64),
                      hidden_act="gelu" if open_clip else "quick_gelu")


def _infer(infer, sd, what, path):
    """A file too damaged to infer its config from is a CheckpointError, not a KeyError."""
    try:
        return infer(sd)
    except KeyError as e:
        raise CheckpointError(f"{path}: {what} tensor {e.args[0]} is missing; incomplete or not SD?") from None
    except (StopIteration, ValueError, IndexError):  # no keys of a kind at all, or a malformed name
        raise CheckpointError(f"{path}: the {what} tensors do not form a SD {what}; wrong model?") from None


def _config(cls, d):
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


# -----------------------------------------------------------------------------------------------
# Building modules from state dicts

def _load_strict(cls, cfg, sd, what, path, device, dtype):
    """Build the module on the "meta" device (names and shapes, no memory, no random init) and
    hand it copies of the file's tensors. dtype None keeps the file's own dtype."""
    with torch.device("meta"):
        module = cls(cfg)
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: {what} {'is missing' if missing else 'has unexpected'} tensor(s) "
                              f"{_some(missing or unexpected)}; wrong model?")
    for k, v in own.items():
        if v.shape != sd[k].shape:
            raise CheckpointError(f"{path}: {what} tensor {k} has shape {tuple(sd[k].shape)}, "
                                  f"expected {tuple(v.shape)}; wrong model size or version?")
    # Always a copy: both readers map the file into memory, and a model must not change (or crash
    # with SIGBUS) when its file is overwritten later.
    module.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in sd.items()},
                           strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _build(unet_sd, vae_sd, text_sd, cfgs, path, device, dtype):
    unet = _load_strict(UNet, cfgs["unet"], unet_sd, "UNet", path, device, dtype)
    vae = _load_strict(VAE, cfgs["vae"], vae_sd, "VAE", path, device, dtype)
    text = _load_strict(TextEncoder, cfgs["text"], text_sd, "text encoder", path, device, dtype)
    return fast_layout(unet), fast_layout(vae), text


def fast_layout(module):
    """On CPU, convolution weights in channels-last layout (the UNet moves its input to match): oneDNN's
    convolutions run faster so, on the toy model 13% for the UNet and 30% for the VAE decoder, one thread
    (same outputs within 5e-6). Saving makes every tensor contiguous again."""
    if next(module.parameters()).device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def _check_tokenizer(tok, cfg, path):
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the text encoder "
                              f"{cfg.vocab_size}; the tokenizer does not belong to this model")


def load(path, device="cpu", dtype=torch.float32, variant=None, verbose=False, prediction_type=None):
    """Load a CompVis single file (.safetensors / .ckpt) or a diffusers folder -> StableDiffusion.

    dtype is the compute dtype: fp16 / bf16 files are upcast (or fp32 files downcast) on load;
    None keeps the dtype stored in the file. `variant="fp16"` picks the *.fp16.* files of a
    diffusers folder. verbose prints which file(s) were read. prediction_type ("epsilon" or
    "v_prediction") overrides what the file says or what is guessed: SD 2.x CompVis files say nothing, and
    are read as 768-v models, or as 512-base ones with prediction_type="epsilon". None or "auto": no override.
    """
    path, prediction_type = Path(path), None if prediction_type == "auto" else prediction_type
    if path.is_dir():
        model = load_diffusers(path, device=device, dtype=dtype, variant=variant, verbose=verbose)
    else:
        model = load_compvis(path, device=device, dtype=dtype, verbose=verbose, prediction_type=prediction_type)
    if prediction_type is not None:
        model.unet.cfg = replace(model.unet.cfg, prediction_type=prediction_type)
    return model


def load_compvis(path, device="cpu", dtype=torch.float32, verbose=False, prediction_type=None):
    sd, meta = read_any(path)
    version = check_supported(sd, path)
    sd, ema = _use_ema(sd, path)
    open_clip = any(k.startswith(OPEN_CLIP) for k in sd)
    stored = json.loads(meta["duge.config"]) if "duge.config" in meta else {}
    unet_sd, vae_sd, text_sd, extras = split_compvis(sd, path, stored.get("text", {}).get("layers"))
    cfgs = {}
    for name, cls, infer, part, what in (("unet", UNetConfig, lambda d: infer_unet_config(d, version), unet_sd, "UNet"),
                                         ("vae", VAEConfig, infer_vae_config, vae_sd, "VAE"),
                                         ("text", TextConfig, lambda d: infer_text_config(d, open_clip), text_sd,
                                          "text encoder")):
        cfgs[name] = _config(cls, stored[name]) if name in stored else _infer(infer, part, what, path)
    unet, vae, text = _build(unet_sd, vae_sd, text_sd, cfgs, path, device, dtype)
    pad = "!" if open_clip else EOT  # open_clip pads with id 0
    tok = (Tokenizer.from_merges_text(meta["duge.tokenizer"], pad=pad) if "duge.tokenizer" in meta
           else Tokenizer.from_openai_gz(pad=pad))
    _check_tokenizer(tok, cfgs["text"], path)
    if verbose:
        print(f"read {path} (CompVis single file{', UNet from its EMA copy' if ema else ''})", file=sys.stderr)
    # SD 2.x guessed as a 768-v model, as its prediction type; told epsilon, a 512-base one
    native = 768 if version == "v2" and prediction_type in (None, "v_prediction") else 512
    if version == "v2" and prediction_type is None and "unet" not in stored:
        print(f"note: {path.name} does not say what its UNet predicts: read as SD 2.x 768-v (v-prediction, 768 px); "
              "a 512-base file (v2-1_512-ema-pruned) predicts eps: pass --prediction-type epsilon "
              "(load(..., prediction_type='epsilon'))", file=sys.stderr)
    return StableDiffusion(tok, text, unet, vae, meta=meta, image_size=stored.get("image_size", native),
                           guidance=stored.get("guidance", 7.5), source=str(path), format="compvis", extras=extras)


# -----------------------------------------------------------------------------------------------
# diffusers folders

# Weight file names per component, best first: safetensors over a pickled .bin.
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "text_encoder": ("model.safetensors", "pytorch_model.bin")}


def _pick_weights(folder, names, variant):
    """The first of `names` present, or of their variants (model.safetensors -> model.fp16.safetensors)."""
    wanted = [n.replace(".", f".{variant}.", 1) for n in names] if variant else names
    for n in wanted:
        if (folder / n).is_file():
            return folder / n
    others = sorted(p.name for n in names for p in folder.glob(n.replace(".", ".*.", 1)))
    hint = (f"; it has {others[0]}: pass variant={others[0].split('.')[-2]!r}" if others and not variant
            else "; incomplete diffusers folder?")
    raise CheckpointError(f"{folder}: no {' or '.join(wanted)}{hint}")


def _read_json(p):
    try:
        return json.loads(Path(p).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing; incomplete diffusers folder?") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def load_diffusers(path, device="cpu", dtype=torch.float32, variant=None, verbose=False):
    path = Path(path)
    if not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: a folder, but not a diffusers Stable Diffusion folder (no unet/)")
    uc, vc, tc = (_read_json(path / p / "config.json") for p in ("unet", "vae", "text_encoder"))
    if uc.get("addition_embed_type") or (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path}: an SDXL folder; only Stable Diffusion v1.x and 2.x are supported")
    if uc.get("in_channels", 4) == 9:
        raise CheckpointError(f"{path}: an inpainting UNet (9 input channels); only txt2img v1.x and 2.x are supported")
    sc = _read_json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    try:
        cfgs = {"unet": unet_config_from_diffusers(uc, sc.get("prediction_type", "epsilon")),
                "vae": vae_config_from_diffusers(vc), "text": text_config_from_diffusers(tc, path)}
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: a config.json lacks or garbles {e}; not a SD diffusers folder?") from None
    files = {p: _pick_weights(path / p, names, variant) for p, names in WEIGHT_FILES.items()}
    raw = {p: read_any(f)[0] for p, f in files.items()}

    inv = {v: k for k, v in unet_diffusers_key_map(cfgs["unet"]).items()}
    unet_sd = _rename(raw["unet"], inv, "UNet", path)
    vinv = {v: k for k, v in vae_diffusers_key_map(cfgs["vae"]).items()}
    vae_sd = _rename({normalize_legacy_diffusers_key(k): v for k, v in raw["vae"].items()}, vinv, "VAE", path)
    vae_sd = {k: from_diffusers_tensor(k, v) for k, v in vae_sd.items()}
    unet, vae, text = _build(unet_sd, vae_sd, text_model_keys(raw["text_encoder"]), cfgs, path, device, dtype)
    tok = read_tokenizer(path / "tokenizer", pad="!" if cfgs["text"].hidden_act == "gelu" else EOT)
    _check_tokenizer(tok, cfgs["text"], path)
    meta = _read_json(path / "duge.json") if (path / "duge.json").exists() else {}
    stored = json.loads(meta.get("duge.config", "{}"))
    if verbose:
        print("read " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    return StableDiffusion(tok, text, unet, vae, meta=meta,
                           image_size=stored.get("image_size", uc.get("sample_size", 64) * vae.downscale),
                           guidance=stored.get("guidance", 7.5), source=str(path), format="diffusers")


def unet_from_diffusers_tensors(cfg, sd):
    """Our UNet holding a diffusers UNet2DConditionModel's state dict (strict, shared storage: no copy)."""
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict({ours: sd[theirs] for ours, theirs in unet_diffusers_key_map(cfg).items()},
                          strict=True, assign=True)
    return model.eval()


def read_tokenizer(folder, pad=EOT):
    """The folder's CLIP tokenizer (clip_text reads both HF layouts); no folder: OpenAI's, padded with `pad`."""
    try:
        return Tokenizer.from_folder(folder) if folder.is_dir() else Tokenizer.from_openai_gz(pad=pad)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: not a CLIP tokenizer we can read ({str(e).splitlines()[0]})") from None


def _rename(sd, inverse_map, what, path):
    out = {}
    for k, v in sd.items():
        if k not in inverse_map:
            raise CheckpointError(f"{path}: {what} tensor {k!r} has no place in a SD {what}; wrong model?")
        out[inverse_map[k]] = v
    return out


def unet_config_from_diffusers(c, prediction_type="epsilon"):
    types, widths = c["down_block_types"], c["block_out_channels"]
    # "attention_head_dim" is the number of heads (a historical misnomer): one for all levels (SD v1), or
    # one per level (SD 2.x: [5, 10, 20, 20], i.e. heads of 64 channels)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    heads = dict(num_heads=heads) if isinstance(heads, int) else _head_channels(heads, widths)
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                      model_channels=widths[0], channel_mult=tuple(b // widths[0] for b in widths),
                      num_res_blocks=c.get("layers_per_block", 2),
                      attention_levels=tuple(i for i, t in enumerate(types) if t.startswith("CrossAttn")),
                      context_dim=c.get("cross_attention_dim", 768), norm_groups=c.get("norm_num_groups", 32),
                      use_linear_projection=c.get("use_linear_projection", False),
                      upcast_attention=c.get("upcast_attention", False), prediction_type=prediction_type, **heads)


def _head_channels(heads, widths):
    """Per-level head counts -> UNetConfig's way to say them: one count, or one head size."""
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0])
    sizes = {w // h for w, h in zip(widths, heads)}
    if len(sizes) != 1 or any(w % h for w, h in zip(widths, heads)):
        raise TypeError(f"attention_head_dim {heads} (neither one head count nor one head size)")
    return dict(num_head_channels=sizes.pop())


def unet_config_to_diffusers(cfg: UNetConfig, sample_size):
    n = len(cfg.channel_mult)
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n)]
    up = ["CrossAttnUpBlock2D" if (n - 1 - i) in cfg.attention_levels else "UpBlock2D" for i in range(n)]
    heads = [cfg.heads(cfg.model_channels * m) for m in cfg.channel_mult] if cfg.num_head_channels else cfg.num_heads
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
            "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
            "center_input_sample": False, "cross_attention_dim": cfg.context_dim,
            "down_block_types": down, "up_block_types": up, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "layers_per_block": cfg.num_res_blocks,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": cfg.norm_groups,
            "sample_size": sample_size, "use_linear_projection": cfg.use_linear_projection,
            "upcast_attention": cfg.upcast_attention}


def vae_config_from_diffusers(c):
    b = c["block_out_channels"]
    return VAEConfig(in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3), ch=b[0],
                     ch_mult=tuple(x // b[0] for x in b), num_res_blocks=c.get("layers_per_block", 2),
                     z_channels=c.get("latent_channels", 4), embed_dim=c.get("latent_channels", 4),
                     norm_groups=c.get("norm_num_groups", 32), scale_factor=c.get("scaling_factor", 0.18215))


def vae_config_to_diffusers(cfg: VAEConfig, sample_size):
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.z_channels,
            "layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.norm_groups,
            "sample_size": sample_size, "scaling_factor": cfg.scale_factor}


def text_config_from_diffusers(c, path=""):
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu") or c.get("intermediate_size", 4 * c["hidden_size"]) != 4 * c["hidden_size"]:
        raise CheckpointError(f"{path}: the text encoder uses {act} and a {c.get('intermediate_size')}-wide MLP; "
                              "not a SD v1 / 2.x CLIP text encoder")
    return TextConfig(vocab_size=c.get("vocab_size", 49408), max_length=c.get("max_position_embeddings", 77),
                      width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                      hidden_act=act)


def text_config_to_diffusers(cfg: TextConfig, dtype=torch.float32):
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": cfg.hidden_act,
            "hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_attention_heads": cfg.heads,
            "num_hidden_layers": cfg.layers, "max_position_embeddings": cfg.max_length,
            "vocab_size": cfg.vocab_size, "layer_norm_eps": 1e-5, "projection_dim": cfg.width,
            "bos_token_id": cfg.vocab_size - 2, "eos_token_id": cfg.vocab_size - 1, "pad_token_id": cfg.vocab_size - 1,
            "torch_dtype": str(dtype).removeprefix("torch.")}


# -----------------------------------------------------------------------------------------------
# Saving

def metadata(model, extra=None):
    """The str -> str metadata we write: configs, tokenizer (when not the OpenAI one), ledger, ..."""
    meta = {k: v for k, v in model.meta.items() if k.startswith("duge.")}
    meta["duge.config"] = json.dumps(model.configs())
    if model.text_encoder.cfg.vocab_size != 49408:
        meta["duge.tokenizer"] = model.tokenizer.merges_text()
    meta.update(extra or {})
    return meta


def compvis_state_dict(model):
    """The model as one flat CompVis dict, with the extras of the file it came from (a diffusers folder has
    no place for them: its scheduler config replaces the schedule buffers)."""
    sd = {}
    text = model.text_encoder.state_dict()
    text = {OPEN_CLIP + k: v for k, v in to_open_clip(text).items()} if model.open_clip else \
        {TEXT + k: v for k, v in text.items()}
    for prefix, m in ((UNET, model.unet), (VAE_, model.vae)):
        sd.update({prefix + k: v for k, v in m.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in {**model.extras, **sd, **text}.items()}


def output_format(path, format=None):
    """"compvis" or "diffusers", from `format` or the name; refuses names save() must not write."""
    fmt = format or {".safetensors": "compvis", "": "diffusers"}.get(path.suffix)
    if fmt not in ("compvis", "diffusers"):
        raise CheckpointError(f"{path}: cannot tell the format; use a .safetensors name or a folder name "
                              "(format='compvis' or 'diffusers')")
    if fmt == "compvis" and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: a CompVis file must be named *.safetensors (we never write pickles)")
    if fmt == "compvis" and path.is_dir() or fmt == "diffusers" and path.exists() and not (
            path / "model_index.json").is_file():  # never replace a folder that is not a model
        raise CheckpointError(f"{path}: exists and is not a {'file' if fmt == 'compvis' else 'diffusers folder'}; "
                              "choose another name")
    return fmt


def save(model, path, format=None, extra_metadata=None, dtype=None):
    """Write `model` as a CompVis .safetensors file or a diffusers folder (format "compvis" or
    "diffusers"; by default a name ending in .safetensors is compvis, one without suffix a folder).
    dtype casts the tensors written (None: as they are in memory). Everything is written under a
    temporary name and renamed at the end, so a failed save leaves the old file or folder intact
    and no half-written one."""
    path = Path(path)
    fmt = output_format(path, format)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    meta = metadata(model, extra_metadata)
    with atomic_path(path) as tmp:
        if fmt == "compvis":
            save_file({k: cast(v).cpu() for k, v in compvis_state_dict(model).items()}, str(tmp), metadata=meta)
        else:
            tmp.mkdir()
            _write_diffusers(model, tmp, meta, cast)
    return path


def _write_diffusers(model, folder, meta, cast):
    sample = model.image_size // model.vae.downscale
    umap = unet_diffusers_key_map(model.unet.cfg)
    vmap = vae_diffusers_key_map(model.vae.cfg)
    text_sd = {k: cast(v) for k, v in model.text_encoder.state_dict().items()}
    parts = {
        "unet": ({umap[k]: cast(v) for k, v in model.unet.state_dict().items()},
                 unet_config_to_diffusers(model.unet.cfg, sample), "diffusion_pytorch_model.safetensors"),
        "vae": ({vmap[k]: to_diffusers_tensor(k, cast(v)) for k, v in model.vae.state_dict().items()},
                vae_config_to_diffusers(model.vae.cfg, model.image_size), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (text_sd, text_config_to_diffusers(model.text_encoder.cfg, next(iter(text_sd.values())).dtype),
                         "model.safetensors"),
    }
    for name, (sd, cfg, fname) in parts.items():
        (folder / name).mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(folder / name / fname),
                  metadata={"format": "pt"})
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2))
    model.tokenizer.save_folder(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
        "prediction_type": model.unet.cfg.prediction_type, "timestep_spacing": "leading"}, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    (folder / "duge.json").write_text(json.dumps(meta, indent=2))


# -----------------------------------------------------------------------------------------------
# The command line: convert once, then load the clean file every time.

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m checkpoint", description="Stable Diffusion v1 / 2.x checkpoint tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite a .ckpt / .safetensors / diffusers folder as a "
                                          ".safetensors file or a diffusers folder")
    conv.add_argument("input", help="CompVis .ckpt/.safetensors file or diffusers folder")
    conv.add_argument("output", help="NAME.safetensors (CompVis single file) or a folder name (diffusers)")
    conv.add_argument("--format", choices=["compvis", "diffusers"], help="default: from the output name")
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="default: the input's own")
    conv.add_argument("--variant", help="read the *.VARIANT.* files of a diffusers folder, e.g. fp16")
    args = ap.parse_args(argv)
    try:
        output_format(Path(args.output), args.format)  # a bad output name fails before a long read
        model = load(args.input, dtype=None, variant=args.variant, verbose=True)
        out = save(model, args.output, format=args.format, dtype=DTYPES.get(args.dtype))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES.get(args.dtype) or next(model.unet.parameters()).dtype
    print(f"wrote {out} ({'diffusers folder' if out.is_dir() else 'CompVis single file'}, "
          f"{str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
