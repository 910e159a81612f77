"""Where a method's erosion comes from: every retained concept, request by request, read from the
benchmark's committed runs (docs/benchmark-state), beside how close it is to the concepts forgotten so
far, by text and by image.

    python -m experiments.erosion                      # DUGE's runs, every sequence -> docs/erosion.md
    python -m experiments.erosion --variant ca+ --docs docs
    python -m experiments.erosion --kv docs/benchmark-state/styles/duge-seed0.safetensors   # what moved
    python -m experiments.erosion --fd docs/benchmark-state/styles/duge-seed0.safetensors   # which images

For each sequence: one row per retained concept (seen by the methods, or held out from all), its
accuracy under the base model and after every request (mean over the variant's seeds), the request at
which that mean first falls more than 15 points below base, and two similarities to its nearest
forgotten concept: of the text embedding (baselines.concept_embeddings: the name's tokens, as CUIG's
projection reads them), and of the images (image_embeddings: the mean pixels, or classifier features,
of the world's own images of each concept; same kind only), with the concept forgotten where it
first falls. Base accuracies come from the ledger when train.py stored them; runs older than that are scored against the base model drawn once here, on the same evaluation images for
styles (their images do not depend on what was forgotten) and on the last request's images for
shapes and colours.
"""
import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoint
import trainer
from baselines import concept_embeddings
from experiments.benchmark import SEQUENCES, docs_name, file_name, ledger, rebuild
from toy import concepts as toy_concepts
from toy import classifier, evaluate, world

DROP = 0.15   # issue 29's goal: no retained concept below its base - 15 points
SPACES = ("pixels", "classifier")   # image_embeddings' two ways of telling how alike concepts look
STYLE_PROMPT = "a painting in the style of {}"   # the prompt --kv reads every style's tokens from


def ledgers(docs, sequence, variant):
    """{seed: [ledger step, ...]} of the variant's committed runs on a sequence."""
    folder = Path(docs) / "benchmark-state" / sequence
    out = {}
    for path in sorted(folder.glob(f"{file_name(variant)}-seed*.safetensors")):
        seed = path.stem.rsplit("-seed", 1)[1]
        if seed.isdigit():
            out[int(seed)] = ledger(path)
    return out


def base_accuracy(model, steps, seed, n, drawn):
    """Per concept under the base model: from the last request's ledger entry if stored, else drawn."""
    stored = steps[-1]["metrics"].get("base")
    if stored:
        return stored
    gone = [s["concept"] for s in steps]
    key = (seed, tuple(gone))
    if key not in drawn:
        its = evaluate.items(n, gone, seed)
        scored = evaluate.score(its, evaluate.draw(model, its, desc=f"base, seed {seed}"), gone)
        drawn[key] = {c: h / k for c, (h, k) in scored.items() if k}
    return drawn[key]


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def _looks(n):
    """{space: {concept: unit vector}} for every concept of the world, from ONE pass over its images."""
    rng = np.random.default_rng(0)
    pools = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}
    others = {k: [pool[i] for i in rng.integers(0, len(pool), n)] for k, pool in pools.items()}
    reads = {"pixels": lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1),
             "classifier": classifier.load_classifier().embed}
    means = {space: {} for space in SPACES}
    kinds = {}
    for kind, slot in (("object", "shape"), ("colour", "colour"), ("style", "style")):
        for c in pools[slot]:
            pick = dict(others, **{slot: [c] * n})
            x = world.render_batch(pick["shape"], pick["colour"], pick["style"], list(range(n)))
            kinds[c] = kind
            for space in SPACES:
                means[space][c] = reads[space](x).mean(0)
    out = {}
    for space, m in means.items():
        centre = {k: torch.stack([m[c] for c in m if kinds[c] == k]).mean(0) for k in set(kinds.values())}
        out[space] = {c: torch.nn.functional.normalize(v - centre[kinds[c]], dim=0) for c, v in m.items()}
    return out


def image_embeddings(names, space, n=64):
    """How alike concepts LOOK: for each concept, the mean over n of the generator's own images showing
    it (the other two slots drawn at random, the same draws for every concept) of their pixels (space
    "pixels": averaged in 4x4 blocks, so colour and layout) or of the classifier's features
    ("classifier": classifier.embed, what it tells concepts apart by), centred on the mean over the
    concept's kind and normalised. -> (len(names), dim)"""
    return torch.stack([_looks(n)[space][c] for c in names])


def analyse(model, sequence, runs, n, drawn):
    """-> rows (one per retained concept) and the per-request means, for one sequence."""
    forgotten = [s["concept"] for s in next(iter(runs.values()))]
    kept = [c for c in evaluate.concepts() if c not in forgotten and world.concept_kind(c) in
            {world.concept_kind(f) for f in forgotten} | {"style"}]
    names = kept + forgotten
    emb = torch.nn.functional.normalize(concept_embeddings(model, names), dim=-1)
    cos = emb @ emb.T
    looks = {space: image_embeddings(names, space) for space in SPACES}
    base = {s: base_accuracy(model, steps, s, n, drawn) for s, steps in runs.items()}
    rows = []
    for c in kept:
        i = names.index(c)
        sims = {f: cos[i, names.index(f)].item() for f in forgotten}
        near = max(sims, key=sims.get)
        same_kind = [f for f in forgotten if world.concept_kind(f) == world.concept_kind(c)]
        alike = {space: {f: (e[i] @ e[names.index(f)]).item() for f in same_kind} for space, e in looks.items()}
        b = sum(base[s][c] for s in runs) / len(runs)
        curve = [sum(steps[k]["metrics"]["eval"][c] for steps in runs.values()) / len(runs)
                 for k in range(len(forgotten))]
        first = next((k + 1 for k, a in enumerate(curve) if a < b - DROP), None)
        finals = [steps[-1]["metrics"]["eval"][c] for steps in runs.values()]
        rows.append({"concept": c, "kind": world.concept_kind(c),
                     "split": "held out" if c in toy_concepts.HELD_OUT else "seen",
                     "nearest": near, "cos": sims[near], "base": b, "curve": curve, "final": curve[-1],
                     **{space: max(a.items(), key=lambda kv: kv[1]) if a else None for space, a in alike.items()},
                     "final_lo": min(finals), "final_hi": max(finals), "first": first,
                     "first_at": forgotten[first - 1] if first else None})
    rows.sort(key=lambda r: r["final"] - r["base"])
    return rows


def spearman(xs, ys):
    rank = lambda v: torch.tensor(v).argsort().argsort().double()
    rx, ry = rank(xs), rank(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm())).item() if len(xs) > 2 else float("nan")


def image_spearman(rows, space):
    """Spearman(image similarity, drop) over the rows that have a forgotten concept of their kind."""
    rs = [r for r in rows if r[space]]
    return f"{spearman([r[space][1] for r in rs], [r['base'] - r['final'] for r in rs]):.2f} ({len(rs)})"


def table(sequence, variant, seeds, rows):
    pct = lambda v: f"{100 * v:.0f}%"
    near = lambda r, space: f"{r[space][0]} ({r[space][1]:.2f})" if r[space] else "-"
    first = lambda r: f"{r['first']} ({r['first_at']})" if r["first"] else "-"
    k = len(rows[0]["curve"])
    lines = [f"## {sequence}: {', '.join(SEQUENCES.get(sequence, []))}", "",
             f"`{variant}`, seeds {', '.join(map(str, seeds))}: accuracy of every retained concept after each "
             f"request (mean over seeds); `first`: the first request at which that mean is more than "
             f"{100 * DROP:.0f} points below base (and the concept forgotten there); the nearest forgotten concept by text embedding, and of its "
             f"kind by the world's images (pixels; classifier features), cosine in brackets.", "",
             "| concept | kind | split | nearest by text | by pixels | by classifier | base | "
             + " | ".join(str(j) for j in range(1, k + 1)) + " | last (seeds' range) | first |",
             "|---|---|---|---|---|---|---|" + "---|" * k + "---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['kind']} | {r['split']} | {r['nearest']} ({r['cos']:.2f}) | "
                     f"{near(r, 'pixels')} | {near(r, 'classifier')} | "
                     f"{pct(r['base'])} | " + " | ".join(f"{100 * a:.0f}" for a in r["curve"])
                     + f" | {pct(r['final'])} ({pct(r['final_lo'])}-{pct(r['final_hi'])}) | {first(r)} |")
    lines.append("")
    groups = [(split, [r for r in rows if r["split"] == split]) for split in ("seen", "held out")]
    groups.append(("styles only", [r for r in rows if r["kind"] == "style"]))
    for name, rs in groups:
        if len(rs) > 2:
            drops = [r["base"] - r["final"] for r in rs]
            lines.append(f"- {name}: {len(rs)} concepts, mean drop {100 * sum(drops) / len(rs):.0f} points, "
                         f"{sum(r['first'] is not None for r in rs)} fall more than {100 * DROP:.0f} points below "
                         f"base; Spearman with the drop: text {spearman([r['cos'] for r in rs], drops):.2f}, "
                         + ", ".join(f"{space} {image_spearman(rs, space)}" for space in SPACES))
    return "\n".join(lines) + "\n"


@torch.no_grad()
def kv_moved(model, state):
    """How far a run's keys and values moved, token by token, on "a painting in the style of S" for
    every style S: ||(W - W_0) c|| / ||W_0 c|| averaged over every attn2 to_k and to_v. -> lines"""
    tensors, _ = checkpoint.read_safetensors(state)
    trained = {k.removeprefix("theta."): v for k, v in tensors.items()}
    named = dict(model.unet.named_parameters())
    names = trainer.trainable_names(model.unet, "kv")
    lines = ["| style | split | " + " | ".join(f"token {i}" for i in range(9)) + " | padding |", "|---|---|" + "---|" * 10]
    for style in world.STYLES:
        ctx = model.text_encoder(model.tokenizer([STYLE_PROMPT.format(style)]))[0]
        moved = torch.stack([(ctx @ (trained.get(n, named[n]) - named[n]).T).norm(dim=-1)
                             / (ctx @ named[n].T).norm(dim=-1) for n in names]).mean(0)
        split = "held out" if style in toy_concepts.HELD_OUT else "-"
        lines.append(f"| {style} | {split} | " + " | ".join(f"{v:.2f}" for v in moved[:9].tolist())
                     + f" | {moved[20:].mean():.2f} |")
    return lines + [""] + through_forgotten_span(model, trained, [s["concept"] for s in ledger(state)])


@torch.no_grad()
def through_forgotten_span(model, trained, gone, energy=0.999):
    """Could the edit have spared the held-out styles without knowing them? Every token of "a painting
    in the style of S", grouped (forgotten, seen, held-out styles): how far the keys and values moved,
    sqrt(sum ||D c||^2 / sum ||W_0 c||^2) over tokens and tensors (D = W - W_0), and the same for the
    part of c inside the span of the forgotten styles' prompts (P c, P the projector on the top
    eigen-directions holding `energy` of their sum c c^T) and for the part outside ((I - P) c); the two
    parts add up to D c, so when they are larger than the whole they cancel. -> lines"""
    named = dict(model.unet.named_parameters())
    deltas = {n: trained[n] - named[n] for n in trainer.trainable_names(model.unet, "kv") if n in trained}
    ctx = lambda styles: model.text_encoder(model.tokenizer([STYLE_PROMPT.format(s) for s in styles])
                                            ).flatten(0, 1)
    c = ctx([g for g in gone if g in world.STYLES])
    values, vectors = torch.linalg.eigh(c.T @ c)
    values, vectors = values.flip(0), vectors.flip(1)
    rank = int((values.cumsum(0) / values.sum() < energy).sum()) + 1
    inside = vectors[:, :rank] @ vectors[:, :rank].T
    lines = [f"Through the forgotten styles' span ({rank} of {c.shape[1]} directions hold {100 * energy:g}% of "
             f"their prompts' energy):", "", "| styles | moved | through the span | through the rest |",
             "|---|---|---|---|"]
    groups = {"forgotten": [g for g in gone if g in world.STYLES],
              "seen": [s for s in world.STYLES if s not in gone and s not in toy_concepts.HELD_OUT],
              "held out": [s for s in world.STYLES if s in toy_concepts.HELD_OUT]}
    for group, styles in groups.items():
        h = ctx(styles)
        size = sum((h @ named[n].T).norm() ** 2 for n in deltas)
        moved = [sum((x @ d.T).norm() ** 2 for d in deltas.values()) / size for x in (h, h @ inside, h - h @ inside)]
        lines.append(f"| {group} ({len(styles)}) | " + " | ".join(f"{m ** 0.5:.2f}" for m in moved) + " |")
    return lines

def image_group(it):
    """Which kind of kept image this is, for --fd."""
    if it.style != world.PHOTO:
        return "held-out style" if it.style in toy_concepts.HELD_OUT else "seen style"
    return "plain, held-out shape or colour" if it.names() & set(toy_concepts.HELD_OUT) else "plain, seen"


@torch.no_grad()
def fd_by_group(model, state, n, folder):
    """Which images carry the quality proxy's rise: on the kept images of the last request's evaluation
    (seed 0; those naming no forgotten concept, as evaluate.quality), each image's squared distance in
    classifier features to the generator's own image of the same prompt and seed, under the base model
    and after the run, summed by kind of image. -> lines"""
    gone = [s["concept"] for s in ledger(state)]
    its = [it for it in evaluate.items(n, gone, 0) if not it.names() & set(gone)]
    ref = dict(zip((it.key for it in its), evaluate.reference_features(its)))
    after = checkpoint.load(rebuild(state, folder))
    drawn = {name: evaluate.draw(m, its, desc=f"--fd: {name}") for name, m in (("base", model), ("after", after))}
    dist = {name: {it.key: float(((np.array(r[it.key]["feat"]) - ref[it.key]) ** 2).sum()) for it in its}
            for name, r in drawn.items()}
    fd = {name: evaluate.frechet_distance([r[it.key]["feat"] for it in its], [ref[it.key] for it in its])
          for name, r in drawn.items()}
    total = sum(dist["after"].values()) - sum(dist["base"].values())
    lines = [f"FD of the {len(its)} kept images: base {fd['base']:.1f}, after {fd['after']:.1f} "
             f"({fd['after'] / fd['base']:.2f}x)", "",
             "| images | count | paired distance, base | after | x base | share of the rise |", "|---|---|---|---|---|---|"]
    for g in ("seen style", "held-out style", "plain, seen", "plain, held-out shape or colour"):
        keys = [it.key for it in its if image_group(it) == g]
        b, a = (sum(dist[name][k] for k in keys) for name in ("base", "after"))
        if keys:
            share = f"{100 * (a - b) / total:.0f}%" if total else "-"
            lines.append(f"| {g} | {len(keys)} | {b / len(keys):.1f} | {a / len(keys):.1f} | {a / b:.2f} | {share} |")
    return lines

def main(argv=None):
    ap = argparse.ArgumentParser(description="Where a variant's erosion comes from, from the benchmark's runs.")
    ap.add_argument("--variant", default="duge")
    ap.add_argument("--docs", default="docs", help="the benchmark's --docs (its benchmark-state folder)")
    ap.add_argument("--eval-n", type=int, default=16, help="the benchmark's --eval-n (for runs without a stored base)")
    ap.add_argument("--out", default=None, help="markdown file (default: DOCS/erosion[-VARIANT].md)")
    ap.add_argument("--kv", metavar="STATE", help="instead: how far one run's keys and values moved, token by token")
    ap.add_argument("--fd", metavar="STATE", help="instead: which kind of image carries one run's rise in FD")
    args = ap.parse_args(argv)
    model = checkpoint.load(checkpoint.TOY_WEIGHTS)
    for state in (args.kv, args.fd):
        if state and not Path(state).exists():
            print(f"error: no such state file {state}; the benchmark writes them in DOCS/benchmark-state",
                  file=sys.stderr)
            return 2
    if args.kv or args.fd:
        print("\n".join(kv_moved(model, args.kv) if args.kv else fd_by_group(model, args.fd, args.eval_n,
                                                                             "out/erosion")))
        return 0
    parts, drawn = [], {}
    for sequence in SEQUENCES:
        runs = ledgers(args.docs, sequence, args.variant)
        runs = {s: steps for s, steps in runs.items() if len(steps) == len(SEQUENCES[sequence])}
        if not runs:
            print(f"{sequence}: no finished run of {args.variant} in {args.docs}/benchmark-state", file=sys.stderr)
            continue
        rows = analyse(model, sequence, runs, args.eval_n, drawn)
        parts.append(table(sequence, args.variant, sorted(runs), rows))
    if not parts:
        print(f"error: no finished run of {args.variant!r}; run experiments.benchmark first", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.docs) / ("erosion.md" if args.variant == "duge"
                                               else f"erosion-{file_name(args.variant)}.md"))
    text = (f"# Where erosion comes from: {args.variant}\n\nWritten by `python -m experiments.erosion --variant "
            f"{args.variant}` from the committed runs of `experiments.benchmark` "
            f"({', '.join(docs_name(s) + '.md' for s in SEQUENCES)}).\n\n" + "\n".join(parts))
    with checkpoint.atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
