"""The toy world's concepts and prompts for train.py and probe.py: the same four methods as
concepts.SDConcepts, filled from the generator's own lists and caption templates."""
import numpy as np

import concepts
from toy import world


def for_model(model, seed=0):
    """The concepts a model knows: this world's for the toy model (its file brings its own tokenizer),
    real SD's (concepts.SDConcepts) for any other."""
    return ToyConcepts(seed) if "duge.tokenizer" in model.meta else concepts.SDConcepts()


class ToyConcepts:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)  # fills the other slots of a template (colour, shape, style)

    def kind(self, concept):
        return world.concept_kind(concept)

    def candidates(self, kind):
        return {"style": world.STYLES, "object": world.SHAPES, "colour": world.COLOURS}.get(kind, [])

    def _pick(self, xs, exclude, concept):
        ok = [x for x in xs if x not in exclude and x != concept]
        return ok[self.rng.integers(len(ok))]

    def prompts(self, concept, kind, n, exclude=()):
        """n prompts naming the concept, other slots filled with concepts not in `exclude`."""
        ts = world.TEMPLATES.get(kind, world.TEMPLATES["object"])
        return [world.fill_template(ts[i % len(ts)], concept, colour=self._pick(world.COLOURS, exclude, concept),
                                    shape=self._pick(world.SHAPES, exclude, concept),
                                    style=self._pick(world.STYLES, exclude, concept)) for i in range(n)]

    def generic(self, n, exclude=()):
        """Captions of everything else the model should keep drawing (never a forgotten concept)."""
        keep = lambda xs: [x for x in xs if x not in exclude]
        shapes, colours, styles = keep(world.SHAPES), keep(world.COLOURS), keep(world.STYLE_LABELS)
        return [world.caption(shapes[self.rng.integers(len(shapes))], colours[self.rng.integers(len(colours))],
                              styles[self.rng.integers(len(styles))], self.rng) for _ in range(n)]
