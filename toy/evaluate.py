"""Measuring unlearning in the toy world: what the model still draws, scored by the toy classifier.

    python -m toy.evaluate --weights out/forget-van-gogh.safetensors      # table of every concept

For every concept of the evaluation set (each style, shape and colour of toy/world.py) we draw
images from fixed prompts and seeds and ask the classifier whether the concept is in them:
  - forget accuracy FA: on the concepts in the ledger (UA = 1 - FA; lower FA is better);
  - retained accuracy, in-domain: the other concepts of the same kind as a forgotten one
    (the other styles when a style was forgotten), which erode first;
  - retained accuracy, cross-domain: concepts of the other kinds;
  - erosion: the drop of retained accuracy from the base model.
This follows the paper's protocol (fixed prompts, seeds `seed + index`, a classifier's top-1)
with the toy classifier in place of ResNet-50.
"""
import argparse
import csv
import io
import json
import os
import sys

import torch
from tqdm import tqdm

import checkpoint
import sample
from toy import classifier, world

EVAL_STEPS, EVAL_GUIDANCE = 20, None  # guidance None: the checkpoint's own default


def eval_prompts(concept, n):
    """n fixed prompts naming the concept, cycling through the other attributes, and the
    classifier head that must recognise it."""
    kind = world.concept_kind(concept)
    out = []
    for i in range(n):
        shape = world.SHAPES[i % len(world.SHAPES)]
        colour = world.COLOURS[(i * 3) % len(world.COLOURS)]
        if kind == "style":
            out.append(f"a {colour} {shape} in the style of {concept}")
        elif kind == "object":
            out.append(f"a {colour} {concept}")
        else:
            out.append(f"a {concept} {shape}")
    head = {"style": "style", "object": "shape", "colour": "colour"}[kind]
    return [world._articles(p) for p in out], head


def concepts():
    return world.STYLES + world.SHAPES + world.COLOURS


@torch.no_grad()
def accuracy(model, names=None, n=8, seed=0, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, batch=64, desc="evaluation"):
    """concept -> fraction of its n images in which the classifier finds it."""
    names = names or concepts()
    clf = classifier.load_classifier()
    guidance = model.guidance if guidance is None else guidance
    prompts, heads = [], []
    for c in names:
        p, h = eval_prompts(c, n)
        prompts += p
        heads += [h] * n
    hits = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch"):
        images = sample.generate(model, prompts[i:i + batch], steps=steps, guidance=guidance, seed=seed + i)
        pred = classifier.classify(images * 2 - 1, clf)  # generate gives [0, 1], the classifier [-1, 1]
        hits += [pred[h][j] == names[(i + j) // n] for j, h in enumerate(heads[i:i + batch])]
    return {c: sum(hits[k * n:(k + 1) * n]) / n for k, c in enumerate(names)}


@torch.no_grad()
def combinations(model, seed=0, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, batch=80, styles=None, shapes=None,
                 colours=None):
    """The base model's quality: one image for every style x shape x colour prompt ("photo" is the
    prompt without a style), scored on all three heads. -> (per-head accuracy, per-concept accuracy)."""
    styles = styles or world.STYLE_LABELS
    shapes, colours = shapes or world.SHAPES, colours or world.COLOURS
    combos = [(st, sh, co) for st in styles for sh in shapes for co in colours]
    prompt = lambda st, sh, co: world._articles(f"a {co} {sh}" + ("" if st == world.PHOTO else f" in the style of {st}"))
    clf = classifier.load_classifier()
    guidance = model.guidance if guidance is None else guidance
    right = {"style": [], "shape": [], "colour": []}
    for i in range(0, len(combos), batch):
        part = combos[i:i + batch]
        images = sample.generate(model, [prompt(*c) for c in part], steps=steps, guidance=guidance, seed=seed + i)
        pred = classifier.classify(images * 2 - 1, clf)
        for j, (st, sh, co) in enumerate(part):
            right["style"].append(pred["style"][j] == st)
            right["shape"].append(pred["shape"][j] == sh)
            right["colour"].append(pred["colour"][j] == co)
    per_head = {h: sum(v) / len(v) for h, v in right.items()}
    per_concept = {}
    for h, pos, names in (("style", 0, styles), ("shape", 1, shapes), ("colour", 2, colours)):
        for n in names:
            hits = [right[h][k] for k, c in enumerate(combos) if c[pos] == n]
            per_concept[n] = sum(hits) / len(hits)
    return per_head, per_concept


def summarise(acc, base, forgotten):
    """Group accuracies as in the paper: forgotten, retained in-domain, retained cross-domain."""
    kinds = {world.concept_kind(c) for c in forgotten}
    groups = {"forgotten": [c for c in acc if c in forgotten],
              "retained_in_domain": [c for c in acc if c not in forgotten and world.concept_kind(c) in kinds],
              "retained_cross_domain": [c for c in acc if c not in forgotten and world.concept_kind(c) not in kinds]}
    mean = lambda d, cs: sum(d[c] for c in cs) / len(cs) if cs else float("nan")
    out = {}
    for g, cs in groups.items():
        out[g] = mean(acc, cs)
        out[g + "_base"] = mean(base, cs)
    retained = groups["retained_in_domain"] + groups["retained_cross_domain"]
    out["retained"] = mean(acc, retained)
    out["erosion"] = mean(base, retained) - mean(acc, retained)
    return out


def table(acc_by_model, forgotten=()):
    """Markdown table: one row per concept, one column per model; forgotten concepts marked."""
    cols = list(acc_by_model)
    first = acc_by_model[cols[0]]
    lines = ["| concept | kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for c in first:
        mark = " (forgotten)" if c in forgotten else ""
        lines.append(f"| {c}{mark} | {world.concept_kind(c)} | " +
                     " | ".join(f"{100 * acc_by_model[m][c]:.0f}%" for m in cols) + " |")
    return "\n".join(lines)


def write_csv(acc_by_model, path):
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = list(acc_by_model)
    w.writerow(["concept", "kind"] + cols)
    for c in acc_by_model[cols[0]]:
        w.writerow([c, world.concept_kind(c)] + [f"{acc_by_model[m][c]:.4f}" for m in cols])
    with checkpoint.atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def report(model, phi0, gone, n, md_path, csv_path, base_file):
    """After a request (train.py): accuracy of every concept under phi_0 (cached in base_file) and
    now; writes the markdown and CSV tables, prints the summary. -> {"eval", "summary"}"""
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        with phi0.applied():
            base = accuracy(model, n=n, desc="evaluation: phi_0")
        with checkpoint.atomic_path(base_file) as tmp:
            tmp.write_text(json.dumps(base))
    after = accuracy(model, n=n, desc="evaluation: after")
    summary = summarise(after, base, gone)
    md = table({"base": base, "after": after}, forgotten=gone)
    md += "\n\n" + "\n".join(f"- {k}: {100 * v:.1f}%" for k, v in summary.items())
    with checkpoint.atomic_path(md_path) as tmp:
        tmp.write_text(f"# Forgetting: {', '.join(gone)}\n\n{md}\n")
    write_csv({"base": base, "after": after}, csv_path)
    pct = lambda k: f"{100 * summary[k]:.0f}% (base {100 * summary[k + '_base']:.0f}%)"
    print(f"  forgotten {pct('forgotten')}, retained in-domain {pct('retained_in_domain')}, "
          f"cross-domain {pct('retained_cross_domain')}", file=sys.stderr)
    return {"eval": after, "summary": summary}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score a toy-world model: accuracy per concept.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", default=str(checkpoint.TOY_WEIGHTS))
    ap.add_argument("-n", type=int, default=8, help="images per concept")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image")
    ap.add_argument("--steps", type=int, default=EVAL_STEPS, help="DDIM steps")
    ap.add_argument("--csv", default=None, help="also write the table as CSV")
    ap.add_argument("--combinations", action="store_true",
                    help="score one image of every style x shape x colour prompt on all three heads")
    args = ap.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"-n must be at least 1, got {args.n}")
        sample.timestep_grid(args.steps)  # validates --steps
        if args.csv:
            checkpoint.check_writable(args.csv)
        model = checkpoint.load(args.weights)
    except (checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.combinations:
        per_head, per_concept = combinations(model, seed=args.seed, steps=args.steps)
        print("| head | accuracy |\n|---|---|\n" + "\n".join(f"| {h} | {100 * a:.1f}% |" for h, a in per_head.items()))
        print("\n| concept | head | accuracy |\n|---|---|---|")
        for c, a in per_concept.items():
            head = "style" if c in world.STYLE_LABELS else "shape" if c in world.SHAPES else "colour"
            print(f"| {c} | {head} | {100 * a:.0f}% |")
        print(f"\nlowest concept: {min(per_concept, key=per_concept.get)} {100 * min(per_concept.values()):.0f}%")
        return 0
    acc = accuracy(model, n=args.n, seed=args.seed, steps=args.steps)
    print(table({os.path.basename(args.weights): acc}))
    for kind in ("style", "object", "colour"):
        cs = [c for c in acc if world.concept_kind(c) == kind]
        print(f"mean {kind}: {100 * sum(acc[c] for c in cs) / len(cs):.1f}%  min: "
              f"{100 * min(acc[c] for c in cs):.0f}%")
    if args.csv:
        write_csv({os.path.basename(args.weights): acc}, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
