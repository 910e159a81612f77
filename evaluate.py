"""Measuring unlearning on real Stable Diffusion with CLIP, and the summaries every evaluation shares.

    python evaluate.py --weights out/sd15-no-van-gogh.safetensors --clip clip-vit-large-patch14/ --device cuda
    python train.py --forget "van gogh" --weights v1-5-pruned-emaonly.safetensors --clip clip-vit-large-patch14/

What it measures, as UCE and MACE report it: for every candidate artist and object of concepts.py
(and every forgotten concept), n images from one fixed prompt ("a painting in the style of
{artist}", "a photo of a {object}") and fixed seeds; CLIP ViT-L/14 (clip_vision.py) classifies each
image zero-shot among the candidates of its kind, written with the same template, and a concept's
accuracy is how often its own images are classified as it. Beside it, the CLIP score of each image
with its own prompt (100 x cosine similarity, as ESD reports), averaged over the retained concepts'
images. The base model's images (phi_0) use the same prompts and seeds, so the table reads
concept by concept, before and after.

What it cannot measure: CLIP's own knowledge bounds it. A concept CLIP does not recognise in the
base model's images (a low base accuracy) can be shown neither forgotten nor kept, so read each
row against its base column; and CLIP judges what an image looks like, so a forgotten artist whose
style is drawn under another name still counts as forgotten if CLIP names the other.

The summaries (means with 95% intervals, the worst retained concept) are the toy world's too
(toy/evaluate.py), which is why they live here, in the library.
"""
import argparse
import csv
import io
import json
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import concepts
import distributed
import sample

# ------------------------------------------------------------------------------------------
# Summaries with intervals (any evaluation: kind_of(concept) -> its kind)


def wilson(p, n, z=1.96):
    """95% Wilson score interval of a proportion p measured on n images."""
    if n == 0:
        return (float("nan"), float("nan"))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def groups(names, forgotten, kind_of, held_out=()):
    """forgotten; retained in-domain (the concepts of a kind already hit, which erode first);
    retained cross-domain (the other kinds); and, across kinds, the retained concepts no method saw
    (held out) and the others (seen: they may be in a method's memory or preserve set)."""
    kinds = {kind_of(c) for c in forgotten}
    kept = [c for c in names if c not in forgotten]
    out = {"forgotten": [c for c in names if c in forgotten],
           "retained_in_domain": [c for c in kept if kind_of(c) in kinds],
           "retained_cross_domain": [c for c in kept if kind_of(c) not in kinds]}
    if held_out:
        out |= {"retained_seen": [c for c in kept if c not in held_out],
                "retained_held_out": [c for c in kept if c in held_out]}
    return out


def summarise(acc, base, forgotten, kind_of, n=None, held_out=()):
    """Group accuracies (groups()), each a mean over concepts and its base; the worst retained concept
    of each retained group; erosion. With n (concept -> images), also 95% intervals: Wilson intervals
    of the mean as a proportion of all the group's images."""
    out = {}
    mean = lambda d, cs: sum(d[c] for c in cs) / len(cs) if cs else float("nan")
    for g, cs in groups(list(acc), forgotten, kind_of, held_out).items():
        out[g], out[g + "_base"] = mean(acc, cs), mean(base, cs)
        if n is not None:
            out[g + "_ci"] = wilson(out[g], sum(n[c] for c in cs))
        if g != "forgotten" and cs:
            worst = min(cs, key=lambda c: (acc[c], c))
            out[g + "_worst"] = worst
            out[g + "_worst_acc"], out[g + "_worst_base"] = acc[worst], base[worst]
            if n is not None:
                out[g + "_worst_ci"] = wilson(acc[worst], n[worst])
    retained = [c for c in acc if c not in forgotten]
    out["retained"] = mean(acc, retained)
    out["erosion"] = mean(base, retained) - mean(acc, retained)
    return out


def pct(v):
    return "-" if v is None or v != v else f"{100 * v:.0f}%"


def summary_lines(s):
    """Markdown bullets of a summary: mean [interval] (base), worst concept, quality."""
    lines = []
    for g, label in (("forgotten", "forgotten"), ("retained_in_domain", "retained in-domain"),
                     ("retained_cross_domain", "retained cross-domain"), ("retained_seen", "retained, seen by methods"),
                     ("retained_held_out", "retained, held out from every method")):
        if g not in s or s[g] != s[g]:   # absent or nan: the group is empty
            continue
        ci = s.get(g + "_ci")
        line = f"- {label}: {100 * s[g]:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
        line += f" (base {100 * s[g + '_base']:.1f}%)"
        if g + "_worst" in s:
            wci = s.get(g + "_worst_ci")
            line += (f"; worst {s[g + '_worst']} {pct(s[g + '_worst_acc'])}"
                     + (f" [{pct(wci[0])}, {pct(wci[1])}]" if wci else "") + f" (base {pct(s[g + '_worst_base'])})")
        lines.append(line)
    if "quality_fd" in s:
        lines.append(f"- quality (Frechet distance of classifier features to the generator's, lower is better): "
                     f"{s['quality_fd']:.2f} (base {s['quality_fd_base']:.2f})")
    if "clip_score" in s:
        lines.append(f"- CLIP score of the retained concepts' images with their prompts (100 x cosine): "
                     f"{s['clip_score']:.2f} (base {s['clip_score_base']:.2f})")
    return lines


def table(acc_by_model, kind_of, forgotten=(), n=None):
    """Markdown table: one row per concept, one column per model (with the last model's 95% interval)."""
    cols = list(acc_by_model)
    last = acc_by_model[cols[-1]]
    head = "| concept | kind | " + " | ".join(cols) + (" | 95% interval | images |" if n else " |")
    lines = [head, "|---|---|" + "---|" * (len(cols) + (2 if n else 0))]
    for c in last:
        mark = " (forgotten)" if c in forgotten else ""
        row = f"| {c}{mark} | {kind_of(c)} | " + " | ".join(pct(acc_by_model[m][c]) for m in cols)
        if n:
            lo, hi = wilson(last[c], n[c])
            row += f" | {pct(lo)}-{pct(hi)} | {n[c]}"
        lines.append(row + " |")
    return "\n".join(lines)


def write_csv(acc_by_model, path, kind_of, n=None):
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = list(acc_by_model)
    w.writerow(["concept", "kind"] + cols + (["images"] if n else []))
    for c in acc_by_model[cols[-1]]:
        w.writerow([c, kind_of(c)] + [f"{acc_by_model[m][c]:.4f}" for m in cols] + ([n[c]] if n else []))
    with checkpoint.atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_report(r, gone, kind_of, md_path, csv_path):
    """The table of every concept under phi_0 and now (markdown and CSV), and the summary printed."""
    md = table({"base": r["base"], "after": r["eval"]}, kind_of, forgotten=gone, n=r["images"])
    md += "\n\n" + "\n".join(summary_lines(r["summary"]))
    if distributed.is_main():  # under torchrun every rank has the same table; rank 0 writes it
        with checkpoint.atomic_path(md_path) as tmp:
            tmp.write_text(f"# Forgetting: {', '.join(gone)}\n\n{md}\n")
        write_csv({"base": r["base"], "after": r["eval"]}, csv_path, kind_of, n=r["images"])
        for line in summary_lines(r["summary"]):
            print("  " + line[2:], file=sys.stderr)
    return {"eval": r["eval"], "base": r["base"], "summary": r["summary"]}


# ------------------------------------------------------------------------------------------
# Real SD, scored by CLIP

TEMPLATES = {"style": "a painting in the style of {}", "object": "a photo of a {}", "other": "a photo of {}"}
NEUTRAL = "a photo"  # the alternative CLIP chooses from for a concept of no known kind ("other")


@dataclass(frozen=True)
class Shot:
    prompt: str
    seed: int
    concept: str

    @property
    def key(self):
        return f"{self.prompt}#{self.seed}"


def concept_list(forgotten=(), source=None):
    """Every concept measured: the known artists and objects (held-out ones included), and every forgotten one."""
    source = source or concepts.SDConcepts()
    return list(dict.fromkeys(source.known("style") + source.known("object") + list(forgotten)))


def shots(n, forgotten=(), source=None):
    """n images per concept: its kind's template, seeds from the prompt (the same in every evaluation)."""
    source = source or concepts.SDConcepts()
    out = []
    for c in concept_list(forgotten, source):
        prompt = TEMPLATES[source.kind(c)].format(c)
        out += [Shot(prompt, zlib.crc32(prompt.encode()) % 1_000_003 + 7919 * i, c) for i in range(n)]
    return out


@torch.no_grad()
def embed_images(model, clip, its, cache=None, steps=20, guidance=None, batch=8, desc="evaluation"):
    """Draw each image and keep its CLIP embedding (L2-normalised): key -> list of floats. Items in
    `cache` (the base model's, from an earlier request) are not drawn again."""
    cache = {} if cache is None else cache
    todo = list({it.key: it for it in its if it.key not in cache}.values())
    mine = distributed.shard(todo)  # under torchrun: this rank's share, gathered below
    for i in tqdm(range(0, len(mine), batch), desc=desc, unit="batch", disable=not todo):
        part = mine[i:i + batch]
        images = sample.generate(model, [it.prompt for it in part], steps=steps, seeds=[it.seed for it in part],
                                 guidance=model.guidance if guidance is None else guidance)
        emb = clip.encode_image(clip_preprocess(images)).float().cpu()
        for it, e in zip(part, emb):
            cache[it.key] = [round(v, 6) for v in e.tolist()]
    cache.update(distributed.gather_dict({it.key: cache[it.key] for it in mine}))   # every rank's share
    return {it.key: cache[it.key] for it in its}


def clip_preprocess(images):
    from clip_vision import preprocess
    return preprocess(images)


@torch.no_grad()
def score(clip, its, embeddings, forgotten=(), source=None):
    """-> (concept -> (hits, images), concept -> mean CLIP score of its images). An image counts as
    a hit when CLIP picks its own concept among the candidates of its kind (same template)."""
    source = source or concepts.SDConcepts()
    names = concept_list(forgotten, source)
    by_kind = {}
    for c in names:
        by_kind.setdefault(source.kind(c), []).append(c)
    classes = {k: cs + ([""] if k == "other" else []) for k, cs in by_kind.items()}   # "": the neutral prompt
    text = {k: clip.encode_text([TEMPLATES[k].format(c) if c else NEUTRAL for c in cs]).float().cpu()
            for k, cs in classes.items()}
    hits, clip_scores = {c: [0, 0] for c in names}, {c: [] for c in names}
    for it in its:
        k = source.kind(it.concept)
        sims = text[k] @ torch.tensor(embeddings[it.key])                  # cosine: both L2-normalised
        hits[it.concept][0] += classes[k][sims.argmax().item()] == it.concept
        hits[it.concept][1] += 1
        clip_scores[it.concept].append(100 * sims[classes[k].index(it.concept)].item())
    return ({c: tuple(v) for c, v in hits.items()},
            {c: sum(v) / len(v) if v else float("nan") for c, v in clip_scores.items()})


def evaluate(model, clip, forgotten, n, base_model=None, base_cache=None, steps=20, guidance=None, source=None):
    """Accuracy of every concept now and under the base model (base_model(): a context manager that
    swaps it in, e.g. phi_0.applied), on the same prompts and seeds; base_cache: a JSON path that
    keeps the base model's embeddings per image. -> {"eval", "base", "images", "summary"}"""
    source = source or concepts.SDConcepts()
    its = shots(n, forgotten, source)
    cache = json.loads(base_cache.read_text()) if base_cache is not None and base_cache.exists() else {}
    if any(it.key not in cache for it in its):
        with base_model():
            base_emb = embed_images(model, clip, its, cache, steps, guidance, desc="evaluation: phi_0")
        if base_cache is not None and distributed.is_main():  # torchrun: rank 0 writes
            with checkpoint.atomic_path(base_cache) as tmp:
                tmp.write_text(json.dumps(cache))
    else:
        base_emb = {it.key: cache[it.key] for it in its}
    emb = embed_images(model, clip, its, None, steps, guidance, desc="evaluation: after")
    (hits, cs), (hits_b, cs_b) = score(clip, its, emb, forgotten, source), score(clip, its, base_emb, forgotten, source)
    acc = {c: h / k for c, (h, k) in hits.items()}
    base = {c: h / k for c, (h, k) in hits_b.items()}
    n_by = {c: k for c, (_, k) in hits.items()}
    summary = summarise(acc, base, forgotten, source.kind, n_by, source.held_out)
    kept = [c for c in acc if c not in forgotten]
    summary["clip_score"] = sum(cs[c] for c in kept) / len(kept)
    summary["clip_score_base"] = sum(cs_b[c] for c in kept) / len(kept)
    return {"eval": acc, "base": base, "images": n_by, "summary": summary}


def report(model, clip, phi0, gone, n, md_path, csv_path, base_cache, steps=20, guidance=None):
    """After a request on real SD (train.py --clip): eval.md / eval.csv and the printed summary."""
    r = evaluate(model, clip, gone, n, phi0.applied, base_cache, steps, guidance)
    return write_report(r, gone, concepts.SDConcepts().kind, md_path, csv_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score a Stable Diffusion v1 / 2.x model with CLIP: accuracy of every "
                                             "concept, before (--base) and now.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", required=True, help="the model to score")
    ap.add_argument("--clip", required=True, help="the transformers folder of openai/clip-vit-large-patch14")
    ap.add_argument("--base", default=None, help="the model before unlearning (None: --weights itself, so the "
                                                 "table compares it with itself)")
    ap.add_argument("--prediction-type", default="auto", choices=["auto", *sample.PREDICTION_TYPES],
                    help="what the UNets predict (auto: what each file says; an official SD 2.x file: v, as the "
                         "768-v models; 2.x-base needs epsilon)")
    ap.add_argument("--forgotten", default=None, help="comma-separated concepts (None: the model's ledger)")
    ap.add_argument("-n", type=int, default=8, help="images per concept")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--out", default="out/clip-eval", help="writes OUT.md and OUT.csv")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (None: autodetect)")
    args = ap.parse_args(argv)
    try:
        if args.n < 1 or args.steps < 1:
            raise ValueError(f"-n {args.n} / --steps {args.steps}: must be positive")
        from clip_vision import load_clip
        device = distributed.init(sample.pick_device(args.device))  # torchrun: this process's device
        clip = load_clip(args.clip, device=device)
        model = checkpoint.load(args.weights, device=device, prediction_type=args.prediction_type)
        gone = ([c.strip().lower() for c in args.forgotten.split(",") if c.strip()] if args.forgotten is not None
                else checkpoint.forgotten(model))
        base = checkpoint.load(args.base, device=device, prediction_type=args.prediction_type) if args.base else model
        swap = base_swap(model, base)
        r = evaluate(model, clip, gone, args.n, swap, None, args.steps)
        write_report(r, gone, concepts.SDConcepts().kind, Path(args.out + ".md"), Path(args.out + ".csv"))
    except (checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if distributed.is_main():
        print(f"wrote {args.out}.md and {args.out}.csv", file=sys.stderr)
    return 0


def base_swap(model, base):
    """A context manager that puts the base model's UNet into `model` for a while (the base is
    only ever sampled from, so its other parts are the model's)."""
    from contextlib import contextmanager

    @contextmanager
    def swapped():
        unet = model.unet
        model.unet = base.unet
        try:
            yield
        finally:
            model.unet = unet
    return swapped


if __name__ == "__main__":
    sys.exit(main())
