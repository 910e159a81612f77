"""Is it really gone, for every method? probe.py's attacks on the continual benchmark's models.

    python -m experiments.probes                                  # after request 1 (van gogh): DUGE, the baselines
    python -m experiments.probes --step 12 --concepts "van gogh"  # the first concept, after all 12 requests
    python -m experiments.probes --methods duge,duge-no-replay --docs out/probes-ablation

For each method, the model the benchmark wrote after request --step (OUT/<sequence>/<method>/seed0/stepNN-*;
run `python -m experiments.benchmark` first) is probed on the given forgotten concepts, and the base
model beside it (the attack's ceiling: it must recover the concept there, or the probe measures
nothing; computed once, it is the same original under every method). Each method's results are kept
in OUT/probes/ and read back on a rerun. Writes DOCS/probes.md, probes.json and probes.png.
"""
import argparse
import json
import sys
from pathlib import Path

import checkpoint
import probe
import request
from toy.concepts import for_model
from experiments.benchmark import COLOURS, SEQUENCES, concepts_of, file_name


def model_path(out, method, step, sequence="styles", seed=0):
    """The benchmark's model of a variant after request `step` (its folder: benchmark.run's)."""
    folder = Path(out) / request.slug(sequence) / file_name(method) / f"seed{seed}"
    found = sorted(folder.glob(f"step{step:02d}-*.safetensors"))
    found = [p for p in found if not p.name.endswith((".delta.safetensors", ".resume.safetensors"))]
    if not found:
        raise request.UserError(f"no model of {method} after request {step} in {folder}; run "
                                f"`python -m experiments.benchmark --methods {method} --sequence {sequence}` first")
    return found[0]


def probe_method(method, path, concepts, probes, cfg, recognised, base_results, keep):
    """One method's probes, kept in `keep` (JSON) so a rerun reads them back and runs only the probes
    missing there."""
    done = json.loads(keep.read_text()) if keep.exists() else {}
    todo = [p for p in probes if any(p not in done.get(c, {}) for c in concepts)]
    if not todo:
        return done
    model = checkpoint.load(path)
    missing = [c for c in concepts if c not in checkpoint.forgotten(model)]
    if missing:
        raise request.UserError(f"{path} has not forgotten {', '.join(missing)} (its ledger: "
                              f"{', '.join(checkpoint.forgotten(model))})")
    phi0 = request.load_phi0(model)
    results = probe.run(model, phi0.applied, for_model(model), concepts, todo, cfg, recognised,
                        base_results, forgotten=checkpoint.forgotten(model))
    results = {c: {**done.get(c, {}), **results[c]} for c in concepts}
    with checkpoint.atomic_path(keep) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    return results


def table(by_method, concepts, probes):
    """One row per concept and probe: every method's recognition, and the base model's."""
    methods = list(by_method)
    lines = ["| concept | probe | " + " | ".join(methods) + " | base model (ceiling) |", "|" + "---|" * (len(methods) + 3)]
    for c in concepts:
        for p in probes:
            first = by_method[methods[0]][c][p]
            lines.append(f"| {c} | {p} | " + " | ".join(f"{100 * by_method[m][c][p]['model']:.0f}%" for m in methods)
                         + f" | {100 * first['base']:.0f}% |")
    return "\n".join(lines)


def plot(by_method, concepts, probes, path):
    """Grouped bars: for each probe, how often the concept is recognised under each method (mean over
    the concepts), and under the base model (grey)."""
    from PIL import Image, ImageDraw

    import sample
    names = list(by_method) + ["base"]
    value = lambda m, p: sum((by_method[names[0]] if m == "base" else by_method[m])[c][p]["base" if m == "base" else
                                                                                      "model"] for c in concepts) / len(concepts)
    gw, bw, h, m = 20 + 12 * len(names), 12, 260, 40
    img = Image.new("RGB", (m + gw * len(probes) + 20, h + 24 + 16 * ((len(names) + 3) // 4)), "white")
    d = ImageDraw.Draw(img)
    y = lambda v: h - m + 10 - (h - m - 10) * v
    d.text((m, 4), f"recognised under each probe: {', '.join(concepts)}", fill="black")
    d.line([(m, 20), (m, y(0)), (img.width - 10, y(0))], fill="black")
    for v in (0, 0.5, 1):
        d.text((4, y(v) - 5), f"{int(100 * v)}%", fill="black")
    for i, p in enumerate(probes):
        x0 = m + i * gw + 10
        for j, name in enumerate(names):
            colour = "#999999" if name == "base" else COLOURS[j % len(COLOURS)]
            d.rectangle([x0 + j * bw, y(value(name, p)), x0 + (j + 1) * bw - 2, y(0)], fill=colour)
        d.text((x0, y(0) + 6), p, fill="black")
    for j, name in enumerate(names):
        d.text((m + (j % 4) * 180, h + 16 + 16 * (j // 4)), f"## {name}",
               fill="#999999" if name == "base" else COLOURS[j % len(COLOURS)])
    sample.save_image(img, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Probe the continual benchmark's models: does a forgotten concept "
                                             "come back?", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default="duge,esd,ca,uce,finetune", help="benchmark variants to probe")
    ap.add_argument("--step", type=int, default=1, help="the request after which each model is probed")
    ap.add_argument("--concepts", default=None, help="comma-separated forgotten concepts (None: the sequence's "
                                                     "first)")
    ap.add_argument("--sequence", default="styles", help="the benchmark's sequence (for the default concept)")
    ap.add_argument("--probes", default=",".join(probe.PROBES), help=f"any of {', '.join(probe.PROBES)}")
    ap.add_argument("-n", type=int, default=probe.ProbeConfig.n, help="images per probe")
    ap.add_argument("--out", default="out/benchmark", help="the benchmark's folder of models")
    ap.add_argument("--docs", default="docs/probes", help="where probes.md / .json / .png go")
    args = ap.parse_args(argv)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        probes = [p.strip() for p in args.probes.split(",") if p.strip()]
        bad = [p for p in probes if p not in probe.PROBES]
        if bad or not probes or not methods:
            raise request.UserError(f"unknown probe {', '.join(bad) or '(none)'}: choose from {', '.join(probe.PROBES)}")
        if args.n < 1 or args.step < 1:
            raise request.UserError(f"-n {args.n} / --step {args.step}: must be positive")
        sequence = concepts_of(args.sequence)
        concepts = [c.strip().lower() for c in args.concepts.split(",") if c.strip()] if args.concepts else sequence[:1]
        if not sequence or not concepts:
            raise request.UserError(f"--sequence {args.sequence!r} / --concepts {args.concepts!r}: name a sequence "
                                    f"({', '.join(SEQUENCES)}) or comma-separated concepts")
        paths = {m: model_path(args.out, m, args.step, args.sequence) for m in methods}   # every model found before any work
        cfg, recognised = probe.ProbeConfig(n=args.n), probe.toy_scorer()
        keep = Path(args.out) / "probes"
        base_file = keep / f"base-n{args.n}.json"
        base_results = json.loads(base_file.read_text()) if base_file.exists() else {}
        by_method = {}
        for m in methods:
            tag = f"{m}-step{args.step:02d}-n{args.n}-{'-'.join(request.slug(c) for c in concepts)}"
            by_method[m] = probe_method(m, paths[m], concepts, probes, cfg, recognised, base_results,
                                        keep / f"{tag}.json")
            with checkpoint.atomic_path(base_file) as tmp:
                tmp.write_text(json.dumps(base_results, indent=1))
    except (request.UserError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    docs = Path(args.docs)
    text = (f"# Probes after request {args.step}: {', '.join(concepts)}\n\n"
            f"`python -m experiments.probes {' '.join(argv if argv is not None else sys.argv[1:])}`, {args.n} images "
            f"per probe, scored by the toy classifier.\n\n{table(by_method, concepts, probes)}\n")
    with checkpoint.atomic_path(docs / "probes.md") as tmp:
        tmp.write_text(text)
    with checkpoint.atomic_path(docs / "probes.json") as tmp:
        tmp.write_text(json.dumps(by_method, indent=1))
    plot(by_method, concepts, probes, docs / "probes.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
