"""Tests of clip_vision.py: CLIP (image tower, projections, logits) against transformers' CLIPModel
on identical random weights, tiny and at full ViT-L/14 size, through load_clip on a folder written
by save_pretrained; preprocessing against transformers' CLIPImageProcessor; refusals."""

import gc
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import clip_vision
from checkpoint import CheckpointError
from clip_text import Tokenizer
from clip_vision import CLIP, MEAN, STD, CLIPConfig, load_clip, preprocess

PROMPTS = ["a photograph of an astronaut riding a horse", "a painting of a cat by van gogh", ""]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_openai_gz()


def hf_clip(text, vision, projection_dim):
    """transformers' CLIPModel, random init (seed 0). Its LayerNorms start at (1, 0) and its biases
    at 0: those are moved too, so that a wrong assignment of any of them shows."""
    from transformers import CLIPConfig as HFConfig, CLIPModel
    torch.manual_seed(0)
    model = CLIPModel(HFConfig(text_config={"eos_token_id": 49407, "bos_token_id": 49406, **text},
                               vision_config=vision, projection_dim=projection_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(4.0)  # not the initial 2.6592: proves it is read from the file
    return model


def reference(hf, pixels, tokens):
    """What transformers computes: raw projections, normalised embeddings, logits."""
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=pixels)
        raw_img = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
        raw_txt = hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
    return {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image,
            "raw image": raw_img, "raw text": raw_txt}


def ours(model, pixels, tokens):
    with torch.no_grad():
        return {"image": model.encode_image(pixels), "text": model.encode_text(tokens),
                "logits": model(pixels, tokens), "raw image": model.encode_image(pixels, normalize=False),
                "raw text": model.encode_text(tokens, normalize=False)}


def assert_matches(got, expected, label):
    for k, ref in expected.items():
        diff = (got[k] - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        print(f"{label} {k}: max abs diff {diff:.3g}, relative to the largest value {rel:.3g}")
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((200 + 40 * i, 300, 3)) * 255).astype("uint8")) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Parity with transformers.CLIPModel

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory):
    """A tiny CLIPModel written by save_pretrained (safetensors), with tokenizer files beside it."""
    hf = hf_clip(TINY_TEXT, TINY_VISION, projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny-clip")
    hf.save_pretrained(folder)
    tok.save_folder(folder)  # vocab.json + merges.txt at the top, as in openai/clip-vit-large-patch14
    return hf, folder


def test_tiny_clip_matches_transformers(tiny, tok):
    hf, folder = tiny
    assert (folder / "model.safetensors").is_file() and (folder / "vocab.json").is_file()
    model = load_clip(folder)
    assert model.cfg.vision == clip_vision.VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2,
                                                        projection_dim=16)
    assert model.logit_scale.item() == 4.0 and not any(p.requires_grad for p in model.parameters())
    pixels = preprocess(images(2), size=32)
    tokens = tok(PROMPTS)
    assert_matches(ours(model, pixels, tokens), reference(hf, pixels, tokens), "tiny")
    # prompts as strings go through the attached tokenizer (the folder's)
    torch.testing.assert_close(model.encode_text(PROMPTS), model.encode_text(tokens), rtol=0, atol=0)
    logits = model(pixels, PROMPTS)
    assert logits.shape == (2, 3)
    norms = model.encode_image(pixels).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(2))


def test_pytorch_model_bin_loads_through_safe_pickle(tiny, tmp_path, tok):
    hf, folder = tiny
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    shutil.copy(folder / "config.json", tmp_path / "config.json")  # no tokenizer files: OpenAI's vocabulary
    model = load_clip(tmp_path)
    assert model.tokenizer.vocab_size == 49408 and model.tokenizer.merges == tok.merges
    pixels = preprocess(images(1), size=32)
    assert_matches(ours(model, pixels, tok(PROMPTS)), reference(hf, pixels, tok(PROMPTS)), "tiny .bin")


def test_old_files_with_position_ids(tiny, tmp_path, tok):
    """Files written by transformers 4.x carry int64 position_ids buffers for both towers."""
    hf, folder = tiny
    sd = load_file(folder / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    pixels = preprocess(images(1), size=32)
    assert_matches(ours(load_clip(tmp_path), pixels, tok(PROMPTS)), reference(hf, pixels, tok(PROMPTS)), "4.x")


def test_vit_l14_keys_and_size():
    with torch.device("meta"):
        sd = CLIP(CLIPConfig()).state_dict()
    assert len(sd) == 590 and sum(v.numel() for v in sd.values()) == 427_616_513  # openai/clip-vit-large-patch14
    assert sd["vision.embeddings.patch_embedding.weight"].shape == (1024, 3, 14, 14)
    assert sd["vision.embeddings.position_embedding.weight"].shape == (257, 1024)
    assert sd["vision.encoder.layers.23.mlp.fc1.weight"].shape == (4096, 1024)
    assert sd["visual_projection.weight"].shape == (768, 1024) and sd["text_projection.weight"].shape == (768, 768)
    assert clip_vision.transformers_key("vision.pre_layrnorm.weight") == "vision_model.pre_layrnorm.weight"
    assert clip_vision.transformers_key("text.text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"


@pytest.mark.slow
def test_full_size_vit_l14_matches_transformers(tok, tmp_path):
    """ViT-L/14 (428M parameters) at full size: one 224x224 image, two prompts. transformers'
    outputs are computed first and its model freed before ours is loaded, to halve peak memory."""
    hf = hf_clip({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
                 {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 14}, projection_dim=768)
    pixels, tokens = preprocess(images(1)), tok(PROMPTS[:2])
    assert pixels.shape == (1, 3, 224, 224)
    expected = reference(hf, pixels, tokens)
    folder = tmp_path / "clip-vit-large-patch14"
    try:
        hf.save_pretrained(folder)
        del hf
        gc.collect()
        model = load_clip(folder)
        assert model.cfg == CLIPConfig() and model.tokenizer.vocab_size == 49408
        assert_matches(ours(model, pixels, tokens), expected, "ViT-L/14")
        del model
        gc.collect()
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 1.7 GB that pytest would keep for three runs


# ----------------------------------------------------------------------------------------------
# Preprocessing against transformers' CLIPImageProcessor (openai settings are its defaults)

def reference_processor():
    """The PIL implementation: transformers 5 names it CLIPImageProcessorPil (its CLIPImageProcessor
    falls back to it without torchvision); in transformers 4 CLIPImageProcessor is PIL-based."""
    import transformers
    return (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()


def gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x / (w - 1), y / (h - 1), (x + y) / (h + w - 2)], -1) * 255


def noise(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)) * 255


PICTURES = {  # name -> H x W x 3 uint8; landscape, square, portrait, odd crop offsets, upscaled
    "noise 300x200": noise(200, 300), "gradient 300x200": gradient(200, 300), "noise 224x224": noise(224, 224),
    "noise 640x480": noise(480, 640), "noise 100x150 (upscaled)": noise(150, 100),
    "noise 333x501 (odd crop)": noise(501, 333), "noise 300x224 (crop only)": noise(224, 300),
    "gradient 250x600 (over 2:1 tall)": gradient(600, 250)}


def to_pixels(x):
    """Undo the normalisation: values in [0, 1], where one grey level is 1/255."""
    return x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]


@pytest.mark.parametrize("name", list(PICTURES))
def test_preprocess_matches_clip_image_processor(name):
    """PIL images and uint8 tensors go through Pillow's own integer arithmetic and give the same
    pixels (acceptance: within one grey level, 1/255; measured: 0). Float tensors skip the rounding
    to grey levels, so they differ from the rounded reference by Pillow's own roundings: half a level
    after its horizontal pass, carried through the vertical pass's weights (their absolute sum is under
    1.5 for the bicubic kernel), and half a level at the end: at most 0.5 * 1.5 + 0.5 = 1.25 levels,
    whatever the CPU (Pillow's resampling is integer arithmetic). Measured 0.95 on the gradients, 1.06
    on noise."""
    a = PICTURES[name].round().astype("uint8")
    expected = to_pixels(torch.from_numpy(reference_processor()(images=Image.fromarray(a),
                                                                return_tensors="np")["pixel_values"][0]))
    from_pil = preprocess(Image.fromarray(a))
    assert from_pil.shape == (1, 3, 224, 224) and from_pil.dtype == torch.float32
    from_uint8 = preprocess(torch.from_numpy(a).permute(2, 0, 1))
    from_float = preprocess(torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    diffs = [(to_pixels(x[0]) - expected).abs().max().item() * 255 for x in (from_pil, from_uint8, from_float)]
    print(f"{name}: max |ours - CLIPImageProcessor| in grey levels: PIL {diffs[0]:.2g}, uint8 {diffs[1]:.2g}, "
          f"float {diffs[2]:.3f}")
    assert diffs[0] <= 1 and diffs[1] <= 1  # the acceptance bound, 1/255
    assert diffs[0] < 1e-3 and diffs[1] < 1e-3  # what we claim: the same grey levels (float32 rounding aside)
    assert diffs[2] <= 1.25  # see the docstring: Pillow's two roundings, bounded


def test_tall_pictures_follow_the_classic_pass_order():
    """Pillow <= 12 always resamples horizontally first, then vertically (CLIP was trained so);
    Pillow 13 goes vertical first when the height shrinks by more than twice the width does. On
    smooth pictures both orders agree (above); on noise they do not. Two one-axis PIL resizes are
    the classic order in any Pillow, and ours equals it."""
    a = noise(600, 250).astype("uint8")  # 250 x 600 -> 224 x 537, then the centre crop
    classic = Image.fromarray(a).resize((224, 600), Image.BICUBIC).resize((224, 537), Image.BICUBIC)
    top = (537 - 224) // 2
    expected = torch.from_numpy(np.array(classic)[top:top + 224]).permute(2, 0, 1) / 255
    got = to_pixels(preprocess(Image.fromarray(a))[0])
    assert (got - expected).abs().max() < 1e-6
    installed = to_pixels(torch.from_numpy(reference_processor()(images=Image.fromarray(a),
                                                                 return_tensors="np")["pixel_values"][0]))
    print(f"tall noise, vs the installed Pillow's CLIPImageProcessor: {(got - installed).abs().max() * 255:.0f}/255")


def test_preprocess_inputs():
    pics = [Image.fromarray(noise(200, 300).astype("uint8")), Image.fromarray(noise(480, 640, 1).astype("uint8"))]
    batch = preprocess(pics)
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[1:], preprocess(pics[1]), rtol=0, atol=0)
    # a batch tensor is one call; transparency is composited on white, as transformers does
    rgba = np.concatenate([noise(200, 300), noise(200, 300, 2)[..., :1]], -1).astype("uint8")
    expected = reference_processor()(images=Image.fromarray(rgba, "RGBA"), return_tensors="pt")["pixel_values"]
    assert (to_pixels(preprocess(Image.fromarray(rgba, "RGBA"))[0]) - to_pixels(expected[0])).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(torch.rand(3, 64, 64) * 2 - 1)
    with pytest.raises(ValueError, match=r"RGB image .* got shape \(64, 64, 3\)"):
        preprocess(torch.rand(64, 64, 3))
    # float input keeps gradients
    x = torch.rand(1, 3, 100, 80, requires_grad=True)
    preprocess(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Refusals: one line each, saying what is wrong

def one_line_error(fn, *args, match):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


def copy_config(folder, dest, **changes):
    dest.mkdir(exist_ok=True)
    c = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**c, **changes}))
    return dest


def test_refuses_folder_without_weights(tiny, tmp_path):
    copy_config(tiny[1], tmp_path)
    one_line_error(load_clip, tmp_path, match="no model.safetensors or pytorch_model.bin")
    one_line_error(load_clip, tmp_path / "nowhere", match="no config.json")


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_refuses_incomplete_or_foreign_weights(tiny, tmp_path, case):
    sd = load_file(tiny[1] / "model.safetensors")
    if case == "missing":
        del sd["vision_model.post_layernorm.weight"]
        words = r"missing tensor\(s\) \['vision_model.post_layernorm.weight'\]"
    elif case == "unexpected":
        sd["vision_model.head.weight"] = torch.zeros(3)
        words = r"unexpected tensor\(s\) \['vision_model.head.weight'\]"
    else:
        sd["visual_projection.weight"] = torch.zeros(8, 32)
        words = r"visual_projection.weight has shape \(8, 32\), expected \(16, 32\)"
    save_file(sd, copy_config(tiny[1], tmp_path) / "model.safetensors")
    one_line_error(load_clip, tmp_path, match=words)


def test_refuses_configs_that_are_not_openai_clip(tiny, tmp_path):
    os.symlink(tiny[1] / "model.safetensors", copy_config(tiny[1], tmp_path / "a") / "model.safetensors")
    for i, (changes, words) in enumerate([
            ({"model_type": "siglip"}, "'siglip' model, not 'clip'"),
            ({"model_type": None, "_class_name": "UNet2DConditionModel"}, "None model, not 'clip'"),
            ({"vision_config": {**TINY_VISION, "hidden_act": "gelu"}}, "vision tower uses gelu"),
            ({"text_config": {**TINY_TEXT, "intermediate_size": 100}}, "text tower .* 100-wide MLP"),
            ({"text_config": "garbled"}, "malformed CLIP config")]):
        folder = copy_config(tiny[1], tmp_path / str(i), **changes)
        os.symlink(tiny[1] / "model.safetensors", folder / "model.safetensors")
        one_line_error(load_clip, folder, match=words)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    one_line_error(load_clip, tmp_path / "bad", match="not valid JSON")


def test_refuses_code_running_bin(tiny, tmp_path):
    class SystemMarker:  # unpickling would run a shell command
        def __reduce__(self): return (os.system, (f"touch {tmp_path / 'marker'}",))
    torch.save({**load_file(tiny[1] / "model.safetensors"), "x": SystemMarker()}, tmp_path / "pytorch_model.bin")
    copy_config(tiny[1], tmp_path)
    one_line_error(load_clip, tmp_path, match=r"refused to unpickle the global \w+\.system")
    assert not (tmp_path / "marker").exists()
