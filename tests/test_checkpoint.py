"""checkpoint.py: every layout people download loads to the right numbers, our own files load
back in diffusers, and everything else is refused with one line before any of it can run.

The references are diffusers' and transformers' own classes and conversion functions, on random
weights: folders they write must give their outputs through our modules, and files we write must
give back their tensors through their loaders."""
import gc
import json
import os
import shutil
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import TEXT, UNET, VAE_, CheckpointError
from clip_text import TextConfig, TextEncoder, Tokenizer
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

ROOT = Path(checkpoint.__file__).resolve().parent
PROMPTS = ["a photo of a cat", "An astronaut riding a horse!", ""]

# Tiny models whose every hyper-parameter can be read back from tensor shapes (8 heads and 32
# GroupNorm groups as in SD v1, text heads of 64), so a CompVis file without our metadata, as the
# official ones are, infers exactly this model. The text encoder keeps CLIP's 49,408 tokens for
# the same reason: such a file is read with OpenAI's tokenizer.
UCFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                  num_heads=8, context_dim=64, norm_groups=32)
VCFG = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=32)  # 16x16 images <-> 8x8 latents
TCFG = TextConfig(width=64, layers=2, heads=1)


def randomize_(module, seed):
    """Random weights everywhere, norms included, at a scale that keeps activations near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # biases, and the scales of norms (1-D weights are only those)
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def openai_tok():
    return Tokenizer.from_openai_gz()


@pytest.fixture(scope="module")
def tiny_sd(openai_tok):
    """A tiny SD v1 as an official CompVis file stores it: the flat dict plus the extras
    (schedule buffers, EMA bookkeeping, position_ids)."""
    torch.manual_seed(0)
    model = checkpoint.StableDiffusion(openai_tok, randomize_(TextEncoder(TCFG), 1), randomize_(UNet(UCFG), 2),
                                       randomize_(VAE(VCFG), 3), image_size=16)
    return {**checkpoint.compvis_state_dict(model), **official_extras()}


def official_extras():
    """The tensors of weight_formats.md §1.1 that a loader must drop on purpose."""
    extras = {k: torch.linspace(0, 1, 1000) for k in checkpoint.SCHEDULE_BUFFERS - {"logvar"}}
    assert len(extras) == 12
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    extras[TEXT + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # int64 [1, 77]
    return extras


def weights(model):
    return {**{UNET + k: v for k, v in model.unet.state_dict().items()},
            **{VAE_ + k: v for k, v in model.vae.state_dict().items()},
            **{TEXT + k: v for k, v in model.text_encoder.state_dict().items()}}


def assert_same_weights(a, b, dtype=None):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == (dtype or wb[k].dtype) and torch.equal(wa[k], wb[k].to(wa[k].dtype)), k


@torch.no_grad()
def outputs(model):
    """Text context, UNet eps and VAE decode on fixed inputs."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    ctx = model.text_encoder(model.tokenizer(PROMPTS))
    return {"text": ctx, "eps": model.unet(x, torch.tensor([981, 500, 1]), ctx), "image": model.vae.decode(x)}


def assert_same_outputs(a, b):
    oa, ob = outputs(a), outputs(b)
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k


def one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# -----------------------------------------------------------------------------------------------
# 1. A diffusers folder written by diffusers and transformers themselves

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """StableDiffusionPipeline(...).save_pretrained of tiny random diffusers/transformers models,
    with a CLIPTokenizer built from our Tokenizer's vocabulary (300 merges, 814 tokens)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = Tokenizer(Tokenizer.from_openai_gz().merges[:300])
    tmp = tmp_path_factory.mktemp("hf")
    tok.save_folder(tmp / "our_tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.sot_id, eos_token_id=tok.eot_id,
        pad_token_id=tok.eot_id))
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, 10 + i)
    return saved_pipeline(tmp / "sd", tok, unet, vae, text)


def saved_pipeline(folder, tok, unet, vae, text, **scheduler):
    """StableDiffusionPipeline(...).save_pretrained(folder) with CompVis's DDIM settings (plus `scheduler`),
    the tokenizer read from folder.parent / "our_tokenizer"."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                         steps_offset=1, clip_sample=False, timestep_spacing="leading", **scheduler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, scheduler=ddim, safety_checker=None,
                                   tokenizer=CLIPTokenizer.from_pretrained(folder.parent / "our_tokenizer"),
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return types.SimpleNamespace(folder=folder, pipe=pipe, unet=unet, vae=vae, text=text, tok=tok)


@pytest.fixture(scope="module")
def from_hf(hf):
    return checkpoint.load(hf.folder)


def test_diffusers_folder_gives_the_reference_outputs(hf, from_hf):
    model = from_hf
    assert sorted(p.name for p in (hf.folder / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert model.format == "diffusers" and model.image_size == 16 and model.guidance == 7.5
    assert model.unet.cfg == UCFG and model.vae.cfg == VCFG
    assert model.text_encoder.cfg == TextConfig(vocab_size=814, width=64, layers=2, heads=1)
    assert model.tokenizer.vocab == hf.tok.vocab
    ids = hf.pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(model.tokenizer(PROMPTS), ids)

    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([981, 500, 1])
    with torch.no_grad():
        pairs = {"text": (model.text_encoder(ids), hf.text(ids).last_hidden_state)}
        ctx = pairs["text"][1]
        pairs["eps"] = (model.unet(x, t, ctx), hf.unet(x, t, encoder_hidden_states=ctx).sample)
        pairs["image"] = (model.vae.decode(x), hf.vae.decode(x / 0.18215).sample)
    for name, (ours, ref) in pairs.items():
        diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        print(f"{name}: max abs diff {diff:.2e} (output scale {scale:.2f})")
        assert ours.shape == ref.shape and scale > 0.1 and diff < 1e-4, name


def rewrite(path, fn):
    save_file(fn(load_file(path)), path)


def test_text_encoder_with_text_model_prefix_and_position_ids(hf, from_hf, tmp_path):
    """transformers 5 writes CLIPTextModel keys without 'text_model.'; older files (and SD v1.5's
    own folder) have the prefix and an int64 position_ids buffer."""
    folder = Path(shutil.copytree(hf.folder, tmp_path / "sd"))
    f = folder / "text_encoder" / "model.safetensors"
    assert not any(k.startswith("text_model.") for k in load_file(f))
    rewrite(f, lambda sd: {**{"text_model." + k: v for k, v in sd.items()},
                           "text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert_same_weights(checkpoint.load(folder), from_hf)


def test_vae_with_legacy_attention_names(hf, from_hf, tmp_path):
    """Older diffusers VAEs name the mid attention query/key/value/proj_attn."""
    folder = Path(shutil.copytree(hf.folder, tmp_path / "sd"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(sd):
        out = {}
        for k, v in sd.items():
            for new, old in legacy.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            out[k] = v
        assert sum(".query." in k for k in out) == 4  # weight and bias, in encoder and decoder
        return out
    rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", rename)
    assert_same_weights(checkpoint.load(folder), from_hf)


# -----------------------------------------------------------------------------------------------
# 2. Our own files: reloaded by us and by diffusers / transformers

def test_save_and_reload_in_both_formats(from_hf, tmp_path):
    model = from_hf
    extra = {"duge.ledger": json.dumps([{"forget": "van gogh"}])}
    for fmt, name in (("compvis", "sd.safetensors"), ("diffusers", "sd")):
        path = checkpoint.save(model, tmp_path / name, extra_metadata=extra)
        back = checkpoint.load(path)
        assert back.format == fmt and back.source == str(path)
        assert_same_weights(back, model)
        assert back.configs() == model.configs() and back.tokenizer.merges == model.tokenizer.merges
        assert back.meta["duge.ledger"] == extra["duge.ledger"]
        assert_same_outputs(back, model)
    assert not list(tmp_path.glob("*.tmp"))

    # fp16 on disk: loaded as fp32 (the default), as bf16, or as stored (dtype=None)
    checkpoint.save(model, tmp_path / "half.safetensors", dtype=torch.float16)
    checkpoint.save(model, tmp_path / "half", dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors").values())
    assert json.loads((tmp_path / "half" / "text_encoder" / "config.json").read_text())["torch_dtype"] == "float16"
    halved = checkpoint.load(tmp_path / "sd.safetensors", dtype=torch.float16)
    for path in (tmp_path / "half.safetensors", tmp_path / "half"):
        assert_same_weights(checkpoint.load(path), halved, dtype=torch.float32)
        assert_same_weights(checkpoint.load(path, dtype=None), halved, dtype=torch.float16)
        assert_same_weights(checkpoint.load(path, dtype=torch.bfloat16), halved, dtype=torch.bfloat16)
    assert any(not torch.equal(a, b.float()) for a, b in zip(weights(model).values(), weights(halved).values()))


def test_our_diffusers_folder_loads_in_diffusers(hf, from_hf, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    folder = checkpoint.save(from_hf, tmp_path / "sd")
    loaded = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
              "vae": AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
              "text": CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)}
    for name, m in loaded.items():  # diffusers' tensors -> our folder -> diffusers: unchanged
        ref = getattr(hf, name).state_dict()
        got = m.state_dict()
        assert got.keys() == ref.keys(), name
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    assert loaded["unet"].config.attention_head_dim == 8 and loaded["vae"].config.scaling_factor == 0.18215
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    assert torch.equal(tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids,
                       from_hf.tokenizer(PROMPTS))
    sched = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    sched.set_timesteps(50)
    assert sched.timesteps[-1] == 1 and sched.timesteps[0] == 981


def test_our_compvis_file_converts_in_diffusers(hf, from_hf, tmp_path):
    """diffusers' own single-file conversion of our .safetensors gives back its tensors exactly."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, infer_diffusers_model_type)
    sd = load_file(checkpoint.save(from_hf, tmp_path / "sd.safetensors"))
    assert infer_diffusers_model_type(sd) == "v1"
    converted = {"unet": convert_ldm_unet_checkpoint(sd, dict(hf.unet.config)),
                 "vae": convert_ldm_vae_checkpoint(sd, dict(hf.vae.config)),
                 # transformers >= 5 names CLIPTextModel's tensors without the 'text_model.' level
                 "text": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}}
    for name, got in converted.items():
        ref = getattr(hf, name).state_dict()
        assert got.keys() == ref.keys(), name
        for k in ref:
            assert got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]), (name, k)


# -----------------------------------------------------------------------------------------------
# 3. Full size: the official key names, shapes and extras

@pytest.mark.slow
def test_full_size_official_layout(tmp_path):
    """A SD v1 file with the official 686 + 248 + 196 tensors and the extras of §1.1, fp16 on disk:
    loads strictly, infers the SD v1 configs, upcasts to fp32 with every value in place."""
    with torch.device("meta"):
        parts = {UNET: UNet(UNetConfig()), VAE_: VAE(VAEConfig()), TEXT: TextEncoder(TextConfig())}
    shapes = {p + k: v.shape for p, m in parts.items() for k, v in m.state_dict().items()}
    counts = {p: sum(k.startswith(p) for k in shapes) for p in parts}
    assert counts == {UNET: 686, VAE_: 248, TEXT: 196}
    official = {  # a few entries of weight_formats.md §1.3-1.5, written out
        UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        UNET + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        UNET + "time_embed.2.weight": (1280, 1280), UNET + "out.2.weight": (4, 320, 3, 3),
        VAE_ + "decoder.mid.attn_1.q.weight": (512, 512, 1, 1), VAE_ + "encoder.conv_out.weight": (8, 512, 3, 3),
        TEXT + "text_model.embeddings.token_embedding.weight": (49408, 768),
        TEXT + "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768)}
    assert all(shapes[k] == s for k, s in official.items())
    # one constant per tensor (i / 2048 is exact in fp16), so a tensor loaded in the wrong place shows
    value = {k: i / 2048 for i, k in enumerate(shapes)}
    sd = {k: torch.full(s, value[k], dtype=torch.float16) for k, s in shapes.items()}
    sd.update(official_extras())
    assert len(sd) == 686 + 248 + 196 + 12 + 2 + 1
    save_file(sd, tmp_path / "v1-5-like.safetensors")
    del sd, parts
    gc.collect()

    model = checkpoint.load(tmp_path / "v1-5-like.safetensors")
    assert (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg) == (UNetConfig(), VAEConfig(), TextConfig())
    assert model.tokenizer.vocab_size == 49408 and model.image_size == 512
    loaded = weights(model)
    assert loaded.keys() == shapes.keys()
    for k, v in loaded.items():
        assert v.dtype == torch.float32 and v.shape == shapes[k] and not v.requires_grad, k
        assert v.min().item() == v.max().item() == value[k], k
    del model, loaded
    gc.collect()
    (tmp_path / "v1-5-like.safetensors").unlink()  # 2 GB that pytest would keep for three runs


def test_loaded_model_does_not_depend_on_its_file(tiny_sd, tiny_safetensors, tmp_path):
    """Both readers memory-map the file. The model must hold copies: overwriting the file in place
    (cp, torch.save to the same name) must neither change the weights nor crash (SIGBUS)."""
    lightning_ckpt(tiny_sd, tmp_path / "x.ckpt")
    save_file(tiny_sd, tmp_path / "x.safetensors")
    for path in (tmp_path / "x.ckpt", tmp_path / "x.safetensors"):
        model = checkpoint.load(path)
        size = path.stat().st_size
        with open(path, "r+b") as f:  # same inode, same size, every byte changed
            f.write(bytes(size))
        assert_same_weights(model, tiny_safetensors)


# -----------------------------------------------------------------------------------------------
# 4. Refusals: one line that says what is wrong

def without(sd, *prefixes):
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def crafted(tiny_sd):
    """name -> (state dict, expected words in the message)."""
    to_k = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    conv_in = UNET + "input_blocks.0.0.weight"
    proj_in = UNET + "input_blocks.1.1.proj_in.weight"
    return {
        "sd2 text without layers": ({**without(tiny_sd, TEXT), "cond_stage_model.model.token_embedding.weight":
                                     torch.zeros(8, 4), "cond_stage_model.model.positional_embedding":
                                     torch.zeros(77, 4)}, "text encoder"),
        "sd2 unet with v1 text": ({**tiny_sd, to_k: torch.zeros(32, 1024)}, "wrong model size or version"),
        "sd3": ({**tiny_sd, UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(4)},
                "Stable Diffusion 3"),
        "sdxl": ({**without(tiny_sd, TEXT), "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
                  torch.zeros(4)}, "SDXL"),
        "inpainting": ({**tiny_sd, conv_in: torch.zeros(32, 9, 3, 3)}, "inpainting"),
        "extra tensor": ({**tiny_sd, "cond_stage_model.extra.weight": torch.zeros(2)}, "unexpected"),
        "extra unet tensor": ({**tiny_sd, UNET + "extra.weight": torch.zeros(2)}, r"unexpected.*extra\.weight"),
        "missing tensor": (without(tiny_sd, UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
                           r"missing.*attn1\.to_q\.weight"),
        "missing key tensor": (without(tiny_sd, UNET + "out.2.weight"), r"out\.2\.weight.*missing"),
        "no vae": (without(tiny_sd, VAE_), "VAE is missing"),
        "misshaped": ({**tiny_sd, proj_in: torch.zeros(32, 16, 1, 1)}, r"input_blocks\.1\.1\.proj_in\.weight.*\(32, 16, 1, 1\)"),
        "no unet": (without(tiny_sd, UNET), "no Stable Diffusion UNet"),
    }


@pytest.mark.parametrize("case", ["sd2 text without layers", "sd2 unet with v1 text", "sd3", "sdxl", "inpainting",
                                  "extra tensor", "extra unet tensor",
                                  "missing tensor", "missing key tensor", "no vae", "misshaped", "no unet"])
def test_refuses_crafted_checkpoints(tiny_sd, tmp_path, case):
    sd, words = crafted(tiny_sd)[case]
    save_file(sd, tmp_path / "x.safetensors")
    msg = one_line_error(checkpoint.load, tmp_path / "x.safetensors", match=words)
    assert str(tmp_path / "x.safetensors") in msg


def test_the_untouched_tiny_file_loads(tiny_sd, tmp_path):
    """The control for the refusals above: the same file without the damage loads, with the
    configs inferred from shapes alone."""
    save_file(tiny_sd, tmp_path / "x.safetensors")
    model = checkpoint.load(tmp_path / "x.safetensors")
    assert (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg) == (UCFG, VCFG, TCFG)
    assert weights(model).keys() == tiny_sd.keys() - official_extras().keys()
    assert all(torch.equal(v, tiny_sd[k]) for k, v in weights(model).items())


def test_refuses_files_that_are_not_checkpoints(tiny_sd, tmp_path):
    cases = {}
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    cases["random.safetensors"] = "not a readable .safetensors"
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    cases["config.json"] = "unknown file type"
    torch.save([torch.zeros(2)], tmp_path / "list.ckpt")
    cases["list.ckpt"] = "no state dict"
    (tmp_path / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\n")
    cases["lfs.ckpt"] = "not a torch.save file"
    save_file(tiny_sd, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    cases["truncated.safetensors"] = "truncated"
    cases["missing.safetensors"] = "no such file"
    (tmp_path / "empty").mkdir()
    cases["empty"] = "not a diffusers"
    for name, words in cases.items():
        assert str(tmp_path / name) in one_line_error(checkpoint.load, tmp_path / name, match=words), name


class OpenMarker:  # unpickling calls open(path, "w"), which creates the file
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, "w"))


class SystemMarker:  # unpickling runs a shell command
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [OpenMarker, SystemMarker])
def test_code_running_ckpt_is_refused(tiny_sd, tmp_path, payload):
    marker = tmp_path / "marker"
    torch.save({"state_dict": tiny_sd, "callbacks": {"evil": payload(marker)}}, tmp_path / "evil.ckpt")
    one_line_error(checkpoint.load, tmp_path / "evil.ckpt", match="refused to unpickle")
    assert not marker.exists()


def test_refuses_sdxl_and_inpainting_diffusers_folders(hf, tmp_path):
    for change, words in (({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "SDXL"),
                          ({"in_channels": 9}, "inpainting")):
        folder = Path(shutil.copytree(hf.folder, tmp_path / words))
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**cfg, **change}))
        one_line_error(checkpoint.load, folder, match=words)


# -----------------------------------------------------------------------------------------------
# 5. "Load every official file people have"

@contextmanager
def fake_lightning():
    """pytorch_lightning's ModelCheckpoint exists only while torch.save pickles it, as in a training
    run; the loader then has no Lightning to import (and must not need one)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    assert not any(n in sys.modules for n in names)
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1], "__qualname__": "ModelCheckpoint"})
    mods[names[-1]].ModelCheckpoint = cls
    sys.modules.update(mods)
    try:
        yield cls
    finally:
        for n in names:
            del sys.modules[n]


def lightning_ckpt(state_dict, path, **legacy):
    with fake_lightning() as ModelCheckpoint:
        callback = ModelCheckpoint()
        callback.dirpath, callback.monitor = "/logs/checkpoints", "val/loss_simple_ema"
        torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {callback: {"best_model_score": torch.tensor(0.125), "dirpath": "/logs"}},
                    "optimizer_states": [], "lr_schedulers": []}, path, **legacy)
    return path


@pytest.fixture(scope="module")
def tiny_safetensors(tiny_sd, tmp_path_factory):
    """The plain .safetensors equivalent every other form must load to."""
    path = tmp_path_factory.mktemp("plain") / "tiny.safetensors"
    save_file(tiny_sd, path)
    return checkpoint.load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_ckpt(tiny_sd, tiny_safetensors, tmp_path, legacy):
    path = lightning_ckpt(tiny_sd, tmp_path / "sd-v1-4-like.ckpt",
                          **({"_use_new_zipfile_serialization": False} if legacy else {}))
    model = checkpoint.load(path)
    assert "pytorch_lightning" not in sys.modules
    assert_same_weights(model, tiny_safetensors)
    assert_same_outputs(model, tiny_safetensors)


def test_full_ema_ckpt_loads_the_ema_weights(tiny_sd, tiny_safetensors, tmp_path, capsys):
    """sd-v1-4-full-ema.ckpt keeps the training weights under model.diffusion_model.* and the EMA
    ones (what CompVis samples with) flattened under model_ema.*."""
    ema = {"model_ema." + "".join(k[len("model."):].split(".")): v for k, v in tiny_sd.items() if k.startswith(UNET)}
    assert len(ema) > 100 and "model_ema.diffusion_modelinput_blocks00weight" in ema
    g = torch.Generator().manual_seed(9)
    train = {k: v + 0.5 * torch.randn(v.shape, generator=g) if k.startswith(UNET) else v for k, v in tiny_sd.items()}
    model = checkpoint.load(lightning_ckpt({**train, **ema}, tmp_path / "full-ema.ckpt"), verbose=True)
    assert "EMA" in capsys.readouterr().err
    assert_same_weights(model, tiny_safetensors)  # the EMA copy, not the training weights
    assert_same_outputs(model, tiny_safetensors)
    del ema["model_ema.diffusion_modelout2weight"]
    one_line_error(checkpoint.load, lightning_ckpt({**train, **ema}, tmp_path / "broken.ckpt"), match="EMA")


def to_bin(folder):
    """Replace every .safetensors of a diffusers folder by the torch.save .bin older folders have."""
    names = {"diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin", "model.safetensors": "pytorch_model.bin"}
    for f in folder.glob("*/*.safetensors"):
        torch.save(load_file(f), f.with_name(names[f.name]))
        f.unlink()


def test_diffusers_folder_with_only_bin_files(hf, from_hf, tmp_path, capsys):
    folder = Path(shutil.copytree(hf.folder, tmp_path / "sd"))
    to_bin(folder)
    assert sorted(p.name for p in folder.glob("*/*.bin")) == ["diffusion_pytorch_model.bin"] * 2 + ["pytorch_model.bin"]
    model = checkpoint.load(folder, verbose=True)
    assert "text_encoder/pytorch_model.bin" in capsys.readouterr().err
    assert_same_weights(model, from_hf)
    assert_same_outputs(model, from_hf)


def test_diffusers_fp16_variant(hf, from_hf, tmp_path, capsys):
    folder = Path(shutil.copytree(hf.folder, tmp_path / "sd"))
    for f in list(folder.glob("*/*.safetensors")):
        save_file({k: v.half() for k, v in load_file(f).items()}, f.with_name(f.name.replace(".", ".fp16.", 1)))
    model = checkpoint.load(folder, verbose=True)
    assert ".fp16." not in capsys.readouterr().err
    assert_same_weights(model, from_hf)
    half = checkpoint.load(folder, variant="fp16", verbose=True)
    err = capsys.readouterr().err
    assert all(f"{p}.fp16.safetensors" in err for p in ("diffusion_pytorch_model", "model"))
    assert_same_weights(half, checkpoint.load(hf.folder, dtype=torch.float16), dtype=torch.float32)
    assert not torch.equal(half.unet.out[2].weight, model.unet.out[2].weight)  # the variant really was read
    for f in folder.glob("*/*[!6].safetensors"):  # fp16 files only: say which variant to ask for
        f.unlink()
    one_line_error(checkpoint.load, folder, match="variant='fp16'")
    one_line_error(checkpoint.load, hf.folder, variant="fp16", match=r"no diffusion_pytorch_model\.fp16\.safetensors")


def test_code_running_bin_in_diffusers_folder_is_refused(hf, tmp_path):
    folder = Path(shutil.copytree(hf.folder, tmp_path / "sd"))
    to_bin(folder)
    marker = tmp_path / "marker"
    f = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({**torch.load(f), "lr": SystemMarker(marker)}, f)
    one_line_error(checkpoint.load, folder, match=r"refused to unpickle the global \w+\.system")
    assert not marker.exists()


# -----------------------------------------------------------------------------------------------
# 6. Saving never leaves half a file; `python -m checkpoint convert`

def test_failed_save_leaves_nothing_behind(from_hf, tmp_path, monkeypatch):
    good = checkpoint.save(from_hf, tmp_path / "sd.safetensors")
    checkpoint.save(from_hf, tmp_path / "sd")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", write_half_then_fail)
    for name in ("sd.safetensors", "sd", "new.safetensors", "new"):
        with pytest.raises(OSError, match="No space"):
            checkpoint.save(from_hf, tmp_path / name)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # old ones intact, no .tmp
    monkeypatch.undo()
    assert_same_weights(checkpoint.load(good), from_hf)

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"precious")
    one_line_error(checkpoint.save, from_hf, tmp_path / "photos", match="not a diffusers folder")
    one_line_error(checkpoint.save, from_hf, tmp_path / "photos.ckpt", match="cannot tell the format")
    one_line_error(checkpoint.save, from_hf, tmp_path / "photos.ckpt", format="compvis", match="never write pickles")
    assert (tmp_path / "photos" / "cat.png").read_bytes() == b"precious"


def convert(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "checkpoint", "convert", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_command(tiny_sd, tiny_safetensors, tmp_path):
    ckpt = lightning_ckpt(tiny_sd, tmp_path / "sd-v1-4.ckpt")
    r = convert(ckpt, tmp_path / "clean.safetensors")
    assert r.returncode == 0, r.stderr
    assert f"read {ckpt}" in r.stderr and f"wrote {tmp_path / 'clean.safetensors'}" in r.stdout
    model = checkpoint.load(tmp_path / "clean.safetensors")
    assert_same_weights(model, tiny_safetensors)
    assert json.loads(model.meta["duge.config"])["unet"]["model_channels"] == 32  # configs now stored

    r = convert(ckpt, tmp_path / "folder", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert "(diffusers folder, float16)" in r.stdout and (tmp_path / "folder" / "model_index.json").is_file()
    assert_same_weights(checkpoint.load(tmp_path / "folder", dtype=None),
                        checkpoint.load(ckpt, dtype=torch.float16))

    before = sorted(tmp_path.iterdir())
    marker = tmp_path / "marker"
    torch.save({"state_dict": tiny_sd, "x": SystemMarker(marker)}, tmp_path / "evil.ckpt")
    for bad in ([tmp_path / "evil.ckpt", tmp_path / "out.safetensors"], [tmp_path / "nope.ckpt", tmp_path / "out"],
                [ckpt, tmp_path / "out.ckpt"]):
        r = convert(*bad)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(tmp_path.iterdir()) == sorted(before + [tmp_path / "evil.ckpt"]) and not marker.exists()


# -----------------------------------------------------------------------------------------------
# 7. SD 2.x: a diffusers folder written by diffusers, our files in both layouts, an official-layout
#    single file (OpenCLIP text tower under cond_stage_model.model.)

# heads of 64 channels (1 and 2 heads), Linear proj_in/proj_out, fp32 attention, v-prediction
UCFG2 = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                   num_head_channels=64, context_dim=64, norm_groups=32, use_linear_projection=True,
                   upcast_attention=True, prediction_type="v_prediction")
PROMPTS2 = ["a photo of a cat", "An astronaut riding a horse", ""]  # no '!': transformers splits the pad token off


def hf_gelu_text(vocab_size, layers, seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu")), seed)


@pytest.fixture(scope="module")
def hf2(tmp_path_factory):
    """A tiny SD 2.x-like StableDiffusionPipeline saved by diffusers: UNet with attention_head_dim [1, 2] and
    linear projections, GELU CLIPTextModel, tokenizer padding with '!', v_prediction DDIM."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    tok = Tokenizer(Tokenizer.from_openai_gz().merges[:300], pad="!")
    tmp = tmp_path_factory.mktemp("hf2")
    tok.save_folder(tmp / "our_tokenizer")
    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True, norm_num_groups=32), 20)
    vae = randomize_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
                                   sample_size=16), 21)
    text = hf_gelu_text(tok.vocab_size, 2, 22)
    return saved_pipeline(tmp / "sd2", tok, unet, vae, text, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def from_hf2(hf2):
    return checkpoint.load(hf2.folder)


def test_sd2_diffusers_folder_gives_the_reference_outputs(hf2, from_hf2):
    import sample
    model = from_hf2
    assert model.unet.cfg == UCFG2 and model.open_clip and model.tokenizer.pad_id == 0
    assert model.text_encoder.cfg == TextConfig(vocab_size=814, width=64, layers=2, heads=1, hidden_act="gelu")
    ids = hf2.pipe.tokenizer(PROMPTS2, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(model.tokenizer(PROMPTS2), ids) and (ids == 0).any()
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([981, 500, 1])
    with torch.no_grad():
        ctx = hf2.text(ids).last_hidden_state
        pairs = {"text": (model.text_encoder(ids), ctx),
                 "v": (model.unet(x, t, ctx), hf2.unet(x, t, encoder_hidden_states=ctx).sample)}
    latents = torch.randn(2, 4, 8, 8, generator=g)
    pairs["images"] = (sample.generate(model, PROMPTS2[:2], latents=latents, steps=4, guidance=7.5),
                       torch.from_numpy(hf2.pipe(prompt=PROMPTS2[:2], height=16, width=16, num_inference_steps=4,
                                                 guidance_scale=7.5, latents=latents.clone(),
                                                 output_type="np").images).permute(0, 3, 1, 2))
    for name, (ours, ref) in pairs.items():
        diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        print(f"{name}: max abs diff {diff:.2e} (output scale {scale:.2f})")
        assert ours.shape == ref.shape and scale > 0.1 and diff < 1e-4 * max(1.0, scale), name


def test_sd2_compvis_file_round_trip_and_diffusers_conversion(hf2, from_hf2, tmp_path):
    """Our SD 2.x single file: OpenCLIP's layout for the text (fused in_proj), Linear proj_in; diffusers'
    own single-file conversion gives back its tensors, and we read back the same model."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)
    path = checkpoint.save(from_hf2, tmp_path / "sd2.safetensors")
    sd = load_file(path)
    assert not any(k.startswith(TEXT) for k in sd)
    assert sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (192, 64)
    assert sd[UNET + "input_blocks.1.1.proj_in.weight"].shape == (64, 64)
    assert infer_diffusers_model_type({**sd, UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
                                       torch.zeros(64, 1024)}) == "v2"  # diffusers' test needs SD 2's real width
    converted = {"unet": convert_ldm_unet_checkpoint(sd, dict(hf2.unet.config)),
                 "vae": convert_ldm_vae_checkpoint(sd, dict(hf2.vae.config)),
                 "text": {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(hf2.text, sd).items()}}
    for name, got in converted.items():
        ref = getattr(hf2, name).state_dict()
        assert got.keys() == ref.keys(), name
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    back = checkpoint.load(path)
    assert back.configs() == from_hf2.configs() and back.tokenizer.pad_id == 0
    assert_same_weights(back, from_hf2)
    assert_same_outputs(back, from_hf2)


def test_sd2_diffusers_folder_we_write_loads_in_diffusers(hf2, from_hf2, tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    folder = checkpoint.save(from_hf2, tmp_path / "sd2")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    assert unet.config.attention_head_dim == [1, 2] and unet.config.use_linear_projection and unet.config.upcast_attention
    assert text.config.hidden_act == "gelu"
    for m, ref in ((unet, hf2.unet), (text, hf2.text)):
        assert m.state_dict().keys() == ref.state_dict().keys()
        assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert DDIMScheduler.from_pretrained(folder / "scheduler").config.prediction_type == "v_prediction"
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer").pad_token_id == 0
    back = checkpoint.load(folder)
    assert back.configs() == from_hf2.configs() and back.tokenizer.pad_id == 0
    assert_same_weights(back, from_hf2)


def open_clip_layout(hf_text, extra_layer_seed):
    """A CLIPTextModel's tensors as SD 2.x single files store OpenCLIP's text tower, written out here from
    weight_formats.md §4, plus what SD 2.x does not use: one more resblock, text_projection, logit_scale."""
    sd = {k.removeprefix("text_model."): v for k, v in hf_text.state_dict().items()}
    n = hf_text.config.num_hidden_layers
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    for i in range(n):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[b + f"attn.in_proj_{leaf}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[b + f"{theirs}.{leaf}"] = sd[a + f"{ours}.{leaf}"]
    g = torch.Generator().manual_seed(extra_layer_seed)
    out.update({k.replace(".0.", f".{n}.", 1): torch.randn(v.shape, generator=g)
                for k, v in out.items() if k.startswith("transformer.resblocks.0.")})
    out["text_projection"] = torch.randn(64, 64, generator=g)
    out["logit_scale"] = torch.tensor(4.6052)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def test_sd2_official_layout_file(hf2, from_hf2, openai_tok, tmp_path):
    """A SD 2.x single file as Stability AI's are (OpenCLIP text tower with its last resblock, text_projection
    and logit_scale, no metadata of ours): the configs are inferred, the unused tensors dropped, and the
    text context is the reference CLIPTextModel's (the 24 -> 23 layer cut of SD 2.x, in small)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    hf_text = hf_gelu_text(49408, 2, 30)                     # OpenAI's vocabulary: the file says nothing else
    text_sd = open_clip_layout(hf_text, 31)
    got = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(hf_text, text_sd).items()}
    ref = hf_text.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)     # diffusers reads our hand-written layout the same
    parts = checkpoint.compvis_state_dict(from_hf2)
    sd = {**{k: v for k, v in parts.items() if k.startswith((UNET, VAE_))}, **text_sd,
          **{k: v for k, v in official_extras().items() if not k.startswith(TEXT)}}
    save_file(sd, tmp_path / "v2-like.safetensors")
    model = checkpoint.load(tmp_path / "v2-like.safetensors")
    assert model.unet.cfg == UCFG2 and model.image_size == 768 and model.tokenizer.pad_id == 0
    assert model.text_encoder.cfg == TextConfig(width=64, layers=2, heads=1, hidden_act="gelu")
    assert_same_weights(model, checkpoint.StableDiffusion(model.tokenizer, model.text_encoder, from_hf2.unet, from_hf2.vae))
    rows = [[49406, *openai_tok.encode(p), 49407] for p in PROMPTS2]
    ids = torch.tensor([r + [0] * (77 - len(r)) for r in rows])  # zero padding after each prompt's eot
    assert torch.equal(model.tokenizer(PROMPTS2), ids)
    with torch.no_grad():
        diff = (model.text_encoder(ids) - hf_text(ids).last_hidden_state).abs().max().item()
    print(f"text (OpenCLIP layout): max abs diff {diff:.2e}")
    assert diff < 1e-5
    assert checkpoint.load(tmp_path / "v2-like.safetensors", prediction_type="epsilon").unet.cfg.prediction_type == "epsilon"


def test_sd2_official_file_is_written_back_with_every_tensor(hf2, from_hf2, tmp_path, capsys):
    """Issue 31: an official SD 2.x file holds tensors no module of ours uses (OpenCLIP's last resblock,
    text_projection, logit_scale, the 12 schedule buffers). They are kept beside the model and written
    back, so the file we write has the official key set and the same tensors (what the original SD 2
    code loads), also from our own file a second time; the unused tower's layers stay out of the model."""
    hf_text = hf_gelu_text(49408, 2, 30)
    schedule = {k: v for k, v in official_extras().items() if k in checkpoint.SCHEDULE_BUFFERS}
    parts = checkpoint.compvis_state_dict(from_hf2)
    sd = {**{k: v for k, v in parts.items() if k.startswith((UNET, VAE_))}, **open_clip_layout(hf_text, 31), **schedule}
    save_file(sd, tmp_path / "v2-like.safetensors")
    model = checkpoint.load(tmp_path / "v2-like.safetensors")
    open_clip = "cond_stage_model.model."
    unused = {open_clip + "text_projection", open_clip + "logit_scale"} | {
        k for k in sd if k.startswith(open_clip + "transformer.resblocks.2.")}
    assert len(unused) == 2 + 12 and model.extras.keys() == unused | schedule.keys()
    assert model.text_encoder.cfg.layers == 2
    assert "does not say what its UNet predicts" in capsys.readouterr().err   # the 768-v guess is said
    ours = load_file(checkpoint.save(model, tmp_path / "ours.safetensors"))
    assert ours.keys() == sd.keys() and all(torch.equal(ours[k], sd[k]) for k in sd)
    again = load_file(checkpoint.save(checkpoint.load(tmp_path / "ours.safetensors"), tmp_path / "again.safetensors"))
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    assert capsys.readouterr().err == ""                                    # our file says what it predicts
    # a 512-base file told so: eps at 512 px
    base = checkpoint.load(tmp_path / "v2-like.safetensors", prediction_type="epsilon")
    assert base.unet.cfg.prediction_type == "epsilon" and base.image_size == 512
    assert checkpoint.load(tmp_path / "v2-like.safetensors", prediction_type="auto").image_size == 768
