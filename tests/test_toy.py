"""The shipped toy model: it draws its concepts, sample.py uses it by default, and DUGE makes it
forget van gogh while keeping the rest (reduced versions of the README's measurements)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from toy import evaluate, world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy():
    return checkpoint.load(checkpoint.TOY_WEIGHTS)


def test_toy_checkpoint_is_small_and_sd_shaped(toy):
    assert checkpoint.TOY_WEIGHTS.stat().st_size <= 30e6
    assert toy.image_size == 64 and toy.vae.downscale == 4
    assert toy.unet.cfg.context_dim == toy.text_encoder.cfg.width
    assert toy.tokenizer.vocab_size == toy.text_encoder.cfg.vocab_size < 49408


def test_sample_cli_uses_the_toy_model_by_default(tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "a red circle in the style of van gogh", "-n", "2",
                        "--steps", "10", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    im = Image.open(out)
    assert im.width >= 2 * 64 and im.height >= 64


def test_base_model_draws_every_concept(toy):
    """Reduced version of `python -m toy.evaluate --combinations`: 3 images per concept, fixed seeds."""
    acc = evaluate.accuracy(toy, n=3, seed=0)
    for kind in ("style", "object", "colour"):
        cs = [c for c in acc if world.concept_kind(c) == kind]
        assert sum(acc[c] for c in cs) / len(cs) >= MIN_MEAN[kind], (kind, {c: acc[c] for c in cs})
    assert acc["van gogh"] >= 2 / 3
    assert min(acc.values()) >= 1 / 3, {c: a for c, a in acc.items() if a < 1 / 3}  # every concept is drawn


def test_forget_van_gogh(tmp_path):
    """Reduced version of the README's single-request result: fewer steps and images."""
    out = tmp_path / "no-van-gogh.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--forget", "van gogh", "--out", str(out),
                        "--cache", str(tmp_path / "cache"), "--steps", "120", "--eval-n", "4"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["concept"]: row for row in csv.DictReader(open(out.with_suffix("").as_posix() + ".eval.csv"))}
    base = {c: float(v["base"]) for c, v in rows.items()}
    after = {c: float(v["after"]) for c, v in rows.items()}
    assert base["van gogh"] >= 0.75 and after["van gogh"] <= 0.25, (base["van gogh"], after["van gogh"])
    kept = [c for c in rows if c != "van gogh"]
    drop = sum(base[c] - after[c] for c in kept) / len(kept)
    assert drop <= 0.10, {c: (base[c], after[c]) for c in kept}


MIN_MEAN = {"style": 0.9, "object": 0.9, "colour": 0.9}  # measured: 99.7%, 99.3%, 99.9% (python -m toy.evaluate --combinations)


def test_evaluate_cli_refuses_bad_counts():
    for flags, message in ((["-n", "0"], "error: -n must be at least 1, got 0"),
                           (["--steps", "0"], "error: steps must be between 1 and 1000, got 0")):
        r = subprocess.run([sys.executable, "-m", "toy.evaluate", *flags], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and r.stderr.strip() == message, r.stderr
