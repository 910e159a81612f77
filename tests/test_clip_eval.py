"""evaluate.py on real SD: the CLIP evaluator's table, with a stand-in CLIP whose answers are known."""
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import concepts
import evaluate

ROOT = Path(__file__).resolve().parent.parent
VG, MONET = evaluate.TEMPLATES["style"].format("van gogh"), evaluate.TEMPLATES["style"].format("monet")


class StandInCLIP:
    """Every text gets its own fixed random unit vector; an "image" is the index of the text it
    shows, and its embedding is that text's vector. So CLIP picks exactly what the image shows."""

    def __init__(self):
        self.texts = []

    def index(self, text):
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text)

    def vector(self, i):
        return F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1000 + i)), dim=0)

    def encode_text(self, texts):
        return torch.stack([self.vector(self.index(t)) for t in texts])

    def encode_image(self, shown):
        return torch.stack([self.vector(int(i)) for i in shown])


def fake_world(monkeypatch, clip, shows):
    """sample.generate draws, for each prompt, an image showing shows(prompt) (a prompt text)."""
    monkeypatch.setattr(evaluate, "clip_preprocess", lambda images: images)
    monkeypatch.setattr(evaluate.sample, "generate",
                        lambda model, prompts, **kw: torch.tensor([clip.index(shows(p)) for p in prompts]))


def test_known_answers_give_the_expected_table(monkeypatch, tmp_path):
    """After unlearning, van gogh's images show monet and the images of a forgotten concept of no
    known kind show a plain photo; under the base model every image shows its own prompt."""
    clip, state = StandInCLIP(), {"base": False}
    odd = "a photo of nudity"

    def shows(p):
        if state["base"]:
            return p
        return {VG: MONET, odd: evaluate.NEUTRAL}.get(p, p)
    fake_world(monkeypatch, clip, shows)

    @contextmanager
    def base_model():
        state["base"] = True
        yield
        state["base"] = False
    model = type("M", (), {"guidance": 7.5})()
    gone = ["van gogh", "nudity"]
    cache = tmp_path / "base.json"
    r = evaluate.evaluate(model, clip, gone, 3, base_model, cache)
    names = concepts.SD_ARTISTS + concepts.SD_OBJECTS + ["nudity"]
    assert list(r["eval"]) == names and all(r["images"][c] == 3 for c in names)
    assert r["eval"]["van gogh"] == 0.0 and r["eval"]["nudity"] == 0.0
    assert all(r["eval"][c] == 1.0 for c in names if c not in gone) and all(v == 1.0 for v in r["base"].values())
    s = r["summary"]
    assert (s["forgotten"], s["forgotten_base"]) == (0.0, 1.0)
    assert s["retained_in_domain"] == 1.0 and s["retained_cross_domain"] == 1.0
    assert s["retained_in_domain_ci"] == pytest.approx(evaluate.wilson(1.0, 3 * (len(concepts.SD_ARTISTS) - 1)))
    # retained images each show their own prompt: cosine 1, CLIP score 100; the base's too
    assert s["clip_score"] == pytest.approx(100.0) and s["clip_score_base"] == pytest.approx(100.0)
    # the base model's embeddings are cached per image, and a second evaluation draws only "after"
    assert len(json.loads(cache.read_text())) == 3 * len(names)
    calls = []
    monkeypatch.setattr(evaluate, "embed_images", lambda m, c, its, cache=None, *a, **k:
                        calls.append(cache is None) or {it.key: [0.0] * 64 for it in its})
    evaluate.evaluate(model, clip, gone, 3, base_model, cache)
    assert calls == [True]


def test_clip_score_is_the_cosine_with_the_own_prompt(monkeypatch):
    """One concept whose images show another prompt: its CLIP score is 100 x the cosine of the two texts."""
    clip = StandInCLIP()
    fake_world(monkeypatch, clip, lambda p: MONET if p == VG else p)
    its = evaluate.shots(2, ["van gogh"])
    emb = evaluate.embed_images(None, clip, [it for it in its if it.concept == "van gogh"], guidance=7.5)
    hits, scores = evaluate.score(clip, [it for it in its if it.concept == "van gogh"], emb, ["van gogh"])
    cos = (clip.encode_text([VG]) @ clip.encode_text([MONET]).T).item()
    assert hits["van gogh"] == (0, 2) and scores["van gogh"] == pytest.approx(100 * cos, abs=1e-4)


def test_report_writes_the_table(monkeypatch, tmp_path, capsys):
    clip = StandInCLIP()
    fake_world(monkeypatch, clip, lambda p: p)
    model = type("M", (), {"guidance": 7.5})()
    phi0 = type("P", (), {"applied": staticmethod(contextmanager(lambda: (yield)))})()
    evaluate.report(model, clip, phi0, ["monet"], 1, tmp_path / "e.md", tmp_path / "e.csv", None)
    md = (tmp_path / "e.md").read_text()
    assert "| monet (forgotten) | style | 100% | 100% |" in md and "CLIP score" in md
    assert (tmp_path / "e.csv").read_text().splitlines()[0] == "concept,kind,base,after,images"
    assert "retained in-domain: 100.0%" in capsys.readouterr().err


def test_cli_refuses_a_folder_without_clip(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", str(tmp_path / "m.safetensors"),
                        "--clip", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "config.json" in r.stderr
    assert not list(tmp_path.iterdir())
