"""probe.py on a tiny SD-shaped model: each probe's mechanics (the toy-model validation, where every
probe must bring the concept back in the base model, is in the README)."""
from contextlib import contextmanager

import pytest
import torch

import checkpoint
import concepts
import probe
import sample
from tests.test_train import tiny_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return checkpoint.load(tiny_sd(tmp_path_factory.mktemp("probe") / "m.safetensors"))


def test_placeholder_vectors_replace_only_the_placeholder(tiny):
    prompts = ["a painting in the style of * *", "a * * river"]
    star = tiny.text_encoder.text_model.embeddings.token_embedding.weight[tiny.tokenizer.encode("*")[0]]
    with torch.no_grad():
        same = probe.encode_with(tiny, prompts, star.repeat(2, 1))
        torch.testing.assert_close(same, sample.encode_prompts(tiny, prompts), atol=1e-6, rtol=1e-5)
        other = probe.encode_with(tiny, prompts, torch.randn(2, star.shape[0]))
    tokens = tiny.tokenizer(prompts)
    first = (tokens == tiny.tokenizer.encode("*")[0]).int().argmax(1)
    for b in range(2):   # causal attention: positions before the first placeholder cannot change
        assert torch.allclose(other[b, :first[b]], same[b, :first[b]], atol=1e-6)
        assert not torch.allclose(other[b, first[b]:], same[b, first[b]:], atol=1e-4)


def test_ddim_from_a_grid_timestep_is_the_tail_of_the_full_run():
    eps_fn = lambda x, t: 0.1 * x + 0.001 * t
    x = torch.randn(2, 4, 4, 4)
    seen = []
    sample.ddim_sample(eps_fn, x, steps=10, callback=lambda i, t, xi: seen.append((t, xi.clone())))
    at = dict(seen)
    tail = sample.ddim_sample(eps_fn, at[601], steps=10, start=501)   # x at 501 is the output of step t=601
    torch.testing.assert_close(tail, seen[-1][1])
    with pytest.raises(ValueError, match="not on the 10-step grid"):
        sample.ddim_sample(eps_fn, x, steps=10, start=500)


def test_learning_lowers_the_diffusion_loss_and_leaves_the_model_alone(tiny):
    before = {n: p.detach().clone() for n, p in tiny.unet.named_parameters()}
    x0 = torch.randn(4, 4, 2, 2)
    ctx = sample.encode_prompts(tiny, [""]).detach().clone().requires_grad_(True)
    loss = lambda s: probe.diffusion_loss(tiny, x0, lambda idx: ctx.expand(len(idx), -1, -1), s % 3, 4, 0)
    with torch.no_grad():
        start = sum(loss(s).item() for s in range(3))
    for p in tiny.unet.parameters():
        p.requires_grad_(False)
    probe.learn([ctx], loss, 60, 5e-2, "test")
    with torch.no_grad():
        assert sum(loss(s).item() for s in range(3)) < 0.999 * start   # a random tiny UNet reads its context weakly
    assert all(torch.equal(before[n], p) for n, p in tiny.unet.named_parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_targets_what_the_unet_predicts(tmp_path, prediction_type):
    """Textual inversion, the learned context and relearning train on probe.diffusion_loss: for a v
    model (the same file read as v) its target is v = sqrt(abar) eps - sqrt(1 - abar) x_0, not eps."""
    import torch.nn.functional as F
    from tests.common import target_by_hand
    model = checkpoint.load(tiny_sd(tmp_path / "m.safetensors"), prediction_type=prediction_type)
    x0, ctx = torch.randn(4, 4, 4, 4), torch.randn(1, 77, 32)
    with torch.no_grad():
        got = probe.diffusion_loss(model, x0, lambda idx: ctx.expand(len(idx), -1, -1), 3, 4, 0).item()
        idx, x_t, eps, t = sample.noised_rows(x0, 4, torch.Generator().manual_seed(3), "epsilon")   # the same draw
        out = model.unet(x_t, t, ctx.expand(4, -1, -1))
        want = F.mse_loss(out, target_by_hand(x0[idx], eps, t, prediction_type)).item()
        against_eps = F.mse_loss(out, eps).item()
    assert got == pytest.approx(want, rel=1e-5)
    if prediction_type == "v_prediction":
        assert got != pytest.approx(against_eps, rel=1e-2), (got, against_eps)


@pytest.mark.parametrize("name", probe.PROBES)
def test_every_probe_draws_its_images_and_puts_the_model_back(tiny, name):
    world = concepts.SDConcepts()
    cfg = probe.ProbeConfig(n=3, inversion_steps=2, relearn_steps=2, batch=2, steps=2)
    latents = sample.generate(tiny, world.prompts("van gogh", "style", 4), steps=2, guidance=7.5, decode=False)
    before = {n: p.detach().clone() for n, p in tiny.unet.named_parameters()}
    images, prompts = probe.probe_images(name, tiny, world, "van gogh", latents, cfg)
    assert images.shape == (3, 3, tiny.image_size, tiny.image_size) and 0 <= images.min() <= images.max() <= 1
    assert len(prompts) == 3
    if name == "paraphrase":
        assert not set(prompts) & set(world.prompts("van gogh", "style", 8)) and all("van gogh" in p for p in prompts)
    if name == "misspelling":
        assert all("van gogh" not in p for p in prompts) and any("vangogh" in p for p in prompts)
    if name.startswith("inversion"):
        assert all(p.count(probe.PLACEHOLDER) == int(name[-1]) and "van gogh" not in p for p in prompts)
    if name.startswith("complete"):   # no prompt at all: the empty context, unguided
        assert prompts == [""] * 3
    assert all(torch.equal(before[n], p) for n, p in tiny.unet.named_parameters())


def test_run_scores_the_model_and_the_base(tiny):
    world = concepts.SDConcepts()
    cfg = probe.ProbeConfig(n=2, inversion_steps=1, relearn_steps=1, batch=2, steps=2)
    state = {"base": False}

    @contextmanager
    def base():
        state["base"] = True
        yield
        state["base"] = False
    # a stand-in scorer: the base model "shows" the concept in every image, the unlearned one in none
    out = probe.run(tiny, base, world, ["van gogh"], ["paraphrase", "complete500"], cfg,
                    lambda images, c, kind: [state["base"]] * len(images))
    assert out == {"van gogh": {"paraphrase": {"model": 0.0, "base": 1.0}, "complete500": {"model": 0.0, "base": 1.0}}}
    assert "| van gogh | paraphrase | 0% | 100% |" in probe.table(out)


def test_relearning_trains_on_retained_concepts_only(tiny, monkeypatch):
    """After several requests, relearning fine-tunes on concepts neither probed nor forgotten earlier,
    and the base model's relearning result is kept apart from one learned on other concepts."""
    world, seen = concepts.SDConcepts(), []
    cfg = probe.ProbeConfig(n=2, relearn_steps=1, batch=2, steps=2)
    real = probe.relearn
    monkeypatch.setattr(probe, "relearn", lambda model, w, c, exclude, *a: seen.append(list(exclude)) or real(
        model, w, c, exclude, *a))
    keep = {}
    probe.run(tiny, contextmanager(lambda: (yield)), world, ["van gogh"], ["relearn"], cfg,
              lambda images, c, kind: [False] * len(images), keep, forgotten=["van gogh", "monet", "picasso"])
    assert seen == [["van gogh", "monet", "picasso"]] * 2          # the model's run and the base model's
    assert list(keep) == ["van gogh|relearn|without monet,picasso"]


def test_benchmark_probe_table_and_figure(tmp_path):
    """experiments/probes.py's outputs from known results: one row per concept and probe, every
    method's recognition and the base model's once; the figure is written."""
    from experiments import probes
    by_method = {"duge": {"van gogh": {"context": {"model": 0.25, "base": 1.0}, "relearn": {"model": 0.0, "base": 0.9375}}},
                 "esd": {"van gogh": {"context": {"model": 1.0, "base": 1.0}, "relearn": {"model": 0.5, "base": 0.9375}}}}
    text = probes.table(by_method, ["van gogh"], ["context", "relearn"])
    assert text.splitlines()[0] == "| concept | probe | duge | esd | base model (ceiling) |"
    assert text.splitlines()[2:] == ["| van gogh | context | 25% | 100% | 100% |", "| van gogh | relearn | 0% | 50% | 94% |"]
    probes.plot(by_method, ["van gogh"], ["context", "relearn"], tmp_path / "p.png")
    from PIL import Image
    img = Image.open(tmp_path / "p.png")
    assert img.width > 100 and len(set(img.convert("RGB").getdata())) > 3   # bars in several colours


def test_benchmark_probes_refuse_a_missing_model_in_one_line(tmp_path, capsys):
    from experiments import probes
    assert probes.main(["--methods", "duge", "--out", str(tmp_path), "--docs", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model of duge after request 1") and "\n" not in err
    assert not (tmp_path / "d").exists()
    assert probes.main(["--sequence", " , ", "--out", str(tmp_path), "--docs", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --sequence ' , '") and "\n" not in err     # not an IndexError


def test_clip_scorer_recognises_what_clip_picks_among_the_kind(monkeypatch):
    """Real SD's scorer: an image counts for the concept when CLIP's nearest text, among the concept's
    kind written with the evaluator's template, is the concept's own (stand-in CLIP, known answers)."""
    import evaluate
    from tests.test_clip_eval import StandInCLIP
    clip, world = StandInCLIP(), concepts.SDConcepts()
    monkeypatch.setattr(evaluate, "clip_preprocess", lambda images: images)
    style = evaluate.TEMPLATES["style"]
    shown = torch.tensor([clip.index(style.format(c)) for c in ("van gogh", "monet", "van gogh", "picasso")])
    assert probe.clip_scorer(clip, world)(shown, "van gogh", "style") == [True, False, True, False]
