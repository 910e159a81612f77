"""sample.py: schedule golden values, the DDIM grid, and sampler parity with diffusers' schedulers, for
models that predict the noise (SD v1) and models that predict v (SD 2.x 768-v)."""
import dataclasses

import pytest
import torch

import sample


def test_alphas_cumprod_golden():
    ac = sample.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    # weight_formats.md §1.2
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert ac[1].item() == pytest.approx(0.998296, abs=1e-6)
    assert ac[980].item() == pytest.approx(0.0058437833, rel=1e-6)
    assert ac[999].item() == pytest.approx(0.0046600983, rel=1e-6)


def test_schedule_matches_diffusers():
    from diffusers import DDIMScheduler
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers takes the cumulative product in float32, CompVis (and we) in float64: equal to 1e-6.
    torch.testing.assert_close(s.alphas_cumprod, sample.alphas_cumprod, rtol=2e-6, atol=0)


def test_ddim_grid():
    assert sample.timestep_grid(50) == list(range(1, 1000, 20))
    assert sample.timestep_grid(50)[-1] == 981
    assert sample.timestep_grid(1) == [1]
    assert sample.timestep_grid(1000) == list(range(1, 1001))
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps"):
            sample.timestep_grid(bad)


def test_add_noise_matches_diffusers():
    from diffusers import DDPMScheduler
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(sample.add_noise(x0, noise, t), s.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)


def test_v_target_matches_diffusers():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (DDPMScheduler.get_velocity), and turning v back into eps at
    x_t gives the noise that made x_t."""
    from diffusers import DDPMScheduler
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    v = sample.v_target(x0, noise, t)
    torch.testing.assert_close(v, s.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-6)
    x_t = sample.add_noise(x0, noise, t)
    torch.testing.assert_close(sample.eps_from_output(v, x_t, t, "v_prediction"), noise, atol=1e-5, rtol=0)
    assert sample.eps_from_output(v, x_t, t, "epsilon") is v
    for i, ti in enumerate(t.tolist()):  # an int timestep, as the samplers pass it
        torch.testing.assert_close(sample.eps_from_output(v[i:i + 1], x_t[i:i + 1], ti, "v_prediction"),
                                   noise[i:i + 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        sample.eps_from_output(v, x_t, t, "sample")


def test_training_target_is_what_the_unet_predicts():
    """The target of every loss on the noise: the noise for an eps model, v for a v one; noised_rows
    hands out the same, consistent with its own x_t (x0 = sqrt(abar) x_t - sqrt(1 - abar) v)."""
    from tests.common import target_by_hand
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    assert sample.training_target(x0, noise, t, "epsilon") is noise
    v = sample.training_target(x0, noise, t, "v_prediction")
    torch.testing.assert_close(v, target_by_hand(x0, noise, t, "v_prediction"), atol=1e-6, rtol=0)
    assert (v - noise).abs().mean() > 0.3   # at t = 999 v is mostly -x0, at t = 0 mostly eps
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        sample.training_target(x0, noise, t, "sample")
    for prediction_type in sample.PREDICTION_TYPES:
        idx, x_t, target, t2 = sample.noised_rows(x0, 6, torch.Generator().manual_seed(3), prediction_type)
        noise2 = sample.eps_from_output(target, x_t, t2, prediction_type)   # the noise that made x_t
        torch.testing.assert_close(x_t, sample.add_noise(x0[idx], noise2, t2), atol=1e-5, rtol=0)
        if prediction_type == "v_prediction":
            abar = sample.alphas_cumprod[t2].view(-1, 1, 1, 1)
            torch.testing.assert_close(abar.sqrt() * x_t - (1 - abar).sqrt() * target, x0[idx], atol=1e-5, rtol=0)


def tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()


def _eps_fn(unet, ctx, uctx, guidance):
    @torch.no_grad()
    def eps(x, t):
        e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uctx, ctx])).sample.chunk(2)
        return e_u + guidance * (e_c - e_u)
    return eps


def _guided_start(seed, guidance):
    """A tiny diffusers UNet under guidance (its output at (x, t): eps or v) and a starting latent."""
    unet = tiny_diffusers_unet()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx, uctx = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    return _eps_fn(unet, ctx, uctx, guidance), x


def _as_eps(out_fn, prediction_type):
    """What our samplers take: the model's output turned into eps (sample.guided_eps does it so)."""
    return lambda x, t: sample.eps_from_output(out_fn(x, t), x, t, prediction_type)


def _same_trajectory(ours_fn, sch, out_fn, x, **step_kw):
    """Our sampler (ours_fn(eps_fn, x, callback)) and a diffusers scheduler agree after every step. The
    scheduler is given the model's own output and its config's prediction_type. -> ours"""
    ours, ref, xr = [], [], x.clone()
    ours_fn(_as_eps(out_fn, sch.config.prediction_type), x.clone(), callback=lambda i, t, xi: ours.append(xi.clone()))
    for t in sch.timesteps:
        xr = sch.step(out_fn(xr, t), t, xr, **step_kw).prev_sample
        ref.append(xr.clone())
    assert len(ours) == len(ref) == len(sch.timesteps)
    diffs = [(a - b).abs().max().item() for a, b in zip(ours, ref)]
    print(f"{type(sch).__name__} {sch.config.prediction_type}: max abs diff {max(diffs):.2e}, "
          f"final scale {ref[-1].abs().max().item():.2f}")
    assert max(diffs) < 1e-4
    return ours


PREDICTIONS = ["epsilon", "v_prediction"]


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers_every_step(eta, prediction_type):
    """Same UNet, latents, contexts: our DDIM trajectory equals DDIMScheduler configured as CompVis."""
    from diffusers import DDIMScheduler
    eps, x = _guided_start(1, 7.5)
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                        prediction_type=prediction_type)
    sch.set_timesteps(10)
    assert sch.timesteps.tolist() == sample.timestep_grid(10)[::-1]
    ours = lambda e, x, callback: sample.ddim_sample(e, x, steps=10, eta=eta, callback=callback,
                                                     generators=[torch.Generator().manual_seed(5)])
    _same_trajectory(ours, sch, eps, x, eta=eta, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_matches_diffusers_every_step(prediction_type):
    from diffusers import DDPMScheduler
    eps, x = _guided_start(2, 3.0)
    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        steps_offset=1, timestep_spacing="leading", variance_type="fixed_small",
                        prediction_type=prediction_type)
    sch.set_timesteps(20)
    assert sch.timesteps.tolist() == sample.timestep_grid(20)[::-1]
    ours = lambda e, x, callback: sample.ddpm_sample(e, x, steps=20, callback=callback,
                                                     generators=[torch.Generator().manual_seed(9)])
    _same_trajectory(ours, sch, eps, x, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [4, 20])
def test_dpmpp_2m_matches_diffusers_every_step(steps, prediction_type):
    """DPM-Solver++(2M) on the CompVis grid equals DPMSolverMultistepScheduler (data prediction,
    second order, last step to sigma = 0), step by step."""
    from diffusers import DPMSolverMultistepScheduler
    eps, x = _guided_start(3, 3.0)
    sch = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      steps_offset=1, timestep_spacing="leading", algorithm_type="dpmsolver++",
                                      solver_order=2, final_sigmas_type="zero", prediction_type=prediction_type)
    sch.set_timesteps(timesteps=sample.timestep_grid(steps)[::-1])  # its own "leading" grid differs by a step
    assert sch.timesteps.tolist() == sample.timestep_grid(steps)[::-1]
    ours = _same_trajectory(lambda e, x, callback: sample.dpmpp_2m_sample(e, x, steps=steps, callback=callback),
                            sch, eps, x)
    # and it is not DDIM: after the first (first-order, DDIM-equal) step the two part
    ddim = []
    sample.ddim_sample(_as_eps(eps, prediction_type), x.clone(), steps=steps,
                       callback=lambda i, t, xi: ddim.append(xi.clone()))
    assert (ddim[-1] - ours[-1]).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------------------------
# End to end: generate() on a model read by checkpoint.load equals diffusers' StableDiffusionPipeline
# on the same random weights, latents and prompts.

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random StableDiffusionPipeline (DDIM configured as CompVis), saved with
    save_pretrained, and the same folder loaded by checkpoint.load."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import checkpoint
    from clip_text import Tokenizer
    tmp = tmp_path_factory.mktemp("pipeline")
    tok = Tokenizer(Tokenizer.from_openai_gz().merges[:300])
    tok.save_folder(tmp / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu",
                                        bos_token_id=tok.sot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere, norms included, activations near unit scale
        for m in (unet, vae, text):
            for name, p in m.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_((name.endswith("weight") + 0.1 * noise) if p.ndim == 1 else noise / p[0].numel() ** 0.5)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), unet=unet.eval(), scheduler=scheduler,
                                   tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp / "sd")
    return pipe, checkpoint.load(tmp / "sd")


def test_generate_matches_stable_diffusion_pipeline(tiny_sd):
    pipe, model = tiny_sd
    assert model.image_size == 16 and model.vae.downscale == 2
    prompts = ["a photo of a cat", "An astronaut riding a horse!"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = sample.generate(model, prompts, latents=latents, steps=8, guidance=7.5)  # (B, 3, H, W)
    ref = pipe(prompt=prompts, height=16, width=16, num_inference_steps=8, guidance_scale=7.5,
               latents=latents.clone(), output_type="np").images                   # (B, H, W, 3) numpy
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2)
    diff = (ours - ref).abs().max().item()
    print(f"images: max abs diff {diff:.2e}, std {ref.std().item():.3f}")
    assert ours.shape == ref.shape == (2, 3, 16, 16) and diff < 1e-3
    assert ref.std() > 0.05 and (ref[0] - ref[1]).abs().max() > 0.05  # the images are not flat, prompts matter
    # the same latents with guidance 1 (one UNet call per step, no unconditional branch)
    ours1 = sample.generate(model, prompts, latents=latents, steps=4, guidance=1.0)
    ref1 = pipe(prompt=prompts, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
                latents=latents.clone(), output_type="np").images
    assert (ours1 - torch.from_numpy(ref1).permute(0, 3, 1, 2)).abs().max() < 1e-3


def test_generate_v_prediction_matches_stable_diffusion_pipeline(tiny_sd):
    """The same tiny model read as a v-prediction model (SD 2.x 768-v), against the pipeline with a
    v_prediction DDIMScheduler: generate() turns the guided v into eps where the UNet is called."""
    from diffusers import DDIMScheduler
    pipe, model = tiny_sd
    cfg, scheduler = model.unet.cfg, pipe.scheduler
    model.unet.cfg = dataclasses.replace(cfg, prediction_type="v_prediction")
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    try:
        prompts = ["a photo of a cat", "An astronaut riding a horse!"]
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        ours = sample.generate(model, prompts, latents=latents, steps=8, guidance=7.5)
        ref = pipe(prompt=prompts, height=16, width=16, num_inference_steps=8, guidance_scale=7.5,
                   latents=latents.clone(), output_type="np").images
        model.unet.cfg = cfg
        as_eps = sample.generate(model, prompts, latents=latents, steps=8, guidance=7.5)
    finally:
        model.unet.cfg, pipe.scheduler = cfg, scheduler
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2)
    diff = (ours - ref).abs().max().item()
    print(f"v-prediction images: max abs diff {diff:.2e}, std {ref.std().item():.3f}")
    assert diff < 1e-3 and ref.std() > 0.05
    assert (as_eps - ours).abs().max() > 0.05  # the prediction type changes the images


def test_per_image_seeds(tiny_sd):
    """Image i of a batch is the image generated alone with seed + i."""
    _, model = tiny_sd
    prompts = ["a cat", "a cat", "a dog"]
    batch = sample.generate(model, prompts, steps=3, seed=10)
    for i, p in enumerate(prompts):
        alone = sample.generate(model, [p], steps=3, seed=10 + i)
        assert (batch[i] - alone[0]).abs().max() < 1e-5, i
    assert (batch[0] - batch[1]).abs().max() > 0.05  # same prompt, different seed: different noise
    ddpm = sample.generate(model, prompts[:2], steps=3, seed=10, sampler="ddpm")
    assert (ddpm[1] - sample.generate(model, prompts[1:2], steps=3, seed=11, sampler="ddpm")[0]).abs().max() < 1e-5


def test_encode_prompts_encodes_each_distinct_prompt_once(tiny_sd):
    """Repeated prompts (a guided batch's empty ones) are encoded once and copied: the same rows as encoding
    each prompt alone, and the text encoder sees only the distinct prompts."""
    _, model = tiny_sd
    prompts = ["a cat", "", "a dog", "a cat", "", ""]
    seen = []
    hook = model.text_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        ctx = sample.encode_prompts(model, prompts)
    finally:
        hook.remove()
    assert seen == [3] and ctx.shape[0] == 6
    for i, p in enumerate(prompts):
        assert (ctx[i] - sample.encode_prompts(model, [p])[0]).abs().max() < 1e-6, p
    assert (ctx[0] - ctx[2]).abs().max() > 1e-3   # different prompts, different rows


def test_text_keys_and_values_are_computed_once_per_generate(tiny_sd, monkeypatch):
    """While sampling, each attn2 computes the prompts' keys and values once (UNet.reusing_text), and the
    images are the same numbers as recomputing them at every step."""
    from contextlib import nullcontext
    _, model = tiny_sd
    calls = []
    hooks = [m.to_k.register_forward_hook(lambda *a: calls.append(1)) for _, m in model.unet.cross_attentions()]
    try:
        once = sample.generate(model, ["a cat", "a dog"], steps=4, seed=3)
        n_once = len(calls)
        monkeypatch.setattr(type(model.unet), "reusing_text", lambda self: nullcontext(self))
        every = sample.generate(model, ["a cat", "a dog"], steps=4, seed=3)
    finally:
        for h in hooks:
            h.remove()
    attn2 = len(model.unet.cross_attentions())
    assert attn2 >= 2 and n_once == attn2 and len(calls) - n_once == 4 * attn2
    assert torch.equal(once, every)
    assert all(m.memo is None for _, m in model.unet.cross_attentions())   # nothing kept after sampling


def test_generate_rejects_bad_input(tiny_sd):
    _, model = tiny_sd
    for kwargs, words in [({"prompts": []}, "no prompt"), ({"steps": 0}, "steps must be"),
                          ({"steps": 1001}, "steps must be"), ({"height": 15}, "divisible by 2"),
                          ({"width": 17, "height": 16}, "divisible"), ({"sampler": "euler"}, "unknown sampler 'euler'"),
                          ({"guidance": float("nan")}, "guidance must be a finite number, got nan"),
                          ({"guidance": float("inf")}, "guidance must be a finite number"),
                          ({"eta": float("nan")}, "eta must be"), ({"height": 0}, "image size must be positive")]:
        with pytest.raises(ValueError, match=words):
            sample.generate(model, **{"prompts": ["a cat"], **kwargs})


def test_cli_errors_are_one_line(tiny_sd, tmp_path):
    import os
    import subprocess
    import sys

    import checkpoint
    weights = checkpoint.save(tiny_sd[1], tmp_path / "tiny.safetensors")
    script = os.path.join(os.path.dirname(os.path.abspath(sample.__file__)), "sample.py")

    def run(*args):
        r = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr.strip().splitlines()

    assert run("a cat", "--weights", str(tmp_path / "missing.safetensors")) == [
        f"error: {tmp_path / 'missing.safetensors'}: no such file or folder; expected a Stable Diffusion checkpoint"]
    lines = run("a cat", "--weights", str(weights), "--steps", "0", "--size", "16")
    assert lines == ["error: steps must be between 1 and 1000, got 0"]
    lines = run("a cat", "--weights", str(weights), "--sampler", "euler")  # argparse: usage, then the error
    assert lines[0].startswith("usage: ") and lines[-1].startswith("sample.py: error: argument --sampler: invalid choice")
    assert run("a cat", "--weights", str(weights), "--guidance", "nan") == ["error: guidance must be a finite number, got nan"]
    assert run("a cat", "--weights", str(weights), "--size", "0") == ["error: --size must be positive, got 0"]
    (tmp_path / "afile").write_text("")  # an output folder that cannot exist: refused before any work
    assert run("a cat", "--weights", str(weights), "--out", str(tmp_path / "afile" / "o.png"))[0].startswith(
        "error: cannot write to")
    assert run() == ['error: no prompt given: pass one, e.g. python sample.py "a red circle in the style of van gogh", '
                     'or --prompts FILE']
    assert not list(tmp_path.rglob("*.png")) and not (tmp_path / "out").exists()


def test_cli_help_shows_defaults_and_writes_under_out(tiny_sd, tmp_path):
    import subprocess
    import sys

    import checkpoint
    weights = checkpoint.save(tiny_sd[1], tmp_path / "tiny.safetensors")
    script = str(checkpoint.ROOT / "sample.py")
    text = " ".join(subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout.split())
    assert "sampler steps (default: 50)" in text and "(default: out/sample.png)" in text
    r = subprocess.run([sys.executable, script, "a cat", "--weights", str(weights), "-n", "1", "--steps", "2",
                        "--size", "16"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "sample.png").stat().st_mode & 0o777 == 0o644
