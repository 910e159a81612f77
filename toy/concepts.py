"""The toy world's concepts and prompts for train.py and probe.py: the same four methods as
concepts.SDConcepts, filled from the generator's own lists and caption templates.

HELD_OUT: retained concepts no method ever sees. They are never a candidate (so never in DUGE's
memory or related set, UCE's preserve set or the gradient projection's subspace), never fill a
slot of a training prompt and never appear in a generic caption; the evaluation reports them apart
(retained held-out against retained seen), as CUIG measures retention on concepts its methods never
train on. Each is the close neighbour of a concept the benchmark's sequences forget (munch of van
gogh, malevich of mondrian, rembrandt of turner, oval of circle, house of square, orange of red,
purple of blue), so held-out concepts are among the first to erode; moon is a shape far from all.
"""
import numpy as np

import concepts
from toy import world


def for_model(model, seed=0):
    """The concepts a model knows: this world's for the toy model (its file brings its own tokenizer),
    real SD's (concepts.SDConcepts) for any other."""
    return ToyConcepts(seed) if "duge.tokenizer" in model.meta else concepts.SDConcepts()


HELD_OUT = ["munch", "malevich", "rembrandt", "oval", "house", "moon", "orange", "purple"]


class ToyConcepts:
    held_out = HELD_OUT

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)  # fills the other slots of a template (colour, shape, style)

    def kind(self, concept):
        return world.concept_kind(concept)

    def known(self, kind):
        """Every concept of a kind that the evaluation measures."""
        return {"style": world.STYLES, "object": world.SHAPES, "colour": world.COLOURS}.get(kind, [])

    def candidates(self, kind):
        """The concepts of a kind a method may use (in its memory, preserve set or prompts): not held out."""
        return [c for c in self.known(kind) if c not in HELD_OUT]

    def _pick(self, xs, exclude, concept):
        ok = [x for x in xs if x not in exclude and x not in HELD_OUT and x != concept]
        return ok[self.rng.integers(len(ok))]

    def prompts(self, concept, kind, n, exclude=()):
        """n prompts naming the concept, other slots filled with concepts neither in `exclude` nor held out."""
        ts = world.TEMPLATES.get(kind, world.TEMPLATES["object"])
        return [world.fill_template(ts[i % len(ts)], concept, colour=self._pick(world.COLOURS, exclude, concept),
                                    shape=self._pick(world.SHAPES, exclude, concept),
                                    style=self._pick(world.STYLES, exclude, concept)) for i in range(n)]

    def generic(self, n, exclude=()):
        """Captions of everything else the model should keep drawing (never a forgotten or held-out concept)."""
        keep = lambda xs: [x for x in xs if x not in exclude and x not in HELD_OUT]
        shapes, colours, styles = keep(world.SHAPES), keep(world.COLOURS), keep(world.STYLE_LABELS)
        return [world.caption(shapes[self.rng.integers(len(shapes))], colours[self.rng.integers(len(colours))],
                              styles[self.rng.integers(len(styles))], self.rng) for _ in range(n)]
