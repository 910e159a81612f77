"""The Stable Diffusion v1 autoencoder (AutoencoderKL, f=8, z=4): images <-> latents.

Diffusion runs in the latent space of this VAE: a 3x512x512 image in [-1, 1] becomes a 4x64x64
latent, scaled by 0.18215 so the latents have roughly unit variance. The encoder outputs a
diagonal Gaussian (mean, log-variance); the decoder maps a latent back to pixels.

References
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (sec. 3, app. G).
- Esser et al. 2021, "Taming Transformers" (the encoder/decoder this one reuses).
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (the reparameterised sample).
- Official code: CompVis/stable-diffusion ldm/modules/diffusionmodules/model.py (Encoder, Decoder)
  and ldm/models/autoencoder.py (AutoencoderKL). Attribute names reproduce its checkpoint keys,
  so `first_stage_model.*` of a CompVis file loads here after stripping that prefix.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import GroupNorm32  # one fp32 GroupNorm for both models


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                  # channels at full resolution
    ch_mult: tuple = (1, 2, 4, 4)  # one level per entry; every level but the last halves H and W
    num_res_blocks: int = 2
    z_channels: int = 4            # latent channels out of the encoder / into the decoder
    embed_dim: int = 4             # latent channels after quant_conv (the diffusion model's input)
    norm_groups: int = 32
    scale_factor: float = 0.18215  # makes SD latents roughly unit-variance (from v1-inference.yaml)

    @property
    def downscale(self):
        return 2 ** (len(self.ch_mult) - 1)  # 8 for SD: 512x512 pixels -> 64x64 latents


def Normalize(channels, groups):
    return GroupNorm32(groups, channels, eps=1e-6)  # 1e-6 here, unlike the UNet's 1e-5


class ResnetBlock(nn.Module):
    """Two (norm, SiLU, 3x3 conv) steps plus a skip; no timestep input in the VAE."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):  # (B, cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h  # (B, cout, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the projections."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W)
        # A stride-2 3x3 conv on even H needs one pixel of padding in total. This VAE (from taming)
        # puts it all on the right and bottom, TensorFlow "SAME" style; the UNet pads 1 on every
        # side. Padding symmetrically here would shift every window by a pixel against the weights.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, H, W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def mid_block(c, groups):
    mid = nn.Module()  # a plain container, only so the keys read mid.block_1, mid.attn_1, ...
    mid.block_1 = ResnetBlock(c, c, groups)
    mid.attn_1 = AttnBlock(c, groups)
    mid.block_2 = ResnetBlock(c, c, groups)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*z, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(chans):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.num_res_blocks))
            if i < len(chans) - 1:  # the last level keeps its resolution
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = mid_block(cin, g)
        self.norm_out = Normalize(cin, g)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f). Levels are indexed like the encoder's
    (up.0 = full resolution) but run from the deepest one, up.{n-1}, back to up.0."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin, g)
        levels = []
        for i in reversed(range(len(chans))):
            cout = chans[i]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.num_res_blocks + 1))
            if i > 0:  # up.0 is already at full resolution
                level.upsample = Upsample(cout)
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B, z, h, w)
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h*f, w*f)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downscale(self):
        return self.cfg.downscale  # pixels per latent along each side

    def posterior(self, images):
        """q(z|x) as (mean, logvar), each (B, embed_dim, H/f, W/f); unscaled. For a KL loss."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp keeps exp() finite

    def encode(self, images, sample=True, generator=None):
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, embed_dim, H/f, W/f)."""
        mean, logvar = self.posterior(images)
        z = mean
        if sample:  # z = mean + std * eps, differentiable in mean and std
            # as diffusers does: a CPU generator draws on the CPU, so a seed gives the same noise anywhere
            device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            eps = eps.to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.cfg.scale_factor * z

    def decode(self, latents):
        """Scaled latents -> images of about [-1, 1], not clamped (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(latents / self.cfg.scale_factor))


# -----------------------------------------------------------------------------------------------
# diffusers names. diffusers' AutoencoderKL holds the same tensors under other names, numbers its
# decoder levels the other way round (up_blocks.0 is the deepest) and stores the mid attention
# projections as Linear [C, C] instead of 1x1 Conv [C, C, 1, 1].

_RULES = [  # (CompVis pattern, diffusers replacement), applied in order
    (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
    (r"\.block\.(\d+)\.", r".resnets.\1."),
    (r"\.downsample\.", r".downsamplers.0."),
    (r"\.upsample\.", r".upsamplers.0."),
    (r"\.mid\.block_1\.", r".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", r".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", r".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", r".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
    (r"\.norm_out\.", r".conv_norm_out."),
]


def diffusers_key_map(cfg: VAEConfig) -> dict:
    """Every key of our state dict (= CompVis without 'first_stage_model.') -> its diffusers key."""
    with torch.device("meta"):  # names only: no memory, no init
        keys = list(VAE(cfg).state_dict())
    deepest = len(cfg.ch_mult) - 1
    out = {}
    for key in keys:
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{deepest - int(m[1])}.", key)
        for pattern, repl in _RULES:
            new = re.sub(pattern, repl, new)
        out[key] = new
    return out


_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_legacy_diffusers_key(key: str) -> str:
    """Older diffusers files name the mid attention query/key/value/proj_attn."""
    pattern = r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\."
    return re.sub(pattern, lambda m: m[1] + _LEGACY[m[2]] + ".", key)


# Either naming may be passed: ours (mid.attn_1.q) or diffusers' (mid_block.attentions.0.to_q).
_ATTN_WEIGHT = re.compile(r"(mid\.attn_1|mid_block\.attentions\.0)\."
                          r"(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.weight$")


def to_diffusers_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if _ATTN_WEIGHT.search(key) and tensor.ndim == 4:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])  # [C, C, 1, 1] -> [C, C]
    return tensor


def from_diffusers_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if _ATTN_WEIGHT.search(key) and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)  # [C, C] -> [C, C, 1, 1]
    return tensor
