"""The continual-unlearning benchmark in the toy world: requests one after another, for DUGE, its
ablations and the baselines, and what each model still knows after every step.

    python -m experiments.benchmark                                     # 12 styles; DUGE and the baselines
    python -m experiments.benchmark --methods duge,duge-no-reg,duge-no-pr,duge-no-replay,duge+gp
    python -m experiments.benchmark --methods duge,duge+related-prior,duge-paper,duge+phin,duge+uncond,duge+maps,duge-related-no-replay,duge+l2 --docs docs/recipes
    python -m experiments.benchmark --sequence mixed --out out/bench-mixed --docs out/bench-mixed

CUIG's protocol (Lee et al., ICLR 2026): 12 requests of one kind (12 of the 20 styles; in-domain =
the 8 styles left, cross-domain = the shapes and colours), and a mixed sequence. Each request
starts from the previous output (train.py), so every method is applied sequentially as its own code
would be. After every step: the forget accuracy of every concept forgotten so far (does anything
come back?), retained in-domain and cross-domain means with 95% intervals and their worst concept,
and the quality proxy (toy/evaluate.py). Resumable per method and step: a finished step's model
is kept and read back. Writes DOCS/benchmark.md, DOCS/benchmark.csv and DOCS/benchmark.png.
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

import checkpoint
import request
import sample
import train

# Every named variant: a method and its train.py flags, and what it tests (`--list` prints this table).
# The baselines' strengths were chosen once, on the first request alone, as the mildest setting that
# forgets it to <= 10% (--calibrate; docs/results.md).
ROBUST = ["--trainable", "attn2", "--adversarial", "5"]   # the robust variant's attack, on every attn2 tensor
VARIANTS = {
    "duge": ([], "DUGE, defaults"),
    "duge-no-reg": (["--lambda-reg", "0"], "ablation: R_pr off, no distillation towards phi_0 on the memory"),
    "duge-no-pr": (["--lambda-pr", "0"], "ablation: L_pr off, no diffusion loss on the memory bank"),
    "duge-no-replay": (["--no-replay"], "ablation: earlier concepts not replayed in L_U"),
    "duge+gp": (["--gp"], "DUGE with CUIG's gradient projection"),
    "duge-paper": (["--recipe", "paper"], "DUGE as the paper is described (duge.RECIPES)"),
    "duge-paper-cal": (["--recipe", "paper"], "the same, its strength chosen as the baselines' (--calibrate)"),
    # each of the paper's departures alone on our first reconstruction (L_pr on the related concepts' images,
    # the default when they were measured; the fifth, L_pr on the memory bank, is the default now)
    "duge+related-prior": (["--prior", "related"], "our first reconstruction: L_pr on the related concepts"),
    "duge+phin": (["--prior", "related", "--reference", "phin"], "... with phi_n as the frozen reference"),
    "duge+uncond": (["--prior", "related", "--target", "uncond"], "... with the empty prompt as L_U's target"),
    "duge+maps": (["--prior", "related", "--attention", "maps"], "... with L_U on the attention maps"),
    "duge+l2": (["--prior", "related", "--regulariser", "l2"], "... with R_pr a parameter pull"),
    "duge-related-no-replay": (["--prior", "related", "--no-replay"], "... without replay"),
    # the robust variant (adversarial.py): trained sets and weights tried (docs/probes_and_robust.md)
    "duge+robust": (["--trainable", "unet", "--adversarial", "5"], "robust: the whole UNet against the attack"),
    "duge+robust-lr3e-4": (["--trainable", "unet", "--adversarial", "5", "--lr", "3e-4"], "... at lr 3e-4"),
    "duge+robust-lr-rest": (["--trainable", "unet", "--adversarial", "5", "--lr-rest", "1e-4"],
                            "... the tensors outside keys and values at lr 1e-4"),
    "duge+robust-attn2": (ROBUST, "robust: every attn2 tensor against the attack"),
    "duge+robust-attn2-adv3": (ROBUST + ["--lambda-adv", "3"], "... L_adv weighted 3"),
    "duge+robust-attn2-adv3-reg3": (ROBUST + ["--lambda-adv", "3", "--lambda-reg", "3"], "... and R_pr 3"),
    "duge+robust-attn2-adv5-reg3": (ROBUST + ["--lambda-adv", "5", "--lambda-reg", "3"], "... L_adv 5, R_pr 3"),
    "duge+robust-attn2-adv5-reg5": (ROBUST + ["--lambda-adv", "5", "--lambda-reg", "5"], "... L_adv 5, R_pr 5"),
    "duge+robust-attn2-adv5-reg5-comp": (ROBUST + ["--lambda-adv", "5", "--lambda-reg", "5", "--completion", "1"],
                                         "... and the completion term"),
    "duge+robust-attn2-adv5-reg3-s100": (ROBUST + ["--lambda-adv", "5", "--lambda-reg", "3", "--steps", "100"],
                                         "... L_adv 5, R_pr 3 at 100 steps"),
    "duge+robust-attn2-adv5-reg5-s100": (ROBUST + ["--lambda-adv", "5", "--lambda-reg", "5", "--steps", "100"],
                                         "... L_adv 5, R_pr 5 at 100 steps"),
    "esd": (["--method", "esd"], "ESD-x (baselines.py)"),
    "ca": (["--method", "ca"], "Concept Ablation"),
    "uce": (["--method", "uce"], "UCE"),
    "finetune": (["--method", "finetune"], "plain fine-tuning"),
    "finetune+gp": (["--method", "finetune", "--gp"], "fine-tuning with CUIG's gradient projection"),
}
SEQUENCES = {
    "styles": ["van gogh", "monet", "picasso", "mondrian", "hokusai", "pollock", "klimt", "kandinsky", "rothko",
               "escher", "turner", "kusama"],   # kept: munch, seurat, warhol, matisse, cezanne, rembrandt,
                                                # malevich, lichtenstein (each the close pair of one forgotten)
    "mixed": ["van gogh", "star", "red", "monet", "circle", "blue", "picasso", "heart", "green", "mondrian",
              "square", "yellow"],
}


# Strengths tried by --calibrate, mildest first: training steps at the shared lr (1e-3) for the trained
# baselines; for UCE, the weight of the preserved concepts (more weight: a milder edit).
STEPS = ("5", "10", "25", "50", "100", "200", "400")
STRENGTHS = {"esd": [["--steps", s] for s in STEPS], "ca": [["--steps", s] for s in STEPS],
             "finetune": [["--steps", s] for s in STEPS],
             "uce": [["--uce-preserve", w] for w in ("100", "30", "10", "3", "1", "0.3", "0.1")],
             # the paper's recipe gives no weights: L_U's share of the loss, raised by lowering the two others
             "duge-paper-cal": [["--lambda-pr", w, "--lambda-reg", w] for w in ("0.5", "0.1", "0.02", "0")]}


def forget_accuracy(weights, concept, n):
    """How often the concept is still recognised: its own n evaluation images only."""
    from toy import evaluate
    its = [it for it in evaluate.items(n, [concept]) if evaluate.counts_for(it, concept, [concept])]
    h, k = evaluate.score(its, evaluate.draw(checkpoint.load(weights), its), [concept], [concept])[concept]
    return h / k


def calibrate(methods, concept, outdir, n, extra):
    """For each baseline, the mildest strength that forgets the first request's concept to <= 10%,
    on that request alone. -> {method: flags}, also written to OUT/calibration.json."""
    path, lines = outdir / "calibration.json", []
    chosen = json.loads(path.read_text()) if path.exists() else {}   # other methods' choices stay
    for m in [m for m in methods if m in STRENGTHS]:
        for flags in STRENGTHS[m]:
            out = outdir / "calibrate" / m / f"{'-'.join(flags).strip('-')}.safetensors"
            if not out.exists() and train.main(["--forget", concept, "--out", str(out), *VARIANTS[m][0], *flags,
                                               "--no-eval", "--no-grid", *extra]) != 0:
                raise SystemExit(f"calibration of {m} with {' '.join(flags)} failed")
            acc = forget_accuracy(out, concept, n)
            lines.append(f"| {m} | `{' '.join(flags)}` | {100 * acc:.0f}% |")
            print(f"  {m} {' '.join(flags)}: {concept} recognised {100 * acc:.0f}%", file=sys.stderr)
            if acc <= 0.10:
                chosen[m] = flags
                break
        else:
            chosen[m] = flags  # none reached 10%: the strongest, and the table says so
    with checkpoint.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(chosen, indent=1))
    return chosen, ["| method | setting | " + concept + " recognised |", "|---|---|---|"] + lines


def run_variant(name, concepts, outdir, extra, bar):
    """The requests of one variant, each on the previous output; -> one row per step."""
    weights, rows = str(checkpoint.TOY_WEIGHTS), []
    for k, c in enumerate(concepts, 1):
        out = outdir / name / f"step{k:02d}-{request.slug(c)}.safetensors"
        bar.set_description(f"{name}: {k} {c}")
        t = time.time()
        if not out.exists():  # a finished step is kept: rerunning the command resumes after it
            argv = ["--forget", c, "--weights", weights, "--out", str(out), *VARIANTS[name][0], *extra, "--resume"]
            if train.main(argv) != 0:
                raise SystemExit(f"{name}: request {k} ({c}) failed; rerun the same command to resume")
        m = json.loads(checkpoint.load(out).meta["duge.ledger"])["steps"][-1]["metrics"]
        s = m["summary"]
        rows.append({"variant": name, "step": k, "concept": c, **{f"acc[{g}]": m["eval"][g] for g in concepts[:k]},
                     "forgotten_max": max(m["eval"][g] for g in concepts[:k]),
                     **{key: s.get(key) for key in COLUMNS[4:] if key in s},
                     **{f"{key}_{end}": s[key + "_ci"][i] for key in INTERVALS if key + "_ci" in s
                        for i, end in enumerate(("lo", "hi"))},
                     "seconds": round(sum(m.get("seconds", {}).values()), 1) or round(time.time() - t, 1)})
        weights = str(out)
        bar.update()
    return rows


COLUMNS = ["variant", "step", "concept", "forgotten_max", "retained_in_domain", "retained_in_domain_base",
           "retained_in_domain_worst", "retained_in_domain_worst_acc", "retained_cross_domain",
           "retained_cross_domain_base", "retained_cross_domain_worst", "retained_cross_domain_worst_acc",
           "quality_fd", "quality_fd_base", "seconds"]
INTERVALS = ["retained_in_domain", "retained_in_domain_worst", "retained_cross_domain", "retained_cross_domain_worst"]


def pct(v):
    return "" if v is None else f"{100 * v:.0f}%" if isinstance(v, float) else str(v)


def ci(r, key):
    """' [lo, hi]': the 95% Wilson interval of a retained mean or worst concept, in points."""
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    return "" if lo is None or hi is None else f" [{100 * lo:.0f}, {100 * hi:.0f}]"


def retained(r, group):
    """The cells of one group: the mean [interval] (base) and the worst concept's accuracy [interval]."""
    return (f"{pct(r[group])}{ci(r, group)} ({pct(r[group + '_base'])})",
            f"{r[group + '_worst']} {pct(r[group + '_worst_acc'])}{ci(r, group + '_worst')}")


def write_outputs(rows, concepts, docs, calibration=()):
    """The final step of every variant (and its worst step), every step in the CSV, and the figure."""
    last = {}
    for r in rows:
        last[r["variant"]] = r
    worst_forget = {v: max(r["forgotten_max"] for r in rows if r["variant"] == v) for v in last}
    minutes = {v: sum(r["seconds"] or 0 for r in rows if r["variant"] == v) / 60 for v in last}
    lines = ["| variant | steps | forgotten, worst at any step | retained in-domain [95%] (base) "
             "| worst in-domain [95%] | retained cross-domain [95%] (base) | worst cross-domain [95%] "
             "| quality FD (base) | minutes |", "|" + "---|" * 9]
    for v, r in last.items():
        cells = [v, r["step"], pct(worst_forget[v]), *retained(r, "retained_in_domain"),
                 *retained(r, "retained_cross_domain"), f"{r['quality_fd']:.1f} ({r['quality_fd_base']:.1f})",
                 f"{minutes[v]:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    steps = ["", "| variant | step | concept | forgotten (worst) | in-domain [95%] (base) | worst in-domain [95%] "
             "| cross-domain [95%] (base) | worst cross-domain [95%] | FD | seconds |", "|" + "---|" * 10]
    for r in rows:
        cells = [r["variant"], r["step"], r["concept"], pct(r["forgotten_max"]), *retained(r, "retained_in_domain"),
                 *retained(r, "retained_cross_domain"), f"{r['quality_fd']:.1f}", r["seconds"]]
        steps.append("| " + " | ".join(map(str, cells)) + " |")
    if calibration:
        lines += ["", "Each baseline's strength, chosen on the first request alone (the mildest that forgets it "
                      "to <= 10%):", "", *calibration]
    text = (f"# Continual benchmark: {', '.join(concepts)}\n\n" + "\n".join(lines) +
            "\n\n<details><summary>every step</summary>\n" + "\n".join(steps) + "\n\n</details>\n")
    with checkpoint.atomic_path(docs / "benchmark.md") as tmp:
        tmp.write_text(text)
    cols = (COLUMNS[:3] + [f"acc[{c}]" for c in concepts] + COLUMNS[3:]
            + [f"{key}_{end}" for key in INTERVALS for end in ("lo", "hi")])
    with checkpoint.atomic_path(docs / "benchmark.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, docs / "benchmark.png")
    return text


PANELS = [("forgotten_max", "forgotten (worst concept so far)"), ("retained_in_domain", "retained in-domain"),
          ("retained_cross_domain", "retained cross-domain"), ("quality_fd", "quality: Frechet distance")]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def plot(rows, path):
    """Four panels over the requests, one line per variant (as CUIG's figures): forgotten, retained
    in-domain, retained cross-domain (0-100%), and the quality proxy (lower is better; dotted: base)."""
    from PIL import Image, ImageDraw
    pw, ph, m = 330, 240, 38
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    legend = 16 * ((len(variants) + 2) // 3) + 8
    img = Image.new("RGB", (4 * pw, ph + legend), "white")
    d = ImageDraw.Draw(img)
    steps = max(r["step"] for r in rows)
    top_fd = max(max(r["quality_fd"], r["quality_fd_base"]) for r in rows) * 1.1 or 1
    for i, (key, title) in enumerate(PANELS):
        x0 = i * pw
        x = lambda s: x0 + m + (pw - m - 10) * s / max(steps, 1)
        scale = top_fd if key == "quality_fd" else 1.0
        y = lambda v: ph - m - (ph - 2 * m) * v / scale
        d.text((x0 + m, 8), title, fill="black")
        d.line([(x0 + m, m), (x0 + m, ph - m), (x0 + pw - 10, ph - m)], fill="black")
        for v in (0, 0.5, 1):
            d.text((x0 + 4, y(v * scale) - 5), f"{v * scale:.0f}" if key == "quality_fd" else f"{int(100 * v)}%",
                   fill="black")
        for s in range(0, steps + 1, max(1, steps // 6)):
            d.text((x(s) - 3, ph - m + 5), str(s), fill="black")
        d.text((x0 + pw // 2 - 20, ph - 16), "request", fill="black")
        for j, v in enumerate(variants):
            rs = [r for r in rows if r["variant"] == v]
            colour = COLOURS[j % len(COLOURS)]
            start = {"forgotten_max": None, "quality_fd": rs[0]["quality_fd_base"]}.get(key, rs[0].get(key + "_base"))
            pts = ([(x(0), y(start))] if start is not None else []) + [(x(r["step"]), y(r[key])) for r in rs]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        if key == "quality_fd":
            yb = y(rows[0]["quality_fd_base"])
            for xs in range(int(x(0)), int(x(steps)), 6):
                d.point((xs, yb), fill="black")
    for j, v in enumerate(variants):
        d.text((m + (j % 3) * 300, ph + 4 + 16 * (j // 3)), f"-- {v}", fill=COLOURS[j % len(COLOURS)])
    sample.save_image(img, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="The continual-unlearning benchmark in the toy world.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default="duge,esd,ca,uce,finetune", help="comma-separated variants (--list)")
    ap.add_argument("--list", action="store_true", help="print every named variant, its flags and what it tests")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an ad-hoc variant, e.g. --variant \"reg3=--lambda-reg 3\" (then use it in --methods)")
    ap.add_argument("--sequence", default="styles",
                    help=f"{' or '.join(SEQUENCES)}, or comma-separated concepts in order")
    ap.add_argument("--eval-n", type=int, default=32, help="images per style in each evaluation")
    ap.add_argument("--out", default="out/benchmark", help="folder of the models of every step")
    ap.add_argument("--docs", default="docs", help="where benchmark.md / .csv / .png go")
    ap.add_argument("--extra", default="", help="extra train.py arguments for every request, e.g. '--steps 50'")
    ap.add_argument("--calibrate", action="store_true",
                    help="first choose each baseline's strength on the first request alone (the mildest that "
                         "forgets it to <= 10%%); later runs read it from OUT/calibration.json")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{name:36} {' '.join(flags) or '(defaults)':60} {why}" for name, (flags, why) in VARIANTS.items()))
        return 0
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name.strip() or not flags.strip():
            print(f"error: --variant {spec!r}: write NAME=FLAGS, e.g. \"reg3=--lambda-reg 3\"", file=sys.stderr)
            return 2
        VARIANTS[name.strip()] = (flags.split(), "ad hoc")
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    concepts = SEQUENCES.get(args.sequence) or [c.strip().lower() for c in args.sequence.split(",") if c.strip()]
    if unknown or not variants:
        print(f"error: unknown variant {', '.join(unknown) or '(none)'}; --list shows them, --variant adds one",
              file=sys.stderr)
        return 2
    if args.eval_n < 1:
        print(f"error: --eval-n {args.eval_n}: must be positive", file=sys.stderr)
        return 2
    extra = ["--eval-n", str(args.eval_n), "--no-grid", *args.extra.split()]
    out, table = Path(args.out), []
    if args.calibrate:
        chosen, table = calibrate(variants, concepts[0], out, args.eval_n, args.extra.split())
        print("\n".join(table))
    saved = out / "calibration.json"
    for m, flags in (json.loads(saved.read_text()) if saved.exists() else {}).items():
        VARIANTS[m] = (VARIANTS[m][0] + flags, VARIANTS[m][1])
    rows = []
    with tqdm(total=len(variants) * len(concepts), desc="benchmark", unit="request") as bar:
        for v in variants:
            rows += run_variant(v, concepts, out, extra, bar)
    Path(args.docs).mkdir(parents=True, exist_ok=True)
    print(write_outputs(rows, concepts, Path(args.docs), table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
