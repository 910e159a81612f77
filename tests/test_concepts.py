"""concepts.py: anchors, nearest concepts by text embedding, the end-of-text summary."""
import pytest
import torch

import concepts


@pytest.mark.parametrize("prompt,concept,anchor,expected", [
    ("a painting in the style of van gogh", "van gogh", "", "a painting"),
    ("a van gogh painting of a star", "van gogh", "", "a painting of a star"),
    ("a painting by van gogh", "van gogh", "", "a painting"),
    ("a red circle, painted by van gogh", "van gogh", "", "a red circle"),
    ("a photo of a star", "star", "", "a photo"),
    ("a painting of an orange star by monet", "orange", "", "a painting of a star by monet"),
    ("an orange octagon", "orange", "", "an octagon"),
    ("a painting in the style of van gogh", "van gogh", "monet", "a painting in the style of monet"),
    ("a photo of an apple", "apple", "pear", "a photo of a pear"),
])
def test_anchor_prompt(prompt, concept, anchor, expected):
    assert concepts.anchor_prompt(prompt, concept, anchor) == expected


def test_related_concepts_by_cosine():
    vecs = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0], "d": [-1.0, 0.0], "e": [0.7, 0.7]}
    embed = lambda ps: torch.tensor([vecs[p] for p in ps])
    assert concepts.related_concepts(embed, "a", ["a", "b", "c", "d", "e"], 2) == ["b", "e"]
    assert concepts.related_concepts(embed, "a", ["a"], 2) == []


def test_eot_embedding_picks_first_end_token():
    ctx = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    tokens = torch.tensor([[9, 1, 7, 7, 7], [9, 1, 2, 3, 7]])
    out = concepts.eot_embedding(ctx, tokens, 7)
    torch.testing.assert_close(out, torch.stack([ctx[0, 2], ctx[1, 4]]))
