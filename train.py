"""Continual concept unlearning with DUGE: one request at a time, each on the previous output.

    python train.py --forget "van gogh"                                  # the toy model in weights/
    python train.py --forget "monet" --weights out/forget-van-gogh.safetensors
    python train.py --forget "van gogh" --forget "picasso"              # two requests in a row
    python train.py --forget "van gogh" --weights v1-5-pruned-emaonly.safetensors   # real SD v1

Each request (a "decremental step") does:
  1. work out the concept's kind, its anchor, the prompts naming it, the related concepts to
     protect (nearest by the model's own text embeddings) and the memory of prompts to keep;
  2. draw the anchor / related / memory images with the ORIGINAL model phi_0 (cached on disk);
  3. train the cross-attention keys and values on L_U + lambda_pr L_pr + lambda_reg R_pr (duge.py);
  4. write the full model (same format as the input) with the ledger of every forgotten concept in
     its metadata, a small delta file (the trained tensors and phi_0's), a before/after grid and,
     in the toy world, the evaluation table (evaluate.py).
The ledger is what makes the next request continual: earlier concepts are replayed so they stay
forgotten, and phi_0 is carried along in the delta so every step distils towards the original.
"""
import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import duge
import sample

# -----------------------------------------------------------------------------------------------
# Real Stable Diffusion: templates, candidate concepts and generic prompts. The toy world brings
# its own (toyworld.py).

SD_TEMPLATES = {
    "style": ["a painting in the style of {}", "a portrait in the style of {}", "a landscape painted by {}",
              "an artwork by {}", "a painting of a city by {}", "a still life in the style of {}",
              "a painting of a river by {}", "a painting of flowers by {}"],
    "object": ["a photo of a {}", "a picture of a {}", "a {} on a table", "a close-up photo of a {}",
               "an image of a {}", "a {} in a garden", "a drawing of a {}", "a photo of a {} in the street"],
    "other": ["a photo of {}", "an image of {}", "a picture of {}", "{}"],
}
SD_ARTISTS = ["van gogh", "monet", "picasso", "rembrandt", "salvador dali", "claude lorrain", "kandinsky",
              "klimt", "hokusai", "andy warhol", "frida kahlo", "leonardo da vinci", "edvard munch",
              "georges seurat", "jackson pollock", "piet mondrian", "paul cezanne", "thomas kinkade"]
SD_OBJECTS = ["apple", "broccoli", "backpack", "traffic light", "umbrella", "parachute", "orange",
              "goldfish", "bowtie", "harp", "gas pump", "sunglasses", "computer mouse", "broom",
              "english springer", "eiffel tower", "corgi", "airplane", "car", "dog", "cat"]
SD_GENERIC = ["a photo of a dog", "a mountain landscape at sunset", "a bowl of fruit on a table",
              "a city street at night", "a portrait of a woman", "a red sports car", "a cat sleeping on a sofa",
              "a forest in autumn", "a plate of food", "a beach with palm trees", "a house with a garden",
              "an astronaut in space"]


class UserError(Exception):
    """Bad input: printed as one line, no traceback, nothing written."""


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_toy(model):
    return "duge.tokenizer" in model.meta  # only the toy model brings its own tokenizer


# -----------------------------------------------------------------------------------------------
# The ledger: every request so far, stored as JSON in the checkpoint's metadata

def read_ledger(model):
    return json.loads(model.meta.get("duge.ledger", '{"steps": []}'))


def forgotten(ledger):
    return [(s["concept"], s["anchor"]) for s in ledger["steps"]]


# -----------------------------------------------------------------------------------------------
# Prompts

class World:
    """Where concepts, templates and prompts come from: the toy world or real SD."""

    def __init__(self, toy, seed):
        self.toy = toy
        self.rng = np.random.default_rng(seed)
        if toy:
            import toyworld
            self.tw = toyworld

    def kind(self, concept, requested="auto"):
        if requested != "auto":
            return requested
        if self.toy:
            return self.tw.concept_kind(concept)
        c = concept.lower()
        return "style" if c in SD_ARTISTS else "object" if c in SD_OBJECTS else "other"

    def candidates(self, kind):
        if self.toy:
            return {"style": self.tw.STYLES, "object": self.tw.SHAPES, "colour": self.tw.COLOURS}.get(kind, [])
        return {"style": SD_ARTISTS, "object": SD_OBJECTS}.get(kind, [])

    def prompts(self, concept, kind, n, exclude=()):
        """n prompts naming the concept, other slots filled with concepts not in `exclude`."""
        if not self.toy:
            ts = SD_TEMPLATES.get(kind, SD_TEMPLATES["other"])
            return [ts[i % len(ts)].format(concept) for i in range(n)]
        tw = self.tw
        def pick(xs):
            ok = [x for x in xs if x not in exclude and x != concept]
            return ok[self.rng.integers(len(ok))]

        ts = tw.TEMPLATES.get(kind, tw.TEMPLATES["object"])
        return [tw.fill_template(ts[i % len(ts)], concept, colour=pick(tw.COLOURS), shape=pick(tw.SHAPES),
                                 style=pick(tw.STYLES)) for i in range(n)]

    def generic(self, n, exclude=()):
        """Prompts of everything else the model should keep drawing (never a forgotten concept)."""
        if not self.toy:
            ok = [p for p in SD_GENERIC if not any(re.search(rf"\b{re.escape(c)}\b", p) for c in exclude)]
            return [ok[i % len(ok)] for i in range(n)]
        tw = self.tw
        keep = lambda xs: [x for x in xs if x not in exclude]
        shapes, colours, styles = keep(tw.SHAPES), keep(tw.COLOURS), keep(tw.STYLE_LABELS)
        return [tw.caption(shapes[self.rng.integers(len(shapes))], colours[self.rng.integers(len(colours))],
                           styles[self.rng.integers(len(styles))], self.rng) for _ in range(n)]


# -----------------------------------------------------------------------------------------------
# Images of the original model, cached on disk (they only depend on phi_0 and the prompt)

def fingerprint(model, phi0):
    h = hashlib.sha1()
    for k in sorted(phi0.tensors):
        h.update(k.encode())
        h.update(phi0.tensors[k].float().cpu().numpy().tobytes())
    h.update(model.unet.input_blocks[0][0].weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def original_latents(model, phi0, prompts, per_prompt, args, cache_dir, fp):
    """Latents x_0 drawn by phi_0 for each prompt (per_prompt seeds each), cached per prompt."""
    folder = Path(cache_dir) / fp
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in prompts:
        key = hashlib.sha1(json.dumps([p, per_prompt, args.gen_steps, args.guidance, args.size]).encode()).hexdigest()[:20]
        f = folder / f"{key}.safetensors"
        if f.exists():
            out.append(load_file(str(f))["latents"])
            continue
        with phi0.applied():
            lat = sample.generate(model, [p] * per_prompt, steps=args.gen_steps, guidance=args.guidance,
                                  height=args.size, width=args.size, decode=False)
        write_safetensors(f, {"latents": lat.cpu().contiguous()}, {"prompt": p})
        out.append(lat.cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------------------------
# Outputs

def write_safetensors(path, tensors, meta):
    """Write under a temporary name, then rename: an interrupted run never leaves half a file."""
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def output_paths(out):
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return {"model": out, "delta": Path(f"{stem}.delta.safetensors"), "grid": Path(f"{stem}.grid.png"),
            "md": Path(f"{stem}.eval.md"), "csv": Path(f"{stem}.eval.csv"),
            "resume": Path(f"{stem}.resume.safetensors")}


def check_writable(path):
    """Fail before any work if the output folder cannot be made or written (nothing is created)."""
    folder = Path(path).resolve().parent
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK) or (
            existing != folder and not os.access(existing, os.W_OK)):
        raise UserError(f"cannot write to {folder}; choose another --out")
    try:  # /proc and similar refuse even when os.access says yes
        probe = existing / f".duge-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); choose another --out") from None


def save_delta(path, unet, names, phi0, meta):
    named = dict(unet.named_parameters())
    tensors = {f"theta.{n}": named[n].detach().cpu().contiguous() for n in names}
    tensors.update({f"phi0.{n}": v.cpu().contiguous() for n, v in phi0.tensors.items()})
    write_safetensors(path, tensors, meta)


def load_phi0(model, ledger, args):
    """phi_0's cross-attention tensors: the model itself before any request; afterwards, the copy
    carried in the last delta file (or the --base model)."""
    names = duge.trainable_names(model.unet, "attn2")
    named = dict(model.unet.named_parameters())
    if args.base:
        base = checkpoint.load(args.base)
        tensors = dict(base.unet.named_parameters())
        return duge.Original(model.unet, {n: tensors[n].to(named[n]) for n in names})
    if not ledger["steps"]:
        return duge.Original(model.unet, {n: named[n] for n in names})
    delta = Path(model.source).resolve().parent / ledger["steps"][-1]["delta"]
    if not delta.exists():
        raise UserError(f"the original model's tensors should be in {delta}, which is missing; "
                        "pass --base ORIGINAL_MODEL")
    d = load_file(str(delta))
    return duge.Original(model.unet, {n: d[f"phi0.{n}"].to(named[n]) for n in names})


# -----------------------------------------------------------------------------------------------
# One request

def prepare(model, phi0, world, concept, kind, anchor, retain, ledger, args, fp):
    """Prompts, related concepts and phi_0's images -> the `data` dict duge.unlearn trains on."""
    gone = [c for c, _ in forgotten(ledger)]
    exclude = gone + [concept]
    # L_U: the current concept and every earlier one (replay), each with its own anchor
    pairs = []
    for c, a in (forgotten(ledger) if not args.no_replay else []) + [(concept, anchor)]:
        for p in world.prompts(c, world.kind(c), args.prompts, exclude=exclude):
            pairs.append((p, duge.anchor_prompt(p, c, a)))
    targets, anchors = [p for p, _ in pairs], [a for _, a in pairs]
    # related concepts R_k: user-given, or the nearest of the same kind by text embedding
    if retain is None:
        embed = lambda ps: duge.eot_embedding(sample.encode_prompts(model, ps), model.tokenizer(ps).to(
            next(model.text_encoder.parameters()).device), model.tokenizer.eot_id)
        pool = [c for c in world.candidates(kind) if c not in exclude]
        retain = duge.related_concepts(embed, concept, pool, args.num_related)
    related = [p for r in retain for p in world.prompts(r, world.kind(r), args.prompts, exclude=exclude)]
    # memory M: the related concepts of every step so far, every other concept of a kind hit so
    # far (the in-domain ones, which erode first) and generic prompts; never a forgotten one
    kept = [r for s in ledger["steps"] for r in s["retain"] if r not in exclude] + list(retain)
    for k in dict.fromkeys([s["kind"] for s in ledger["steps"]] + [kind]):
        kept += [c for c in world.candidates(k) if c not in exclude]
    memory = [p for r in dict.fromkeys(kept) for p in world.prompts(r, world.kind(r), 2, exclude=exclude)]
    memory += world.generic(args.memory, exclude=exclude)

    k = args.images_per_prompt
    x_a = original_latents(model, phi0, anchors, k, args, args.cache, fp)
    x_r = original_latents(model, phi0, related, k, args, args.cache, fp)
    x_m = original_latents(model, phi0, memory, k, args, args.cache, fp)
    enc = lambda ps: sample.encode_prompts(model, [p for p in ps for _ in range(k)])
    c_a = enc(anchors)
    data = {"anchor": {"x": x_a, "c_target": enc(targets), "c_anchor": c_a},
            # L_pr on the related images and on the anchor images with their own prompts
            "related": {"x": torch.cat([x_r, x_a]), "c": torch.cat([enc(related), c_a])},
            "memory": {"x": x_m, "c": enc(memory)}}
    dev = next(model.unet.parameters()).device
    data = {g: {n: v.to(dev) for n, v in d.items()} for g, d in data.items()}
    return data, retain, targets


def before_after_grid(model, phi_prev, prompts, path, args):
    """Rows: prompts; columns: two images before the request, then the same seeds after."""
    rows = []
    for p in prompts:
        with phi_prev.applied():
            before = sample.generate(model, [p] * 2, steps=args.gen_steps, guidance=args.guidance, height=args.size,
                                     width=args.size)
        after = sample.generate(model, [p] * 2, steps=args.gen_steps, guidance=args.guidance, height=args.size,
                                width=args.size)
        rows.append(torch.cat([before, after]))
    sample.save_image(sample.make_grid(rows, labels=[f"{p}   (before | after)" for p in prompts]), path)


def check_concepts(requested, ledger):
    done = [c for c, _ in forgotten(ledger)]
    for i, concept in enumerate(requested):
        if not concept:
            raise UserError("--forget needs a concept name, e.g. --forget \"van gogh\"")
        if concept in done:
            raise UserError(f"'{concept}' is already forgotten by this model (request {done.index(concept) + 1} "
                            "of its ledger); nothing to do")
        if concept in requested[:i]:
            raise UserError(f"'{concept}' is given twice with --forget")


def run_request(model, concept, args, world, out):
    ledger = read_ledger(model)
    done = [c for c, _ in forgotten(ledger)]
    paths = output_paths(out)
    paths["model"].parent.mkdir(parents=True, exist_ok=True)
    kind = world.kind(concept, args.kind)
    anchor = args.anchor if args.anchor is not None else ""
    retain = [r.strip().lower() for r in args.retain.split(",") if r.strip()] if args.retain else None
    cfg = duge.DugeConfig(steps=args.steps, lr=args.lr, batch=args.batch, lambda_pr=args.lambda_pr,
                          lambda_reg=args.lambda_reg, gamma=args.gamma, trainable=args.trainable, seed=args.seed)
    t0 = time.time()

    phi0 = load_phi0(model, ledger, args)
    fp = fingerprint(model, phi0)
    names = duge.trainable_names(model.unet, cfg.trainable)
    named = dict(model.unet.named_parameters())
    phi_prev = duge.Original(model.unet, {n: named[n] for n in names})  # the model as it came in
    print(f"request {len(done) + 1}: forget '{concept}' (kind {kind}, anchor '{anchor}')", file=sys.stderr)
    data, retain, targets = prepare(model, phi0, world, concept, kind, anchor, retain, ledger, args, fp)
    print(f"  related concepts kept: {', '.join(retain) or '-'}; {len(data['anchor']['x'])} anchor, "
          f"{len(data['related']['x'])} related, {len(data['memory']['x'])} memory images", file=sys.stderr)

    # resume point: the trained tensors and the optimizer, written every 50 steps and on Ctrl-C
    start, opt_state = 0, None
    if args.resume and paths["resume"].exists():
        start, opt_state = load_resume(paths["resume"], model.unet, concept)
        print(f"  resuming at step {start}", file=sys.stderr)

    def on_step(step, logs, opt):
        if (step + 1) % 50 == 0 and step + 1 < cfg.steps:
            save_resume(paths["resume"], model.unet, names, opt, concept, step + 1)

    try:
        history = duge.unlearn(model.unet, phi0, data, cfg, start_step=start, optimizer_state=opt_state,
                               on_step=on_step)
    except FloatingPointError as e:
        raise UserError(str(e)) from None

    metrics = {"seconds_train": round(time.time() - t0, 1), "final_losses": history[-1] if history else {}}
    if world.toy and not args.no_eval:
        metrics.update(evaluate_toy(model, phi0, ledger, concept, paths, args, fp))
    step = {"concept": concept, "kind": kind, "anchor": anchor, "retain": list(retain),
            "hparams": {k: getattr(cfg, k) for k in ("steps", "lr", "batch", "lambda_pr", "lambda_reg", "gamma",
                                                     "trainable")},
            "metrics": metrics, "delta": paths["delta"].name}
    ledger["steps"].append(step)
    model.meta["duge.ledger"] = json.dumps(ledger)
    save_delta(paths["delta"], model.unet, names, phi0, {"duge.ledger": model.meta["duge.ledger"]})
    checkpoint.save(model, paths["model"], format=model.format)
    model.source = str(paths["model"])
    shown = targets[:2] + [p for r in retain[:2] for p in world.prompts(r, world.kind(r), 1)]
    before_after_grid(model, phi_prev, shown, paths["grid"], args)
    paths["resume"].unlink(missing_ok=True)
    print(f"  wrote {paths['model']}, {paths['delta'].name}, {paths['grid'].name} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return metrics


def evaluate_toy(model, phi0, ledger, concept, paths, args, fp):
    """Accuracy of every concept before (phi_0, cached) and after; markdown + CSV tables."""
    import evaluate
    base_file = Path(args.cache) / fp / f"base_eval_n{args.eval_n}.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        with phi0.applied():
            base = evaluate.accuracy(model, n=args.eval_n)
        base_file.write_text(json.dumps(base))
    after = evaluate.accuracy(model, n=args.eval_n)
    gone = [c for c, _ in forgotten(ledger)] + [concept]
    summary = evaluate.summarise(after, base, gone)
    md = evaluate.table({"base": base, "after": after}, forgotten=gone)
    md += "\n\n" + "\n".join(f"- {k}: {100 * v:.1f}%" for k, v in summary.items())
    tmp = Path(str(paths["md"]) + ".tmp")
    tmp.write_text(f"# Forgetting: {', '.join(gone)}\n\n{md}\n")
    os.replace(tmp, paths["md"])
    evaluate.write_csv({"base": base, "after": after}, paths["csv"])
    print(f"  forgotten {100 * summary['forgotten']:.0f}% (base {100 * summary['forgotten_base']:.0f}%), "
          f"retained in-domain {100 * summary['retained_in_domain']:.0f}% "
          f"(base {100 * summary['retained_in_domain_base']:.0f}%), cross-domain "
          f"{100 * summary['retained_cross_domain']:.0f}% (base {100 * summary['retained_cross_domain_base']:.0f}%)",
          file=sys.stderr)
    return {"eval": after, "summary": summary}


def save_resume(path, unet, names, opt, concept, step):
    named = dict(unet.named_parameters())
    tensors = {f"theta.{n}": named[n].detach().cpu().contiguous() for n in names}
    state = opt.state_dict()
    for i, s in state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in s.items()})
    meta = {"concept": concept, "step": str(step), "param_groups": json.dumps(state["param_groups"])}
    write_safetensors(path, tensors, meta)


def load_resume(path, unet, concept):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["concept"] != concept:
        raise UserError(f"{path} is a resume point for '{meta['concept']}', not '{concept}'; delete it or drop --resume")
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("theta."):
                named[k[6:]].copy_(v)
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return int(meta["step"]), {"state": state, "param_groups": json.loads(meta["param_groups"])}


# -----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Forget concepts from a Stable Diffusion v1 model with DUGE "
                                             "(the toy model in weights/ by default).")
    ap.add_argument("--forget", action="append", required=True, metavar="CONCEPT",
                    help="concept to forget; repeat for several requests in a row")
    ap.add_argument("--weights", default=None, help=f"input model (default: {checkpoint.TOY_WEIGHTS})")
    ap.add_argument("--kind", default="auto", choices=["auto", "style", "object", "colour", "other"])
    ap.add_argument("--anchor", default=None, help="what the concept becomes (default: nothing, so "
                                                   "'a painting in the style of X' -> 'a painting')")
    ap.add_argument("--retain", default=None, help="comma-separated related concepts to protect "
                                                   "(default: the nearest by text embedding)")
    ap.add_argument("--num-related", type=int, default=3)
    ap.add_argument("--steps", type=int, default=duge.DugeConfig.steps)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 on the toy model, 1e-5 on SD")
    ap.add_argument("--batch", type=int, default=8, help="images per loss group per step")
    ap.add_argument("--lambda-pr", type=float, default=duge.DugeConfig.lambda_pr)
    ap.add_argument("--lambda-reg", type=float, default=duge.DugeConfig.lambda_reg)
    ap.add_argument("--gamma", type=float, default=duge.DugeConfig.gamma, help="L2 pull to the original tensors")
    ap.add_argument("--trainable", default=duge.DugeConfig.trainable, choices=["kv", "attn2"])
    ap.add_argument("--no-replay", action="store_true", help="ablation: do not replay earlier concepts in L_U")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per concept")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--memory", type=int, default=24, help="generic prompts in the memory")
    ap.add_argument("--gen-steps", type=int, default=20, help="DDIM steps for the training images")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale for images (default: the model's)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    ap.add_argument("--eval-n", type=int, default=16, help="images per concept in the toy evaluation")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--out", default=None, help="output model (default: out/forget-<concepts>.safetensors)")
    ap.add_argument("--base", default=None, help="the original model, if the last delta file is not at hand")
    ap.add_argument("--cache", default="cache", help="folder for phi_0's images")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=sorted(sample.DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.forget = [c.strip().lower() for c in args.forget]
        if any(not c for c in args.forget):
            raise UserError("--forget needs a concept name, e.g. --forget \"van gogh\"")
        device = sample.pick_device(args.device)
        model = checkpoint.load(args.weights or checkpoint.TOY_WEIGHTS, device=device,
                                dtype=sample.DTYPES[args.dtype])
        world = World(is_toy(model), args.seed)
        args.lr = args.lr or (1e-3 if world.toy else 1e-5)
        args.guidance = args.guidance or model.guidance
        gone = [c for c, _ in forgotten(read_ledger(model))]
        check_concepts(args.forget, read_ledger(model))
        outs = []
        for i, concept in enumerate(args.forget):
            if args.out and i == len(args.forget) - 1:
                out = Path(args.out)
            else:
                name = "forget-" + slug("-".join(gone + args.forget[:i + 1]))
                out = Path(args.out).parent / name if args.out else Path("out") / name
                if model.format == "compvis":
                    out = out.with_name(out.name + ".safetensors")
            if model.format == "compvis" and out.suffix != ".safetensors":
                raise UserError(f"--out {out}: a single-file model must end in .safetensors")
            check_writable(out)
            outs.append(out)
        for concept, out in zip(args.forget, outs):
            run_request(model, concept, args, world, out)
    except (UserError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished requests are saved; rerun with --resume to continue the current one",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
