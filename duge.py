"""DUGE: Decremental Unlearning without Generalization Erosion, the method in one file.

Paper: K. Thakral, T. Glaser, T. Hassner, M. Vatsa, R. Singh, "Continual Unlearning for
Foundational Text-to-Image Models without Generalization Erosion", arXiv 2503.13769 (2025).
Only its abstract is public; its three sentences are quoted next to the code below, and the
formulas are THIS PROJECT'S RECONSTRUCTION (README, "How DUGE works"). Notation:

    theta   the UNet being unlearned; only its cross-attention key/value projections train
    phi_0   the ORIGINAL model, frozen, from before the first request (phi_n: a request's start)
    c*, c^a a prompt naming the target concept, and the same prompt with it replaced by its
            anchor ("a painting in the style of van gogh" -> "a painting")
    A^l     output of the l-th cross-attention layer (attn2), before its output projection
    x_t     sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (sample.add_noise), t ~ U{0..999}

    L = L_U + lambda_pr * L_pr + lambda_reg * R_pr  (+ lambda_kv * R_kv, our addition, off by default)

Requests come one at a time ("decremental steps"), each from the previous output; `plan` says which
concepts feed each loss. The training loop, phi_0 as a function of the same UNet (never a second
copy) and the trained tensors are trainer.py's; request.py draws the images. Two recipes: "ours"
(default), the reconstruction, and "paper", as a review paraphrases the paper (docs/paper_recipe.md):
each departure is a DugeConfig field, set together by RECIPES["paper"].
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer import KEYS_AND_VALUES, check, setting


@dataclass
class DugeConfig:
    """DUGE's own settings (the shared ones, steps, lr, batch..., are trainer.TrainConfig's)."""
    lambda_pr: float = setting(2.0, "weight of the prior-preservation loss L_pr", low=0)
    lambda_reg: float = setting(1.0, "weight of the memory regulariser R_pr", low=0)
    replay: bool = setting(True, "replay the forgotten concepts in L_U (--no-replay: the ablation)")
    lambda_kv: float = setting(0.0, "weight of R_kv (ours, not the paper's): the keys and values of every token "
                               "of the kept prompts held at the reference's (0: off)", low=0)
    # the recipe: one field per choice the paper's description makes (first: ours; second: the paper's)
    recipe: str = setting("ours", "DUGE as reconstructed here, or as the paper is described (sets the five "
                          "fields below and --no-replay)", choices=("ours", "paper"))
    reference: str = setting("phi0", "frozen model of L_U and R_pr: phi_0 the original, or phi_n the request's start",
                             choices=("phi0", "phin"))
    target: str = setting("anchor", "L_U's target context: the anchor prompt, or the empty one",
                          choices=("anchor", "uncond"))
    attention: str = setting("outputs", "L_U compares attn2 outputs (+ eps), or attention maps",
                             choices=("outputs", "maps"))
    prior: str = setting("memory", "L_pr's images: the memory bank's, or the related concepts' and the anchor's",
                         choices=("memory", "related"))
    regulariser: str = setting("distil", "R_pr: distil to the reference on the memory, or pull the parameters "
                               "(l2)", choices=("distil", "l2"))

    def __post_init__(self):
        check(self)


RECIPES = {"ours": {}, "paper": dict(reference="phin", target="uncond", attention="maps", prior="memory",
                                     regulariser="l2", replay=False)}


# -----------------------------------------------------------------------------------------------
# The continual plan: which concepts feed which loss in request k

@dataclass
class Plan:
    unlearn: list             # (concept, anchor) pairs for L_U: this request, and every earlier one (replay)
    related: list             # R_k: the concepts nearest this one, which erode first (in the memory)
    memory: list              # the concepts of M: R_pr's prompts, L_pr's images (generic prompts come on top)
    exclude: list             # every forgotten concept: never in a prompt we keep


def plan(ledger, concept, anchor, kind, candidates, nearest, retain=None, replay=True):
    """ledger: {"steps": [{"concept", "anchor", "kind", "retain"}, ...]} of the earlier requests;
    candidates(kind) -> the concepts of a kind a method may use (none held out); nearest(pool) -> the
    related concepts chosen from pool (by text embedding), used when `retain` (the user's list) is None."""
    done = ledger["steps"]
    exclude = [s["concept"] for s in done] + [concept]
    unlearn = ([(s["concept"], s["anchor"]) for s in done] if replay else []) + [(concept, anchor)]
    related = list(retain) if retain is not None else nearest([c for c in candidates(kind) if c not in exclude])
    # M: the related concepts of every request so far, and every other concept of a kind hit so far
    # (the in-domain ones, which erode first); never a forgotten one
    kept = [r for s in done for r in s["retain"] if r not in exclude] + related
    for k in dict.fromkeys([s["kind"] for s in done] + [kind]):
        kept += [c for c in candidates(k) if c not in exclude]
    return Plan(unlearn, related, list(dict.fromkeys(kept)), exclude)


# -----------------------------------------------------------------------------------------------
# What L_U reads: every attn2 layer's output (or attention maps), recorded by hooks

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
# The three losses, each on UNet outputs already computed, so each reads as its formula

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


def prior_preservation_loss(eps_theta, target):
    """Abstract: "a prior-preservation loss that safeguards knowledge related to non-target concepts".

        L_pr = || eps_theta(x_t, t, c_m) - eps ||^2,      x_0 in X^m, phi_0's images of the memory M

    The plain diffusion loss (DreamBooth's prior preservation, Ruiz et al. 2023) on a memory bank of
    images of the concepts kept, as the paper is described (prior="memory", the default: it measured
    better over 12 requests than our first choice, prior="related": the related concepts' images
    and the anchor's, X^r and X^a with c^a; docs/paper_recipe.md). A v-prediction model (SD 2.x 768-v)
    outputs v, so its target is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (trainer.draw_batch's
    "target"); the other losses compare two outputs of the same kind and need no change."""
    return F.mse_loss(eps_theta, target)


def regularization_loss(eps_theta, eps_phi0):
    """Abstract: "a regularization loss that prevents the model from suffering from generalization erosion".

        R_pr = || eps_theta(x_t, t, c_m) - sg eps_phi0(x_t, t, c_m) ||^2,  c_m in the memory M

    Distilling towards the ORIGINAL model, not the previous request's, is what stops erosion from
    piling up: each request is pulled back to phi_0 on everything that must be kept, so the errors
    of requests 1..k-1 are corrected rather than inherited."""
    return F.mse_loss(eps_theta, eps_phi0)


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


def kv_preservation_loss(trained, reference, contexts):
    """Ours (issue 29), not the paper's: L_U can be met by moving the keys and values of ANY token of
    c*, and the tokens c* shares with every prompt (start-of-text, "a painting in the style of", which a
    causal text encoder encodes alike in every prompt) are the cheapest; R_pr then repairs the memory's
    prompts but nothing repairs a concept outside it. R_kv holds W c at the reference's for every token
    c (all 77 positions) of the kept prompts in the batch (anchors, memory), so the edit has to live in
    the directions of the forgotten concepts' own tokens:

        R_kv = mean_W  sum_c ||(W - W_ref) c||^2 / sum_c ||W_ref c||^2,  W in every attn2 to_k, to_v

    computed from the contexts' Gram matrix G = sum_c c c^T: sum_c ||D c||^2 = sum(D G * D).
    Off by default: over 12 requests (3 seeds) it keeps more of the held-out concepts on both style
    sequences (63 -> 81%, 71 -> 85%) but fewer on the mixed one (63 -> 59%; README, "Headline results")."""
    c = contexts.reshape(-1, contexts.shape[-1]).detach().float()
    gram = c.T @ c
    terms = [((p - reference[n]) @ gram * (p - reference[n])).sum() / (reference[n] @ gram * reference[n]).sum()
             for n, p in trained.items() if n.endswith(KEYS_AND_VALUES)]
    return torch.stack(terms).mean()


# -----------------------------------------------------------------------------------------------
# DUGE as a method of the shared loop (trainer.py): what it trains on, and its loss

class Duge:
    name = "duge"

    def __init__(self, cfg: DugeConfig):
        self.cfg = cfg
        self.reference, self.replays = cfg.reference, cfg.replay

    def data(self, p):
        """Three groups of phi_0's images: "unlearn" X^a (anchor prompts' images, with c* and c^a),
        "prior" L_pr's (the memory bank), "memory" R_pr's (absent for the l2 regulariser)."""
        c_anchor = [""] * len(p.anchors) if self.cfg.target == "uncond" else p.anchors   # the paper: uncond
        groups = {"unlearn": {"x": p.anchors, "c_target": p.targets, "c_anchor": c_anchor}}
        if self.cfg.prior == "memory":
            groups["prior"] = {"x": p.memory, "c": p.memory}
        else:   # our first reconstruction: the related concepts' images, and the anchor's with c^a
            groups["prior"] = {"x": p.related + p.anchors, "c": p.related + c_anchor}
        if self.cfg.regulariser == "distil":
            groups["memory"] = {"x": p.memory, "c": p.memory}
        return groups

    def loss(self, unet, ref, batch):
        """All three losses from two UNet calls: theta on every group (attn2 recorded), the frozen
        reference (phi_0, or phi_n) on the groups it supervises (unlearn under c^a, memory)."""
        cfg, u, pr, mem = self.cfg, batch["unlearn"], batch["prior"], batch.get("memory")
        groups = [u, pr] + ([mem] if mem is not None else [])
        n = [len(b["x"]) for b in groups]
        with AttentionRecorder(unet, cfg.attention) as rec_theta:
            e = unet(torch.cat([b["x_t"] for b in groups]), torch.cat([b["t"] for b in groups]),
                     torch.cat([u["c_target"]] + [b["c"] for b in groups[1:]])).split(n)
        sup = [(u, u["c_anchor"])] + ([(mem, mem["c"])] if mem is not None else [])
        with AttentionRecorder(unet, cfg.attention) as rec_ref:
            p = ref(*(torch.cat(v) for v in zip(*[(b["x_t"], b["t"], c) for b, c in sup]))).split(n[:1] + n[2:])
        attn_theta = [a[:n[0]] for a in rec_theta.outputs]                      # the unlearn group's A^l
        attn_ref = [a[:n[0]] for a in rec_ref.outputs]

        l_u = (attention_map_loss(attn_theta, attn_ref) if cfg.attention == "maps" else
               cross_attention_loss(attn_theta, attn_ref, e[0], p[0]))
        l_pr = prior_preservation_loss(e[1], pr["target"])
        trained = {k: v for k, v in unet.named_parameters() if v.requires_grad}
        if cfg.regulariser == "l2":
            r_pr = parameter_loss(trained, ref.tensors)
        else:
            r_pr = regularization_loss(e[2], p[1])
        total, logs = l_u + cfg.lambda_pr * l_pr + cfg.lambda_reg * r_pr, {"L_U": l_u.item(), "L_pr": l_pr.item(),
                                                                            "R_pr": r_pr.item()}
        if cfg.lambda_kv > 0:
            kept = torch.cat([u["c_anchor"], pr["c"]] + ([mem["c"]] if mem is not None else []))
            r_kv = kv_preservation_loss(trained, ref.tensors, kept)
            total, logs["R_kv"] = total + cfg.lambda_kv * r_kv, r_kv.item()
        return total, logs
