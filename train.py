"""Continual concept unlearning from the command line: one request at a time, each on the previous output.

    python train.py --forget "van gogh"                                  # the toy model in weights/
    python train.py --forget "monet" --weights out/forget-van-gogh.safetensors
    python train.py --forget "van gogh" --forget "picasso"              # two requests in a row
    python train.py --forget "van gogh" --weights v1-5-pruned-emaonly.safetensors   # real SD v1
    python train.py --forget "van gogh" --weights v2-1_512-ema-pruned.safetensors --prediction-type epsilon  # 2.1-base
    python train.py --forget "van gogh" --method esd                     # a baseline (baselines.py)
    torchrun --nproc_per_node 2 train.py --forget "van gogh"             # several GPUs (distributed.py)

This file is the command line only: request.py prepares, trains and saves a request (a notebook
calls it the same way); here are the flags, the checks of the input, the evaluation (the toy
world's classifier, or CLIP on real SD), the before/after grid and the time each phase took.
"""
import time

STARTED = time.time()  # the process's start: the command line's first request prints its start-up time

import argparse  # noqa: E402  (after STARTED, so that the start-up time includes every import)
import dataclasses
import math
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import adversarial
import baselines
import checkpoint
import distributed
import duge
import request
import sample
import trainer
from request import UserError

METHODS = {"duge": duge.Duge, "esd": baselines.Esd, "ca": baselines.Ca, "uce": baselines.Uce,
           "finetune": baselines.Finetune}
LADDER = (5, 10, 20, 30, 45, 60, 90, 120, 180, 240)          # --match-forgetting's rungs (steps), mildest first
UCE_LADDER = (1e4, 3e3, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.0)   # ... UCE's (--uce-preserve)
# --help's groups: (title, config class, its fields shown there; None: all)
FLAG_GROUPS = [
    ("training (every method)", trainer.TrainConfig, ["steps", "lr", "batch", "seed", "trainable", "num_prompts",
                                                      "images_per_prompt", "num_related", "generic"]),
    ("DUGE's losses and recipe (duge.py)", duge.DugeConfig, ["lambda_pr", "lambda_reg", "lambda_kv", "recipe",
                                                            "target", "attention", "prior", "regulariser"]),
    ("what a method is given (DUGE: phi0 and replay; a baseline: phin and none)", duge.DugeConfig,
     ["reference", "replay"]),
    ("baselines (baselines.py) and CUIG's add-ons", baselines.BaselineConfig, ["esd_eta", "esd_prompt", "uce_lambda",
                                                                              "uce_preserve"]),
    (None, trainer.TrainConfig, ["gamma", "gamma_to", "gp"]),
    ("the robust variant (adversarial.py)", adversarial.RobustConfig, None),
    (None, trainer.TrainConfig, ["lr_rest"]),
    ("real SD: memory bounds", trainer.TrainConfig, ["micro_batch", "checkpointing", "autocast"]),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Forget concepts from Stable Diffusion v1 / 2.x with DUGE (or a baseline).")
    g = ap.add_argument_group("the request")
    g.add_argument("--forget", action="append", required=True, metavar="CONCEPT",
                   help="concept to forget; repeat for several requests in a row")
    g.add_argument("--weights", default=str(checkpoint.TOY_WEIGHTS), help="input model (default: the toy model)")
    g.add_argument("--prediction-type", default="auto", choices=["auto", *sample.PREDICTION_TYPES], help="what it "
                   "predicts (default: auto, what the file says; an official SD 2.x file: v; 2.x-base needs epsilon)")
    g.add_argument("--method", default="duge", choices=list(METHODS), help="DUGE, or a baseline (default: duge)")
    g.add_argument("--kind", default="auto", choices=["auto", "style", "object", "colour", "other"],
                   help="the concept's kind (default: auto, looked up among the known concepts)")
    g.add_argument("--anchor", default="", help="what the concept becomes (default: '', nothing, so "
                                                "'a painting in the style of X' -> 'a painting')")
    g.add_argument("--retain", default=None, help="comma-separated related concepts to protect (default: the "
                                                  "nearest by text embedding)")
    group = None
    for title, cls, names in FLAG_GROUPS:   # every config field is a flag; its default from the preset
        group = ap.add_argument_group(title) if title else group
        for f in dataclasses.fields(cls):
            if names is None or f.name in names:
                add_config_flag(group, cls, f)
    g = ap.add_argument_group("images, evaluation and outputs")
    g.add_argument("--gen-sampler", default=None, choices=sorted(sample.SAMPLERS), help="sampler of phi_0's images "
                   "and the grid (default: the toy evaluation's on the toy model, ddim on SD)")
    g.add_argument("--gen-steps", type=int, default=None, help="its steps (default: the toy evaluation's, 20 on SD)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale of every image (default: the model's)")
    g.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    g.add_argument("--eval-n", type=int, default=None, help="images per style (and at least per shape and colour) "
                   "in the toy evaluation, per concept in the CLIP one (default: 32 on the toy model, 8 on SD)")
    g.add_argument("--clip", default=None, help="real SD: score every request with this CLIP (the transformers "
                                                "folder of openai/clip-vit-large-patch14), as evaluate.py does")
    g.add_argument("--eval-seed", type=int, default=0, help="toy evaluation: which images (seeds) it draws (default: 0)")
    g.add_argument("--match-forgetting", type=float, default=None, metavar="TARGET",
                   help="toy model: stop at the first rung of --ladder where the concept is recognised on <= TARGET of "
                        "16 check images (seeds the evaluation never draws); UCE: its mildest --uce-preserve that does")
    g.add_argument("--ladder", default=",".join(map(str, LADDER)), help="the rungs of --match-forgetting, in steps")
    g.add_argument("--shrink", choices=["start", "phi0"], help="after --match-forgetting, move the trained tensors back "
                   "towards the request's start (or phi_0, checking every forgotten concept) while the check holds")
    g.add_argument("--shrink-target", type=float, default=None, help="what the check must show while shrinking "
                   "(default: --match-forgetting's TARGET; 0: no check image recognised)")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation (the toy world's or CLIP's)")
    g.add_argument("--no-grid", action="store_true", help="skip the before/after grid")
    g.add_argument("--out", default=None, help="output model (default: out/forget-<concepts>.safetensors)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    g.add_argument("--base", default=None, help="the original model, if the last delta file is not at hand")
    g.add_argument("--cache", default="cache", help="folder of phi_0's images (default: cache)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run")
    g.add_argument("--device", default=None, help="cpu, cuda or mps (default: autodetect)")
    g.add_argument("--dtype", default="fp32", choices=sorted(checkpoint.DTYPES), help="compute dtype (default: fp32)")
    g.add_argument("--save-dtype", choices=sorted(checkpoint.DTYPES), help="written model's dtype (default: the "
                                                                           "input's)")
    return ap.parse_args(argv)


def add_config_flag(group, cls, f):
    presets = trainer.PRESETS if cls is trainer.TrainConfig else {"toy": cls(), "sd": cls()}
    toy, sd = (getattr(presets[p], f.name) for p in ("toy", "sd"))
    kw = ({"action": argparse.BooleanOptionalAction} if isinstance(toy, bool) else
          {"type": type(toy), "choices": f.metadata["choices"]})
    shown = toy if toy == sd else f"{toy} on the toy model, {sd} on SD"
    if cls is duge.DugeConfig and f.name in ("reference", "replay"):   # a flag of every method, defaults of each
        shown = f"{toy} for DUGE, {getattr(baselines.BaselineConfig(), f.name)} for a baseline"
    group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kw,
                       help=f"{f.metadata['help']} (default: {shown})")


def configs(args, toy):
    """The flags given on the command line over the model's preset: (TrainConfig, the method's own
    configs), checked."""
    given = lambda cls: {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    train_given = given(trainer.TrainConfig)
    train_given.setdefault("trainable", getattr(METHODS[args.method], "trainable", "kv"))   # ESD-x: all of attn2
    cfg = dataclasses.replace(trainer.PRESETS["toy" if toy else "sd"], **train_given)
    d = given(duge.DugeConfig)
    own = ([duge.DugeConfig(**{**duge.RECIPES[d.get("recipe", "ours")], **d}),   # the recipe's, then the user's
            adversarial.RobustConfig(**given(adversarial.RobustConfig))] if args.method == "duge" else
           [baselines.BaselineConfig(**given(baselines.BaselineConfig))])
    if toy:   # the toy evaluation's fast sampler, validated there (docs/toy_world.md)
        from toy.evaluate import EVAL_SAMPLER, EVAL_STEPS
        fast = args.gen_sampler in (None, EVAL_SAMPLER)
        args.gen_sampler, args.gen_steps = args.gen_sampler or EVAL_SAMPLER, args.gen_steps or (
            EVAL_STEPS if fast else 20)
    else:
        args.gen_sampler, args.gen_steps = args.gen_sampler or "ddim", args.gen_steps or 20
    args.eval_n = args.eval_n if args.eval_n is not None else 32 if toy else 8
    if args.clip is not None and toy:
        raise UserError("--clip scores real SD; the toy model is scored by its own classifier (drop --clip)")
    if args.match_forgetting is not None:
        if not toy:
            raise UserError("--match-forgetting checks with the toy world's classifier: toy model only")
        for flag, v in (("--match-forgetting", args.match_forgetting), ("--shrink-target", args.shrink_target)):
            if v is not None and not 0 <= v < 1:
                raise UserError(f"{flag} {v}: a fraction in [0, 1), e.g. 0.1")
        raw, args.ladder = args.ladder, sorted({int(r) for r in re.findall(r"\d+", args.ladder)})
        if not re.fullmatch(r"[\d,\s]+", raw) or not args.ladder or args.ladder[0] < 1:
            raise UserError(f"--ladder {raw}: comma-separated positive step counts, e.g. 10,20,40")
        cfg = dataclasses.replace(cfg, steps=args.ladder[-1])   # trained up to the last rung at most
    elif args.shrink:
        raise UserError("--shrink moves back as far as the --match-forgetting check holds: give --match-forgetting")
    for flag, v in (("--eval-n", args.eval_n), ("--gen-steps", args.gen_steps), ("--size", args.size)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be positive")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance {args.guidance}: must be a finite number")
    return cfg, own


def new_method(name, cfg, own, guidance):
    """A fresh method object for one request (the robust variant's attacker starts anew); a baseline
    is given --reference and --replay."""
    if name == "duge":
        return adversarial.RobustDuge(*own, cfg.batch, cfg.seed, guidance) if own[1].adversarial else duge.Duge(own[0])
    method = METHODS[name](own[0]) if name in ("esd", "uce") else METHODS[name]()   # CA, finetune: no settings
    method.reference, method.replays = own[0].reference, own[0].replay
    return method


def output_models(args, model, world):
    """The requests and the output model of each, checked before any work."""
    gone, outs = checkpoint.forgotten(model), []
    for i, concept in enumerate(args.forget):
        if not concept:
            raise UserError("--forget needs a concept name, e.g. --forget \"van gogh\"")
        if concept in gone:
            raise UserError(f"'{concept}' is already forgotten (request {gone.index(concept) + 1} of the ledger)")
        if concept in args.forget[:i]:
            raise UserError(f"'{concept}' is given twice with --forget")
        world.kind(concept)  # an unknown toy-world concept fails here
        name = "forget-" + request.slug("-".join(gone + args.forget[:i + 1])) + (
            ".safetensors" * (model.format == "compvis"))
        last = args.out and i == len(args.forget) - 1
        out = Path(args.out) if last else (Path(args.out).parent if args.out else Path("out")) / name
        if model.format == "compvis" and out.suffix != ".safetensors":
            raise UserError(f"--out {out}: a single-file model must end in .safetensors")
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
        checkpoint.check_writable(out)
        outs.append(out)
    return outs


def grid_rows(world, plan, concept):
    """(prompt, label) rows of the before/after grid: two prompts of this request's concept, one of
    a replayed earlier concept, one of each of two related concepts."""
    prompts = lambda c, n: world.prompts(c, world.kind(c), n, exclude=plan.exclude)
    rows = [(p, f"{p}   (forgotten now)") for p in prompts(concept, 2)]
    rows += [(p, f"{p}   (replayed: forgotten earlier)") for c, _ in plan.unlearn[:-1][-1:] for p in prompts(c, 1)]
    return rows + [(p, f"{p}   (related: kept)") for r in plan.related[:2] for p in prompts(r, 1)]


def run_request(model, world, concept, cfg, own, args, out, startup=None):
    """One request, timed by phase; startup: the process's start-up seconds (the first request only)."""
    paths, phases, t0 = request.output_paths(out), {}, time.time()
    method = new_method(args.method, cfg, own, args.guidance)

    @contextmanager
    def phase(name):
        t = time.time()
        yield
        phases[name] = phases.get(name, 0) + time.time() - t
    kind = args.kind if args.kind != "auto" else world.kind(concept)
    retain = [r.strip().lower() for r in args.retain.split(",") if r.strip()] if args.retain else None
    images = {"sampler": args.gen_sampler, "steps": args.gen_steps, "guidance": args.guidance, "height": args.size,
              "width": args.size}
    print(f"request {len(checkpoint.forgotten(model)) + 1}: forget '{concept}' with {method.name} (kind {kind}, "
          f"anchor '{args.anchor}')", file=sys.stderr)
    with phase(f"{'phi_0' if method.reference == 'phi0' else 'reference'} images"):
        req = request.prepare(model, method, world, concept, cfg, kind=kind, anchor=args.anchor, retain=retain,
                              base=args.base, cache=args.cache, sampling=images)
    history, checks, gone = [], [], checkpoint.forgotten(model) + [concept]
    if args.match_forgetting is not None:
        from toy import evaluate
        # an edit re-solved from phi_0 over the ledger (uce+) erases every concept anew at each rung: all must
        # hold, checked in order until the first one over the target
        anew = hasattr(method, "edit") and method.reference == "phi0" and method.replays
        watched = [c for c, _ in req.plan.unlearn][::-1] if anew else [concept]     # this concept first

        def recognised(watched=watched, limit=args.match_forgetting):
            worst = 0.0
            for c in watched:
                worst = max(worst, evaluate.recognised(model, c, gone))
                if worst > limit:
                    break
            return worst
    if hasattr(method, "edit"):
        with phase(f"{method.name.upper()} edit"):
            for w in (UCE_LADDER if args.match_forgetting is not None else [method.preserve]):
                trainer.put(model.unet, req.start.tensors)   # each rung solved anew from the request's start
                method.preserve = w
                method.edit(model, req)
                checks += [(w, recognised())] if args.match_forgetting is not None else []
                if not checks or checks[-1][1] <= args.match_forgetting:
                    break
    else:
        print(f"  related concepts kept: {', '.join(req.plan.related) or '-'}; "
              + ", ".join(f"{len(d['x'])} {g}" for g, d in req.data.items()) + " images", file=sys.stderr)
        if args.resume and not paths["resume"].exists():
            print(f"  no resume point at {paths['resume']}: starting at step 0", file=sys.stderr)
        enough = None
        if args.match_forgetting is not None:
            enough, checks = request.steps_until(recognised, args.ladder, args.match_forgetting)
        with phase("training"):
            history = request.train(model, method, req, cfg, paths["resume"], resume=args.resume, enough=enough)
    met, shrunk = checks and checks[-1][1] <= args.match_forgetting, []
    if met and args.shrink and not hasattr(method, "edit"):
        limit = args.match_forgetting if args.shrink_target is None else args.shrink_target
        towards = (req.start if args.shrink == "start" else req.phi0).tensors
        with phase("shrink"):
            shrunk = request.shrink_back(model.unet, {n: towards[n] for n in req.names}, lambda: recognised(
                [concept] if args.shrink == "start" else gone[::-1], limit), limit)
    steps = 0 if hasattr(method, "edit") else checks[-1][0] if met else cfg.steps   # UCE's rungs are weights
    metrics = {"method": method.name, "seconds_train": round(time.time() - t0, 1), "steps_taken": steps,
               "image_gradients": steps * cfg.batch * len(req.data), "checks": checks, "shrink": shrunk,
               "final_losses": history[-1] if history else {}}
    if checks:
        print(f"  matched forgetting: '{concept}' recognised " + ", ".join(f"{100 * a:.0f}% at {r}" for r, a in checks)
              + ("" if met else f"; never <= {100 * args.match_forgetting:.0f}%") + "".join(
                  f"; x{a:g} of the change: {100 * r:.0f}%" for a, r in shrunk), file=sys.stderr)
    cache = Path(args.cache) / request.fingerprint(model, req.phi0)
    if request.is_toy(model) and not args.no_eval:
        from toy import evaluate
        with phase("evaluation"):
            metrics.update(evaluate.report(model, req.phi0, gone, args.eval_n, paths["md"], paths["csv"],
                                           cache / "base_eval.json", seed=args.eval_seed))
    elif args.clip is not None and not args.no_eval:   # real SD, scored by CLIP (evaluate.py)
        import evaluate
        with phase("evaluation"):
            metrics.update(evaluate.report(model, args.clip_model, req.phi0, gone, args.eval_n, paths["md"],
                                           paths["csv"], cache / f"base_clip_{args.gen_steps}_{args.guidance}_{args.size}.json",
                                           steps=args.gen_steps, guidance=args.guidance))
    metrics["seconds"] = {k: round(v, 1) for k, v in phases.items()}
    request.record(model, req, [cfg, *own], metrics, paths)
    rows = grid_rows(world, req.plan, concept)
    with phase("grid"):
        if not args.no_grid:
            grid = sample.before_after(model, req.start.applied, [p for p, _ in rows], **images)
            if distributed.is_main():   # under torchrun every rank holds the same model; rank 0 writes
                sample.save_image(sample.make_grid(grid, labels=[f"{label}   before | after" for _, label in rows]),
                                  paths["grid"])
    with phase("writing"):
        request.save(model, req, paths, args.save_dtype)
    total = time.time() - t0 + (startup or 0)
    shown = ({"start-up": startup} if startup is not None else {}) | phases
    print(f"  wrote {paths['model']}, {paths['delta'].name}" + ("" if args.no_grid else f", {paths['grid'].name}")
          + "\n  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in shown.items())
          + f", other {total - sum(shown.values()):.1f} s; total {total:.1f} s", file=sys.stderr)
    return metrics


def main(argv=None, started=None):
    """`started`: when the process started (the command line gives it), so that the first request's time line
    includes the start-up (imports, loading the model); the benchmark, running many requests, leaves it out."""
    args = parse_args(argv)
    try:
        args.forget = [c.strip().lower() for c in args.forget]
        device = distributed.init(sample.pick_device(args.device))  # torchrun: this process's device
        if not distributed.is_main():
            sys.stderr = open(os.devnull, "w")  # rank 0 prints; an error here still shows (below)
        model = checkpoint.load(args.weights, device=device, dtype=None, prediction_type=args.prediction_type)
        args.save_dtype = checkpoint.DTYPES.get(args.save_dtype) or next(model.unet.parameters()).dtype  # the file's
        model.to(dtype=checkpoint.DTYPES[args.dtype])  # the compute dtype (loaded in the file's own, above)
        cfg, own = configs(args, request.is_toy(model))
        args.guidance = args.guidance or model.guidance
        from toy.concepts import for_model   # the toy world's concepts, or real SD's (concepts.py)
        world = for_model(model, cfg.seed)
        if args.clip is not None:  # loaded before any work: a wrong folder fails here, in one line
            from clip_vision import load_clip
            args.clip_model = load_clip(args.clip, device=device)
        startup = None if started is None else time.time() - started
        for i, (concept, out) in enumerate(zip(args.forget, output_models(args, model, world))):
            run_request(model, world, concept, cfg, own, args, out, startup=startup if i == 0 else None)
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
