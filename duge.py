"""DUGE: Decremental Unlearning without Generalization Erosion, all of the method in one file.

Paper: K. Thakral, T. Glaser, T. Hassner, M. Vatsa, R. Singh, "Continual Unlearning for
Foundational Text-to-Image Models without Generalization Erosion", arXiv 2503.13769 (2025).
Only its abstract is public; its three sentences are quoted next to the code below, and the
formulas are THIS PROJECT'S RECONSTRUCTION (README, "How DUGE works"). Notation:

    theta   the UNet being unlearned; only its cross-attention key/value projections train
    phi_0   the ORIGINAL model, frozen, from before the first request (phi_n: a step's start)
    c*, c^a a prompt naming the target concept, and the same prompt with it replaced by its
            anchor ("a painting in the style of van gogh" -> "a painting")
    A^l     output of the l-th cross-attention layer (attn2), before its output projection
    x_t     sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (sample.add_noise), t ~ U{0..999}

    L = L_U + lambda_pr * L_pr + lambda_reg * R_pr

Requests come one at a time ("decremental steps"), each from the previous output. `recipe` says
which concepts feed each loss: the ledger of forgotten concepts is replayed in L_U (no resurgence),
and the memory grows with every kind of concept hit. phi_0 is never a second UNet: it differs
from theta only in the trained tensors, so the same module runs with a copy of them swapped in.

Two recipes: "ours" (default), the reconstruction, and "paper", as a review paraphrases the paper
(README, "The paper's DUGE and ours"): L_U on attention MAPS against the UNCONDITIONAL prompt's
under phi_n, R_pr a parameter pull to phi_n, no replay (L_pr on a memory bank: ours took that from
it, as it measured better); each departure is a DugeConfig field (RECIPES). The robust variant's
adversary (adversarial.py) adds one term, L_adv. No file I/O and no CLI here: train.py makes the data and saves.
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

import distributed
from sample import NUM_TRAIN_TIMESTEPS, add_noise


METHODS = ("duge", "esd", "ca", "uce", "finetune")


@dataclass
class DugeConfig:
    """Every default of a request (PRESETS: the toy's and real SD's); train.py's flags override fields."""
    steps: int = 200
    lr: float = 1e-3          # AdamW on the trainable tensors
    lr_rest: float = 0.0      # ...but this one on those outside the attn2 keys and values (0: lr)
    batch: int = 8            # images per group (anchor / related / memory) in each step
    lambda_pr: float = 2.0    # weight of the prior-preservation loss L_pr (toy-world tuned, README)
    lambda_reg: float = 1.0   # weight of the memory regulariser R_pr
    gamma: float = 0.0        # optional L2 pull of the trained tensors towards phi_0 (inside R_pr)
    trainable: str = "kv"     # "kv": attn2.to_k/to_v (default); "attn2": every attn2 tensor; "unet": all of it
    replay: bool = True       # replay the ledger's concepts in L_U
    num_related: int = 3      # related concepts R_k, kept in the memory (and L_pr's images with prior="related")
    num_prompts: int = 8      # prompts per concept
    images_per_prompt: int = 2
    memory: int = 24          # generic prompts in the memory M
    seed: int = 0
    # memory bounds (same result up to float rounding; see README, "Real SD on one GPU")
    micro_batch: int = 0      # images per group per forward/backward, gradients accumulated (0: the whole batch)
    checkpointing: bool = False  # recompute UNet block activations in backward
    autocast: str = ""        # "bf16" / "fp16": forward in that dtype, trained tensors stay fp32
    # the methods DUGE is measured against (baselines.py) and CUIG's projection add-on
    method: str = "duge"      # one of METHODS
    esd_eta: float = 1.0      # ESD's negative guidance
    uce_lambda: float = 0.1   # UCE's pull towards the unedited weights
    uce_preserve: float = 1.0  # UCE's weight of the preserved concepts
    gp: bool = False          # CUIG's gradient projection: updates orthogonal to the retained concepts
    # the recipe, one field per choice the paper's description makes (first: ours; second: the other one)
    recipe: str = "ours"
    reference: str = "phi0"   # the frozen model of L_U and R_pr: phi_0 the original | phi_n, the step's start
    target: str = "anchor"    # L_U's target context: the anchor prompt | uncond, the empty prompt
    attention: str = "outputs"  # L_U compares attn2 outputs (+ eps) | maps, softmax(q k^T / sqrt(d))
    prior: str = "memory"     # L_pr's images: the memory bank's | related, the related concepts' and the anchor's
    regulariser: str = "distil"  # R_pr: distil to the reference on the memory | l2, parameters to the reference
    # the robust variant (adversarial.py): context-inversion steps against theta per training step (0: off)
    adversarial: int = 0
    lambda_adv: float = 1.0   # weight of L_adv, theta under the attacker's context vs phi_0 under the anchor
    completion: float = 0.0   # weight of its L_comp: the concept's noised images, no prompt (adversarial.py)

    def __post_init__(self):
        """Refuse settings that would train nothing, or nonsense, in one line."""
        for name, low in (("steps", 1), ("batch", 1), ("num_prompts", 1), ("images_per_prompt", 1), ("lr", None),
                          ("lambda_pr", 0), ("lambda_reg", 0), ("gamma", 0), ("lr_rest", 0), ("num_related", 0),
                          ("memory", 0), ("micro_batch", 0), ("esd_eta", 0), ("uce_lambda", 0), ("uce_preserve", 0),
                          ("adversarial", 0), ("lambda_adv", 0), ("completion", 0)):
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > 0 if low is None else v >= low)):
                raise ValueError(f"{name} {v}: must be {'at least ' + str(low) if low is not None else 'positive'}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(map(repr, allowed))}")


CHOICES = {"method": METHODS, "autocast": ("", "bf16", "fp16"), "trainable": ("kv", "attn2", "unet"),
           "recipe": ("ours", "paper"), "reference": ("phi0", "phin"), "target": ("anchor", "uncond"),
           "attention": ("outputs", "maps"), "prior": ("memory", "related"), "regulariser": ("distil", "l2")}
# The fields each recipe sets (train.py applies them before the user's own flags)
RECIPES = {"ours": {}, "paper": dict(reference="phin", target="uncond", attention="maps", prior="memory",
                                     regulariser="l2", replay=False)}


# SD: 3 x 8 images per step in micro-batches of 2, checkpointed: one UNet plus a few GB, not ~45 GB (README,
# "Real SD on one GPU"). Toy: 60 steps forget as fully as 100 and erode less (README, "One request").
PRESETS = {"toy": DugeConfig(steps=60), "sd": DugeConfig(lr=1e-5, micro_batch=2, checkpointing=True)}


# -----------------------------------------------------------------------------------------------
# The continual recipe: which concepts feed which loss in step k

@dataclass
class Recipe:
    unlearn: list             # (concept, anchor) pairs for L_U: this request, and every earlier one
    related: list             # R_k: the concepts nearest this one, which erode first (in the memory)
    memory: list              # the concepts of M: R_pr's prompts, L_pr's images (generic prompts come on top)
    exclude: list             # every forgotten concept: never in a prompt we keep


def recipe(ledger, concept, anchor, kind, candidates, nearest, retain=None, replay=True):
    """ledger: {"steps": [{"concept", "anchor", "kind", "retain"}, ...]} of the earlier requests;
    candidates(kind) -> the known concepts of a kind; nearest(pool) -> the related concepts
    chosen from pool (by text embedding), used when `retain` (the user's list) is None."""
    done = ledger["steps"]
    exclude = [s["concept"] for s in done] + [concept]
    unlearn = ([(s["concept"], s["anchor"]) for s in done] if replay else []) + [(concept, anchor)]
    related = list(retain) if retain is not None else nearest([c for c in candidates(kind) if c not in exclude])
    # M: the related concepts of every step so far, and every other concept of a kind hit so far
    # (the in-domain ones, which erode first); never a forgotten one
    kept = [r for s in done for r in s["retain"] if r not in exclude] + related
    for k in dict.fromkeys([s["kind"] for s in done] + [kind]):
        kept += [c for c in candidates(k) if c not in exclude]
    return Recipe(unlearn, related, list(dict.fromkeys(kept)), exclude)


# -----------------------------------------------------------------------------------------------
# What trains, the frozen original, and what L_U reads

def trainable_names(unet, which="kv"):
    """Names of the trained tensors (SD v1: 16 attn2 x (to_k, to_v) = 19.2 M parameters). Keys and values
    are where the prompt enters the UNet: editing them changes what a prompt means, not what it can draw."""
    parts = {"kv": ("to_k.weight", "to_v.weight"),
             "attn2": ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")}
    if which == "unet":   # everything: what the UNet can draw, not only what prompts mean (adversarial.py)
        return [n for n, _ in unet.named_parameters()]
    if which not in parts:
        raise ValueError(f"unknown trainable set {which!r}: choose 'kv', 'attn2' or 'unet'")
    return [f"{name}.{p}" for name, _ in unet.cross_attentions() for p in parts[which]]


class Original:
    """phi_0 as a function: the same UNet module run with the original trainable tensors.
    `tensors` holds phi_0's values of (at least) the trained tensors, by parameter name."""

    def __init__(self, unet, tensors):
        self.unet = unet
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}  # theta_0 of the trained subset

    @torch.no_grad()
    def __call__(self, x, t, context):
        return functional_call(self.unet, self.tensors, (x, t, context))

    @contextmanager
    def applied(self):
        """Temporarily put phi_0's tensors into the UNet, e.g. to sample from the original model."""
        named = dict(self.unet.named_parameters())
        saved = {k: named[k].detach().clone() for k in self.tensors}
        put = torch.no_grad()(lambda tensors: [named[k].copy_(v) for k, v in tensors.items()])
        put(self.tensors)
        try:
            yield self.unet
        finally:
            put(saved)


class AttentionRecorder:
    """What every attn2 layer computed in one forward, taken by forward pre-hooks (which fire under
    functional_call too): A^l, the input of attn2.to_out (B, N, C), or with what="maps" the attention
    maps (B, H, N, T). A layer the forward never reached stays None."""

    def __init__(self, unet, what="outputs"):
        layers = [m for _, m in unet.cross_attentions()]
        self.hooked = layers if what == "maps" else [m.to_out for m in layers]
        self.read = self.maps if what == "maps" else (lambda m, args: args[0])

    @staticmethod
    def maps(module, args):  # saved plainly, not by an activation checkpoint, whose recomputation has no hook
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return module.attention_maps(*args)

    def __enter__(self):
        self.outputs = [None] * len(self.hooked)

        def hook(i):
            return lambda module, args: self.outputs.__setitem__(i, self.read(module, args))
        self.handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(self.hooked)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# -----------------------------------------------------------------------------------------------
# The three losses. Each takes UNet outputs already computed in the two batched calls of
# `losses` below, so each reads as its formula.

def cross_attention_loss(attn_theta, attn_phi0, eps_theta, eps_phi0):
    """Abstract: "a cross-attention loss that steers the focus towards images devoid of the target concept".

        L_U = mean_l || A^l_theta(x_t, t, c*) - sg A^l_phi0(x_t, t, c^a) ||^2
              + || eps_theta(x_t, t, c*) - sg eps_phi0(x_t, t, c^a) ||^2,     x_0 in X^a

    On images without the concept (X^a, drawn by phi_0 from anchor prompts), the target prompt
    is made to attend, and to denoise, exactly as the anchor prompt does under the original
    model. The second term (as in Concept Ablation, Kumari et al. 2023) ties the final output too."""
    return layer_mean_mse(attn_theta, attn_phi0) + F.mse_loss(eps_theta, eps_phi0)


def layer_mean_mse(xs, ys):
    """The mean over layers of each layer's mean squared difference."""
    return torch.stack([F.mse_loss(x, y) for x, y in zip(xs, ys)]).mean()


def prior_preservation_loss(eps_theta, noise):
    """Abstract: "a prior-preservation loss that safeguards knowledge related to non-target concepts".

        L_pr = || eps_theta(x_t, t, c_m) - eps ||^2,      x_0 in X^m, phi_0's images of the memory M

    The plain diffusion loss (DreamBooth's prior preservation, Ruiz et al. 2023) on a memory bank of
    images of the concepts kept, as the paper is described (prior="memory", the default: it measured
    better over 12 requests than our first choice, prior="related": the related concepts' images
    and the anchor's, X^r and X^a with c^a; README, "The paper's DUGE and ours")."""
    return F.mse_loss(eps_theta, noise)


def regularization_loss(eps_theta, eps_phi0, trained=None, original=None, gamma=0.0):
    """Abstract: "a regularization loss that prevents the model from suffering from generalization erosion".

        R_pr = || eps_theta(x_t, t, c_m) - sg eps_phi0(x_t, t, c_m) ||^2  (+ gamma ||theta - theta_0||^2),
               c_m in the memory M (Recipe.memory's prompts and generic ones)

    Distilling towards the ORIGINAL model, not the previous step's, is what stops erosion from
    piling up: each step is pulled back to phi_0 on everything that must be kept, so the errors
    of steps 1..k-1 are corrected rather than inherited."""
    loss = F.mse_loss(eps_theta, eps_phi0)
    if gamma > 0:
        loss = loss + gamma * sum(((p - original[n]) ** 2).sum() for n, p in trained.items())
    return loss


# The paper's terms as the review describes them (recipe "paper"); L_pr keeps its form above.

def attention_map_loss(maps_theta, maps_phin):
    """"L_U = (1/M) sum_i (A_i^theta - A_i^{phi_n})^2", A the cross-attention maps: "the
    context-conditioned attention maps for the target concept" against "unconditional attention
    maps". Our choices where it is silent: the maps of every head, pixel and token of the M attn2
    layers, each layer's mean squared difference, averaged over layers; x_0 the anchor images."""
    return layer_mean_mse(maps_theta, maps_phin)


def parameter_loss(trained, reference):
    """R_pr "controls model parameters": || theta - theta_{phi_n} ||^2, here the MEAN square over
    the trained tensors' entries (our choice, so lambda_reg = 1 weighs it like the other terms)."""
    diffs = torch.cat([(p - reference[n]).flatten() for n, p in trained.items()])
    return (diffs ** 2).mean()


def with_noise(batch, generator):
    """The step's draws, for the whole batch before any micro-batching: eps_* and t_* of each group
    present (a: anchor, r: related, m: memory), drawn in that order."""
    groups = [g for g in "arm" if f"x_{g}" in batch]
    sizes = [len(batch[f"x_{g}"]) for g in groups]
    x = batch["x_a"]
    noise = torch.randn((sum(sizes), *x.shape[1:]), generator=generator).to(x).split(sizes)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (sum(sizes),), generator=generator).to(x.device).split(sizes)
    return {**batch, **{f"eps_{g}": e for g, e in zip(groups, noise)}, **{f"t_{g}": s for g, s in zip(groups, t)}}


def losses(unet, ref, params, batch, cfg):
    """All three losses from two UNet calls: theta on every group (attn2 recorded), the frozen reference
    (phi_0 or phi_n) on those it supervises. batch: x_a, c_target, c_anchor (anchor images with target /
    anchor prompts), x_r, c_r (L_pr's), x_m, c_m (memory; absent for the l2 R_pr), eps_*, t_* (with_noise),
    c_adv (the robust variant's attacker context: theta also runs on the anchor group under it)."""
    groups = [g for g in "arm" if f"x_{g}" in batch]
    sizes = [len(batch[f"x_{g}"]) for g in groups]
    noise, t = (torch.cat([batch[f"{k}_{g}"] for g in groups]) for k in ("eps", "t"))
    xt = add_noise(torch.cat([batch[f"x_{g}"] for g in groups]), noise, t)     # (Na+Nr[+Nm], 4, h, w)
    split = lambda v, gs: dict(zip(gs, v.split([sizes[groups.index(g)] for g in gs])))
    xt_, t_, noise_ = split(xt, groups), split(t, groups), split(noise, groups)
    sup = [g for g in "am" if g in groups]                                      # what the reference supervises
    c_sup = {"a": batch["c_anchor"], "m": batch.get("c_m")}

    adv, ctx = "c_adv" in batch, [batch["c_target"]] + [batch[f"c_{g}"] for g in groups[1:]]
    with AttentionRecorder(unet, cfg.attention) as rec_theta:   # (+ the anchor group under the attacker's context)
        e = (unet(torch.cat([xt, xt_["a"]]), torch.cat([t, t_["a"]]), torch.cat(ctx + [batch["c_adv"]])) if adv
             else unet(xt, t, torch.cat(ctx)))
    e, e_adv = split(e[:len(xt)], groups), e[len(xt):]
    with AttentionRecorder(unet, cfg.attention) as rec_ref:
        p = split(ref(*(torch.cat([d[g] for g in sup]) for d in (xt_, t_, c_sup))), sup)
    attn_theta = [a[:sizes[0]] for a in rec_theta.outputs]                      # the anchor group's A^l
    attn_ref = [a[:sizes[0]] for a in rec_ref.outputs]

    l_u = (attention_map_loss(attn_theta, attn_ref) if cfg.attention == "maps" else
           cross_attention_loss(attn_theta, attn_ref, e["a"], p["a"]))
    l_pr = prior_preservation_loss(e["r"], noise_["r"])
    r_pr = (parameter_loss(params, ref.tensors) if cfg.regulariser == "l2" else
            regularization_loss(e["m"], p["m"], params, ref.tensors, cfg.gamma))
    total = l_u + cfg.lambda_pr * l_pr + cfg.lambda_reg * r_pr
    logs = {"L_U": l_u.item(), "L_pr": l_pr.item(), "R_pr": r_pr.item()}
    if adv:   # adversarial.py: under the attacker's best context, denoise as phi_0 does under the anchor
        l_adv = F.mse_loss(e_adv, p["a"])
        total, logs["L_adv"] = total + cfg.lambda_adv * l_adv, l_adv.item()
    return total, logs


# -----------------------------------------------------------------------------------------------
# One decremental step

def draw(data, n, generator):
    """n random rows of every tensor in a group, e.g. {"x": latents, "c": contexts}."""
    idx = torch.randint(0, len(next(iter(data.values()))), (n,), generator=generator)
    return {k: v[idx.to(v.device)] for k, v in data.items()}


def unlearn(unet, phi0, data, cfg: DugeConfig, progress=True, start_step=0, optimizer_state=None,
            on_step=None, loss_fn=None, projection=None, adversary=None):
    """Train theta for cfg.steps on the three losses; -> per-step loss history. `data`: precomputed latents
    and contexts, data["anchor"] = {"x", "c_target", "c_anchor"}, data["related"|"memory"] = {"x", "c"}.
    on_step(step, logs, optimizer) runs after every step (train.py's resume point). loss_fn (default:
    `losses`) and projection (baselines.GradientProjection) run the baselines and CUIG's add-on in this loop;
    adversary(unet, step) -> the attacker's context for this step (adversarial.ContextAdversary)."""
    loss_fn = loss_fn or losses
    names = trainable_names(unet, cfg.trainable)
    named = dict(unet.named_parameters())
    unet.requires_grad_(False)
    params = {n: named[n].requires_grad_(True) for n in names}
    rest = set(params) - set(trainable_names(unet, "kv")) if cfg.lr_rest else set()   # --lr-rest's tensors
    groups = [{"params": [p for n, p in params.items() if (n in rest) == r], "lr": cfg.lr_rest if r else cfg.lr}
              for r in (False, True)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    g, history = torch.Generator(), []
    unet.checkpointing = cfg.checkpointing
    autocast = (torch.autocast(next(unet.parameters()).device.type,
                               dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast])
                if cfg.autocast else nullcontext())
    bar = tqdm(range(start_step, cfg.steps), desc="unlearning", disable=not progress,
               initial=start_step, total=cfg.steps)
    try:
        for step in bar:
            g.manual_seed(cfg.seed * 100_003 + step)  # each step's draws depend on the step alone: exact resume
            a = draw(data["anchor"], cfg.batch, g)
            batch = {"x_a": a["x"], "c_target": a["c_target"], "c_anchor": a["c_anchor"]}
            for k, s in (("related", "r"), ("memory", "m")):
                if k in data:
                    d = draw(data[k], cfg.batch, g)
                    batch |= {f"x_{s}": d["x"], f"c_{s}": d["c"]}
            batch = with_noise(batch, g)
            if adversary is not None:
                batch["c_adv"] = adversary(unet, step).expand(cfg.batch, -1, -1)
            opt.zero_grad(set_to_none=True)
            logs, mb = {}, min(cfg.micro_batch or cfg.batch, -(-cfg.batch // distributed.size()))
            for j in distributed.shard(range(0, cfg.batch, mb)):  # each loss is a mean: the micro-batches'
                # (under torchrun: every rank's share of them) weighted gradients add up
                part = {k: v[j:j + mb] for k, v in batch.items()}
                w = len(part["x_a"]) / cfg.batch
                with autocast:
                    loss, part_logs = loss_fn(unet, phi0, params, part, cfg)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step} ({part_logs}); "
                                             "lower --lr or use --dtype fp32")
                (w * loss).backward()
                logs = {k: logs.get(k, 0.0) + w * v for k, v in part_logs.items()}
            if adversary is not None and cfg.completion > 0:   # one batch per step: every rank draws the same,
                # weighted 1/N so the summed gradient counts it once
                l_comp = adversary.completion(unet, phi0, step) / distributed.size()
                (cfg.completion * l_comp).backward()
                logs["L_comp"] = l_comp.item()
            distributed.sum_gradients(params.values())
            logs = distributed.sum_logs(logs)
            if projection is not None:
                projection.before_step()
            opt.step()
            if projection is not None:
                projection.after_step()
            history.append(logs)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            if on_step is not None:
                on_step(step, logs, opt)
    finally:
        unet.requires_grad_(False)
        unet.checkpointing = False
    return history
