"""train.py: the CLI's errors, the ledger across requests, and the real-SD path at full size."""
import dataclasses
import json
import os
import re
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


FAST = ["--steps", "2", "--num-prompts", "1", "--images-per-prompt", "1", "--generic", "2", "--gen-steps", "2",
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
    phi0_keys = {k.removeprefix("phi0.") for k in delta if k.startswith("phi0.")}
    attn2 = {n for n in b if ".attn2." in n}
    assert phi0_keys == attn2 and len(attn2) == 5 * len(base.unet.cross_attentions())  # all of phi_0's attn2
    assert all(torch.equal(delta[f"phi0.{n}"], b[n]) for n in phi0_keys)
    assert all(torch.equal(delta[f"theta.{n}"], f2[n]) for n in changed)
    assert any(not torch.equal(f1[n], f2[n]) for n in changed)  # the second request trained again


def interrupted_then_resumed(train, monkeypatch, args, out):
    """Ctrl-C right after the first resume point is written (step 50): exit 130, no model, a resume
    file and nothing half-written; then --resume finishes the run and removes the resume file."""
    import request
    save = request.save_resume
    def save_then_interrupt(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(request, "save_resume", save_then_interrupt)
    assert train.main(args + ["--out", str(out)]) == 130
    resume = out.with_name(out.name.removesuffix(".safetensors") + ".resume.safetensors")
    assert not out.exists() and resume.exists() and not list(out.parent.glob("*.tmp"))
    monkeypatch.setattr(request, "save_resume", save)
    assert train.main(args + ["--out", str(out), "--resume"]) == 0
    assert not resume.exists()


def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Ctrl-C after the step-50 resume point: no model file, a resume file; --resume then ends
    with exactly the tensors of an uninterrupted run."""
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    args = ["--forget", "van gogh", "--weights", str(w), *FAST, "--steps", "60", "--cache", str(tmp_path / "cache")]
    assert train.main(args + ["--out", str(tmp_path / "full.safetensors")]) == 0
    out = tmp_path / "cut.safetensors"
    interrupted_then_resumed(train, monkeypatch, args, out)
    full, cut = (dict(checkpoint.load(p).unet.named_parameters()) for p in (tmp_path / "full.safetensors", out))
    assert all(torch.equal(full[n], cut[n]) for n in full)
    ledger = json.loads(checkpoint.load(out).meta["duge.ledger"])
    assert [s["concept"] for s in ledger["steps"]] == ["van gogh"]


def test_gamma_to_start_pulls_towards_the_requests_start_and_resumes_exactly(tmp_path, monkeypatch):
    """--gamma-to start on a second request: the pull's target is the tensors the request started
    from, taken before a resume point loads (an interrupted run ends bit for bit as a whole one), and it
    trains otherwise than the pull to phi_0 (which the first request moved away from)."""
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    first = tmp_path / "first.safetensors"
    assert train.main(["--forget", "van gogh", "--weights", str(w), *FAST, "--steps", "20", "--lr", "1e-2",
                       "--cache", str(tmp_path / "cache"), "--out", str(first)]) == 0
    args = ["--forget", "monet", "--weights", str(first), *FAST, "--steps", "60", "--gamma", "30",
            "--cache", str(tmp_path / "cache")]
    trained = {}
    for to in ("phi0", "start"):
        out = tmp_path / f"{to}.safetensors"
        assert train.main(args + ["--gamma-to", to, "--out", str(out)]) == 0
        trained[to] = dict(checkpoint.load(out).unet.named_parameters())
    cut = tmp_path / "cut.safetensors"
    interrupted_then_resumed(train, monkeypatch, args + ["--gamma-to", "start"], cut)
    resumed = dict(checkpoint.load(cut).unet.named_parameters())
    assert all(torch.equal(trained["start"][n], resumed[n]) for n in resumed)
    assert any(not torch.equal(trained["start"][n], trained["phi0"][n]) for n in resumed)


def test_robust_variant_trains_the_whole_unet_resumes_exactly_and_carries_phi0(tmp_path, monkeypatch):
    """--trainable unet --adversarial K: tensors beyond cross-attention move; an interruption after the
    step-50 resume point resumes to the same tensors (the attacker's context is in the resume point);
    the delta carries phi_0's value of every UNet tensor, and a later default request still does."""
    import train
    from safetensors.torch import load_file
    w = tiny_sd(tmp_path / "m.safetensors")
    args = ["--forget", "van gogh", "--weights", str(w), *FAST, "--steps", "60", "--trainable", "unet",
            "--adversarial", "2", "--completion", "1", "--cache", str(tmp_path / "cache")]
    full_path = tmp_path / "full.safetensors"
    assert train.main(args + ["--out", str(full_path)]) == 0
    out = tmp_path / "cut.safetensors"
    interrupted_then_resumed(train, monkeypatch, args, out)
    base, full, cut = (dict(checkpoint.load(p).unet.named_parameters()) for p in (w, full_path, out))
    assert all(torch.equal(full[n], cut[n]) for n in full)
    changed = {n for n in base if not torch.equal(base[n], full[n])}
    assert any(".attn2." not in n for n in changed) and any(".attn2.to_k." in n for n in changed)
    ledger = json.loads(checkpoint.load(full_path).meta["duge.ledger"])
    assert {"L_adv", "L_comp"} <= set(ledger["steps"][0]["metrics"]["final_losses"])

    assert train.main(["--forget", "apple", "--weights", str(full_path), *FAST, "--out",
                       str(tmp_path / "next.safetensors"), "--cache", str(tmp_path / "cache")]) == 0
    for name in ("full", "next"):
        delta = load_file(str(tmp_path / f"{name}.delta.safetensors"))
        phi0 = {k.removeprefix("phi0."): v for k, v in delta.items() if k.startswith("phi0.")}
        assert phi0.keys() == base.keys() and all(torch.equal(phi0[n], base[n]) for n in base), name


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
    ours = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(unet.state_dict()[name], sd[ours])
    # training changed the keys and values, and nothing else; the fp16 input gives an fp16 output
    src_sd = load_file(str(src))
    changed = {k for k in sd if not torch.equal(sd[k], src_sd[k])}
    assert len(changed) == 32 and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)[:3]
    assert sd[ours].dtype == torch.float16


def sd2_official_file(path, unet_cfg, text_cfg, vae_cfg, dtype=torch.float32, randomize=False):
    """A SD 2.x model with random weights in the layout of Stability AI's single files, no metadata of ours:
    the OpenCLIP text tower with one resblock more than SD uses (its 24th), text_projection and logit_scale,
    and the 12 schedule buffers. -> the file's tensors."""
    from safetensors.torch import save_file
    from clip_text import to_open_clip
    open_clip, sd = "cond_stage_model.model.", {}
    torch.manual_seed(0)
    for prefix, module in (("model.diffusion_model.", UNet(unet_cfg)), ("first_stage_model.", VAE(vae_cfg))):
        if randomize:   # CompVis zero-inits some convs; a tiny UNet trains faster when every weight matters
            for q in module.parameters():
                q.data.normal_(0, 0.05)
        sd |= {prefix + k: v.to(dtype) for k, v in module.state_dict().items()}
        del module
    text = to_open_clip(TextEncoder(text_cfg).state_dict())
    n, w = text_cfg.layers, text_cfg.width
    text |= {k.replace("resblocks.0.", f"resblocks.{n}."): torch.randn_like(v) for k, v in text.items()
             if k.startswith("transformer.resblocks.0.")}
    text |= {"text_projection": torch.randn(w, w) / w ** 0.5, "logit_scale": torch.tensor(4.6052)}
    sd |= {open_clip + k: v.to(dtype) for k, v in text.items()}
    sd |= {k: torch.linspace(0, 1, 1000, dtype=dtype) for k in checkpoint.SCHEDULE_BUFFERS - {"logvar"}}
    save_file(sd, path)
    return sd


def trained_and_kept(src_sd, out):
    """The output file's tensors that differ from the input's; its key set and dtypes must be the input's."""
    from safetensors.torch import load_file
    sd = load_file(str(out))
    assert sd.keys() == src_sd.keys(), sorted(sd.keys() ^ src_sd.keys())[:3]
    assert all(sd[k].dtype == src_sd[k].dtype for k in sd)
    return {k for k in sd if not torch.equal(sd[k], src_sd[k])}, sd


def test_tiny_sd2_v_prediction_file_trains_on_v_and_writes_back_the_official_tensors(tmp_path, capsys):
    """Issue 31: an official-layout SD 2.x file (tiny, v-prediction: what the file is guessed to be, said in
    one line) through train.py: it trains, the output says v-prediction and SD 2.x, the keys and values
    moved, and every other tensor of the input, OpenCLIP's unused ones and the schedule included, is
    written back unchanged."""
    import train
    from unet import SD_V2
    ucfg = dataclasses.replace(SD_V2, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                               attention_levels=(0, 1), context_dim=64, prediction_type="v_prediction")
    src = tmp_path / "v2-tiny.safetensors"
    src_sd = sd2_official_file(src, ucfg, TextConfig(width=64, layers=1, heads=1, hidden_act="gelu"),
                               VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1), randomize=True)
    out = tmp_path / "out.safetensors"
    assert train.main(["--forget", "apple", "--weights", str(src), "--out", str(out), "--size", "16", *FAST,
                       "--cache", str(tmp_path / "cache"), "--no-grid"]) == 0
    assert "does not say what its UNet predicts: read as SD 2.x 768-v" in capsys.readouterr().err
    model = checkpoint.load(out)
    assert model.unet.cfg == ucfg and model.open_clip and model.image_size == 768 and model.tokenizer.pad_id == 0
    changed, _ = trained_and_kept(src_sd, out)
    assert len(changed) == 2 * 7 and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), changed
    # the same file read as epsilon trains otherwise (L_pr and the images phi_0 draws follow the prediction type)
    eps_out = tmp_path / "eps.safetensors"
    assert train.main(["--forget", "apple", "--weights", str(src), "--out", str(eps_out), "--size", "16", *FAST,
                       "--cache", str(tmp_path / "cache"), "--no-grid", "--prediction-type", "epsilon"]) == 0
    eps_model = checkpoint.load(eps_out)
    assert eps_model.unet.cfg.prediction_type == "epsilon" and eps_model.image_size == 512
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(dict(model.unet.named_parameters())[name], dict(eps_model.unet.named_parameters())[name])
    assert len(list((tmp_path / "cache").iterdir())) == 2   # phi_0's images, cached apart: v draws other ones


@pytest.mark.slow
def test_real_sd2_base_path_full_size(tmp_path):
    """Issue 31: a full-size SD 2.1-base file (random weights, the official layout of v2-1_512-ema-pruned,
    fp16) through `train.py --forget apple --prediction-type epsilon` at 64 px: the output loads back as SD
    2.x (1024-wide context, heads of 64 channels, linear projections, eps at 512 px), the 32 trained key
    and value tensors moved, and every other tensor of the input is written back as it was."""
    from unet import SD_V2
    from clip_text import SD_V2_TEXT
    src = tmp_path / "v2-1_512-like.safetensors"
    src_sd = sd2_official_file(src, SD_V2, SD_V2_TEXT, VAEConfig(), dtype=torch.float16)
    open_clip = "cond_stage_model.model."
    counts = [sum(k.startswith(p) for k in src_sd) for p in ("model.diffusion_model.", "first_stage_model.", open_clip)]
    assert counts == [686, 248, 24 * 12 + 6] and src_sd[open_clip + "transformer.resblocks.23.attn.in_proj_weight"
                                                        ].shape == (3072, 1024)
    out = tmp_path / "out.safetensors"
    r = run("--forget", "apple", "--weights", str(src), "--prediction-type", "epsilon", "--out", str(out),
            "--size", "64", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "does not say what its UNet predicts" not in r.stderr
    model = checkpoint.load(out)
    assert model.unet.cfg == SD_V2 and model.text_encoder.cfg == SD_V2_TEXT and model.open_clip
    assert model.image_size == 512 and model.unet.cfg.prediction_type == "epsilon"
    del model
    changed, sd = trained_and_kept(src_sd, out)
    ours = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd[ours].shape == (320, 1024) and sd[ours].dtype == torch.float16
    assert len(changed) == 32 and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)[:3]


# -----------------------------------------------------------------------------------------------
# Interruptions, bad numbers, existing outputs, dtype and modes, help (the reliability issue)

def test_recorder_exit_never_masks_an_interrupt():
    """Ctrl-C inside a UNet forward must reach the caller as KeyboardInterrupt, not as an error of
    the recorder that reads A^l of a forward that never finished."""
    import duge
    from tests.common import TINY_UNET
    unet = UNet(TINY_UNET)
    _, attn = unet.cross_attentions()[1]
    def ctrl_c(module, args):
        raise KeyboardInterrupt
    attn.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with duge.AttentionRecorder(unet) as rec:
            unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 16))
    assert rec.outputs[0] is not None and rec.outputs[1] is None


@pytest.fixture
def sigint_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the tests run in the background
    (a shell starts background jobs with SIGINT ignored, and train.py then leaves it ignored)."""
    import signal
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def test_sigint_mid_training_writes_the_resume_point_and_resumes_exactly(tmp_path, monkeypatch, capsys,
                                                                         sigint_as_in_a_terminal):
    """A real SIGINT at step 5: the step finishes, the resume point is written at step 5, exit 130
    with a one-line message naming it, no model; --resume ends with an uninterrupted run's tensors."""
    import signal
    import duge
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    args = ["--forget", "van gogh", "--weights", str(w), *FAST, "--steps", "12", "--cache", str(tmp_path / "cache")]
    assert train.main(args + ["--out", str(tmp_path / "full.safetensors")]) == 0

    losses, calls = duge.Duge.loss, []
    def losses_then_sigint(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside step 5 (index 4)
        return losses(*a, **k)
    monkeypatch.setattr(duge.Duge, "loss", losses_then_sigint)
    out = tmp_path / "cut.safetensors"
    capsys.readouterr()
    assert train.main(args + ["--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped after step 5 of 12" in err and "--resume" in err, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "cut.resume.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "5"

    monkeypatch.setattr(duge.Duge, "loss", losses)
    assert train.main(args + ["--out", str(out), "--resume"]) == 0
    assert "resuming at step 5 of 12" in capsys.readouterr().err
    full, cut = (dict(checkpoint.load(p).unet.named_parameters()) for p in (tmp_path / "full.safetensors", out))
    assert all(torch.equal(full[n], cut[n]) for n in full)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "steps 0: must be at least 1"),
    (["--steps", "-5"], "steps -5: must be at least 1"),
    (["--lr", "0"], "lr 0.0: must be positive"),
    (["--lr", "nan"], "lr nan: must be positive"),
    (["--batch", "0"], "batch 0: must be at least 1"),
    (["--num-prompts", "0"], "num_prompts 0: must be at least 1"),
    (["--images-per-prompt", "0"], "images_per_prompt 0: must be at least 1"),
    (["--eval-n", "0"], "--eval-n 0: must be positive"),
    (["--size", "0"], "--size 0: must be positive"),
    (["--lambda-pr", "-1"], "lambda_pr -1.0: must be at least 0"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number"),
    (["--forget", "banana"], "choose a style (van gogh, munch"),
    (["--clip", "nowhere"], "no config.json here"),
    (["--forget", "monet", "--clip", "nowhere"], "the toy model is scored by its own classifier"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flags, message):
    import train
    out = tmp_path / "o.safetensors"
    weights = ["--weights", str(tiny_sd(tmp_path / "m.safetensors"))] if flags[0] != "--forget" else []
    assert train.main(["--forget", "van gogh", *weights, "--out", str(out), "--cache", str(tmp_path / "c"),
                       *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == (["m.safetensors"] if weights else [])


def test_existing_output_needs_overwrite_and_dtype_and_mode_are_kept(tmp_path, capsys):
    """An fp16 input gives an fp16 model (not fp32), files are 0644, and a second run onto the same
    output is refused without --overwrite."""
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    half = tmp_path / "half.safetensors"
    checkpoint.save(checkpoint.load(w), half, dtype=torch.float16)
    out = tmp_path / "o.safetensors"
    args = ["--forget", "van gogh", "--weights", str(half), "--out", str(out), *FAST, "--cache", str(tmp_path / "c")]
    assert train.main(args) == 0
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float16}
    assert out.stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size
    for f in (out, tmp_path / "o.delta.safetensors", tmp_path / "o.grid.png"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    before = out.read_bytes()
    capsys.readouterr()
    assert train.main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert train.main(args + ["--overwrite", "--save-dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float32}


def test_grid_of_a_later_request_shows_this_concept(tmp_path):
    import duge
    import train
    from toy.concepts import ToyConcepts
    world = ToyConcepts(0)
    ledger = {"steps": [{"concept": "van gogh", "anchor": "", "kind": "style", "retain": []}]}
    plan = duge.plan(ledger, "monet", "", "style", world.candidates, lambda pool: pool[:2])
    rows = train.grid_rows(world, plan, "monet")
    assert all("monet" in p and "forgotten now" in label for p, label in rows[:2])
    assert "van gogh" in rows[2][0] and "replayed" in rows[2][1]
    assert [label.endswith("(related: kept)") for _, label in rows[3:]] == [True, True]


def test_help_shows_defaults():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    for expected in ("training steps (default: 60 on the toy model, 200 on SD)", "AdamW learning rate (default: 0.001 on the toy model, 1e-05 on SD)",
                     "(default: 32 on the toy model, 8 on SD)", "--num-prompts", "(default: cache)", "--method {duge,esd,ca,uce,finetune}",
                     "(default: phi0 for DUGE, phin for a baseline)", "(default: True for DUGE, False for a baseline)"):
        assert expected in text, expected


@pytest.mark.parametrize("flags,groups", [((), ("unlearn", "prior")),
                                          (("--prior", "related"), ("unlearn", "prior", "memory")),
                                          (("--adversarial", "1"), ("unlearn", "prior", "concept"))])
def test_every_long_phase_shows_a_progress_bar(tmp_path, flags, groups):
    """phi_0 draws the images of the groups the recipe uses, and only those, each with its bar (a group
    whose prompts an earlier group drew, as R_pr's memory after L_pr's memory bank, draws nothing)."""
    w = tiny_sd(tmp_path / "m.safetensors")
    r = run("--forget", "van gogh", "--weights", str(w), "--out", str(tmp_path / "o.safetensors"), *FAST, *flags,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for bar in [f"phi_0 images: {g}" for g in groups] + ["unlearning", "before/after grid"]:
        assert f"{bar}: 100%" in r.stderr, bar
    drawn = {g for g in ("unlearn", "prior", "memory", "concept") if f"phi_0 images: {g}" in r.stderr}
    assert drawn == set(groups)
    # the time line: the command line's start-up (imports, loading) first, then each phase; they add up to the total
    line = r.stderr.split("time: ")[-1].splitlines()[0]
    parts = dict(re.fullmatch(r"(.+) ([0-9.]+) s", p).groups() for p in line.replace(";", ",").split(", "))
    assert list(parts)[:2] == ["start-up", "phi_0 images"] and "training" in parts and float(parts["start-up"]) > 0
    total = float(parts.pop("total"))
    assert sum(map(float, parts.values())) == pytest.approx(total, abs=0.05 * len(parts))


@pytest.mark.parametrize("method,changed", [("esd", ("to_q", "to_k", "to_v", "to_out")), ("ca", ("to_k", "to_v")),
                                            ("uce", ("to_k", "to_v")), ("finetune", ("to_k", "to_v"))])
def test_every_baseline_runs_two_requests_with_the_same_outputs_and_ledger(tmp_path, method, changed):
    """train.py --method X: each request starts from the previous output, changes only the method's
    tensors, and the delta file still carries the ORIGINAL model (for the evaluation and the L2 add-on)."""
    import train
    from safetensors.torch import load_file
    w = tiny_sd(tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    assert train.main(["--forget", "van gogh", "--forget", "apple", "--weights", str(w), "--out", str(out),
                       "--method", method, "--no-grid", *FAST]) == 0
    ledger = json.loads(checkpoint.load(out).meta["duge.ledger"])
    assert [(s["concept"], s["metrics"]["method"]) for s in ledger["steps"]] == [("van gogh", method), ("apple", method)]
    base, first, final = (dict(checkpoint.load(p).unet.named_parameters())
                          for p in (w, tmp_path / "forget-van-gogh.safetensors", out))
    moved = {n for n in base if not torch.equal(base[n], final[n])}
    assert moved and all(".attn2." in n and n.split(".attn2.")[1].split(".")[0] in changed for n in moved), moved
    assert any(not torch.equal(first[n], final[n]) for n in moved)           # the second request changed it again
    delta = load_file(str(tmp_path / "o.delta.safetensors"))
    for n, v in delta.items():
        if n.startswith("phi0."):
            assert torch.equal(v, base[n.removeprefix("phi0.")].to(v.dtype)), n
    assert not (tmp_path / "o.grid.png").exists()                            # --no-grid


def test_paper_recipe_trains_against_the_requests_start_with_the_empty_prompt(tmp_path, monkeypatch):
    """--recipe paper: L_U's target context is the empty prompt's, L_pr's images are the memory
    bank's, there is no memory group, and the frozen reference of request 2 is request 1's output
    (phi_n), while the delta file still carries the original."""
    import sample
    import train
    import trainer
    from safetensors.torch import load_file
    seen, real = [], trainer.unlearn

    def spy(unet, method, ref, data, cfg, **kw):
        seen.append((dict(ref.tensors), data, method.cfg))
        return real(unet, method, ref, data, cfg, **kw)
    monkeypatch.setattr(trainer, "unlearn", spy)
    w = tiny_sd(tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    assert train.main(["--forget", "van gogh", "--forget", "apple", "--weights", str(w), "--out", str(out),
                       "--recipe", "paper", "--no-grid", *FAST]) == 0
    first = dict(checkpoint.load(tmp_path / "forget-van-gogh.safetensors").unet.named_parameters())
    base = dict(checkpoint.load(w).unet.named_parameters())
    model = checkpoint.load(w)
    empty = sample.encode_prompts(model, [""])
    for k, (ref, data, cfg) in enumerate(seen):
        assert (cfg.recipe, cfg.reference, cfg.target, cfg.replay) == ("paper", "phin", "uncond", False)
        assert set(data) == {"unlearn", "prior"}                        # L_pr on the memory bank, R_pr on tensors
        c = data["unlearn"]["c_anchor"]
        torch.testing.assert_close(c, empty.expand_as(c))
        start = base if k == 0 else first
        assert all(torch.equal(v, start[n]) for n, v in ref.items())   # phi_n: the request's own start
    assert any(not torch.equal(first[n], base[n]) for n in seen[1][0])
    delta = load_file(str(tmp_path / "o.delta.safetensors"))
    assert all(torch.equal(v, base[n.removeprefix("phi0.")].to(v.dtype)) for n, v in delta.items() if n.startswith("phi0."))
    steps = json.loads(checkpoint.load(out).meta["duge.ledger"])["steps"]
    assert [s["hparams"]["recipe"] for s in steps] == ["paper", "paper"]


def test_phi0_draws_the_training_images_of_a_later_request(tmp_path):
    """Request 2's training images come from the ORIGINAL model phi_0 (swapped in from the delta file),
    not from the model the request starts from: bit for bit the base file's own images, and not the
    current model's."""
    import duge
    import request
    import sample
    import train
    import trainer
    from toy.concepts import for_model
    w = tiny_sd(tmp_path / "m.safetensors")
    first = tmp_path / "first.safetensors"
    assert train.main(["--forget", "van gogh", "--weights", str(w), "--out", str(first), "--no-grid", *FAST,
                       "--steps", "20", "--lr", "0.05", "--cache", str(tmp_path / "c1")]) == 0
    model = checkpoint.load(first)
    cfg = dataclasses.replace(trainer.PRESETS["sd"], num_prompts=1, images_per_prompt=1, generic=2, num_related=1)
    sampling = {"steps": 2, "guidance": model.guidance}
    req = request.prepare(model, duge.Duge(duge.DugeConfig()), for_model(model), "apple", cfg,
                          cache=tmp_path / "c2", sampling=sampling)
    anchors = req.prompts.anchors
    base = checkpoint.load(w)
    by_base = sample.generate_cached(base, anchors, 1, tmp_path / "c3", **sampling)
    by_current = sample.generate_cached(model, anchors, 1, tmp_path / "c4", **sampling)
    assert torch.equal(req.data["unlearn"]["x"], by_base)
    assert (by_current - by_base).abs().max() > 1e-3        # the first request changed what the model draws
