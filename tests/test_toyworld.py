"""Tests of the toy world (toy/world.py) and its concept classifier (toy/classifier.py)."""

import os

import numpy as np
import pytest
import torch

from clip_text import Tokenizer
from toy import classifier
from toy import world as tw


def test_render_is_deterministic_and_seed_dependent():
    a = tw.render("star", "red", "van gogh", seed=7)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, tw.render("star", "red", "van gogh", seed=7))
    for style in tw.STYLE_LABELS:  # every background and the jitter draw on the seed
        x, y = tw.render("circle", "blue", style, seed=1), tw.render("circle", "blue", style, seed=2)
        assert np.abs(x.astype(int) - y.astype(int)).mean() > 3, style


def test_every_concept_renders_and_changes_the_image():
    base = tw.render("circle", "red", "photo", seed=3).astype(int)
    for shape in tw.SHAPES[1:]:
        assert np.abs(tw.render(shape, "red", "photo", seed=3) - base).mean() > 2, shape
    for colour in tw.COLOURS[1:]:
        assert np.abs(tw.render("circle", colour, "photo", seed=3) - base).mean() > 5, colour
    for style in tw.STYLES:
        assert np.abs(tw.render("circle", "red", style, seed=3) - base).mean() > 10, style
    # the fill colour is readable: the centre pixel of a photo image is the named colour, near enough
    for colour, rgb in tw.COLOUR_RGB.items():
        centre = tw.render("square", colour, "photo", seed=5)[30:35, 30:35].reshape(-1, 3).mean(0)
        assert np.abs(centre - rgb).max() < 15, colour
    with pytest.raises(ValueError):
        tw.render("circle", "red", "vermeer", seed=0)


def test_concept_lists_are_consistent():
    names = tw.SHAPES + tw.COLOURS + tw.STYLES
    assert len(names) == len(set(names))  # a name has one kind
    assert len(tw.SHAPES) >= 12 and len(tw.COLOURS) >= 6 and len(tw.STYLES) >= 20   # room for 12 requests of a kind
    assert [tw.concept_kind(n) for n in names] == ["object"] * 12 + ["colour"] * 8 + ["style"] * 20
    assert tw.STYLE_LABELS == tw.STYLES + ["photo"]
    assert set(tw.TEMPLATES) == {"style", "object", "colour"}
    for a, b in tw.CLOSE_PAIRS:
        assert tw.concept_kind(a) == tw.concept_kind(b)
    with pytest.raises(ValueError):
        tw.concept_kind("photo")


def test_captions_name_the_concepts():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        s, c, st = (xs[rng.integers(len(xs))] for xs in (tw.SHAPES, tw.COLOURS, tw.STYLE_LABELS))
        text = tw.caption(s, c, st, rng)
        words = set(text.replace(",", "").split())
        assert st == "photo" or st.split()[-1] in words, text  # a painting always names its artist
        assert words & set(tw.SHAPES) <= {s} and words & set(tw.COLOURS) <= {c}, text  # never a wrong concept
        assert " a o" not in text and not text.startswith("a o"), text  # "an orange", "an oval"
        seen |= words
    for name in tw.SHAPES + tw.COLOURS + tw.STYLES:
        assert set(name.split()) <= seen, name
    assert tw.caption("square", "green", "photo", np.random.default_rng(1)) in {
        "a green square", "a photo of a green square", "a picture of a green square",
        "a green square on a plain background", "a square", "a photo of a square", "a picture of a square",
        "a square on a plain background"}
    assert tw.fill_template(tw.STYLE_TEMPLATES[4], "van gogh", colour="orange", shape="oval") == \
        "an orange oval in the style of van gogh"
    assert tw.fill_template("a photo of a {}", "") == "a photo of"
    assert tw.fill_template("a {} painting", "") == "a painting"


def test_sample_batch():
    x, caps, labels = tw.sample_batch(12, 4, p_uncond=0.5)
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert 0 < sum(c == "" for c in caps) < 12
    assert set(labels) == {"shape", "colour", "style"} and all(len(v) == 12 for v in labels.values())
    y, caps2, labels2 = tw.sample_batch(12, np.random.default_rng(4), p_uncond=0.5)
    assert torch.equal(x, y) and caps == caps2 and labels == labels2
    rng = np.random.default_rng(4)  # the draw order of sample_batch: shapes, colours, styles, seeds
    for size in (len(tw.SHAPES), len(tw.COLOURS), len(tw.STYLE_LABELS)):
        rng.integers(size, size=12)
    seeds = rng.integers(2**31, size=12)
    for i in (0, 11):
        expected = tw.render(labels["shape"][i], labels["colour"][i], labels["style"][i], int(seeds[i]))
        assert torch.equal(x[i], tw.to_tensor(expected[None])[0])


def test_train_bpe_makes_every_caption_word_one_token():
    texts = tw.corpus()
    merges = tw.train_bpe(texts, 1000)
    assert merges == tw.train_bpe(texts, 1000)  # deterministic
    assert 50 < len(merges) < 1000  # stopped early: nothing left to merge
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in merges)
    tok = Tokenizer(merges)
    assert {"painting</w>", "lichtenstein</w>", "gogh</w>"} <= set(tok.vocab)   # whole words became tokens
    assert tok.vocab_size == 512 + len(merges) + 2
    inverse = {i: t for t, i in tok.vocab.items()}
    for text in texts[::37]:
        ids = tok.encode(text)
        assert len(ids) == len(text.replace(",", " ,").split()), text
        assert [inverse[i].removesuffix("</w>") for i in ids] == text.replace(",", " ,").split()
    assert len(tok.encode("a painting in the style of van gogh")) == 8
    assert Tokenizer.from_merges_text(tok.merges_text()).merges == merges
    # a small run: the most frequent pairs first, and no more merges than asked
    small = tw.train_bpe(["low lower lowest", "low low"], 3)
    assert small == [("l", "o"), ("lo", "w</w>"), ("lo", "w")]


def test_concept_grid(tmp_path):
    grid = tw.concept_grid(str(tmp_path / "grid.png"))
    assert grid.size[1] > 10 * 64 and (tmp_path / "grid.png").exists()


def test_shipped_classifier_is_accurate_on_every_head():
    assert os.path.getsize(classifier.DEFAULT_PATH) <= 5e6
    model = classifier.load_classifier()
    assert sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model.labels == {"shape": tw.SHAPES, "colour": tw.COLOURS, "style": tw.STYLE_LABELS}
    acc = classifier.heldout_accuracy(model, n=400, seed=classifier.HELDOUT_SEED)
    assert all(a >= 0.98 for a in acc.values()), acc
    # [0, 1] images would be a silent mistake: the classifier takes [-1, 1], like the VAE
    x, _, labels = tw.sample_batch(8, 11)
    assert classifier.classify(x, model)["style"] == labels["style"]
