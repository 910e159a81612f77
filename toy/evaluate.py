"""Measuring unlearning in the toy world: what the model still draws, scored by the toy classifier.

    python -m toy.evaluate --weights out/forget-van-gogh.safetensors      # table of every concept
    python -m toy.evaluate --combinations                                  # the base model's quality

The images. For every style, n prompts "a {colour} {shape} in the style of {style}"; for every
forgotten shape or colour, n prompts naming it ("a {colour} {shape}"); and n plain prompts
"a {colour} {shape}" (more if needed). The other slots cycle through the concepts NOT forgotten,
and each image's seed comes from its prompt, so an image is the same in every evaluation that contains it. Every
image is scored on all three heads (style, shape, colour), and counts for each concept its prompt
names, unless the prompt also names a forgotten concept: a retained shape is measured on the
images of the retained styles and the plain ones, never on images of a forgotten style. Every
concept is measured on at least n images (each style on exactly n).

What is reported (as CUIG and the DUGE paper do, with the toy classifier in place of theirs):
  - forget accuracy: on the concepts in the ledger (lower is better);
  - retained accuracy, in-domain: the other concepts of a kind already hit (the other styles once a
    style is forgotten), which erode first; cross-domain: the concepts of the other kinds;
  - for each group the mean over concepts with a 95% interval, and the WORST retained concept with
    its own interval (Wilson score intervals: with 32 images, one image is 3 points);
  - a quality proxy: the Frechet distance between the classifier's hidden features of the model's
    retained images and of the generator's images of the same prompts (FID's formula on a small
    feature space). Collapse shows here before it shows in accuracy.

The sampler. The evaluation draws with DDIM in 6 steps instead of 20 (3.3x fewer UNet calls);
`python -m toy.evaluate -n 96 --compare-samplers ddim:20,ddim:6` measures the difference on the base
model (README: each kind's mean within a quarter of a point; a single concept by up to 3 of its 96 images).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import distributed
import evaluate as shared
import sample
from toy import classifier, world

EVAL_SAMPLER, EVAL_STEPS = "ddim", 6  # validated against DDIM 20 steps: toy.evaluate --compare-samplers (README)
PLAIN_PER_N = 1   # plain prompts per n: they keep >= n images per shape and colour while styles are forgotten
HEAD = {"style": "style", "object": "shape", "colour": "colour"}


def concepts():
    return world.STYLES + world.SHAPES + world.COLOURS


# ------------------------------------------------------------------------------------------
# The images: prompts, seeds, and which concepts each one counts for


@dataclass(frozen=True)
class Item:
    prompt: str
    seed: int
    style: str   # world.PHOTO for a plain prompt
    shape: str
    colour: str

    @property
    def key(self):
        return f"{self.prompt}#{self.seed}"

    def names(self):
        """The concepts this image's prompt names."""
        return {self.style, self.shape, self.colour} - {world.PHOTO}


def items(n, forgotten=(), seed=0):
    """The evaluation images for a ledger (see the module docstring); another seed: the same prompts,
    other images (disjoint seeds)."""
    gone = set(forgotten)
    shapes = [s for s in world.SHAPES if s not in gone] or world.SHAPES
    colours = [c for c in world.COLOURS if c not in gone] or world.COLOURS
    out, seen = [], {}

    def add(style, shape, colour):
        prompt = world._articles(f"a {colour} {shape}" + ("" if style == world.PHOTO else f" in the style of {style}"))
        rep = seen[prompt] = seen.get(prompt, -1) + 1
        out.append(Item(prompt, zlib.crc32(prompt.encode()) % 1_000_003 + 7919 * rep + 10_000_019 * seed, style, shape,
                        colour))

    fill = lambda j: (shapes[j % len(shapes)], colours[(j + j // len(shapes)) % len(colours)])
    for k, style in enumerate(world.STYLES):       # fillers depend on the style's position only
        for i in range(n):
            add(style, *fill(k * n + i))
    for shape in [s for s in world.SHAPES if s in gone]:
        for i in range(n):
            add(world.PHOTO, shape, fill(i)[1])
    for colour in [c for c in world.COLOURS if c in gone]:
        for i in range(n):
            add(world.PHOTO, fill(i)[0], colour)
    for i in range(PLAIN_PER_N * n):
        add(world.PHOTO, *fill(i))
    short = lambda: [c for c in shapes + colours if sum(counts_for(it, c, gone) for it in out) < n]
    i = PLAIN_PER_N * n
    while short():   # many styles forgotten: more plain images, until every kept shape and colour has n
        add(world.PHOTO, *fill(i))
        i += 1
    return out


def counts_for(item, concept, forgotten):
    """Does this image measure this concept? It must name it, and name no OTHER forgotten concept."""
    names = item.names()
    return concept in names and not (names & set(forgotten)) - {concept}


# ------------------------------------------------------------------------------------------
# Drawing and scoring


@torch.no_grad()
def draw(model, its, cache=None, sampler=EVAL_SAMPLER, steps=EVAL_STEPS, guidance=None, batch=64,
         desc="evaluation"):
    """Draw and score each item: key -> {"pred": [style, shape, colour], "feat": hidden features}.
    Items already in `cache` (a dict, e.g. the base model's results) are not drawn again."""
    clf = classifier.load_classifier()
    guidance = model.guidance if guidance is None else guidance
    cache = {} if cache is None else cache
    todo = list({it.key: it for it in its if it.key not in cache}.values())
    mine = distributed.shard(todo)  # under torchrun: this rank's share, gathered below
    for i in tqdm(range(0, len(mine), batch), desc=desc, unit="batch", disable=not todo):
        part = mine[i:i + batch]
        images = sample.generate(model, [it.prompt for it in part], steps=steps, guidance=guidance,
                                 sampler=sampler, seeds=[it.seed for it in part])
        x = images * 2 - 1  # generate gives [0, 1], the classifier [-1, 1]
        logits, feats = clf(x.float(), with_features=True)
        for j, it in enumerate(part):
            cache[it.key] = {"pred": [clf.labels[h][logits[h][j].argmax().item()] for h in ("style", "shape", "colour")],
                             "feat": [round(v, 4) for v in feats[j].tolist()]}
    cache.update(distributed.gather_dict({it.key: cache[it.key] for it in mine}))   # every rank's share
    return {it.key: cache[it.key] for it in its}


def score(its, results, forgotten, names=None):
    """concept -> (hits, images) over the images that measure it."""
    out = {}
    for c in names or concepts():
        head = ("style", "shape", "colour").index(HEAD[world.concept_kind(c)])
        hits = [results[it.key]["pred"][head] == c for it in its if counts_for(it, c, forgotten)]
        out[c] = (sum(hits), len(hits))
    return out


_REFERENCE: dict[str, list[float]] = {}


def reference_file(folder):
    """Where the reference features are kept on disk: named after the generator's code and the classifier's
    weights, so a change to either draws them again."""
    h = hashlib.sha1(Path(world.__file__).read_bytes() + Path(classifier.DEFAULT_PATH).read_bytes()).hexdigest()
    return Path(folder) / f"reference-{h[:16]}.json"


@torch.no_grad()
def reference_features(its, path=None):
    """The generator's own images of the same prompts (same labels and seeds), through the classifier.
    path: a JSON file (reference_file) read first and written back with what was new."""
    if path is not None and path.exists() and any(it.key not in _REFERENCE for it in its):
        for k, v in json.loads(path.read_text()).items():
            _REFERENCE.setdefault(k, v)
    todo = [it for it in its if it.key not in _REFERENCE]
    clf = classifier.load_classifier()
    for i in range(0, len(todo), 256):
        part = todo[i:i + 256]
        x = world.render_batch([it.shape for it in part], [it.colour for it in part], [it.style for it in part],
                               [it.seed for it in part])
        for it, f in zip(part, clf.embed(x)):
            _REFERENCE[it.key] = f.tolist()
    if todo and path is not None and distributed.is_main():
        with checkpoint.atomic_path(path) as tmp:
            tmp.write_text(json.dumps(_REFERENCE))
    return np.array([_REFERENCE[it.key] for it in its], np.float64)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two samples of features (rows):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Dowson & Landau 1982; FID, Heusel et al. 2017).
    Tr (S_a S_b)^(1/2) = sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    symmetric, so it needs no general matrix square root."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def quality(its, results, forgotten, reference=None):
    """The quality proxy on the images that name no forgotten concept (reference: reference_features' file)."""
    keep = [it for it in its if not it.names() & set(forgotten)]
    return frechet_distance(np.array([results[it.key]["feat"] for it in keep]), reference_features(keep, reference))


# ------------------------------------------------------------------------------------------
# Summaries with intervals: the library's (evaluate.py), with the toy world's kinds

wilson, pct, summary_lines = shared.wilson, shared.pct, shared.summary_lines


def summarise(acc, base, forgotten, n=None):
    from toy.concepts import HELD_OUT
    return shared.summarise(acc, base, forgotten, world.concept_kind, n, HELD_OUT)


def table(acc_by_model, forgotten=(), n=None):
    return shared.table(acc_by_model, world.concept_kind, forgotten, n)


# ------------------------------------------------------------------------------------------
# What train.py and the benchmark call


CHECK_SEED = 1000   # recognised()'s images: seeds no evaluation draws (train.py --eval-seed is 0, 1, 2...)


def recognised(model, concept, forgotten=(), n=16):
    """How often the concept is still recognised, on n images naming it drawn with CHECK_SEED (never
    an evaluation's images): the check of train.py --match-forgetting."""
    gone = list(dict.fromkeys([*forgotten, concept]))
    its = [it for it in items(n, gone, CHECK_SEED) if counts_for(it, concept, gone)][:n]
    h, k = score(its, draw(model, its, desc="check"), gone, [concept])[concept]
    return h / k


def evaluate(model, forgotten, n, base_model=None, base_cache=None, seed=0):
    """Accuracy of every concept now and under the base model, on the same images.
    base_model: a context manager that swaps the base model in (phi_0.applied); base_cache: a path
    whose JSON holds the base model's results per image, so each image is drawn for the base only once.
    seed: which images (items()). -> {"eval", "base", "images", "summary"}"""
    its = items(n, forgotten, seed)
    cache = json.loads(base_cache.read_text()) if base_cache is not None and base_cache.exists() else {}
    if any(it.key not in cache for it in its):
        with base_model():
            base_results = draw(model, its, cache, desc="evaluation: phi_0")
        if base_cache is not None and distributed.is_main():  # torchrun: rank 0 writes
            with checkpoint.atomic_path(base_cache) as tmp:
                tmp.write_text(json.dumps(cache))
    else:
        base_results = {it.key: cache[it.key] for it in its}
    results = draw(model, its, desc="evaluation: after")
    scored, scored_base = score(its, results, forgotten), score(its, base_results, forgotten)
    acc = {c: h / k if k else float("nan") for c, (h, k) in scored.items()}
    base = {c: h / k if k else float("nan") for c, (h, k) in scored_base.items()}
    n_by = {c: k for c, (_, k) in scored.items()}
    summary = summarise(acc, base, forgotten, n_by)
    ref = reference_file(base_cache.parent) if base_cache is not None else None   # beside the base's results
    summary["quality_fd"], summary["quality_fd_base"] = (quality(its, results, forgotten, ref),
                                                         quality(its, base_results, forgotten, ref))
    return {"eval": acc, "base": base, "images": n_by, "summary": summary}


def report(model, phi0, gone, n, md_path, csv_path, base_cache, seed=0):
    """After a request (train.py): the table of every concept under phi_0 and now, in markdown and CSV;
    prints the summary. -> {"eval", "base", "summary"}"""
    r = evaluate(model, gone, n, phi0.applied, base_cache, seed)
    return shared.write_report(r, gone, world.concept_kind, md_path, csv_path)


@torch.no_grad()
def combinations(model, seed=0, sampler="ddim", steps=20, guidance=None, batch=128):
    """The base model's quality: one image for every style x shape x colour prompt ("photo" is the
    prompt without a style), scored on all three heads. -> (per-head accuracy, per-concept accuracy)."""
    combos = [(st, sh, co) for st in world.STYLE_LABELS for sh in world.SHAPES for co in world.COLOURS]
    prompt = lambda st, sh, co: world._articles(f"a {co} {sh}" + ("" if st == world.PHOTO else f" in the style of {st}"))
    clf = classifier.load_classifier()
    guidance = model.guidance if guidance is None else guidance
    right = {"style": [], "shape": [], "colour": []}
    for i in tqdm(range(0, len(combos), batch), desc="combinations", unit="batch"):
        part = combos[i:i + batch]
        images = sample.generate(model, [prompt(*c) for c in part], steps=steps, guidance=guidance, seed=seed + i,
                                 sampler=sampler)
        pred = classifier.classify(images * 2 - 1, clf)
        for j, (st, sh, co) in enumerate(part):
            right["style"].append(pred["style"][j] == st)
            right["shape"].append(pred["shape"][j] == sh)
            right["colour"].append(pred["colour"][j] == co)
    per_head = {h: sum(v) / len(v) for h, v in right.items()}
    per_concept = {}
    for h, pos, names in (("style", 0, world.STYLE_LABELS), ("shape", 1, world.SHAPES), ("colour", 2, world.COLOURS)):
        for c in names:
            hits = [right[h][k] for k, combo in enumerate(combos) if combo[pos] == c]
            per_concept[c] = sum(hits) / len(hits)
    return per_head, per_concept


def compare_samplers(model, n, samplers):
    """The base model's accuracy of every concept under each (sampler, steps), on the same images."""
    its = items(n)
    out = {}
    for name, steps in samplers:
        scored = score(its, draw(model, its, sampler=name, steps=steps, desc=f"{name} {steps} steps"), ())
        out[f"{name} {steps}"] = {c: h / k for c, (h, k) in scored.items()}
    return out, {c: k for c, (_, k) in scored.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score a toy-world model: accuracy per concept.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", default=str(checkpoint.TOY_WEIGHTS))
    ap.add_argument("-n", type=int, default=32, help="images per style (and at least per shape and colour)")
    ap.add_argument("--forgotten", default="", help="comma-separated concepts to treat as forgotten")
    ap.add_argument("--sampler", default=EVAL_SAMPLER, choices=sorted(sample.SAMPLERS))
    ap.add_argument("--steps", type=int, default=EVAL_STEPS, help="sampler steps")
    ap.add_argument("--csv", default=None, help="also write the table as CSV")
    ap.add_argument("--combinations", action="store_true",
                    help="score one image of every style x shape x colour prompt on all three heads (DDIM 20 "
                         "unless --sampler/--steps are given)")
    ap.add_argument("--seed", type=int, default=0,
                    help="with --combinations: batch k of its 128 images is drawn with seed + 128 k; another seed "
                         "draws other images of the same prompts")
    ap.add_argument("--compare-samplers", default=None, metavar="S:N,S:N",
                    help="e.g. 'ddim:20,ddim:8': the base model's accuracy under each sampler on the same images")
    args = ap.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"-n must be at least 1, got {args.n}")
        sample.timestep_grid(args.steps)  # validates --steps
        gone = [c.strip().lower() for c in args.forgotten.split(",") if c.strip()]
        for c in gone:
            world.concept_kind(c)
        pairs = []
        for part in (args.compare_samplers or "").split(","):
            if part.strip():
                name, _, k = part.strip().partition(":")
                if name not in sample.SAMPLERS or not k.isdigit():
                    raise ValueError(f"--compare-samplers wants SAMPLER:STEPS pairs, e.g. ddim:20,ddim:8; "
                                     f"got {part!r}")
                sample.timestep_grid(int(k))
                pairs.append((name, int(k)))
        if args.csv:
            checkpoint.check_writable(args.csv)
        model = checkpoint.load(args.weights)
    except (checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.combinations:
        explicit = any(a.startswith(("--sampler", "--steps")) for a in (argv or sys.argv[1:]))
        sampler, steps = (args.sampler, args.steps) if explicit else ("ddim", 20)
        per_head, per_concept = combinations(model, seed=args.seed, sampler=sampler, steps=steps)
        print(f"{len(per_concept)} concepts, {sampler} {steps} steps, seed {args.seed}\n")
        print("| head | accuracy |\n|---|---|\n" + "\n".join(f"| {h} | {100 * a:.1f}% |" for h, a in per_head.items()))
        print("\n| concept | head | accuracy |\n|---|---|---|")
        sizes = {"style": len(world.STYLE_LABELS), "shape": len(world.SHAPES), "colour": len(world.COLOURS)}
        head = lambda c: "style" if c in world.STYLE_LABELS else "shape" if c in world.SHAPES else "colour"
        for c, a in per_concept.items():
            print(f"| {c} | {head(c)} | {100 * a:.1f}% |")
        low = min(per_concept, key=per_concept.get)   # one decimal: 91 of 96 is 94.8%, not "95%"
        n = math.prod(sizes.values()) // sizes[head(low)]   # every combination that names it
        print(f"\nlowest concept: {low} {100 * per_concept[low]:.1f}% ({round(per_concept[low] * n)} of {n} images)")
        return 0
    if pairs:
        acc, n_by = compare_samplers(model, args.n, pairs)
        print(table(acc, n=n_by))
        cols = list(acc)
        for col in cols[1:]:
            diff = {c: acc[col][c] - acc[cols[0]][c] for c in n_by}
            for kind in ("style", "object", "colour"):
                cs = [c for c in n_by if world.concept_kind(c) == kind]
                d = sum(diff[c] for c in cs) / len(cs)
                print(f"{col} vs {cols[0]}, {kind}: mean {100 * d:+.1f} points; largest per concept "
                      f"{100 * max(abs(diff[c]) for c in cs):.0f} points")
        return 0
    its = items(args.n, gone)
    results = draw(model, its, sampler=args.sampler, steps=args.steps)
    scored = score(its, results, gone)
    acc = {c: h / k for c, (h, k) in scored.items()}
    n_by = {c: k for c, (_, k) in scored.items()}
    print(table({os.path.basename(args.weights): acc}, forgotten=gone, n=n_by))
    for kind in ("style", "object", "colour"):
        cs = [c for c in acc if world.concept_kind(c) == kind and c not in gone]
        print(f"mean {kind}: {100 * sum(acc[c] for c in cs) / len(cs):.1f}%  worst: "
              f"{min(cs, key=acc.get)} {100 * min(acc[c] for c in cs):.0f}%")
    print(f"quality (Frechet distance to the generator's images, classifier features): "
          f"{quality(its, results, gone):.2f}")
    if args.csv:
        shared.write_csv({os.path.basename(args.weights): acc}, args.csv, world.concept_kind, n=n_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
