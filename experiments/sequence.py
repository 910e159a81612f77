"""Continual unlearning experiments in the toy world: a sequence of requests, with and without
each DUGE term, and what the model remembers after every step.

    python -m experiments.sequence                                   # van gogh -> monet -> picasso -> star
    python -m experiments.sequence --forget "van gogh,munch,seurat" --variants full,no_reg

For each variant (full DUGE; R_pr off; L_pr off; ...) it runs train.py request after request, each
on the previous output, and records after every step: the forget accuracy of every concept in the
ledger (does anything come back?), and the retained accuracy in-domain (concepts of a kind already
hit) and cross-domain, against the base model. Writes docs/sequence.md, docs/sequence.csv and
docs/sequence.png (retained accuracy over the steps).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import checkpoint
import sample
import train

VARIANTS = {
    "full": [],
    "no_reg": ["--lambda-reg", "0"],          # R_pr off: no distillation towards phi_0 on the memory
    "no_pr": ["--lambda-pr", "0"],            # L_pr off: no plain diffusion loss on related concepts
    "no_replay": ["--no-replay"],             # earlier concepts not replayed in L_U
    "l_u_only": ["--lambda-pr", "0", "--lambda-reg", "0"],  # neither: forgetting alone, nothing protected
}


def run_variant(name, concepts, extra, outdir, common):
    weights = str(checkpoint.TOY_WEIGHTS)
    rows = []
    for k, c in enumerate(concepts, 1):
        out = outdir / name / f"step{k}-{train.slug(c)}.safetensors"
        argv = ["--forget", c, "--weights", weights, "--out", str(out), *common, *VARIANTS[name], *extra]
        print(f"[{name}] request {k}: {c}", file=sys.stderr)
        if out.exists():  # done by an earlier run of this command: resume after it
            print(f"  {out} exists: kept", file=sys.stderr)
        elif train.main(argv + ["--resume"]) != 0:
            raise SystemExit(f"{name}: request {k} ({c}) failed")
        ledger = json.loads(checkpoint.load(out).meta["duge.ledger"])
        m = ledger["steps"][-1]["metrics"]
        acc, s = m["eval"], m["summary"]
        rows.append({"variant": name, "step": k, "concept": c,
                     **{f"acc[{g}]": acc[g] for g in concepts[:k]},
                     "forgotten_mean": s["forgotten"], "retained_in_domain": s["retained_in_domain"],
                     "retained_in_domain_base": s["retained_in_domain_base"],
                     "retained_cross_domain": s["retained_cross_domain"],
                     "retained_cross_domain_base": s["retained_cross_domain_base"],
                     "retained": s["retained"], "erosion": s["erosion"], "seconds": m["seconds_train"]})
        weights = str(out)
    return rows


def write_outputs(rows, concepts, docs):
    cols = ["variant", "step", "concept", *[f"acc[{c}]" for c in concepts], "forgotten_mean", "retained_in_domain",
            "retained_in_domain_base", "retained_cross_domain", "retained_cross_domain_base", "retained", "erosion"]
    pct = lambda v: "" if v is None else f"{100 * v:.0f}%"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) if c in ("variant", "step", "concept") else
                                       pct(r.get(c)) for c in cols) + " |")
    with checkpoint.atomic_path(docs / "sequence.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with checkpoint.atomic_path(docs / "sequence.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, docs / "sequence.png")


def plot(rows, path):
    """Retained accuracy (solid) and forget accuracy (dashed) per step, one colour per variant."""
    from PIL import Image, ImageDraw
    W, H, m = 520, 300, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = max(r["step"] for r in rows)
    x = lambda s: m + (W - 2 * m) * s / max(steps, 1)
    y = lambda v: H - m - (H - 2 * m) * v
    d.line([(m, m), (m, H - m), (W - m, H - m)], fill="black")
    for v in (0, 0.5, 1):
        d.text((5, y(v) - 5), f"{int(100 * v)}%", fill="black")
    for s in range(steps + 1):
        d.text((x(s) - 3, H - m + 5), str(s), fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        rs = [r for r in rows if r["variant"] == v]
        first = rs[0]
        base = (first["retained_in_domain_base"] + first["retained_cross_domain_base"]) / 2
        pts = [(x(0), y(base))] + [(x(r["step"]), y(r["retained"])) for r in rs]
        d.line(pts, fill=colours[i % len(colours)], width=3)
        d.line([(x(r["step"]), y(r["forgotten_mean"])) for r in rs], fill=colours[i % len(colours)], width=1)
        d.text((W - m - 150, m + 14 * i), f"{v}: retained (thick), forgotten (thin)", fill=colours[i % len(colours)])
    d.text((m, 10), "accuracy after each request", fill="black")
    sample.save_image(img, path)


def main():
    ap = argparse.ArgumentParser(description="Sequential unlearning in the toy world, with ablations.")
    ap.add_argument("--forget", default="van gogh,monet,picasso,star", help="comma-separated, in order")
    ap.add_argument("--variants", default="full,no_reg,no_pr", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="out/sequence")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--extra", default="", help="extra train.py arguments, e.g. '--steps 100'")
    args = ap.parse_args()
    concepts = [c.strip() for c in args.forget.split(",") if c.strip()]
    rows = []
    for v in args.variants.split(","):
        rows += run_variant(v, concepts, args.extra.split(), Path(args.out), [])
    Path(args.docs).mkdir(exist_ok=True)
    write_outputs(rows, concepts, Path(args.docs))
    print((Path(args.docs) / "sequence.md").read_text())


if __name__ == "__main__":
    main()
