"""train.py: the CLI's errors, the ledger across requests, and the real-SD path at full size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from clip_text import TextConfig, TextEncoder, Tokenizer
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parent.parent


def tiny_sd(path, ledger=None, seed=0):
    """A tiny SD v1-shaped model with the real CLIP vocabulary, saved as a CompVis file."""
    torch.manual_seed(seed)
    m = checkpoint.StableDiffusion(
        Tokenizer.from_openai_gz(), TextEncoder(TextConfig(width=32, layers=1, heads=2)),
        UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        num_heads=2, context_dim=32, norm_groups=8)),
        VAE(VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)), image_size=16)
    for p in m.unet.parameters():
        p.data.normal_(0, 0.05)
    if ledger is not None:
        m.meta["duge.ledger"] = json.dumps(ledger)
    checkpoint.save(m, path)
    return path


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


FAST = ["--steps", "2", "--prompts", "1", "--images-per-prompt", "1", "--memory", "2", "--gen-steps", "2",
        "--num-related", "1", "--batch", "1"]


def test_errors_are_one_line_and_write_nothing(tmp_path):
    w = tiny_sd(tmp_path / "m.safetensors", ledger={"steps": [{"concept": "van gogh", "anchor": "", "retain": [],
                                                              "delta": "x.delta.safetensors"}]})
    cases = [
        (["--forget", "", "--weights", str(w)], "needs a concept name"),
        (["--forget", "Van Gogh", "--weights", str(w)], "already forgotten"),
        (["--forget", "monet", "--weights", str(tmp_path / "missing.safetensors")], "no such file"),
        (["--forget", "monet", "--weights", str(w), "--out", "/proc/nope/out.safetensors"], "cannot write"),
        (["--forget", "monet", "--weights", str(w), "--out", str(tmp_path / "o.ckpt")], "must end in .safetensors"),
    ]
    before = sorted(os.listdir(tmp_path))
    for args, message in cases:
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


def test_two_requests_build_the_ledger(tmp_path):
    w = tiny_sd(tmp_path / "m.safetensors")
    r = run("--forget", "van gogh", "--forget", "apple", "--weights", str(w), "--out", str(tmp_path / "o.safetensors"),
            *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = checkpoint.load(tmp_path / "forget-van-gogh.safetensors")
    final = checkpoint.load(tmp_path / "o.safetensors")
    ledger = json.loads(final.meta["duge.ledger"])
    assert [s["concept"] for s in ledger["steps"]] == ["van gogh", "apple"]
    assert ledger["steps"][0]["kind"] == "style" and ledger["steps"][1]["kind"] == "object"
    assert ledger["steps"][1]["hparams"]["steps"] == 2
    for f in ("o.delta.safetensors", "o.grid.png", "forget-van-gogh.delta.safetensors"):
        assert (tmp_path / f).exists(), f
    # only the cross-attention keys and values changed, and phi_0 in the delta is the input model
    base = checkpoint.load(w)
    from safetensors.torch import load_file
    delta = load_file(str(tmp_path / "o.delta.safetensors"))
    b, f1, f2 = (dict(m.unet.named_parameters()) for m in (base, first, final))
    changed = {n for n in b if not torch.equal(b[n], f2[n])}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert all(torch.equal(delta[f"phi0.{n}"], b[n]) for n in b if f"phi0.{n}" in delta)
    assert all(torch.equal(delta[f"theta.{n}"], f2[n]) for n in changed)
    assert any(not torch.equal(f1[n], f2[n]) for n in changed)  # the second request trained again


def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Ctrl-C after the step-50 resume point: no model file, a resume file; --resume then ends
    with exactly the tensors of an uninterrupted run."""
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    args = ["--forget", "van gogh", "--weights", str(w), *FAST, "--steps", "60", "--cache", str(tmp_path / "cache")]
    assert train.main(args + ["--out", str(tmp_path / "full.safetensors")]) == 0

    save = train.save_resume
    def save_then_interrupt(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_resume", save_then_interrupt)
    out = tmp_path / "cut.safetensors"
    assert train.main(args + ["--out", str(out)]) == 130
    assert not out.exists() and (tmp_path / "cut.resume.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(train, "save_resume", save)
    assert train.main(args + ["--out", str(out), "--resume"]) == 0
    assert not (tmp_path / "cut.resume.safetensors").exists()
    full, cut = (dict(checkpoint.load(p).unet.named_parameters()) for p in (tmp_path / "full.safetensors", out))
    assert all(torch.equal(full[n], cut[n]) for n in full)
    ledger = json.loads(checkpoint.load(out).meta["duge.ledger"])
    assert [s["concept"] for s in ledger["steps"]] == ["van gogh"]


@pytest.mark.slow
def test_real_sd_path_full_size(tmp_path):
    """A full-size SD v1 file (random weights, official layout) through train.py at a small
    resolution; the output loads in diffusers with its own single-file conversion."""
    torch.manual_seed(0)
    m = checkpoint.StableDiffusion(Tokenizer.from_openai_gz(), TextEncoder(TextConfig()), UNet(UNetConfig()),
                                   VAE(VAEConfig()))
    src = tmp_path / "sd.safetensors"
    checkpoint.save(m, src, dtype=torch.float16)
    del m
    out = tmp_path / "out.safetensors"
    r = run("--forget", "van gogh", "--weights", str(src), "--out", str(out), "--size", "64", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers import UNet2DConditionModel
    sd = load_file(str(out))
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == 686
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    converted = convert_ldm_unet_checkpoint(sd, {"layers_per_block": 2})
    missing, unexpected = unet.load_state_dict(converted, strict=True), None
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(unet.state_dict()[name], sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])
