"""vae.py against diffusers' AutoencoderKL (random weights, identical inputs and noise) and against
the SD v1 key/shape manifest of weight_formats.md."""
import gc

import diffusers  # test-only reference
import pytest
import torch

import vae
from tests.common import vae_from_diffusers as ours_from_diffusers

SD = vae.VAEConfig()
TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)      # f = 2
SMALL = vae.VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=16)  # f = 8


def diffusers_vae(cfg):
    n = len(cfg.ch_mult)
    assert cfg.z_channels == cfg.embed_dim  # diffusers has a single latent_channels
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor)


def perturb_(model, seed):
    """Default init leaves norms at (1, 0) and biases small; shake everything so each tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.add_(0.05 * noise if name.endswith("bias") else 0.1 * p.std() * noise)


def check_parity(cfg, image_hw, seed=0):
    torch.manual_seed(seed)
    ref = diffusers_vae(cfg).eval()
    perturb_(ref, seed)
    ours = ours_from_diffusers(cfg, ref)
    x = torch.rand(1, 3, *image_hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    sf, f = cfg.scale_factor, cfg.downscale
    diffs = {}
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean = ours.encode(x, sample=False)
        assert mean.shape == (1, cfg.embed_dim, image_hw[0] // f, image_hw[1] // f)
        diffs["mean"] = (mean, dist.mean * sf)
        sample = ours.encode(x, generator=torch.Generator().manual_seed(7))
        diffs["sample"] = (sample, dist.sample(generator=torch.Generator().manual_seed(7)) * sf)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed + 1))  # a latent at SD scale
        image = ours.decode(z)
        assert image.shape == x.shape
        diffs["decode"] = (image, ref.decode(z / sf).sample)
    result = {}
    for name, (a, b) in diffs.items():
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert scale > 1e-2, f"{name}: output too small to test anything"
        assert err < 1e-4 * scale, f"{name}: max abs diff {err:.3g} at scale {scale:.3g}"
        result[name] = (err, scale)
    assert (diffs["sample"][0] - diffs["mean"][0]).abs().max() > 1e-3  # the noise really was added
    del ref, ours
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------- parity

def test_parity_tiny():
    print(check_parity(TINY, (32, 32)))


def test_parity_small_four_levels():
    print(check_parity(SMALL, (64, 48)))


@pytest.mark.slow
def test_parity_full_size_sd_v1():
    print(check_parity(SD, (64, 64)))


# ------------------------------------------------------------------------------- names and shapes

def meta_state_dict(model_fn):
    with torch.device("meta"):
        return model_fn().state_dict()


def test_full_size_manifest():
    ours = meta_state_dict(lambda: vae.VAE(SD))
    assert len(ours) == 248
    assert sum(t.numel() for t in ours.values()) == 83_653_863
    assert ours["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert ours["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert ours["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ours["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ours["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ours and "encoder.down.3.downsample.conv.weight" not in ours

    theirs = meta_state_dict(lambda: diffusers_vae(SD))
    key_map = vae.diffusers_key_map(SD)
    assert list(key_map) == list(ours)
    assert len(set(key_map.values())) == len(key_map) and set(key_map.values()) == set(theirs)  # bijection
    for k, d in key_map.items():
        assert vae.to_diffusers_tensor(k, ours[k]).shape == theirs[d].shape, (k, d)
        assert vae.from_diffusers_tensor(d, theirs[d]).shape == ours[k].shape, (k, d)
    assert key_map["decoder.up.3.block.2.conv1.weight"] == "decoder.up_blocks.0.resnets.2.conv1.weight"
    assert key_map["decoder.up.1.upsample.conv.bias"] == "decoder.up_blocks.2.upsamplers.0.conv.bias"
    assert key_map["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert key_map["decoder.norm_out.weight"] == "decoder.conv_norm_out.weight"


@pytest.mark.parametrize("cfg", [TINY, SMALL, SD], ids=["tiny", "small", "sd"])
def test_key_map_round_trip(cfg):
    key_map = vae.diffusers_key_map(cfg)
    inverse = {d: k for k, d in key_map.items()}
    assert len(inverse) == len(key_map)
    assert all(inverse[key_map[k]] == k for k in key_map)
    w = torch.randn(32, 32, 1, 1)
    for k in ("encoder.mid.attn_1.v.weight", "decoder.mid.attn_1.proj_out.weight"):
        assert torch.equal(vae.from_diffusers_tensor(key_map[k], vae.to_diffusers_tensor(k, w)), w)
    assert vae.to_diffusers_tensor("encoder.mid.attn_1.q.weight", w).shape == (32, 32)
    assert vae.to_diffusers_tensor("encoder.mid.attn_1.q.bias", torch.zeros(32)).shape == (32,)
    conv = torch.randn(32, 32, 1, 1)  # a 1x1 conv outside the attention keeps its 4-D shape
    assert vae.to_diffusers_tensor("quant_conv.weight", conv).shape == (32, 32, 1, 1)


def test_legacy_diffusers_names():
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    n = 0
    for d in vae.diffusers_key_map(SD).values():
        old = d
        for new_name, old_name in legacy.items():
            old = old.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        n += old != d
        assert vae.normalize_legacy_diffusers_key(old) == d
    assert n == 16  # q, k, v, proj x weight, bias x encoder, decoder
    assert vae.from_diffusers_tensor("decoder.mid_block.attentions.0.query.weight", torch.zeros(8, 8)).shape == (8, 8, 1, 1)


# ------------------------------------------------------------------------------- behaviour

def test_downscale_and_shapes():
    for ch_mult, f in [((1, 2), 2), ((1, 2, 4), 4), ((1, 2, 4, 4), 8)]:
        cfg = vae.VAEConfig(ch=16, ch_mult=ch_mult, num_res_blocks=1, norm_groups=8)
        assert cfg.downscale == f
        torch.manual_seed(0)
        model = vae.VAE(cfg)
        assert model.downscale == f
        x = torch.rand(2, 3, 32, 24) * 2 - 1
        with torch.no_grad():
            z = model.encode(x)
            assert z.shape == (2, 4, 32 // f, 24 // f)
            assert model.decode(z).shape == x.shape


def test_sampling_uses_generator_and_gradients_flow():
    torch.manual_seed(0)
    model = vae.VAE(TINY)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a = model.encode(x, generator=torch.Generator().manual_seed(3))
    b = model.encode(x, generator=torch.Generator().manual_seed(3))
    c = model.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    mean, logvar = model.posterior(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, TINY.scale_factor * (mean + torch.exp(0.5 * logvar) * eps))
    torch.testing.assert_close(model.encode(x, sample=False), TINY.scale_factor * mean)
    model.decode(a).square().mean().backward()  # the reparameterised sample is differentiable
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = vae.VAE(TINY).eval()
    perturb_(model, 1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = model.decode(model.encode(x, sample=False))
        model.to(torch.bfloat16)
        out = model.decode(model.encode(x.bfloat16(), sample=False))
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 0.05, err


def test_group_norm_runs_in_fp32():
    norm = vae.Normalize(64, 32)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2), norm.bias.normal_(0.0, 0.2)
    x = 100.0 + torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))  # big mean, small spread
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # statistics of the bf16 input taken in fp32, then one rounding of the output
    exact = torch.nn.functional.group_norm(x.bfloat16().float(), 32, norm.weight.float(), norm.bias.float(), 1e-6)
    assert torch.equal(out, exact.bfloat16())
