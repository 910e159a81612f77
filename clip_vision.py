"""CLIP's image side: the ViT image encoder, CLIP's joint embedding space, and its image preprocessing.

CLIP embeds an image and a prompt in one space where their cosine similarity says how well the
prompt describes the image; SD v1's text encoder is the text tower of CLIP ViT-L/14, and this file
adds the image tower of that same model, to score generated images against prompts.

    clip = load_clip("clip-vit-large-patch14/")           # the transformers folder of openai/...
    logits = clip(preprocess([img1, img2]), ["a cat", "a painting by van gogh"])  # (2 images, 2 prompts)

Sources (read for understanding, written here from scratch):
- Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
  (CLIP), section 2.4 and figure 3: image and text features, each projected linearly to the joint
  space and L2-normalised, scaled cosine similarities as logits; ViTs with an extra LayerNorm
  before the transformer.
- Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT): patches -> linear embedding,
  a learned class token and position embeddings, pre-LN transformer, class token as the summary.
- openai/CLIP clip/model.py (VisionTransformer) and clip/clip.py (_transform): bicubic resize of
  the shorter side, centre crop, the mean/std below.
- huggingface/transformers models/clip/{modeling,configuration,image_processing}_clip.py: the
  parameter names of the openai/clip-vit-large-patch14 folder (spelling "pre_layrnorm" included),
  the config keys and defaults, and the reference preprocessing (PIL's BICUBIC resize).
- Pillow src/libImaging/Resample.c: what BICUBIC computes, reproduced below in torch.

Notation: B batch, S image side (224), P patch side (14), N = (S/P)^2 patches (256), T = N + 1
tokens (the class token first), C width (1024), H heads, D joint embedding size (768).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import CheckpointError
from clip_text import MLP, SelfAttention, TextConfig, TextEncoder, Tokenizer
from concepts import eot_embedding


@dataclass
class VisionConfig:
    """Defaults: the image tower of openai/clip-vit-large-patch14. The MLP is 4 x width wide and
    uses quick_gelu, as in every OpenAI CLIP (clip_text.MLP is reused)."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16  # head size 64
    projection_dim: int = 768  # D, the joint space (the text projection has the same output size)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # read by clip_text.MLP


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)  # its defaults are ViT-L/14's text tower


# ----------------------------------------------------------------------------------------------
# The image encoder. Attribute names follow transformers' CLIPVisionModel (see KEY_PREFIXES).

class Attention(SelfAttention):
    """clip_text's multi-head attention without the causal mask: every token sees every token."""

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); mlp = fc2(quick_gelu(fc1))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):  # (B, T, C)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2
        # A conv with stride = kernel = P is one linear map applied to each P x P patch.
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))  # the learned class token
        self.position_embedding = nn.Embedding(n + 1, cfg.width)     # position 0: the class token

    def forward(self, pixels):  # (B, 3, S, S)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, C), patches row by row
        cls = self.class_embedding.expand(len(x), 1, -1)             # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, T, C)


class VisionTransformer(nn.Module):
    """Normalised pixels (B, 3, S, S) -> the class token's final state (B, C), after post_layernorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # CLIP's addition to ViT
        self.encoder = nn.Module()  # a bare container, for transformers' "encoder.layers.*" names
        self.encoder.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels):  # (B, 3, S, S)
        if pixels.shape[-2:] != (self.cfg.image_size,) * 2:
            raise ValueError(f"images must be {self.cfg.image_size}x{self.cfg.image_size}, got "
                             f"{tuple(pixels.shape[-2:])}; use clip_vision.preprocess")
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, T, C)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])  # (B, C): the class token summarises the image


class CLIP(nn.Module):
    """Both towers and the joint space. encode_image / encode_text return L2-normalised (B, D)
    embeddings, as CLIP compares them (normalize=False: the raw projections, which transformers'
    get_image_features / get_text_features return); forward returns the logits."""

    def __init__(self, cfg: CLIPConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.vision.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.vision.projection_dim, bias=False)
        # log of the inverse temperature: log(1 / 0.07) at CLIP's init, log(100) (its clamp) once trained
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def encode_image(self, pixels, normalize=True):  # (B, 3, S, S) from preprocess()
        pixels = pixels.to(self.visual_projection.weight)  # the model's device and dtype
        emb = self.visual_projection(self.vision(pixels))  # (B, D)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, text, normalize=True):  # a prompt, a list of prompts, or token ids (B, 77)
        if isinstance(text, (str, list)):
            if self.tokenizer is None:
                raise ValueError("this CLIP has no tokenizer (load_clip attaches one): pass token ids")
            text = self.tokenizer(text)
        tokens = text.to(self.logit_scale.device)  # (B, 77)
        # The pooled text output is the hidden state at the first end-of-text token.
        pooled = eot_embedding(self.text(tokens), tokens, self.cfg.text.vocab_size - 1)  # (B, width)
        emb = self.text_projection(pooled)  # (B, D)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, pixels, text):
        """logits_per_image (B_images, B_texts) = exp(logit_scale) * cosine similarity; a softmax
        over the texts gives zero-shot probabilities. logits_per_text is its transpose."""
        return self.logit_scale.exp() * self.encode_image(pixels) @ self.encode_text(text).T


# ----------------------------------------------------------------------------------------------
# Preprocessing: what transformers' CLIPImageProcessor does with PIL (OpenAI's, bar the crop's
# rounding), in torch: shorter side -> 224 with BICUBIC, centre crop 224 x 224, normalise.

MEAN = (0.48145466, 0.4578275, 0.40821073)  # of CLIP's training images, per RGB channel
STD = (0.26862954, 0.26130258, 0.27577711)


def bicubic_weights(n_in, n_out):
    """(n_out, n_in) matrix of Pillow's BICUBIC resampling along one axis: Keys' cubic (a = -0.5)
    around each output pixel's centre, stretched by the shrink factor when shrinking (that stretch
    is the antialiasing), cut at the image border and renormalised to sum 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale  # in input pixels
    t = ((torch.arange(n_in, dtype=torch.float64) - centre + 0.5) * (1 / stretch)).abs()  # Pillow's order
    w = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, (((t - 5) * t + 8) * t - 4) * -0.5)
    w = torch.where(t < 2, w, 0.0)  # (n_out, n_in); taps outside the image are simply absent
    return w / w.sum(dim=1, keepdim=True)


def _resample(x, n_out, start, size, dim, exact):
    """Resample axis `dim` (-1 or -2) of x to n_out pixels and keep [start, start + size)."""
    if x.shape[dim] == n_out:  # Pillow skips this pass: nothing to do but the crop
        return x.narrow(dim, start, size)
    w = bicubic_weights(x.shape[dim], n_out)[start:start + size]  # (size, n_in): the kept outputs only
    if exact:  # Pillow's 8-bit arithmetic: weights in 22-bit fixed point, results rounded
        w = torch.where(w < 0, w * 2**22 - 0.5, w * 2**22 + 0.5).trunc()
    y = x @ w.to(x).T if dim == -1 else w.to(x) @ x
    if exact:
        y = torch.floor((y + 2**21) / 2**22)
    return y.clamp(0, 255 if exact else 1)  # Pillow clips after each pass too


def resize_crop(x, size=224):
    """(..., 3, H, W) -> (..., 3, size, size): shorter side to `size`, then the centre crop.

    uint8 input is resampled in Pillow's own arithmetic (float64 holds its integers exactly), so
    the result equals PIL's resize(BICUBIC) bit for bit; float input in [0, 1] gets the same filter
    in float (differentiable, not rounded). The horizontal pass goes first as in Pillow <= 12;
    Pillow 13 goes vertical first when the height shrinks by more than twice the width does (only
    images over 2:1 tall), which can change a few pixel values.
    """
    H, W = x.shape[-2:]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)  # transformers' rounding
    exact = x.dtype == torch.uint8
    y = x.double() if exact else x
    y = _resample(y, w, (w - size) // 2, size, -1, exact)  # crop offsets: transformers' floor
    y = _resample(y, h, (h - size) // 2, size, -2, exact)
    return y / 255 if exact else y


def pil_to_tensor(image):
    """PIL image -> (3, H, W) uint8; transparency composited on white, as transformers does."""
    from PIL import Image
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def preprocess(image, size=224):
    """A PIL image, a list of them, or an RGB tensor (3, H, W) / (B, 3, H, W), uint8 or float in
    [0, 1] -> CLIP's input (B, 3, size, size), float32, normalised with MEAN and STD."""
    if isinstance(image, (list, tuple)):
        return torch.cat([preprocess(im, size) for im in image])
    x = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and (x.min() < 0 or x.max() > 1):
        raise ValueError("a float image must be in [0, 1] (SD's VAE decodes to [-1, 1]: pass (x + 1) / 2)")
    x = resize_crop(x if x.ndim == 4 else x[None], size).float()  # (B, 3, size, size) in [0, 1]
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (MEAN, STD))
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Loading the transformers folder of openai/clip-vit-large-patch14 (config.json + weights)

# transformers' key prefix -> ours; below the prefix the names are the same.
KEY_PREFIXES = {"vision_model.": "vision.", "text_model.": "text.text_model."}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # best first
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json leaves out
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5}


def clip_config(c, path=""):
    """A transformers CLIPModel config.json (as a dict) -> CLIPConfig, refusing what we cannot run."""
    if c.get("model_type") != "clip":
        raise CheckpointError(f"{path}: config.json is of a {c.get('model_type')!r} model, not 'clip'; "
                              "expected a CLIP folder such as openai/clip-vit-large-patch14")
    t = {**TEXT_DEFAULTS, **(c.get("text_config") or {}), **(c.get("text_config_dict") or {})}
    v = {**VISION_DEFAULTS, **(c.get("vision_config") or {}), **(c.get("vision_config_dict") or {})}
    for name, part in (("text", t), ("vision", v)):
        if part.get("hidden_act", "quick_gelu") != "quick_gelu" or part["intermediate_size"] != 4 * part["hidden_size"]:
            raise CheckpointError(f"{path}: the {name} tower uses {part.get('hidden_act')} with a "
                                  f"{part['intermediate_size']}-wide MLP; only OpenAI's CLIP (quick_gelu, 4 x width) is supported")
    text = TextConfig(vocab_size=t["vocab_size"], max_length=t["max_position_embeddings"], width=t["hidden_size"],
                      layers=t["num_hidden_layers"], heads=t["num_attention_heads"])
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                          layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                          projection_dim=c.get("projection_dim", 512), layer_norm_eps=v["layer_norm_eps"])
    return CLIPConfig(vision=vision, text=text)


def _swap_prefix(k, table):
    p = next((p for p in table if k.startswith(p)), None)
    return k if p is None else table[p] + k[len(p):]


def rename_keys(sd):
    """transformers' key names -> ours. The position_ids buffers of older files are dropped (they
    always hold arange); keys with no place in CLIP pass through, for strict loading to refuse."""
    return {_swap_prefix(k, KEY_PREFIXES): v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def transformers_key(k):
    """Inverse of rename_keys, to name tensors in messages as the file does."""
    return _swap_prefix(k, {ours: theirs for theirs, ours in KEY_PREFIXES.items()})


def load_clip(path, device="cpu", dtype=torch.float32):
    """The transformers folder of a CLIP model (openai/clip-vit-large-patch14: config.json, then
    model.safetensors, or pytorch_model.bin read through safe_pickle) -> CLIP, in eval mode with
    gradients off, its tokenizer attached (the folder's, or OpenAI's vocabulary if it has none).
    Strict: any missing, unexpected or misshaped tensor is a one-line CheckpointError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json here; expected the folder of a transformers CLIP "
                              "model such as openai/clip-vit-large-patch14")
    c = checkpoint._read_json(path / "config.json")
    try:
        cfg = clip_config(c, path)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: config.json has a malformed CLIP config ({e}); download it again") from None
    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)}; download the weights into this folder")
    sd = rename_keys(checkpoint.read_any(weights)[0])
    with torch.device("meta"):  # names and shapes only
        own = CLIP(cfg).state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    if missing or unexpected:
        some = checkpoint._some([transformers_key(k) for k in missing or unexpected])
        raise CheckpointError(f"{weights}: {'missing' if missing else 'unexpected'} tensor(s) {some}; not the "
                              "CLIP model its config.json describes: download the folder again")
    model = checkpoint._load_strict(CLIP, cfg, sd, "CLIP model", weights, device, dtype)
    has_tokenizer = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
    model.tokenizer = checkpoint.read_tokenizer(path) if has_tokenizer else Tokenizer.from_openai_gz()
    checkpoint._check_tokenizer(model.tokenizer, cfg.text, path)
    return model
