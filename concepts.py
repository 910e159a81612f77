"""Concepts and prompts: what a request names, what replaces it, and which concepts sit near it.

duge.py decides WHICH concepts feed each loss (the continual recipe); this file turns concept
names into prompts:
  - `anchor_prompt`: the prompt with the concept replaced by its anchor ("a painting in the
    style of van gogh" -> "a painting"), the c^a of the losses;
  - `related_concepts`: the candidates nearest to a concept by the model's own text embeddings,
    which are the ones that erode first;
  - `SDConcepts`: templates, candidate artists / objects and generic prompts for real Stable
    Diffusion. The toy world brings its own (toy/concepts.py), with the same methods.
"""
import re

import torch
import torch.nn.functional as F

from sample import encode_prompts

# -----------------------------------------------------------------------------------------------
# Anchors

CONNECTORS = r"(?:in the style of|(?:painted |drawn )?by|of)"


def anchor_prompt(prompt, concept, anchor=""):
    """The prompt with the concept replaced by its anchor. With the empty anchor the concept is
    removed and the words left dangling go with it: "a painting in the style of van gogh" ->
    "a painting", "a van gogh painting of a star" -> "a painting of a star", "a photo of a star"
    -> "a photo", "a star by monet" (concept star) -> "by monet"."""
    out = re.sub(r"\b" + re.escape(concept) + r"\b", anchor, prompt, flags=re.IGNORECASE)
    out = " ".join(out.split())
    while True:  # drop an article or connector left at the end, or an article before a connector
        new = re.sub(rf"(?:\s*,)?\s*(?:\ban?|{CONNECTORS})\s*$", "", out)
        new = re.sub(rf"\ban?\s+(?={CONNECTORS}\b|,)", "", new).strip(" ,")
        if new == out:
            break
        out = new
    # a / an agree with the word that now follows them
    return re.sub(r"\b(an?)\s+(\w)", lambda m: ("an " if m.group(2) in "aeiouAEIOU" else "a ") + m.group(2), out)


# -----------------------------------------------------------------------------------------------
# Nearest concepts by the model's own text embeddings

def eot_embedding(context, tokens, eot_id):
    """The text encoder's summary of a prompt: the hidden state at its first end-of-text token
    (what CLIP projects to its joint space). context (B, 77, D), tokens (B, 77) -> (B, D)."""
    first = (tokens == eot_id).int().argmax(dim=1)
    return context[torch.arange(len(context)), first]


def related_concepts(embed, concept, candidates, k, template="{}"):
    """The k candidates nearest to the concept by cosine similarity of the model's own text
    embeddings. embed(list of prompts) -> (N, D). These are the concepts most at risk of being
    forgotten along with the target, so L_pr protects them explicitly."""
    others = [c for c in candidates if c.lower() != concept.lower()]
    if not others or k <= 0:
        return []
    e = F.normalize(embed([template.format(c) for c in [concept] + others]).float(), dim=-1)
    sims = e[1:] @ e[0]
    return [others[i] for i in sims.argsort(descending=True)[:k].tolist()]


def nearest_by_text(model, concept, k):
    """nearest(pool) for duge.plan: the k concepts of pool closest to `concept` in the model's
    own text embedding (model: a checkpoint.StableDiffusion)."""
    device = next(model.text_encoder.parameters()).device
    embed = lambda ps: eot_embedding(encode_prompts(model, ps), model.tokenizer(ps).to(device), model.tokenizer.eot_id)
    return lambda pool: related_concepts(embed, concept, pool, k)


# -----------------------------------------------------------------------------------------------
# Real Stable Diffusion: templates, candidate concepts and generic prompts

SD_TEMPLATES = {
    "style": ["a painting in the style of {}", "a portrait in the style of {}", "a landscape painted by {}",
              "an artwork by {}", "a painting of a city by {}", "a still life in the style of {}",
              "a painting of a river by {}", "a painting of flowers by {}"],
    "object": ["a photo of a {}", "a picture of a {}", "a {} on a table", "a close-up photo of a {}",
               "an image of a {}", "a {} in a garden", "a drawing of a {}", "a photo of a {} in the street"],
    "other": ["a photo of {}", "an image of {}", "a picture of {}", "{}"],
}
SD_ARTISTS = ["van gogh", "monet", "picasso", "rembrandt", "salvador dali", "claude lorrain", "kandinsky",
              "klimt", "hokusai", "andy warhol", "frida kahlo", "leonardo da vinci", "edvard munch",
              "georges seurat", "jackson pollock", "piet mondrian", "paul cezanne", "thomas kinkade"]
SD_OBJECTS = ["apple", "broccoli", "backpack", "traffic light", "umbrella", "parachute", "orange",
              "goldfish", "bowtie", "harp", "gas pump", "sunglasses", "computer mouse", "broom",
              "english springer", "eiffel tower", "corgi", "airplane", "car", "dog", "cat"]
SD_GENERIC = ["a photo of a dog", "a mountain landscape at sunset", "a bowl of fruit on a table",
              "a city street at night", "a portrait of a woman", "a red sports car", "a cat sleeping on a sofa",
              "a forest in autumn", "a plate of food", "a beach with palm trees", "a house with a garden",
              "an astronaut in space"]


# Retained concepts no method sees (as toy/concepts.HELD_OUT): never a candidate, never in a generic
# prompt; the CLIP evaluation reports them apart. Each sits near concepts that stay candidates
# (munch near van gogh, rembrandt near the old masters, corgi near dog), so they erode as early.
SD_HELD_OUT = ["edvard munch", "rembrandt", "andy warhol", "corgi", "harp", "parachute"]


class SDConcepts:
    """Where concepts, templates and prompts come from on real SD. toy/concepts.py has the same
    four methods for the toy world."""
    held_out = SD_HELD_OUT

    def kind(self, concept):
        c = concept.lower()
        return "style" if c in SD_ARTISTS else "object" if c in SD_OBJECTS else "other"

    def known(self, kind):
        """Every concept of a kind that the evaluation measures."""
        return {"style": SD_ARTISTS, "object": SD_OBJECTS}.get(kind, [])

    def candidates(self, kind):
        """The concepts of a kind a method may use (in its memory, preserve set or prompts): not held out."""
        return [c for c in self.known(kind) if c not in SD_HELD_OUT]

    def prompts(self, concept, kind, n, exclude=()):
        """n prompts naming the concept (the templates of its kind, in turn)."""
        ts = SD_TEMPLATES.get(kind, SD_TEMPLATES["other"])
        return [ts[i % len(ts)].format(concept) for i in range(n)]

    def generic(self, n, exclude=()):
        """Prompts of everything else the model should keep drawing (never a forgotten or held-out concept)."""
        ok = [p for p in SD_GENERIC if not any(re.search(rf"\b{re.escape(c)}\b", p) for c in [*exclude, *SD_HELD_OUT])]
        return [ok[i % len(ok)] for i in range(n)]
