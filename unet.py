"""The Stable Diffusion denoiser (v1 and 2.x): a UNet that predicts the noise in a 4x64x64 latent.

    eps = UNet(x_t, t, context)    x_t (B, 4, 64, 64), t (B,), context (B, 77, 768) from CLIP

It is the "LDM" UNet of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models" (CVPR 2022), built on the ADM UNet of Dhariwal & Nichol, "Diffusion Models Beat GANs on
Image Synthesis" (2021). The text enters only through cross-attention (attn2): queries from the
image, keys and values from the prompt. Those attn2 layers are what duge.py reads and edits.

SD 2.x is the same network with four settings of UNetConfig (SD_V2 below; Stability-AI/stablediffusion
configs/stable-diffusion/v2-inference{,-v}.yaml and ldm/modules/attention.py): heads of 64 channels
(5/10/20/20 heads instead of 8 everywhere), a 1024-wide context from OpenCLIP ViT-H/14, proj_in/proj_out
as Linear layers on the tokens instead of 1x1 convs on the map, and attention computed in fp32. The
768-pixel 2.x models predict v instead of eps (`prediction_type`; sample.py turns v into eps).

Module names reproduce the official CompVis checkpoint (CompVis/stable-diffusion,
ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py), so a CompVis state dict
loads after stripping "model.diffusion_model.". `diffusers_key_map` renames to diffusers'
UNet2DConditionModel. The file reads bottom-up: small blocks first, the UNet last.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    """Defaults: SD v1. SD 2.x changes the last five fields (SD_V2 below)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320               # channels at full resolution; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)      # one entry per resolution level; a 2x downsample between levels
    num_res_blocks: int = 2                 # ResBlocks per level in the encoder (the decoder has one more)
    attention_levels: tuple = (0, 1, 2)     # levels with a SpatialTransformer after each ResBlock
    num_heads: int = 8                      # heads at every level, so dim_head = channels // num_heads ...
    num_head_channels: int | None = None    # ... unless this is set: dim_head fixed, heads = channels // it (2.x: 64)
    context_dim: int = 768                  # width of the text encoder's output (2.x: 1024)
    norm_groups: int = 32
    use_linear_projection: bool = False     # proj_in/proj_out: 1x1 convs (v1) or Linear on the tokens (2.x)
    upcast_attention: bool = False          # attention in fp32 even in a fp16/bf16 model (2.1 overflows without)
    prediction_type: str = "epsilon"        # what the output is: "epsilon" (v1, 2.x-base) or "v_prediction" (2.x-v)

    def heads(self, channels):
        """Attention heads of a transformer with `channels` channels (CompVis num_heads / num_head_channels)."""
        return channels // self.num_head_channels if self.num_head_channels else self.num_heads


# SD 2.x (v2-inference.yaml; the 768-v models also have prediction_type="v_prediction")
SD_V2 = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_projection=True, upcast_attention=True)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention is all you need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                       # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim), cos first like CompVis


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the model dtype: the statistics over a group of
    32x64x64 values lose too much precision in fp16/bf16."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep added in between, plus a residual (1x1 conv if widths differ)."""

    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        # Sequential indices match the checkpoint: parameter-free SiLU/Dropout keep their slots.
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm32(groups, cout, eps=1e-5), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # as CompVis: a fresh block starts as the identity
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):                                 # x (B, cin, H, W), emb (B, emb_dim)
        h = self.in_layers(x)                                  # (B, cout, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]         # the same shift at every pixel
        h = self.out_layers(h)
        return self.skip_connection(x) + h                     # (B, cout, H, W)


class CrossAttention(nn.Module):
    """Multi-head attention. attn1: self-attention over pixels (context None).
    attn2: queries from the pixels, keys and values from the text, so each pixel reads the prompt.

    duge.py reads A^l, the attention output before to_out, with a forward pre-hook on `to_out`, or
    the maps (`attention_maps`). `fused = False` runs the spelled-out softmax(q k^T / sqrt(D)) v.
    upcast: q, k, v in fp32 whatever the model dtype (SD 2.1's q k^T overflows fp16); the output is
    cast back. diffusers' upcast_attention keeps v in the model dtype; in fp32 both are the same."""

    def __init__(self, dim, context_dim=None, heads=8, upcast=False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.fused = True
        self.memo = None  # {} inside UNet.reusing_text(): the last context's keys and values

    def forward(self, x, context=None):                    # x (B, N, C), context (B, T, Cc)
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)        # (B, H, N, D)
        k, v = self.keys_values(context)                                         # (B, H, T, D) each
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)  # the same softmax(q k^T / sqrt(D)) v, one kernel
        else:
            out = self.probabilities(q, k) @ v                                   # (B, H, N, D)
        out = rearrange(out.to(dtype), "b h n d -> b n (h d)")  # (B, N, C): A^l
        return self.to_out(out)

    def keys_values(self, context):
        """to_k and to_v of the context, split into heads. Under UNet.reusing_text() the same context
        tensor (the same object: a sampler's fixed prompts) gets the keys and values computed the first
        time, not recomputed at every step."""
        memo = self.memo
        if memo is not None and memo.get("context") is context:
            return memo["k"], memo["v"]
        k = rearrange(self.to_k(context), "b t (h d) -> b h t d", h=self.heads)
        v = rearrange(self.to_v(context), "b t (h d) -> b h t d", h=self.heads)
        if memo is not None:
            memo.update(context=context, k=k, v=v)
        return k, v

    @staticmethod
    def probabilities(q, k):
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, N, T), rows sum to 1

    def attention_maps(self, x, context=None):
        """softmax(q k^T / sqrt(D)) of this call, (B, H, N, T): how much each pixel reads each token."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(context), "b t (h d) -> b h t d", h=self.heads)
        return self.probabilities(q.float(), k.float()).to(q.dtype) if self.upcast else self.probabilities(q, k)


class GEGLU(nn.Module):
    """A linear layer whose output is gated by GELU of a second half (Shazeer, "GLU variants")."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)                            # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN transformer layer: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim, heads, context_dim, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads=heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):                         # x (B, N, C), context (B, T, Cc)
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Run a transformer block over the H*W pixels of a feature map, as a residual branch.

    proj_in/proj_out mix channels pixel by pixel: 1x1 convs on the map in v1 (weights [C, C, 1, 1]),
    Linear layers on the tokens in 2.x (weights [C, C]). The same function; the checkpoints differ."""

    def __init__(self, channels, heads, context_dim, groups, linear=False, upcast=False):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, upcast)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)               # as CompVis: starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):                         # x (B, C, H, W)
        B, C, H, W = x.shape
        to_tokens, to_map = "b c h w -> b (h w) c", "b (h w) c -> b c h w"  # (B, H*W, C): one token per pixel
        h = self.norm(x)
        h = self.proj_in(rearrange(h, to_tokens)) if self.linear else rearrange(self.proj_in(h), to_tokens)
        for block in self.transformer_blocks:
            h = block(h, context)
        # contiguous: the permuted view is channels-last in memory, which would send proj_out and the
        # convs after it down a path that re-lays out every conv weight on each call (bench.py speed)
        if self.linear:
            h = rearrange(self.proj_out(h), to_map, h=H, w=W).contiguous()
        else:
            h = self.proj_out(rearrange(h, to_map, h=H, w=W).contiguous())
        return h + x                                       # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):                                  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):                                  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: hands the timestep embedding to ResBlocks and the text to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C, G = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * C
        self.time_embed = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, G)

        def attn(ch):
            return SpatialTransformer(ch, cfg.heads(ch), cfg.context_dim, G, cfg.use_linear_projection,
                                      cfg.upcast_attention)

        # Encoder. For SD v1 (64x64 latent) the 12 input blocks are:
        #   0       conv_in 4->320                64x64
        #   1, 2    ResBlock + transformer 320    64x64
        #   3       Downsample                    32x32
        #   4, 5    ResBlock + transformer 640    32x32
        #   6       Downsample                    16x16
        #   7, 8    ResBlock + transformer 1280   16x16
        #   9       Downsample                    8x8
        #   10, 11  ResBlock 1280                 8x8
        # The output of every input block is kept for the decoder (a "skip").
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        skip_channels = [C]
        ch = C
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * C)]
                ch = mult * C
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        # Bottleneck at the lowest resolution (8x8 for SD v1), always with attention.
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        # Decoder, the mirror image, each block eating one skip (concatenated after h):
        #   0, 1    ResBlock 2560->1280                            8x8
        #   2       ResBlock 2560->1280, Upsample (".1.conv")       8x8 -> 16x16
        #   3, 4    ResBlock 2560->1280 + transformer              16x16
        #   5       ResBlock 1920->1280 + transformer, Upsample     16x16 -> 32x32
        #   6, 7    ResBlock 1920/1280->640 + transformer          32x32
        #   8       ResBlock 960->640 + transformer, Upsample       32x32 -> 64x64
        #   9       ResBlock 960->320 + transformer                64x64
        #   10, 11  ResBlock 640->320 + transformer                64x64
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * C)]
                ch = mult * C
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(G, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)                 # as CompVis: an untrained UNet predicts eps = 0
        nn.init.zeros_(self.out[2].bias)
        self.checkpointing = False  # True: keep only each block's input, recompute the rest in backward

    def run(self, block, h, emb, context):
        """One block; with gradient checkpointing (Chen et al. 2016) when training, so activation
        memory is one block's instead of the whole UNet's, for about one more forward of time."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context):                      # x (B, 4, h, w), context (B, 77, 768)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # int, 0-d or (B,) -> (B,)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4C)
        skips = []
        h = x.contiguous(memory_format=self.memory_format())  # channels-last on CPU: checkpoint.fast_layout
        for block in self.input_blocks:
            h = self.run(block, h, emb, context)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)   # (B, 1280, h/8, w/8) for SD v1
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)                                 # (B, 4, h, w)

    def memory_format(self):
        """The layout of the convolution weights (checkpoint.fast_layout), which inputs should share."""
        w = self.input_blocks[0][0].weight
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() \
            else torch.contiguous_format

    @contextmanager
    def reusing_text(self):
        """For sampling, where the weights and the prompts stay fixed: each attn2 computes the keys and
        values of a context once and reuses them while the same context tensor comes back (the outputs
        are the same numbers). Not for training: the trained keys and values change at every step."""
        attn2 = [m for _, m in self.cross_attentions()]
        for m in attn2:
            m.memo = {}
        try:
            yield self
        finally:
            for m in attn2:
                m.memo = None

    def cross_attentions(self):
        """Every attn2 (text cross-attention) with its name, in the order forward calls them."""
        return [(name, m) for name, m in self.named_modules() if name.endswith(".attn2")]


def diffusers_key_map(cfg: UNetConfig) -> dict:
    """Our (CompVis) state-dict key -> diffusers UNet2DConditionModel key, for any config.

    Only block prefixes and the ResBlock internals are renamed; attention internals are identical.
    diffusers groups by level: down_blocks.i / up_blocks.i hold resnets.j, attentions.j and one
    down/upsampler; up_blocks.i is level L-1-i."""
    L, R = len(cfg.channel_mult), cfg.num_res_blocks
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    for i in range(L):
        for j in range(R):
            n = 1 + i * (R + 1) + j
            blocks[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if i in cfg.attention_levels:
                blocks[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i != L - 1:
            blocks[f"input_blocks.{(i + 1) * (R + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for i in range(L):
        has_attn = (L - 1 - i) in cfg.attention_levels
        for j in range(R + 1):
            n = i * (R + 1) + j
            blocks[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if has_attn:
                blocks[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i != L - 1:
            blocks[f"output_blocks.{i * (R + 1) + R}.{2 if has_attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

    with torch.device("meta"):                             # the key list, without allocating weights
        keys = list(UNet(cfg).state_dict())
    out = {}
    for key in keys:
        parts = key.split(".")
        k = next(k for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in blocks)  # longest block prefix
        module, leaf = ".".join(parts[k:-1]), parts[-1]
        module = resnet.get(module, module)
        out[key] = ".".join(p for p in (blocks[".".join(parts[:k])], module, leaf) if p)
    return out
