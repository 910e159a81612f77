"""Tests for unet.py: parity with diffusers' UNet2DConditionModel on identical random weights (SD v1
and SD 2.x settings), the full-size SD v1 and SD 2.x key manifests, the attn2 record hook, bf16 compute,
and fp32 attention (upcast_attention)."""

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from tests.common import TINY_UNET as TINY
from tests.common import unet_from_diffusers as ours_from_diffusers
from unet import SD_V2, CrossAttention, UNet, UNetConfig, diffusers_key_map, timestep_embedding

# SD v1's shape (4 levels, 2 res blocks, attention at the first 3), small widths
SMALL_SD = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                      num_heads=4, context_dim=24, norm_groups=8)
# attention only in the middle level, 3 levels: exercises the upsampler index rule (.1.conv vs .2.conv)
ODD = UNetConfig(in_channels=3, out_channels=5, model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1,
                 attention_levels=(1,), num_heads=2, context_dim=8, norm_groups=4)
# SD 2.x's settings on the same small shape: heads of 8 channels (4/8/16/16 heads), Linear proj_in/proj_out,
# the 1024-wide OpenCLIP context, fp32 attention
SMALL_V2 = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                      num_head_channels=8, context_dim=1024, norm_groups=8, use_linear_projection=True,
                      upcast_attention=True)
SD = UNetConfig()


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    L = len(cfg.channel_mult)
    cross = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(L)]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(L))]
    return UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, down_block_types=tuple(cross), up_block_types=tuple(up),
        # the number of heads (a historical misnomer), one per level when heads have a fixed size (2.x: [5, 10, 20, 20])
        attention_head_dim=[cfg.heads(cfg.model_channels * m) for m in cfg.channel_mult] if cfg.num_head_channels
        else cfg.num_heads,
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention, act_fn="silu")


def randomize_(model, seed):
    """Random weights everywhere (norm affines too), so every path of the net is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def inputs(cfg, size, batch=2, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    t = torch.tensor([981, 1][:batch])
    return x, t, context


def random_unet(cfg, seed=0):
    torch.manual_seed(seed)
    model = UNet(cfg)
    randomize_(model, seed)
    return model.eval()


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 21, 500.5, 999])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), ref, atol=1e-6, rtol=0)
    assert timestep_embedding(torch.tensor([0]), 8).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("cfg,size", [(TINY, 16), (SMALL_SD, 16), (ODD, 12), (SMALL_V2, 16)],
                         ids=["tiny", "small_sd", "odd", "small_v2"])
def test_parity_with_diffusers(cfg, size):
    torch.manual_seed(0)
    ref = diffusers_unet(cfg).eval()
    randomize_(ref, seed=1)
    ours = ours_from_diffusers(cfg, ref)
    x, t, context = inputs(cfg, size)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
        got_scalar_t = ours(x[:1], int(t[0]), context[:1])
        got_0d_t = ours(x[:1], t[0], context[:1])
    scale = expected.abs().max().item()
    print(f"max abs diff {(got - expected).abs().max().item():.2e}, output scale {scale:.2f}")
    assert expected.std() > 0.1                             # the weights make a non-trivial output
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, scale)
    torch.testing.assert_close(got_scalar_t, got[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_0d_t, got[:1], atol=1e-5, rtol=0)


def test_full_size_manifest():
    """SD v1: 686 tensors, 859,520,964 params, and a shape-preserving bijection onto diffusers' keys."""
    with torch.device("meta"):
        ours = UNet(SD).state_dict()
        theirs = diffusers_unet(SD).state_dict()
    assert len(ours) == 686
    assert sum(p.numel() for p in ours.values()) == 859_520_964
    key_map = diffusers_key_map(SD)
    assert set(key_map) == set(ours)
    assert sorted(key_map.values()) == sorted(theirs)       # onto and one-to-one
    for k, v in key_map.items():
        assert ours[k].shape == theirs[v].shape, k
    # spot checks against weight_formats.md §1.3 / §2.3
    assert ours["input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert ours["output_blocks.5.0.in_layers.2.weight"].shape == (1280, 1920, 3, 3)
    assert key_map["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert key_map["output_blocks.8.2.conv.bias"] == "up_blocks.2.upsamplers.0.conv.bias"
    assert key_map["input_blocks.9.0.op.weight"] == "down_blocks.2.downsamplers.0.conv.weight"
    assert key_map["input_blocks.7.0.skip_connection.weight"] == "down_blocks.2.resnets.0.conv_shortcut.weight"
    assert key_map["middle_block.1.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"


def test_full_size_sd_v2_manifest():
    """SD 2.x (diffusers' stable-diffusion-2-1 unet/config.json): the same 686 names as v1, a shape-preserving
    bijection onto diffusers' keys, and the shapes weight_formats.md §4 lists."""
    with torch.device("meta"):
        ours = UNet(SD_V2).state_dict()
        theirs = UNet2DConditionModel(  # the SD 2.1 config, as stored on the Hub
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            use_linear_projection=True, upcast_attention=True, sample_size=96).state_dict()
    assert len(ours) == 686
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in theirs.values())
    key_map = diffusers_key_map(SD_V2)
    assert sorted(key_map.values()) == sorted(theirs)
    for k, v in key_map.items():
        assert ours[k].shape == theirs[v].shape, k
    assert ours["input_blocks.1.1.proj_in.weight"].shape == (320, 320)          # Linear, not a 1x1 conv
    assert ours["output_blocks.11.1.proj_out.weight"].shape == (320, 320)
    assert ours["input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    with torch.device("meta"):
        heads = [m.heads for _, m in UNet(SD_V2).cross_attentions()]
    assert heads == [5, 5, 10, 10, 20, 20] + [20] + [20, 20, 20, 10, 10, 10, 5, 5, 5]  # input, middle, output


def test_upcast_attention_computes_in_fp32():
    """In fp16, q k^T of large activations overflows (inf, then NaN after softmax); with upcast the same
    fp16 layer gives the fp32 result, in both the fused and the spelled-out path."""
    torch.manual_seed(0)
    ref = CrossAttention(32, heads=2)
    with torch.no_grad():
        ref.to_q.weight.mul_(100)
        ref.to_k.weight.mul_(100)
        ref.half().float()                                  # weights exactly representable in fp16
    x = (3 * torch.randn(1, 6, 32)).half().float()
    with torch.no_grad():
        expected = ref(x)
        for fused in (True, False):
            for upcast in (False, True):
                m = CrossAttention(32, heads=2, upcast=upcast).half()
                m.load_state_dict(ref.state_dict())
                m.fused = fused
                got = m(x.half())
                assert got.dtype == torch.float16
                if upcast:
                    torch.testing.assert_close(got.float(), expected, atol=0.02, rtol=0.02)
                    assert torch.isfinite(m.attention_maps(x.half())).all()
                elif not fused:  # the spelled-out fp16 q k^T overflows
                    assert not torch.isfinite(got).all()
    half = CrossAttention(32, heads=2).half()
    half.load_state_dict(ref.state_dict())
    assert not torch.isfinite(half.attention_maps(x.half())).all()


def record_attn2(model):
    """Forward pre-hooks on every attn2 and its to_out: the layer's inputs (x, context) and A^l,
    the attention output before to_out (what duge.AttentionRecorder reads). -> (inputs, outputs, handles)"""
    inputs_, outputs, handles = [], [], []
    for _, m in model.cross_attentions():
        handles.append(m.register_forward_pre_hook(lambda mod, args: inputs_.append(args)))
        handles.append(m.to_out.register_forward_pre_hook(lambda mod, args: outputs.append(args[0])))
    return inputs_, outputs, handles


def test_cross_attentions_and_record_hook():
    cfg = SMALL_SD
    model = random_unet(cfg)
    x, t, context = inputs(cfg, 16)
    with torch.no_grad():
        plain = model(x, t, context)

        attns = model.cross_attentions()
        n_st = 2 * 3 + 1 + 3 * 3                            # input, middle, output transformers
        assert len(attns) == n_st and all(name.endswith("transformer_blocks.0.attn2") for name, _ in attns)
        ins, records, handles = record_attn2(model)
        recorded = model(x, t, context)
        assert torch.equal(recorded, plain)                 # recording does not change the output
        assert len(records) == n_st and len(ins) == n_st    # one record per layer

        # forward order: the number of pixels goes down then up, as in the UNet
        sizes = [r.shape for r in records]
        expected = ([(2, 256, 32)] * 2 + [(2, 64, 64)] * 2 + [(2, 16, 128)] * 2 + [(2, 4, 128)]
                    + [(2, 16, 128)] * 3 + [(2, 64, 64)] * 3 + [(2, 256, 32)] * 3)
        assert sizes == expected

        for (_, m), (h, ctx), out, size in zip(attns, ins, records, sizes):
            B, N, C = size
            assert torch.equal(ctx, context)                # attn2 reads the text
            split = lambda y: y.reshape(B, -1, m.heads, C // m.heads).transpose(1, 2)  # (B, H, L, D)
            q, k, v = split(m.to_q(h)), split(m.to_k(ctx)), split(m.to_v(ctx))
            probs = (q @ k.transpose(-1, -2) / (C // m.heads) ** 0.5).softmax(-1)
            assert probs.shape == (B, m.heads, N, context.shape[1])
            torch.testing.assert_close(probs.sum(-1), torch.ones(B, m.heads, N), atol=1e-5, rtol=0)
            assert (probs >= 0).all()
            # the recorded output is the probabilities applied to the values, heads concatenated
            torch.testing.assert_close(out, (probs @ v).transpose(1, 2).reshape(B, N, C), atol=1e-5, rtol=1e-5)

        for _, m in model.named_modules():                  # the spelled-out path gives the same UNet
            if hasattr(m, "fused"):
                m.fused = False
        torch.testing.assert_close(model(x, t, context), plain, atol=1e-5, rtol=1e-5)
        for _, m in model.named_modules():
            if hasattr(m, "fused"):
                m.fused = True
        for h in handles:
            h.remove()
        assert torch.equal(model(x, t, context), plain)


def test_record_keeps_gradients():
    """duge.py backpropagates through recorded attn2 outputs."""
    model = random_unet(TINY)
    x, t, context = inputs(TINY, 8)
    name, attn2 = model.cross_attentions()[0]
    record = []
    attn2.to_out.register_forward_pre_hook(lambda mod, args: record.append(args[0]))
    model(x, t, context)
    record[0].pow(2).mean().backward()
    assert attn2.to_v.weight.grad is not None and attn2.to_v.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", [SMALL_SD, SMALL_V2], ids=["small_sd", "small_v2"])
def test_bf16_close_to_fp32(cfg):
    model = random_unet(cfg)
    x, t, context = inputs(cfg, 16)
    with torch.no_grad():
        ref = model(x, t, context)
        model.to(torch.bfloat16)
        got = model(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


def test_fresh_unet_predicts_zero():
    """CompVis zero-initialises the output conv (and every residual branch's last layer)."""
    torch.manual_seed(0)
    x, t, context = inputs(TINY, 8)
    assert UNet(TINY)(x, t, context).abs().max().item() == 0.0


@pytest.mark.slow
def test_full_size_parity_with_diffusers():
    torch.manual_seed(0)
    ref = diffusers_unet(SD).eval()                          # default (non-zero) init, 3.4 GB
    ours = ours_from_diffusers(SD, ref)                      # shares the same tensors: no second copy
    x, t, context = inputs(SD, 32, batch=1, tokens=77)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    del ref, ours
    gc.collect()
    scale = expected.abs().max().item()
    assert expected.std() > 0.01
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, scale)
