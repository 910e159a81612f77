"""The continual-unlearning benchmark in the toy world: requests one after another, for DUGE and the
baselines (plain, and given what DUGE has), at matched forgetting, over seeds.

    python -m experiments.benchmark --all                              # every run below; resumable
    python -m experiments.benchmark --methods duge --seeds 3           # one sequence (styles), DUGE at 3 seeds
    python -m experiments.benchmark --sequence mixed --methods duge,esd+
    python -m experiments.benchmark --noise-floor                      # two draws of the same model differ by?
    python -m experiments.benchmark --ablations                        # DUGE's ablations and fixes (docs/ablations)
    python -m experiments.benchmark --ablations --tables               # their tables from finished runs only
    python -m experiments.benchmark --list                             # every named variant

The protocol (CUIG's, Lee et al., ICLR 2026, with the toy classifier): 12 requests of one kind, each
on the previous output (train.py), and a mixed sequence. Three rules make methods comparable:
  - matched forgetting: at every request every method gets the mildest strength that brings the
    request's concept to <= 10% (train.py --match-forgetting: steps on a ladder checked on 16 images
    no evaluation draws; UCE: its mildest preserve weight); the table gives the steps, image-gradients
    and minutes each took. Variants with a fixed `--steps` (the `@60` rows: DUGE's budget) skip it.
  - held-out retention: toy/concepts.HELD_OUT (3 styles, 3 shapes, 2 colours) never reaches any
    method (memory, related set, generic captions, UCE's preserve set, the gradient projection), so
    "retained, held out" is erosion on concepts no method saw; "retained, seen" is the rest.
  - baselines equipped: each also runs (name+) with phi_0 as its reference and image source, replay
    of the ledger's concepts, and CUIG's gradient projection (UCE: re-solved from phi_0 over every
    concept so far, its own multi-concept form).
After every request: each forgotten concept's accuracy, the retained groups' means with 95% Wilson
intervals and their worst concept, and the quality proxy (toy/evaluate.py); over seeds, the mean and
the range. Resumable per variant, seed and request: each finished request's trained tensors and ledger
go to DOCS/benchmark-state/ (small; commit them) and the model is rebuilt from them in a new checkout.
Writes DOCS/benchmark[-SEQUENCE].md, .csv and .png.
"""
import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

import checkpoint
import request
import sample
import train
import trainer

EQUIP = ["--reference", "phi0", "--replay", "--gp"]     # what DUGE has, given to a baseline
ROBUST = ["--trainable", "attn2", "--adversarial", "5"]   # the robust variant's attack, on every attn2 tensor
# Every named variant: a method and its train.py flags, and what it tests (`--list` prints this table).
VARIANTS = {
    "duge": ([], "DUGE, defaults"),
    "duge@60": (["--steps", "60"], "DUGE at its default budget, no matching"),
    "duge-no-reg": (["--lambda-reg", "0"], "ablation: R_pr off, no distillation towards phi_0 on the memory"),
    "duge-no-pr": (["--lambda-pr", "0"], "ablation: L_pr off, no diffusion loss on the memory bank"),
    "duge-no-replay": (["--no-replay"], "ablation: earlier concepts not replayed in L_U"),
    "duge-lu-only": (["--lambda-pr", "0", "--lambda-reg", "0"], "ablation: L_U alone, no memory at all"),
    "duge+gp": (["--gp"], "DUGE with CUIG's gradient projection"),
    "duge+gamma": (["--gamma", "1e-3"], "DUGE with CUIG's L2 pull to phi_0 (gamma 1e-3: ~L_U's size at one request)"),
    "duge+gamma3e-4": (["--gamma", "3e-4"], "... gamma 3e-4, a weaker pull (1e-3 stops forgetting shapes and colours)"),
    "duge+gamma-start": (["--gamma", "1e-3", "--gamma-to", "start"], "... gamma 1e-3 towards each request's start "
                                                                       "(no pull back on earlier forgetting)"),
    "duge+kv": (["--lambda-kv", "1"], "DUGE with R_kv: keys/values of every kept token held at phi_0's"),
    "duge+kv10": (["--lambda-kv", "10"], "... R_kv weighted 10"),
    "duge+shrink0": (["--shrink", "phi0"], "DUGE, the whole change shrunk towards phi_0 while every forgotten concept "
                                           "stays <= 10% on the check (to the check's edge)"),
    "duge+shrink": (["--shrink", "start", "--shrink-target", "0"], "DUGE, each request's change shrunk towards its "
                                                                   "start while no check image is recognised"),
    "duge+shrink0-strict": (["--shrink", "phi0", "--shrink-target", "0"], "... the whole change towards phi_0, no "
                                                                          "image of any forgotten concept recognised"),
    "duge+kv+shrink0-strict": (["--lambda-kv", "1", "--shrink", "phi0", "--shrink-target", "0"],
                               "R_kv 1 and the strict shrink towards phi_0"),
    "duge-lr3e-4": (["--lr", "3e-4"], "DUGE at a third of the learning rate (AdamW moves every entry ~lr a step)"),
    "duge-paper": (["--recipe", "paper"], "DUGE as the paper is described (duge.RECIPES)"),
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
    "esd": (["--method", "esd"], "ESD-x as its paper: the concept's name, phi_n, no replay"),
    "esd+": (["--method", "esd", *EQUIP], "ESD-x given phi_0, replay and gradient projection"),
    "esd-captions": (["--method", "esd", "--esd-prompt", "captions"], "ESD-x on whole captions (our old departure)"),
    "esd@60": (["--method", "esd", "--steps", "60"], "ESD-x at DUGE's budget, no matching"),
    "ca": (["--method", "ca"], "Concept Ablation (model-based), phi_n, no replay"),
    "ca+": (["--method", "ca", *EQUIP], "CA given phi_0, replay and gradient projection"),
    "ca@60": (["--method", "ca", "--steps", "60"], "CA at DUGE's budget, no matching"),
    "uce": (["--method", "uce"], "UCE, each request from the previous model"),
    "uce+": (["--method", "uce", "--reference", "phi0", "--replay"],
             "UCE re-solved from phi_0 over every concept so far (its multi-concept form)"),
    "finetune": (["--method", "finetune"], "plain fine-tuning on the anchor's images"),
    "finetune+": (["--method", "finetune", *EQUIP], "fine-tuning given phi_0, replay and gradient projection"),
    "finetune@60": (["--method", "finetune", "--steps", "60"], "fine-tuning at DUGE's budget, no matching"),
    "finetune+gp": (["--method", "finetune", "--gp"], "fine-tuning with CUIG's gradient projection alone"),
}
SEQUENCES = {
    "styles": ["van gogh", "monet", "picasso", "mondrian", "hokusai", "pollock", "klimt", "kandinsky", "rothko",
               "escher", "turner", "kusama"],   # kept: seurat, warhol, matisse, cezanne, lichtenstein (seen)
                                                # and munch, malevich, rembrandt (held out)
    "styles-b": ["seurat", "warhol", "matisse", "cezanne", "lichtenstein", "van gogh", "klimt", "pollock", "escher",
                 "turner", "kandinsky", "hokusai"],   # kept: monet, picasso, mondrian, rothko, kusama (seen)
    "mixed": ["van gogh", "star", "red", "monet", "circle", "blue", "picasso", "heart", "green", "mondrian",
              "square", "yellow"],
}
MATCH = "0.1"   # matched forgetting's target: the request's concept recognised on <= 10% of its check images
# --all: the run set, cheapest first so that a cut session leaves whole rows
ALL = [(seq, v, s) for seq in SEQUENCES
       for v, s in [(v, 0) for v in ("duge", "esd", "esd+", "ca", "ca+", "uce", "uce+", "finetune", "finetune+")]
       + [("duge", 1), ("duge", 2)]] + \
      [("styles", v, 0) for v in ("duge@60", "esd@60", "ca@60", "finetune@60")]   # DUGE's old fixed budget

# --ablations (into docs/ablations): issue 29's decomposition of DUGE's erosion and every change tried
# to remove it; DUGE, R_kv and gamma at 3 seeds, the rest at seed 0, the shrink variants on styles only
ABLATIONS = [(seq, v, s) for seq in SEQUENCES
             for v, seeds in [("duge", 3), ("duge+kv", 3), ("duge+gamma", 3), ("duge+kv10", 1), ("duge-lu-only", 1),
                              ("duge-no-reg", 1), ("duge-no-pr", 1), ("duge-no-replay", 1), ("duge+gp", 1), ("duge+gamma3e-4", 1),
                              ("duge+gamma-start", 1)]
             + [(v, 1) for v in ("duge+shrink0", "duge+shrink0-strict", "duge+kv+shrink0-strict") if seq == "styles"]
             for s in range(seeds)]


def concepts_of(sequence):
    """A named sequence's concepts, or those of a comma-separated one."""
    return SEQUENCES.get(sequence) or [c.strip().lower() for c in sequence.split(",") if c.strip()]


def docs_name(sequence):
    return "benchmark" if sequence == "styles" else f"benchmark-{request.slug(sequence)}"


# -----------------------------------------------------------------------------------------------
# Running: one variant at one seed, request after request, resumable from committed state

def file_name(name):
    """A variant's name as a file name, one to one: "esd+" -> "esd-plus", "esd@60" -> "esd-at-60"."""
    return request.slug(name.replace("+", "-plus-").replace("@", "-at-"))


def state_path(docs, sequence, name, seed):
    return Path(docs) / "benchmark-state" / request.slug(sequence) / f"{file_name(name)}-seed{seed}.safetensors"


def ledger(state):
    """The ledger steps ({"concept", ..., "metrics"} per request) stored in a run's state file."""
    return json.loads(checkpoint.read_safetensors(state)[1]["duge.ledger"])["steps"]


def save_state(model_path, path):
    """What a finished request leaves to resume from in a new checkout: the trained tensors and the
    ledger (the rest of the model is the toy model's)."""
    delta, meta = checkpoint.read_safetensors(request.output_paths(model_path)["delta"])   # the model's ledger too
    path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_path(path) as tmp:
        save_file({k: v for k, v in delta.items() if k.startswith("theta.")}, str(tmp),
                  metadata={"duge.ledger": meta["duge.ledger"], "file": Path(model_path).name})


def rebuild(state, folder):
    """The model of the last request in `state`, rebuilt from the toy model with its trained tensors
    and its delta file (phi_0's tensors: the toy model's own): -> its path in folder."""
    tensors, meta = checkpoint.read_safetensors(state)
    model = checkpoint.load(checkpoint.TOY_WEIGHTS, dtype=None)   # the file's dtype, as train.py writes it
    trained = {k.removeprefix("theta.") for k in tensors}
    phi0 = {f"phi0.{n}": p.detach().float().contiguous() for n, p in model.unet.named_parameters()
            if ".attn2." in n or n in trained}
    trainer.put(model.unet, {k.removeprefix("theta."): v for k, v in tensors.items()})
    model.meta["duge.ledger"] = meta["duge.ledger"]
    out = Path(folder) / meta["file"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_path(request.output_paths(out)["delta"]) as tmp:
        save_file(tensors | phi0, str(tmp), metadata={"duge.ledger": meta["duge.ledger"]})
    checkpoint.save(model, out, format=model.format)
    return out


def finished(state, concepts):
    return state.exists() and len(ledger(state)) == len(concepts)


def run(sequence, name, seed, outdir, docs, eval_n, extra, bar):
    """The requests of one variant at one seed, each on the previous output; -> one row per request."""
    concepts, flags = concepts_of(sequence), VARIANTS[name][0]
    folder = Path(outdir) / request.slug(sequence) / file_name(name) / f"seed{seed}"
    state = state_path(docs, sequence, name, seed)
    done = len(ledger(state)) if state.exists() else 0
    match = [] if "--steps" in flags else ["--match-forgetting", MATCH]
    weights = str(checkpoint.TOY_WEIGHTS)
    for k, c in enumerate(concepts, 1):
        out = folder / f"step{k:02d}-{request.slug(c)}.safetensors"
        bar.set_description(f"{sequence} {name} seed {seed}: {k} {c}")
        if k == done and not out.exists():
            out = rebuild(state, folder)   # a new checkout: the last finished request from its committed state
        if k > done:
            argv = ["--forget", c, "--weights", weights, "--out", str(out), *flags, *match, "--seed", str(seed),
                    "--eval-seed", str(seed), "--eval-n", str(eval_n), "--no-grid", "--resume", *extra]
            if not out.exists() and train.main(argv) != 0:
                raise SystemExit(f"{name}: request {k} ({c}) failed; rerun the same command to resume")
            save_state(out, state)
        weights = str(out)
        bar.update()
    return [row(name, seed, k, concepts, s["metrics"]) for k, s in enumerate(ledger(state), 1)] if state.exists() else []


GROUPS = ["retained_seen", "retained_held_out", "retained_in_domain", "retained_cross_domain"]


def row(name, seed, k, concepts, m):
    """One request's CSV row from its ledger metrics (a group absent from the summary stays empty)."""
    s, acc = m.get("summary", {}), m.get("eval", {})
    r = {"variant": name, "seed": seed, "step": k, "concept": concepts[k - 1],
         "own": acc.get(concepts[k - 1]), "forgotten_max": max(acc.get(c, 0.0) for c in concepts[:k]),
         "steps_taken": m.get("steps_taken") if m.get("image_gradients") else 0,   # UCE: no step (its rungs are
         "image_gradients": m.get("image_gradients"),                                # weights, in m["checks"])
         "seconds": round(sum(m.get("seconds", {}).values()), 1),
         "quality_fd": s.get("quality_fd"), "quality_fd_base": s.get("quality_fd_base"),
         **{f"acc[{c}]": acc.get(c) for c in concepts[:k]}}
    for g in GROUPS:
        r |= {g: s.get(g), g + "_base": s.get(g + "_base"), g + "_worst": s.get(g + "_worst"),
              g + "_worst_acc": s.get(g + "_worst_acc")}
        for key in (g, g + "_worst"):
            lo, hi = s.get(key + "_ci") or (None, None)
            r |= {key + "_lo": lo, key + "_hi": hi}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}


# -----------------------------------------------------------------------------------------------
# Tables and figure

def pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def ci(r, key):
    """' [lo, hi]': the 95% Wilson interval of a retained mean or worst concept, in points ('' if none)."""
    return "" if r.get(key + "_lo") is None else f" [{100 * r[key + '_lo']:.0f}, {100 * r[key + '_hi']:.0f}]"


def over_seeds(rows, key):
    """'mean' over seeds, with ' (lo-hi)' the range when there are several; '-' when absent."""
    vs = [r[key] for r in rows if r.get(key) is not None]
    if not vs:
        return "-"
    m = sum(vs) / len(vs)
    return f"{100 * m:.0f}%" + (f" ({100 * min(vs):.0f}-{100 * max(vs):.0f})" if len(vs) > 1 else "")


def cell(rows, g):
    """A retained group at the last request: mean over seeds (range), or with one seed the mean
    [95% interval]; then the worst concept and its accuracy."""
    if len(rows) == 1:
        r = rows[0]
        if r.get(g) is None:
            return "-", "-"
        return (f"{pct(r[g])}{ci(r, g)} ({pct(r[g + '_base'])})",
                f"{r[g + '_worst']} {pct(r[g + '_worst_acc'])}{ci(r, g + '_worst')}")
    worst = min((r for r in rows if r.get(g + "_worst_acc") is not None), key=lambda r: r[g + "_worst_acc"],
                default=None)
    return over_seeds(rows, g), "-" if worst is None else f"{worst[g + '_worst']} {pct(worst[g + '_worst_acc'])} (seed {worst['seed']})"


def write_outputs(rows, concepts, docs, name="benchmark"):
    """The last request of every variant (over its seeds), every request in the CSV, and the figure."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = lambda v: [r for r in rows if r["variant"] == v]
    last_step = {v: max(r["step"] for r in by(v)) for v in variants}
    head = ("| variant | seeds | requests | missed (own > 10%) | forgotten, worst at any step | retained seen (base) "
            "| worst seen | retained held out (base) | worst held out | FD (base) | steps | image-gradients | minutes |")
    lines = [head, "|" + "---|" * 13]
    for v in variants:
        rs, last = by(v), [r for r in by(v) if r["step"] == last_step[v]]
        seeds = sorted({r["seed"] for r in rs})
        per_seed = lambda key: [sum(r[key] or 0 for r in rs if r["seed"] == s) for s in seeds]
        fd = [r["quality_fd"] for r in last if r.get("quality_fd") is not None]
        fd_cell = "-" if not fd else (f"{sum(fd) / len(fd):.1f}" + (f" ({min(fd):.1f}-{max(fd):.1f})" if len(fd) > 1 else "")
                                      + f" ({last[0]['quality_fd_base']:.1f})")
        mean = lambda xs: sum(xs) / len(xs)
        cells = [v, len(seeds), last_step[v], f"{mean([sum((r['own'] or 0) > 0.10 for r in rs if r['seed'] == s) for s in seeds]):.1f}",
                 pct(max(r["forgotten_max"] for r in rs)), *cell(last, "retained_seen"), *cell(last, "retained_held_out"),
                 fd_cell, f"{mean(per_seed('steps_taken')):.0f}", f"{mean(per_seed('image_gradients')):,.0f}",
                 f"{mean(per_seed('seconds')) / 60:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    steps = ["", "| variant | seed | request | concept | steps | own | forgotten (worst) | seen [95%] | held out [95%] "
                 "| worst held out | in-domain | cross-domain | FD | seconds |", "|" + "---|" * 14]
    for r in rows:
        cells = [r["variant"], r["seed"], r["step"], r["concept"], r["steps_taken"], pct(r["own"]), pct(r["forgotten_max"]),
                 pct(r["retained_seen"]) + ci(r, "retained_seen"), pct(r["retained_held_out"]) + ci(r, "retained_held_out"),
                 f"{r['retained_held_out_worst'] or '-'} {pct(r['retained_held_out_worst_acc'])}",
                 pct(r["retained_in_domain"]), pct(r["retained_cross_domain"]),
                 "-" if r["quality_fd"] is None else f"{r['quality_fd']:.1f}", r["seconds"]]
        steps.append("| " + " | ".join(map(str, cells)) + " |")
    text = (f"# Continual benchmark: {', '.join(concepts)}\n\nWritten by `python -m experiments.benchmark` "
            f"(experiments/benchmark.py explains every column). Each variant's last request; over several seeds, "
            f"the mean and (in brackets) the range over seeds, the worst concept over all seeds; with one seed, "
            f"95% Wilson intervals. `missed`: requests whose own concept was still recognised on > 10% of the "
            f"evaluation's images.\n\n" + "\n".join(lines) +
            "\n\n<details><summary>every request</summary>\n" + "\n".join(steps) + "\n\n</details>\n")
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_path(docs / f"{name}.md") as tmp:
        tmp.write_text(text)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with checkpoint.atomic_path(docs / f"{name}.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    plot(rows, docs / f"{name}.png")
    return text


def write_summary(by_sequence, docs, name="benchmark-summary", command="--all"):
    """Every sequence side by side at its last request: per variant, the requests whose own concept
    stayed > 10%, retained held out and seen (mean over seeds, range), and FD as a multiple of the
    base model's; then the minutes all these runs took."""
    seqs = list(by_sequence)
    head = "| variant | " + " | ".join(f"{q}: missed | held out | seen | FD / base" for q in seqs) + " |"
    lines = [head, "|---|" + "---|" * 4 * len(seqs)]
    variants = list(dict.fromkeys(r["variant"] for rows in by_sequence.values() for r in rows))
    for v in variants:
        cells = [v]
        for q in seqs:
            rs = [r for r in by_sequence[q] if r["variant"] == v]
            if not rs:
                cells += ["-"] * 4
                continue
            last = [r for r in rs if r["step"] == max(r["step"] for r in rs)]
            seeds = sorted({r["seed"] for r in rs})
            missed = sum(sum((r["own"] or 0) > 0.10 for r in rs if r["seed"] == s) for s in seeds) / len(seeds)
            fd = [r["quality_fd"] / r["quality_fd_base"] for r in last if r.get("quality_fd") is not None]
            cells += [f"{missed:.1f}", over_seeds(last, "retained_held_out"), over_seeds(last, "retained_seen"),
                      "-" if not fd else f"{sum(fd) / len(fd):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    goal = goal_table(by_sequence)
    minutes = sum(r["seconds"] or 0 for rows in by_sequence.values() for r in rows) / 60
    runs = len({(q, r["variant"], r["seed"]) for q, rows in by_sequence.items() for r in rows})
    requests = sum(len(rows) for rows in by_sequence.values())
    text = (f"# Continual benchmark: every sequence at its last request\n\nWritten by `python -m experiments."
            f"benchmark {command}`; each sequence's own table ({', '.join(docs_name(q) + '.md' for q in seqs)}) has "
            f"the intervals, worst concepts and every request. Over several seeds: the mean (range); `missed`: "
            f"mean number of requests whose own concept stayed > 10% recognised; FD / base: the quality proxy "
            f"after the last request over the base model's on the same images (lower is better).\n\n"
            + "\n".join(lines) + f"\n\n{runs} runs ({requests} requests) took {minutes:.0f} minutes in all (the sum of every "
            f"request's training, checks and evaluation).\n\n## Against the continual goal\n\nEach cell is "
            f"{' / '.join(seqs)}: at each request the mean over seeds, then the worst of the requests (the goal holds "
            f"after every request); the worst concepts are each seed's worst, averaged; `steps`: the training steps "
            f"of all requests, mean over seeds (the cost).\n\n{goal}\n")
    with checkpoint.atomic_path(Path(docs) / f"{name}.md") as tmp:
        tmp.write_text(text)
    return text


GOAL = [("forgotten, worst (<= 10%)", "forgotten_max", max, None), ("held out (>= 97% of base)", "retained_held_out", min,
         "retained_held_out_base"), ("worst held out (>= base - 15)", "retained_held_out_worst_acc", min, None),
        ("seen (>= 97% of base)", "retained_seen", min, "retained_seen_base"),
        ("worst seen (>= base - 15)", "retained_seen_worst_acc", min, None),
        ("FD / base (<= 1.10x)", "quality_fd", max, "quality_fd_base")]


def goal_table(by_sequence):
    """The acceptance of the continual goal, per variant: each criterion's mean over seeds at every
    request, its worst request, one value per sequence; then the training steps (the cost)."""
    seqs = list(by_sequence)
    lines = ["| variant | " + " | ".join(g[0] for g in GOAL) + " | steps |", "|---|" + "---|" * (len(GOAL) + 1)]
    for v in dict.fromkeys(r["variant"] for rows in by_sequence.values() for r in rows):
        cols = [[] for _ in range(len(GOAL) + 1)]
        for q in seqs:
            rs = [r for r in by_sequence[q] if r["variant"] == v]
            per_step = [[r for r in rs if r["step"] == k] for k in sorted({r["step"] for r in rs})]
            for col, (_, key, worst, base) in zip(cols, GOAL):
                means = [sum(r[key] / (r[base] if base else 1) for r in at) / len(at) for at in per_step
                         if at and all(r.get(key) is not None and (not base or r.get(base)) for r in at)]
                col.append("-" if not means else f"{worst(means):.2f}x" if key == "quality_fd" else pct(worst(means)))
            seeds = {r["seed"] for r in rs}
            cols[-1].append(f"{sum(r['steps_taken'] or 0 for r in rs) / len(seeds):.0f}" if rs else "-")
        lines.append(f"| {v} | " + " | ".join(" / ".join(c) for c in cols) + " |")
    return "\n".join(lines)


PANELS = [("forgotten_max", "forgotten (worst concept so far)"), ("retained_seen", "retained, seen"),
          ("retained_held_out", "retained, held out"), ("quality_fd", "quality: Frechet distance")]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78"]   # one per variant up to 16


def plot(rows, path):
    """Four panels over the requests, one line per variant (its mean over seeds; the band: the range
    over seeds), as CUIG's figures: forgotten, retained seen, retained held out (0-100%), and the
    quality proxy (lower is better; dotted: the base model)."""
    from PIL import Image, ImageDraw
    pw, ph, m = 330, 240, 38
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    legend = 16 * ((len(variants) + 2) // 3) + 8
    img = Image.new("RGB", (4 * pw, ph + legend), "white")
    d = ImageDraw.Draw(img, "RGBA")
    steps = max(r["step"] for r in rows)
    fds = [v for r in rows for v in (r.get("quality_fd"), r.get("quality_fd_base")) if v is not None]
    top_fd = max(fds, default=1.0) * 1.1 or 1.0
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
            colour = COLOURS[j % len(COLOURS)]
            at = {}
            for r in rows:
                if r["variant"] == v and r.get(key) is not None:
                    at.setdefault(r["step"], []).append(r[key])
            ks = sorted(at)
            if len(ks) > 1 and any(len(at[k]) > 1 for k in ks):   # the range over seeds
                band = [(x(k), y(max(at[k]))) for k in ks] + [(x(k), y(min(at[k]))) for k in reversed(ks)]
                d.polygon(band, fill=tuple(int(colour[c:c + 2], 16) for c in (1, 3, 5)) + (50,))
            pts = [(x(k), y(sum(at[k]) / len(at[k]))) for k in ks]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        base = next((r["quality_fd_base"] for r in rows if r.get("quality_fd_base") is not None), None)
        if key == "quality_fd" and base is not None:
            for xs in range(int(x(0)), int(x(steps)), 6):
                d.point((xs, y(base)), fill="black")
    for j, v in enumerate(variants):
        d.text((m + (j % 3) * 300, ph + 4 + 16 * (j // 3)), f"-- {v}", fill=COLOURS[j % len(COLOURS)])
    sample.save_image(img, path)


# -----------------------------------------------------------------------------------------------
# The noise floor: how much two evaluations of the SAME model differ

def noise_floor(paths, seeds, n, docs):
    """Each model evaluated at several evaluation seeds (other images of the same prompts): the spread
    of every figure the benchmark reports, with no training in between. -> markdown."""
    from toy import evaluate
    lines = ["| model | eval seed | forgotten | retained seen | worst seen | retained held out | worst held out "
             "| FD |", "|" + "---|" * 8]
    spread = {}
    for path in paths:
        model = checkpoint.load(path)
        gone = checkpoint.forgotten(model)
        phi0 = request.load_phi0(model)
        for s in seeds:
            r = evaluate.evaluate(model, gone, n, phi0.applied, Path("cache") / "noise_floor" / "base_eval.json", s)
            sm = r["summary"]
            worst = lambda g: f"{sm.get(g + '_worst', '-')} {pct(sm.get(g + '_worst_acc'))}"
            lines.append(f"| {Path(path).name} | {s} | {pct(sm['forgotten']) if gone else '-'} | "
                         f"{pct(sm['retained_seen'])} | {worst('retained_seen')} | {pct(sm['retained_held_out'])} | "
                         f"{worst('retained_held_out')} | {sm['quality_fd']:.2f} |")
            for key in ("retained_seen", "retained_held_out", "retained_held_out_worst_acc", "quality_fd"):
                spread.setdefault((Path(path).name, key), []).append(sm[key])
    lines += ["", "| model | figure | min | max | range |", "|---|---|---|---|---|"]
    for (name, key), vs in spread.items():
        f = (lambda v: f"{v:.2f}") if key == "quality_fd" else (lambda v: f"{100 * v:.1f}%")
        lines.append(f"| {name} | {key} | {f(min(vs))} | {f(max(vs))} | {f(max(vs) - min(vs))} |")
    text = ("# The noise floor\n\nWritten by `python -m experiments.benchmark --noise-floor`: each model evaluated "
            f"at evaluation seeds {', '.join(map(str, seeds))} ({n} images per style), the same prompts drawn with "
            "other seeds. A difference between two methods smaller than a figure's range here is not a "
            "difference.\n\n" + "\n".join(lines) + "\n")
    with checkpoint.atomic_path(Path(docs) / "noise_floor.md") as tmp:
        tmp.write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description="The continual-unlearning benchmark in the toy world.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default="duge,esd,esd+,ca,ca+,uce,uce+,finetune,finetune+",
                    help="comma-separated variants (--list)")
    ap.add_argument("--list", action="store_true", help="print every named variant, its flags and what it tests")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="an ad-hoc variant, e.g. --variant \"reg3=--lambda-reg 3\" (then use it in --methods)")
    ap.add_argument("--sequence", default="styles", help=f"{', '.join(SEQUENCES)}, or comma-separated concepts")
    ap.add_argument("--seeds", type=int, default=1, help="training and evaluation seeds 0..N-1")
    ap.add_argument("--all", action="store_true", help="every run of the benchmark's docs (all sequences: DUGE at 3 "
                                                       "seeds, each baseline plain and equipped at seed 0; on styles "
                                                       "also the fixed 60-step rows)")
    ap.add_argument("--ablations", action="store_true", help="issue 29's runs (ABLATIONS), into --docs "
                                                             "docs/ablations unless --docs is given")
    ap.add_argument("--tables", action="store_true", help="only rewrite the tables, figures and summary from the "
                                                          "finished runs of the plan; train nothing")
    ap.add_argument("--noise-floor", action="store_true", help="evaluate the base model and DUGE's last styles model "
                                                               "at 3 evaluation seeds (docs/noise_floor.md)")
    ap.add_argument("--eval-n", type=int, default=16,
                    help="images per style (and at least per shape and colour) in each evaluation")
    ap.add_argument("--out", default="out/benchmark", help="folder of the models of every request")
    ap.add_argument("--docs", default=None, help="where the tables, figures and resumable state go (default: docs)")
    ap.add_argument("--extra", default="", help="extra train.py arguments for every request, e.g. '--lr 2e-3'")
    args = ap.parse_args(argv)
    args.docs = args.docs or ("docs/ablations" if args.ablations else "docs")
    if args.list:
        print("\n".join(f"{name:30} {' '.join(flags) or '(defaults)':60} {why}" for name, (flags, why) in VARIANTS.items()))
        return 0
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name.strip() or not flags.strip():
            print(f"error: --variant {spec!r}: write NAME=FLAGS, e.g. \"reg3=--lambda-reg 3\"", file=sys.stderr)
            return 2
        VARIANTS[name.strip()] = (flags.split(), "ad hoc")
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown variant {', '.join(unknown) or '(none)'}; --list shows them, --variant adds one",
              file=sys.stderr)
        return 2
    if args.eval_n < 1 or args.seeds < 1:
        print("error: --eval-n and --seeds must be positive", file=sys.stderr)
        return 2
    if args.noise_floor:
        last = state_path(args.docs, "styles", "duge", 0)
        paths = [checkpoint.TOY_WEIGHTS] + ([rebuild(last, Path(args.out) / "noise_floor")] if last.exists() else [])
        print(noise_floor(paths, [0, 1, 2], args.eval_n, args.docs))
        return 0
    plan = ALL if args.all else ABLATIONS if args.ablations else [(args.sequence, v, s) for s in range(args.seeds)
                                                                   for v in variants]
    if args.tables:   # the finished runs only
        plan = [(q, v, s) for q, v, s in plan if finished(state_path(args.docs, q, v, s), concepts_of(q))]
    extra = args.extra.split()
    t = time.time()
    by_sequence = {}
    with tqdm(total=len(plan) * 12, desc="benchmark", unit="request") as bar:
        for sequence in dict.fromkeys(seq for seq, _, _ in plan):
            concepts = concepts_of(sequence)
            rows = by_sequence[sequence] = []
            for seq, v, s in plan:
                if seq == sequence:
                    rows += run(sequence, v, s, args.out, args.docs, args.eval_n, extra, bar)
                    print(write_outputs(rows, concepts, args.docs, docs_name(sequence)).split("\n\n<details>")[0])
    if len(by_sequence) > 1:
        print(write_summary(by_sequence, args.docs, command="--ablations" if args.ablations else "--all"))
    print(f"benchmark: {(time.time() - t) / 60:.1f} minutes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
