"""Continual concept unlearning with DUGE: one request at a time, each on the previous output.

    python train.py --forget "van gogh"                                  # the toy model in weights/
    python train.py --forget "monet" --weights out/forget-van-gogh.safetensors
    python train.py --forget "van gogh" --forget "picasso"              # two requests in a row
    python train.py --forget "van gogh" --weights v1-5-pruned-emaonly.safetensors   # real SD v1
    python train.py --forget "van gogh" --method esd                     # a baseline (baselines.py)
    torchrun --nproc_per_node 2 train.py --forget "van gogh"             # several GPUs (distributed.py)

Each request (a "decremental step"): duge.recipe says which concepts feed each loss, concepts.py
turns them into prompts, the ORIGINAL model phi_0 draws their images (cached on disk), duge.unlearn
trains the cross-attention keys and values, and we write the model (same format as the input, the
ledger of every forgotten concept in its metadata), a delta file (the trained tensors and phi_0's:
the next request distils towards the original through it), a before/after grid and, in the toy
world, the evaluation table (toy/evaluate.py) and the time each phase took.

--method esd|ca|uce|finetune runs a baseline through the same steps and outputs instead, with the
model at the start of the request as its frozen reference (as its own code applies it in a sequence);
--gp adds CUIG's gradient projection to any trained method.
"""
import time

STARTED = time.time()  # the process's start: the command line's first request prints its start-up time

import argparse  # noqa: E402  (after STARTED, so that the start-up time includes every import)
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import adversarial
import baselines
import checkpoint
import concepts
import distributed
import duge
import sample


class UserError(Exception):
    """Bad input: printed as one line, no traceback, nothing written."""


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_toy(model):
    return "duge.tokenizer" in model.meta  # only the toy model brings its own tokenizer


def concept_source(model, seed):
    """The toy world's concepts and prompts, or real SD's."""
    if is_toy(model):
        from toy.concepts import ToyConcepts
        return ToyConcepts(seed)
    return concepts.SDConcepts()


def read_ledger(model):
    """Every request so far, stored as JSON in the checkpoint's metadata."""
    return json.loads(model.meta.get("duge.ledger", '{"steps": []}'))


def forgotten(ledger):
    return [s["concept"] for s in ledger["steps"]]


def fingerprint(model, phi0):
    """Names the cache folder of phi_0's images: a hash of phi_0's cross-attention tensors and of one other
    (conv_in: phi_0's if a request trained it, as --trainable unet does)."""
    h = hashlib.sha1()
    own = [(k, v) for k, v in sorted(phi0.tensors.items()) if ".attn2." in k]
    conv_in = phi0.tensors.get("input_blocks.0.0.weight", model.unet.input_blocks[0][0].weight)
    for k, v in own + [("conv_in", conv_in)]:
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------------------------
# Inputs and outputs of a request

def output_paths(out):
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return {"model": out, "delta": Path(f"{stem}.delta.safetensors"), "grid": Path(f"{stem}.grid.png"),
            "md": Path(f"{stem}.eval.md"), "csv": Path(f"{stem}.eval.csv"),
            "resume": Path(f"{stem}.resume.safetensors")}


def trained_tensors(unet, names):
    named = dict(unet.named_parameters())
    return {f"theta.{n}": named[n].detach().cpu().contiguous() for n in names}


def load_phi0(model, ledger, args, names=()):
    """phi_0's values of the cross-attention tensors, of `names` (this request's trained set) and of
    every tensor an earlier request trained: the model itself before any request; afterwards the
    copy carried in the last delta file (or the --base model). A tensor no request trained yet
    still holds phi_0's value in the model."""
    named = dict(model.unet.named_parameters())
    want = set(duge.trainable_names(model.unet, "attn2")) | set(names)
    if args.base:
        base = dict(checkpoint.load(args.base).unet.named_parameters())
        return duge.Original(model.unet, {n: base[n].to(named[n]) for n in sorted(want)})
    carried = {}
    if ledger["steps"]:
        delta = Path(model.source).resolve().parent / ledger["steps"][-1]["delta"]
        if not delta.exists():
            raise UserError(f"the original model's tensors should be in {delta}, which is missing; "
                            "pass --base ORIGINAL_MODEL")
        carried = {k.removeprefix("phi0."): v for k, v in load_file(str(delta)).items() if k.startswith("phi0.")}
    return duge.Original(model.unet, {n: carried.get(n, named[n]).to(named[n]) for n in sorted(want | set(carried))})


# -----------------------------------------------------------------------------------------------
# One request

def prepare(model, ref, world, plan, cfg, args, folder):
    """The recipe's concepts -> prompts -> phi_0's images -> the `data` dict duge.unlearn trains on.
    ref: phi_0, or (a baseline, the paper's recipe) the model at the start of the request. A
    baseline's data is one group: the concept's own images for ESD, the anchor's for CA and finetune."""
    prompts = lambda c, n: world.prompts(c, world.kind(c), n, exclude=plan.exclude)
    pairs = [(p, concepts.anchor_prompt(p, c, a)) for c, a in plan.unlearn for p in prompts(c, cfg.num_prompts)]
    targets, anchors = [p for p, _ in pairs], [a for _, a in pairs]
    related = [p for r in plan.related for p in prompts(r, cfg.num_prompts)]
    memory = [p for r in plan.memory for p in prompts(r, 2)] + world.generic(cfg.memory, exclude=plan.exclude)
    duge_ = cfg.method == "duge"
    todo = {"anchor": targets if cfg.method == "esd" else anchors,
            "related": related if duge_ and cfg.prior == "related" else [], "memory": memory if duge_ else [],
            "concept": targets[-cfg.num_prompts:] if duge_ and cfg.adversarial else []}
    k = cfg.images_per_prompt
    who = "phi_0" if ref_is_phi0(cfg) else "reference"
    with ref.applied():  # x_0 drawn by the frozen reference (phi_0; phi_n for a baseline), cached per prompt
        xs = {g: sample.generate_cached(model, ps, k, folder, desc=f"{who} images: {g}", **images(args))
              for g, ps in todo.items() if ps}
    enc = lambda ps: sample.encode_prompts(model, [p for p in ps for _ in range(k)])
    uncond = cfg.method == "esd" or (duge_ and cfg.target == "uncond")
    c_a = enc([""] * len(anchors) if uncond else anchors)   # ESD, and the paper's L_U: the unconditional prompt
    data = {"anchor": {"x": xs["anchor"], "c_target": enc(targets), "c_anchor": c_a}}
    bank = {"x": xs["memory"], "c": enc(memory)} if duge_ else None
    if duge_ and cfg.prior == "related":   # ours: L_pr on the related concepts' and the anchor's images
        data["related"] = {"x": torch.cat([xs["related"], xs["anchor"]]), "c": torch.cat([enc(related), c_a])}
    elif duge_:                            # the paper's: L_pr on the memory bank
        data["related"] = bank
    if duge_ and cfg.regulariser == "distil":
        data["memory"] = bank
    if todo["concept"]:                    # the robust variant's attacker learns on the concept's own images
        data["concept"] = {"x": xs["concept"], "c": sample.encode_prompts(model, [""]),
                           "c_anchor": enc(anchors[-cfg.num_prompts:])}
    return {g: {n: v.to(next(model.unet.parameters()).device) for n, v in d.items()} for g, d in data.items()}


def ref_is_phi0(cfg):
    return cfg.method == "duge" and cfg.reference == "phi0"


def uce(model, world, plan, concept, anchor, cfg):
    """UCE's closed-form edit: the texts that end in the concept (and the name alone) onto their anchors,
    the retained concepts of plan.memory kept."""
    texts = [concept] + [p for p in world.prompts(concept, world.kind(concept), 16, exclude=plan.exclude)
                         if p.endswith(concept)]
    texts = list(dict.fromkeys(texts))
    baselines.uce_request(model, texts, [concepts.anchor_prompt(p, concept, anchor) for p in texts], plan.memory,
                          cfg.uce_lambda, cfg.uce_preserve)


def images(args):
    """How every image of a request is drawn (sampler, steps, guidance, size)."""
    return {"sampler": args.gen_sampler, "steps": args.gen_steps, "guidance": args.guidance, "height": args.size,
            "width": args.size}


def grid_rows(world, plan, concept):
    """(prompt, label) rows of the before/after grid: two prompts of this request's concept, one of
    a replayed earlier concept, one of each of two related concepts."""
    prompts = lambda c, n: world.prompts(c, world.kind(c), n, exclude=plan.exclude)
    rows = [(p, f"{p}   (forgotten now)") for p in prompts(concept, 2)]
    rows += [(p, f"{p}   (replayed: forgotten earlier)") for c, _ in plan.unlearn[:-1][-1:] for p in prompts(c, 1)]
    return rows + [(p, f"{p}   (related: kept)") for r in plan.related[:2] for p in prompts(r, 1)]


@contextmanager
def stop_between_steps():
    """While training, Ctrl-C / SIGTERM finish the current step first, so the resume point written
    then is exact (a second signal stops at once). -> a list that is non-empty once asked."""
    asked = []
    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in [s for s, h in old.items() if h is not signal.SIG_IGN]:  # started ignoring it (nohup, &)? keep so
        signal.signal(s, handler)
    try:
        yield asked
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_request(model, world, concept, cfg, args, out, startup=None):
    """One request; startup: the process's start-up seconds, shown first in the time line (the first request only)."""
    ledger = read_ledger(model)
    paths = output_paths(out)
    kind, anchor = (args.kind if args.kind != "auto" else world.kind(concept)), args.anchor
    retain = [r.strip().lower() for r in args.retain.split(",") if r.strip()] if args.retain else None
    t0 = time.time()
    phases = {}  # seconds per phase, printed at the end

    @contextmanager
    def phase(name):
        t = time.time()
        yield
        phases[name] = phases.get(name, 0) + time.time() - t
    names = duge.trainable_names(model.unet, cfg.trainable)
    phi0 = load_phi0(model, ledger, args, names)
    phi_prev = duge.Original(model.unet, {n: p for n, p in model.unet.named_parameters() if n in names})  # as it came
    ref = phi0 if ref_is_phi0(cfg) else phi_prev  # a baseline's (or the paper's) reference: the request's start
    folder = Path(args.cache) / fingerprint(model, ref)
    print(f"request {len(ledger['steps']) + 1}: forget '{concept}' with {cfg.method} (kind {kind}, anchor "
          f"'{anchor}')", file=sys.stderr)
    nearest = concepts.nearest_by_text(model, concept, cfg.num_related)
    plan = duge.recipe(ledger, concept, anchor, kind, world.candidates, nearest, retain=retain,
                       replay=cfg.replay and cfg.method == "duge")  # the baselines' code forgets one concept
    history, last = [], {}
    if cfg.method == "uce":
        with phase("UCE edit"):
            uce(model, world, plan, concept, anchor, cfg)
    else:
        with phase(f"{'phi_0' if ref_is_phi0(cfg) else 'reference'} images"):
            data = prepare(model, ref, world, plan, cfg, args, folder)
        print(f"  related concepts kept: {', '.join(plan.related) or '-'}; "
              + ", ".join(f"{len(d['x'])} {g}" for g, d in data.items()) + " images", file=sys.stderr)
        with phase("training"):
            history, last = train_steps(model, ref, phi0, data, plan, cfg, args, concept, names, paths)
    metrics = {"method": cfg.method, "seconds_train": round(time.time() - t0, 1),
               "final_losses": history[-1] if history else last}
    gone, cache = forgotten(ledger) + [concept], Path(args.cache) / fingerprint(model, phi0)  # base: per image
    if is_toy(model) and not args.no_eval:
        from toy import evaluate
        with phase("evaluation"):
            metrics.update(evaluate.report(model, phi0, gone, args.eval_n, paths["md"], paths["csv"],
                                           cache / "base_eval.json"))
    elif args.clip is not None and not args.no_eval:   # real SD, scored by CLIP (evaluate.py)
        import evaluate
        with phase("evaluation"):
            metrics.update(evaluate.report(model, args.clip_model, phi0, gone, args.eval_n, paths["md"], paths["csv"],
                                           cache / f"base_clip_{args.gen_steps}_{args.guidance}_{args.size}.json",
                                           steps=args.gen_steps, guidance=args.guidance))
    metrics["seconds"] = {k: round(v, 1) for k, v in phases.items()}
    ledger["steps"].append({"concept": concept, "kind": kind, "anchor": anchor, "retain": list(plan.related),
                            "hparams": dataclasses.asdict(cfg), "metrics": metrics, "delta": paths["delta"].name})
    model.meta["duge.ledger"] = json.dumps(ledger)
    rows = grid_rows(world, plan, concept)
    main = distributed.is_main()  # under torchrun every rank holds the same model; rank 0 writes
    with phase("grid"):
        if not args.no_grid:
            grid = sample.before_after(model, phi_prev.applied, [p for p, _ in rows], **images(args))
            if main:
                sample.save_image(sample.make_grid(grid, labels=[f"{label}   before | after" for _, label in rows]),
                                  paths["grid"])
    with phase("writing"):
        delta = trained_tensors(model.unet, names) | {f"phi0.{n}": v.cpu().contiguous() for n, v in phi0.tensors.items()}
        if main:
            with checkpoint.atomic_path(paths["delta"]) as tmp:
                save_file(delta, str(tmp), metadata={"duge.ledger": model.meta["duge.ledger"]})
            checkpoint.save(model, paths["model"], format=model.format, dtype=args.save_dtype)  # the model file last
            paths["resume"].unlink(missing_ok=True)
        distributed.barrier()  # the next request reads this delta file on every rank
    model.source = str(paths["model"])
    total = time.time() - t0 + (startup or 0)
    shown = ({"start-up": startup} if startup is not None else {}) | phases
    print(f"  wrote {paths['model']}, {paths['delta'].name}" + ("" if args.no_grid else f", {paths['grid'].name}")
          + "\n  time: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in shown.items())
          + f", other {total - sum(shown.values()):.1f} s; total {total:.1f} s", file=sys.stderr)
    return metrics


def train_steps(model, ref, phi0, data, plan, cfg, args, concept, names, paths):
    """The training loop of a request, with its resume point (tensors, optimizer): written every 50
    steps, at the end of training and on Ctrl-C / SIGTERM. -> (loss history, last logs)"""
    start, opt_state, last, extra = 0, None, {}, {}
    if args.resume and not paths["resume"].exists():
        print(f"  no resume point at {paths['resume']}: starting at step 0", file=sys.stderr)
    elif args.resume:
        start, opt_state, last, extra = load_resume(paths["resume"], model.unet, concept)
        print(f"  resuming at step {start} of {cfg.steps}", file=sys.stderr)
    loss_fn = None if cfg.method == "duge" else functools.partial(baselines.LOSSES[cfg.method], original=phi0.tensors)
    projection = None
    if cfg.gp:  # CUIG: the updates stay orthogonal to the retained concepts' text embeddings
        basis = baselines.protected_subspace(baselines.concept_embeddings(model, plan.memory))
        named = dict(model.unet.named_parameters())
        projection = baselines.GradientProjection({n: named[n] for n in names}, basis)
    adversary = None
    if cfg.adversarial:  # the robust variant: its context is part of the resume point
        adversary = adversarial.ContextAdversary(data["concept"]["x"], data["concept"]["c"], cfg.adversarial,
                                                 cfg.batch, cfg.seed, data["concept"]["c_anchor"], model.guidance)
        adversary.load(extra)

    with stop_between_steps() as asked:
        def on_step(step, logs, opt):
            done, stop = step + 1, distributed.any_rank(asked)  # torchrun: every rank stops at the same step
            if (stop or done % 50 == 0 or done == cfg.steps) and distributed.is_main():
                save_resume(paths["resume"], model.unet, names, opt, concept, done, logs,
                            adversary.state() if adversary else {})
            if stop:
                raise KeyboardInterrupt(f"stopped after step {done} of {cfg.steps} of '{concept}'; rerun the "
                                        f"same command with --resume to continue from step {done}")
        try:
            history = duge.unlearn(model.unet, ref, data, cfg, start_step=start, optimizer_state=opt_state,
                                   on_step=on_step, loss_fn=loss_fn, projection=projection, adversary=adversary)
        except FloatingPointError as e:
            raise UserError(str(e)) from None
    return history, last


def save_resume(path, unet, names, opt, concept, step, logs, extra):
    meta = {"concept": concept, "step": str(step), "losses": json.dumps(logs)}
    checkpoint.save_training_state(path, trained_tensors(unet, names) | extra, opt, meta)


def load_resume(path, unet, concept):
    tensors, opt_state, meta = checkpoint.load_training_state(path)
    if meta["concept"] != concept:
        raise UserError(f"{path} is a resume point for '{meta['concept']}', not '{concept}'; delete it or drop "
                        "--resume")
    unet.load_state_dict({k.removeprefix("theta."): v for k, v in tensors.items() if k.startswith("theta.")},
                         strict=False)  # copies them in
    extra = {k: v for k, v in tensors.items() if not k.startswith("theta.")}   # the adversary's context
    return int(meta["step"]), opt_state, json.loads(meta["losses"]), extra


# -----------------------------------------------------------------------------------------------
# Command line

CONFIG_HELP = {"steps": "training steps", "lr": "AdamW learning rate", "lr_rest": "learning rate of the trained "
               "tensors outside attn2 keys and values (0: --lr)", "batch": "images per loss group per step",
               "lambda_pr": "weight of L_pr", "lambda_reg": "weight of R_pr", "gamma": "L2 pull to the original",
               "trainable": "trained tensors", "num_related": "related concepts kept in the memory",
               "num_prompts": "prompts per concept", "images_per_prompt": "images per prompt",
               "memory": "generic prompts in the memory", "seed": "seed of the training draws",
               "replay": "replay the forgotten concepts in L_U (--no-replay: ablation)",
               "micro_batch": "images per group per forward/backward (0: all)", "checkpointing": "recompute "
               "UNet activations in backward", "autocast": "forward in this dtype ('': none)",
               "method": "duge, or a baseline to compare with (baselines.py)", "esd_eta": "ESD's negative guidance",
               "uce_lambda": "UCE's pull to the unedited weights", "uce_preserve": "UCE's weight of kept concepts",
               "gp": "CUIG's gradient projection (any trained method)",
               "recipe": "DUGE as reconstructed here (ours) or as the paper is described (paper): sets the five below and --no-replay",
               "reference": "frozen model of L_U and R_pr: phi0 (original) or phin (the request's start)",
               "target": "L_U's target: the anchor prompt or uncond (empty)", "attention": "L_U on attn2 outputs or maps",
               "prior": "L_pr's images: the memory bank's or related (+anchor)",
               "adversarial": "robust variant: context-inversion steps against theta per training step (0: off; "
               "adversarial.py)", "lambda_adv": "weight of L_adv (the robust variant's term)",
               "completion": "weight of L_comp (robust variant, with --adversarial: no prompt on the concept's images)",
               "regulariser": "R_pr: distil (memory) or l2 (parameters)"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Forget concepts from a Stable Diffusion v1 model with DUGE.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--forget", action="append", required=True, metavar="CONCEPT",
                    help="concept to forget; repeat for several requests in a row")
    ap.add_argument("--weights", default=str(checkpoint.TOY_WEIGHTS), help="input model")
    ap.add_argument("--kind", default="auto", choices=["auto", "style", "object", "colour", "other"],
                    help="the concept's kind (auto: looked up among the known concepts)")
    ap.add_argument("--anchor", default="", help="what the concept becomes ('': nothing, so "
                                                 "'a painting in the style of X' -> 'a painting')")
    ap.add_argument("--retain", default=None, help="comma-separated related concepts to protect "
                                                   "(None: the nearest by text embedding)")

    for name, help in CONFIG_HELP.items():  # duge.DugeConfig fields: the default comes from the preset
        toy, sd = (getattr(duge.PRESETS[p], name) for p in ("toy", "sd"))
        kw = ({"action": argparse.BooleanOptionalAction} if isinstance(toy, bool) else
              {"type": type(toy), "choices": duge.CHOICES.get(name)})
        ap.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS, **kw,
                        help=f"{help} (default: {toy if toy == sd else f'{toy} on the toy model, {sd} on SD'})")
    ap.add_argument("--gen-sampler", default=None, choices=sorted(sample.SAMPLERS),
                    help="sampler of phi_0's images and the grid (default: the toy evaluation's on the toy model, "
                         "ddim on SD)")
    ap.add_argument("--gen-steps", type=int, default=None, help="its steps (default: the toy evaluation's, 20 on SD)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale for images (None: the model's)")
    ap.add_argument("--size", type=int, default=None, help="image size (None: the model's)")
    ap.add_argument("--eval-n", type=int, default=argparse.SUPPRESS, help="images per style (and at least per "
                    "shape and colour) in the toy evaluation, per concept in the CLIP evaluation (default: 32 on the "
                    "toy model, 8 on SD)")
    ap.add_argument("--clip", default=None, help="real SD: score every request with this CLIP (the transformers "
                                                 "folder of openai/clip-vit-large-patch14), as evaluate.py does")
    ap.add_argument("--no-eval", action="store_true", help="skip the toy evaluation")
    ap.add_argument("--no-grid", action="store_true", help="skip the before/after grid")
    ap.add_argument("--out", default=None, help="output model (None: out/forget-<concepts>.safetensors)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    ap.add_argument("--base", default=None, help="the original model, if the last delta file is not at hand")
    ap.add_argument("--cache", default="cache", help="folder for phi_0's images")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (None: autodetect)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(sample.DTYPES), help="compute dtype")
    ap.add_argument("--save-dtype", choices=sorted(sample.DTYPES), help="written model's dtype (None: the input's)")
    return ap.parse_args(argv)


def config(args, toy):
    """The preset of the model (toy or SD) with the flags given on the command line, checked."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(duge.DugeConfig) if hasattr(args, f.name)}
    if given.get("method") == "esd" and "trainable" not in given:
        given["trainable"] = "attn2"  # ESD-x: every cross-attention tensor, as its code trains
    recipe = duge.RECIPES.get(given.get("recipe", "ours"), {})   # the recipe's fields, then the user's flags
    cfg = dataclasses.replace(duge.PRESETS["toy" if toy else "sd"], **{**recipe, **given})
    from toy.evaluate import EVAL_SAMPLER, EVAL_STEPS  # the toy evaluation's fast sampler, validated there
    fast = toy and args.gen_sampler in (None, EVAL_SAMPLER)
    args.gen_sampler = args.gen_sampler or (EVAL_SAMPLER if toy else "ddim")
    args.gen_steps = args.gen_steps if args.gen_steps is not None else EVAL_STEPS if fast else 20
    args.eval_n = getattr(args, "eval_n", 32 if toy else 8)
    if args.clip is not None and toy:
        raise UserError("--clip scores real SD; the toy model is scored by its own classifier (drop --clip)")
    for flag, v in (("--eval-n", args.eval_n), ("--gen-steps", args.gen_steps), ("--size", args.size)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be positive")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance {args.guidance}: must be a finite number")
    return cfg


def output_models(args, model, world):
    """The requests and the output model of each, checked before any work."""
    gone, outs = forgotten(read_ledger(model)), []
    for i, concept in enumerate(args.forget):
        if not concept:
            raise UserError("--forget needs a concept name, e.g. --forget \"van gogh\"")
        if concept in gone:
            raise UserError(f"'{concept}' is already forgotten (request {gone.index(concept) + 1} of the ledger)")
        if concept in args.forget[:i]:
            raise UserError(f"'{concept}' is given twice with --forget")
        world.kind(concept)  # an unknown toy-world concept fails here
        name = "forget-" + slug("-".join(gone + args.forget[:i + 1])) + (".safetensors" * (model.format == "compvis"))
        last = args.out and i == len(args.forget) - 1
        out = Path(args.out) if last else (Path(args.out).parent if args.out else Path("out")) / name
        if model.format == "compvis" and out.suffix != ".safetensors":
            raise UserError(f"--out {out}: a single-file model must end in .safetensors")
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
        checkpoint.check_writable(out)
        outs.append(out)
    return outs


def main(argv=None, started=None):
    """`started`: when the process started (the command line gives it), so that the first request's time
    line includes the start-up (imports, loading the model); a caller running several requests in one
    process, such as the benchmark, leaves it out."""
    args = parse_args(argv)
    try:
        args.forget = [c.strip().lower() for c in args.forget]
        device = distributed.init(sample.pick_device(args.device))  # torchrun: this process's device
        if not distributed.is_main():
            sys.stderr = open(os.devnull, "w")  # rank 0 prints; an error here still shows (below)
        model = checkpoint.load(args.weights, device=device, dtype=None)  # the file's own dtype...
        args.save_dtype = sample.DTYPES[args.save_dtype] if args.save_dtype else next(model.unet.parameters()).dtype
        model.to(dtype=sample.DTYPES[args.dtype])                          # ...and the compute dtype
        cfg = config(args, is_toy(model))
        world = concept_source(model, cfg.seed)
        args.guidance = args.guidance or model.guidance
        if args.clip is not None:  # loaded before any work: a wrong folder fails here, in one line
            from clip_vision import load_clip
            args.clip_model = load_clip(args.clip, device=device)
        startup = None if started is None else time.time() - started
        for i, (concept, out) in enumerate(zip(args.forget, output_models(args, model, world))):
            run_request(model, world, concept, cfg, args, out, startup=startup if i == 0 else None)
    except (UserError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted: finished requests are saved; rerun the same command "
              "with --resume to continue the current one", file=sys.stderr)
        return 130
    except Exception:
        if not distributed.is_main():  # rank 0 may not have failed: say which rank did
            sys.stderr = sys.__stderr__
            print(f"rank {distributed.rank()} failed:", file=sys.stderr)
        raise
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(started=STARTED))
