"""One unlearning request, as library functions a notebook can call without a command line:

    req = request.prepare(model, method, world, "van gogh", cfg)   # the plan, prompts, phi_0's images
    history = request.train(model, method, req, cfg)                # the shared loop (trainer.py)
    request.save(model, req, method, cfg, metrics, request.output_paths("out/no-van-gogh.safetensors"))

prepare: the ledger (in the model's metadata) and duge.plan say which concepts feed each loss,
`world` (concepts.SDConcepts, or the toy world's) turns them into prompts, the frozen reference
(phi_0, or the model at the request's start) draws their images (cached on disk by prompt), and
the method's data() says which of them it trains on. train: the loop, with its resume point
(tensors, optimizer, step) written every 50 steps, at the end, and on Ctrl-C / SIGTERM. save: the
model in the input's format with the request in its ledger, and a delta file (the trained tensors
and phi_0's: the next request distils towards the original through it).
"""
import hashlib
import json
import re
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

import checkpoint
import concepts
import distributed
import duge
import sample
import trainer
from baselines import GradientProjection, concept_embeddings, protected_subspace


class UserError(Exception):
    """Bad input: printed as one line, no traceback, nothing written."""


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_toy(model):
    return "duge.tokenizer" in model.meta  # only the toy model brings its own tokenizer


def load_phi0(model, base=None, names=()):
    """phi_0, the original model, as a function of the same UNet (trainer.Original): its values of the
    cross-attention tensors, of `names` and of every tensor an earlier request trained. Before any
    request, the model itself; afterwards the copy carried in the last delta file, or `base` (the
    original model's file). A tensor no request trained yet still holds phi_0's value in the model."""
    named = dict(model.unet.named_parameters())
    want = set(trainer.trainable_names(model.unet, "attn2")) | set(names)
    if base:   # its tensors only; read as the model predicts, which also spares a SD 2.x file's guess
        original = dict(checkpoint.load(base, prediction_type=model.unet.cfg.prediction_type).unet.named_parameters())
        return trainer.Original(model.unet, {n: original[n].to(named[n]) for n in sorted(want)})
    steps, carried = checkpoint.read_ledger(model)["steps"], {}
    if steps:
        delta = Path(model.source).resolve().parent / steps[-1]["delta"]
        if not delta.exists():
            raise UserError(f"the original model's tensors should be in {delta}, which is missing; "
                            "pass --base ORIGINAL_MODEL")
        carried = {k.removeprefix("phi0."): v for k, v in load_file(str(delta)).items() if k.startswith("phi0.")}
    return trainer.Original(model.unet, {n: carried.get(n, named[n]).to(named[n]) for n in sorted(want | set(carried))})


def fingerprint(model, ref):
    """Names the cache folder of a reference's images: a hash of its cross-attention tensors and of one
    other (conv_in: its own if a request trained it, as --trainable unet does), and of what the UNet predicts."""
    h = hashlib.sha1()
    own = [(k, v) for k, v in sorted(ref.tensors.items()) if ".attn2." in k]
    conv_in = ref.tensors.get("input_blocks.0.0.weight", model.unet.input_blocks[0][0].weight)
    for k, v in own + [("conv_in", conv_in)]:
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    if model.unet.cfg.prediction_type != "epsilon":   # the same tensors read as v draw other images
        h.update(model.unet.cfg.prediction_type.encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------------------------
# What a request trains on

@dataclass
class Prompts:
    """The prompts of a request, which a method's data() picks from (trainer.py)."""
    targets: list             # c*: prompts naming the concepts to unlearn (replayed earlier ones first)
    anchors: list             # c^a: each target with its concept replaced by the anchor (row-aligned)
    names: list               # the concept each target names, its name alone (row-aligned)
    related: list             # prompts of the related concepts R_k
    memory: list              # 2 prompts of every concept of the memory M, then generic prompts
    concept: list             # this request's own targets (the last num_prompts) ...
    concept_anchors: list     # ... and their anchors


def prompts_for(world, plan, num_prompts, generic):
    prompts = lambda c, n: world.prompts(c, world.kind(c), n, exclude=plan.exclude)
    rows = [(p, concepts.anchor_prompt(p, c, a), c) for c, a in plan.unlearn for p in prompts(c, num_prompts)]
    targets, anchors, names = ([r[i] for r in rows] for i in range(3))
    related = [p for r in plan.related for p in prompts(r, num_prompts)]
    memory = [p for r in plan.memory for p in prompts(r, 2)] + world.generic(generic, exclude=plan.exclude)
    return Prompts(targets, anchors, names, related, memory, targets[-num_prompts:], anchors[-num_prompts:])


@dataclass
class Request:
    concept: str
    kind: str
    anchor: str
    plan: duge.Plan
    prompts: Prompts
    phi0: trainer.Original    # the original model
    start: trainer.Original   # the model as the request found it (phi_n)
    ref: trainer.Original     # the method's frozen reference: phi0 or start
    names: list               # the trained tensors
    data: dict                # {group: {"x": latents, "c_...": contexts}}, on the UNet's device


def prepare(model, method, world, concept, cfg, kind=None, anchor="", retain=None, base=None, cache="cache",
            sampling=None):
    """Everything a request trains on. sampling: how the reference draws its images (sample.generate's
    sampler, steps, guidance, height, width)."""
    kind = kind or world.kind(concept)
    names = trainer.trainable_names(model.unet, cfg.trainable)
    phi0 = load_phi0(model, base, names)
    start = trainer.Original(model.unet, {n: p for n, p in model.unet.named_parameters() if n in names})
    ref = phi0 if method.reference == "phi0" else start
    nearest = concepts.nearest_by_text(model, concept, cfg.num_related)
    plan = duge.plan(checkpoint.read_ledger(model), concept, anchor, kind, world.candidates, nearest, retain=retain,
                     replay=method.replays)
    prompts = prompts_for(world, plan, cfg.num_prompts, cfg.generic)
    req = Request(concept, kind, anchor, plan, prompts, phi0, start, ref, names, {})
    if hasattr(method, "data"):   # a trained method (UCE edits in closed form instead)
        req.data = draw_data(model, method.data(prompts), ref, Path(cache) / fingerprint(model, ref),
                             cfg.images_per_prompt, "phi_0" if ref is phi0 else "reference", sampling or {})
    return req


def draw_data(model, groups, ref, folder, k, who, sampling):
    """A method's groups of prompts -> tensors: "x" by the reference's images (k per prompt, cached in
    folder), every other key by the text encoder (each prompt once per image)."""
    device = next(model.unet.parameters()).device
    enc = lambda ps: sample.encode_prompts(model, [p for p in ps for _ in range(k)])
    with ref.applied():
        xs = {g: sample.generate_cached(model, spec["x"], k, folder, desc=f"{who} images: {g}", **sampling)
              for g, spec in groups.items()}
    return {g: {key: (xs[g] if key == "x" else enc(ps)).to(device) for key, ps in spec.items()}
            for g, spec in groups.items()}


# -----------------------------------------------------------------------------------------------
# Training, with its resume point

class Enough(Exception):
    """Raised between steps when train()'s `enough` says the concept is forgotten."""


def train(model, method, req, cfg, resume_point=None, resume=False, progress=True, enough=None):
    """The loop on req.data. resume_point: a path where the resume point is written every 50 steps, at
    the end and on Ctrl-C / SIGTERM; with resume=True training continues from it when it exists.
    enough(steps done) -> True stops training there (matched forgetting: steps_until).
    -> the loss logs of every step trained (a finished resume point's last, when none was left)."""
    start, opt_state, last = 0, None, []
    pull = req.phi0.tensors if cfg.gamma_to == "phi0" else {    # --gamma-to start: before a resume point loads
        n: p.detach().clone() for n, p in model.unet.named_parameters() if n in req.names}
    if resume and Path(resume_point).exists():
        start, opt_state, extra, last = load_resume(resume_point, model.unet, req.concept)
        print(f"  resuming at step {start} of {cfg.steps}", file=sys.stderr)
        if hasattr(method, "load_state"):
            method.load_state(extra)
    projection = None
    if cfg.gp:  # CUIG: the key/value updates stay orthogonal to the kept concepts' text embeddings
        named = dict(model.unet.named_parameters())
        basis = protected_subspace(concept_embeddings(model, req.plan.memory))
        projection = GradientProjection({n: named[n] for n in req.names}, basis)

    with stop_between_steps() as asked:
        def on_step(step, logs, opt):
            done, stop = step + 1, distributed.any_rank(asked)  # torchrun: every rank stops at the same step
            if resume_point is not None and (stop or done % 50 == 0 or done == cfg.steps) and distributed.is_main():
                state = method.state() if hasattr(method, "state") else {}
                save_resume(resume_point, model.unet, req.names, opt, req.concept, done, logs, state)
            if stop:
                raise KeyboardInterrupt(f"stopped after step {done} of {cfg.steps} of '{req.concept}'; rerun the "
                                        f"same command with --resume to continue from step {done}")
            history.append(logs)
            if enough is not None and enough(done):
                raise Enough
        history = []
        try:
            trainer.unlearn(model.unet, method, req.ref, req.data, cfg, original=pull, progress=progress,
                            start_step=start, optimizer_state=opt_state, on_step=on_step, projection=projection)
        except FloatingPointError as e:
            raise UserError(str(e)) from None
        except Enough:
            pass
    return history or last


def steps_until(recognised, ladder, target=0.10):
    """Matched forgetting: the `enough` of train() that checks the concept at each rung of the ladder
    (steps, mildest first) and stops at the first where recognised() <= target; training runs on
    through the rungs (the same run continued: rung k's model is what --steps k trains, as each
    step's draws depend on its number alone). -> (enough, the checks made: [(steps, recognised)])."""
    checks = []

    def enough(done):
        if done not in ladder:
            return False
        checks.append((done, recognised()))
        return checks[-1][1] <= target
    return enough, checks


def shrink_back(unet, towards, recognised, target=0.10, rounds=3):
    """After matched forgetting (issue 29): theta = towards + a (theta - towards), the trained tensors
    moved back along the straight line to `towards` (the request's start, or phi_0) to the smallest a
    in (0, 1] at which recognised() <= target still holds, found by `rounds` halvings of [0, 1] (a is
    1 when every try fails). The less a request moves, the less it moves what it should keep.
    -> the checks made: [(a, recognised)]"""
    named = dict(unet.named_parameters())
    trained = {n: named[n].detach().clone() for n in towards}
    at = lambda a: {n: towards[n] + a * (trained[n] - towards[n]) for n in towards}
    lo, hi, checks = 0.0, 1.0, []
    for _ in range(rounds):
        a = (lo + hi) / 2
        trainer.put(unet, at(a))
        checks.append((a, recognised()))
        lo, hi = (lo, a) if checks[-1][1] <= target else (a, hi)
    trainer.put(unet, at(hi) if hi < 1 else trained)
    return checks


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


def trained_tensors(unet, names):
    named = dict(unet.named_parameters())
    return {f"theta.{n}": named[n].detach().cpu().contiguous() for n in names}


def save_resume(path, unet, names, opt, concept, step, logs, extra):
    meta = {"concept": concept, "step": str(step), "losses": json.dumps(logs)}
    checkpoint.save_training_state(path, trained_tensors(unet, names) | extra, opt, meta)


def load_resume(path, unet, concept):
    """-> (step, optimizer state, the method's own tensors, [the last step's logs]); the trained tensors
    are copied into unet."""
    tensors, opt_state, meta = checkpoint.load_training_state(path)
    if meta["concept"] != concept:
        raise UserError(f"{path} is a resume point for '{meta['concept']}', not '{concept}'; delete it or drop "
                        "--resume")
    unet.load_state_dict({k.removeprefix("theta."): v for k, v in tensors.items() if k.startswith("theta.")},
                         strict=False)
    extra = {k: v for k, v in tensors.items() if not k.startswith("theta.")}
    return int(meta["step"]), opt_state, extra, [json.loads(meta["losses"])]


# -----------------------------------------------------------------------------------------------
# Outputs

def output_paths(out):
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return {"model": out, "delta": Path(f"{stem}.delta.safetensors"), "grid": Path(f"{stem}.grid.png"),
            "md": Path(f"{stem}.eval.md"), "csv": Path(f"{stem}.eval.csv"),
            "resume": Path(f"{stem}.resume.safetensors")}


def record(model, req, configs, metrics, paths):
    """The request in the model's ledger (its metadata): concept, kind, anchor, related concepts, every
    setting, the metrics, and the delta file's name."""
    ledger = checkpoint.read_ledger(model)
    hparams = {k: v for c in configs for k, v in asdict(c).items()}
    ledger["steps"].append({"concept": req.concept, "kind": req.kind, "anchor": req.anchor,
                            "retain": list(req.plan.related), "hparams": hparams, "metrics": metrics,
                            "delta": paths["delta"].name})
    model.meta["duge.ledger"] = json.dumps(ledger)


def save(model, req, paths, dtype=None):
    """The delta file (trained tensors, phi_0's), then the model: rank 0 writes, the others wait."""
    if distributed.is_main():
        delta = (trained_tensors(model.unet, req.names)
                 | {f"phi0.{n}": v.cpu().contiguous() for n, v in req.phi0.tensors.items()})
        with checkpoint.atomic_path(paths["delta"]) as tmp:
            save_file(delta, str(tmp), metadata={"duge.ledger": model.meta["duge.ledger"]})
        checkpoint.save(model, paths["model"], format=model.format, dtype=dtype)  # the model file last
        paths["resume"].unlink(missing_ok=True)
    distributed.barrier()  # the next request reads this delta file on every rank
    model.source = str(paths["model"])
