"""The methods DUGE is measured against, and CUIG's add-ons, written as readably as duge.py.

Each baseline is applied one request after another as its own code would be: a request starts from
the previous request's output, and its frozen reference `ref` is the model at the START of the
request (phi_n, reference = "phin"), not the original, and it forgets the current concept alone
(replays = False). Each trained baseline is a method of the shared loop (trainer.py: data() says
which images and prompts it trains on, loss() its objective), so the same micro-batching, resume
point and outputs serve all methods (train.py --method). Its "unlearn" group holds:

    x, x_t, eps, t     images for the concept's group: the concept itself for ESD (drawn by ref
                       from the concept's prompts), the anchor's for CA and finetune, noised
    target             what the UNet is trained to output at x_t: eps, or v for a v-prediction
                       model (SD 2.x 768-v), so "- eps" below reads "- target" for those. The
                       terms that compare with ref's outputs need no change: both are v there.
    c_target           the prompts naming the concept (c*); c_anchor their anchors (c^a), for ESD
                       the empty prompt

References
- ESD: R. Gandikota, J. Materzynska, J. Fiotto-Kaufman, D. Bau, "Erasing Concepts from Diffusion
  Models", ICCV 2023 (eq. 2: negative guidance as the target; ESD-x trains cross-attention only).
- CA: N. Kumari, B. Zhang, S.-Y. Wang, E. Shechtman, R. Zhang, J.-Y. Zhu, "Ablating Concepts in
  Text-to-Image Diffusion Models", ICCV 2023 (model-based ablation, keys and values trained, plus
  the plain diffusion loss on the anchor's images as their training scripts run it).
- UCE: R. Gandikota, H. Orgad, Y. Belinkov, J. Materzynska, D. Bau, "Unified Concept Editing in
  Diffusion Models", WACV 2024 (eq. 7: a closed-form least-squares edit of to_k / to_v).
- CUIG: J. Lee et al., "Continual Unlearning for Text-to-Image Diffusion Models: A Regularization
  Perspective", ICLR 2026 (L2 towards the original weights; semantic-aware gradient projection).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from concepts import anchor_prompt
from trainer import KEYS_AND_VALUES, check, put, setting


@dataclass
class BaselineConfig:
    """The baselines' own settings (the shared ones are trainer.TrainConfig's). reference and replay
    equip any baseline with what DUGE has (train.new_method sets them on the method): phi_0 as the
    frozen reference and the source of the training images, and the ledger's concepts unlearned
    again; for UCE, the edit re-solved from phi_0 over every concept forgotten so far."""
    reference: str = setting("phin", "frozen reference, which also draws the training images: phi_n (the request's "
                             "start) or phi_0 (the original)", choices=("phin", "phi0"))
    replay: bool = setting(False, "unlearn the ledger's earlier concepts again with this one")
    esd_eta: float = setting(1.0, "ESD's negative guidance", low=0)
    esd_prompt: str = setting("concept", "ESD's conditioning: the concept's name alone (its paper), or its captions",
                              choices=("concept", "captions"))
    uce_lambda: float = setting(0.5, "UCE's pull towards the unedited weights (its script: 0.5)", low=0)
    uce_preserve: float = setting(0.1, "UCE's weight of the kept concepts (its script: 0.1)", low=0)

    def __post_init__(self):
        check(self)


class Finetune:
    """Plain fine-tuning (CA's noise-based variant): the concept prompt is trained on the anchor's
    images with the ordinary diffusion loss, nothing protected:  L = || eps_theta(x_t, c*, t) - eps ||^2"""
    name, reference, replays = "finetune", "phin", False

    def data(self, p):
        return {"unlearn": {"x": p.anchors, "c_target": p.targets}}

    def loss(self, unet, ref, batch):
        b = batch["unlearn"]
        loss = F.mse_loss(unet(b["x_t"], b["t"], b["c_target"]), b["target"])
        return loss, {"L_ft": loss.item()}


class Esd:
    """ESD-x. The concept's images are denoised under its name towards the reference model's
    prediction guided AWAY from it:

        L = || eps_theta(x_t, c*, t) - [eps_ref(x_t, t) - eta (eps_ref(x_t, c*, t) - eps_ref(x_t, t))] ||^2

    with eps_ref(x_t, t) the unconditional prediction (c_anchor is the empty prompt) and eta =
    cfg.esd_eta (1.0 in the paper). c*: the concept's name alone, as ESD's scripts pass it ("van
    gogh"), or with esd_prompt="captions" its whole captions (which also teaches anti-blue and
    anti-circle when the caption names them). x_0: the concept's images, drawn by ref from its
    captions (ESD samples x_t from its own model under the name: here they are drawn once, as
    every method's). Trains every attn2 tensor. For a v-prediction model the same combination of ref's
    v outputs is the target: it is the v of the eps above (eps is affine in v at a given x_t and t,
    and the weights 1 + eta, -eta sum to 1)."""
    name, reference, replays, trainable = "esd", "phin", False, "attn2"

    def __init__(self, cfg: BaselineConfig):
        self.eta, self.prompt = cfg.esd_eta, cfg.esd_prompt

    def data(self, p):
        c_target = p.names if self.prompt == "concept" else p.targets
        return {"unlearn": {"x": p.targets, "c_target": c_target, "c_anchor": [""] * len(p.targets)}}

    def loss(self, unet, ref, batch):
        b = batch["unlearn"]
        x_t, t = b["x_t"], b["t"]
        eps_uncond, eps_concept = ref(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      torch.cat([b["c_anchor"], b["c_target"]])).chunk(2)
        target = eps_uncond - self.eta * (eps_concept - eps_uncond)
        loss = F.mse_loss(unet(x_t, t, b["c_target"]), target)
        return loss, {"L_esd": loss.item()}


class Ca:
    """Concept Ablation, model-based. On the anchor's images, the concept prompt must predict what
    the reference predicts for the anchor prompt, and the anchor prompt keeps its plain diffusion loss:

        L = || eps_theta(x_t, c*, t) - sg eps_ref(x_t, c^a, t) ||^2 + || eps_theta(x_t, c^a, t) - eps ||^2"""
    name, reference, replays = "ca", "phin", False

    def data(self, p):
        return {"unlearn": {"x": p.anchors, "c_target": p.targets, "c_anchor": p.anchors}}

    def loss(self, unet, ref, batch):
        b = batch["unlearn"]
        x_t, t = b["x_t"], b["t"]
        target = ref(x_t, t, b["c_anchor"])
        eps_target, eps_anchor = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      torch.cat([b["c_target"], b["c_anchor"]])).chunk(2)
        ablate, prior = F.mse_loss(eps_target, target), F.mse_loss(eps_anchor, b["target"])
        return ablate + prior, {"L_ca": ablate.item(), "L_anchor": prior.item()}


# -----------------------------------------------------------------------------------------------
# UCE: a closed-form edit, no training loop


def token_rows(context, tokens, eot_id):
    """UCE's rows of a text: from its last word token to the end (end-of-text and padding),
    context (77, D), tokens (77,) -> (77 - last, D). The empty text gives from its start token on."""
    last = int((tokens == eot_id).int().argmax()) - 1
    return context[last:]


@torch.no_grad()
def uce_edit(projections, erase, preserve, lam=0.1, preserve_scale=1.0):
    """UCE (eq. 7), for every key / value projection W (out x D) of the cross-attention:

        W' = ( sum_e v*_e c_e^T + s_p sum_p W c_p c_p^T + lam W ) ( sum_e c_e c_e^T + s_p sum_p c_p c_p^T + lam I )^-1

    erase: (C_e, C_a) row-aligned text embeddings (N, D) of the concept texts and of their anchors,
    v*_e = W c_a (the anchor's key / value); preserve: C_p (M, D), kept where they are. lam pulls W'
    towards W; preserve_scale (s_p) weighs the kept concepts against the erased ones. Edits in place."""
    c_e, c_a, preserve = (x.double() for x in (*erase, preserve))   # float64: a large s_p or many rows make
    for w in projections:                                              # rhs ill-conditioned for float32
        W = w.weight.double()                                              # (out, D)
        v_star = c_a @ W.T                                                 # (N, out): the anchors' values
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        lhs = v_star.T @ c_e + preserve_scale * (W @ preserve.T) @ preserve + lam * W
        rhs = c_e.T @ c_e + preserve_scale * preserve.T @ preserve + lam * eye
        w.weight.copy_(torch.linalg.solve(rhs, lhs.T).T)                  # lhs @ rhs^-1 (rhs symmetric)


def _encode(model, texts):
    tokens = model.tokenizer(texts).to(next(model.text_encoder.parameters()).device)
    return model.text_encoder(tokens).float(), tokens


@torch.no_grad()
def uce_request(model, texts, anchors, preserve, lam=0.1, preserve_scale=1.0):
    """One UCE request on a checkpoint.StableDiffusion: the texts naming the concept are mapped onto
    their anchors (row-aligned from each text's last word on, as UCE's code aligns them), the
    preserved concepts' texts stay (all their rows), in every attn2 to_k and to_v."""
    eot = model.tokenizer.eot_id
    ctx, tokens = _encode(model, texts + anchors)
    c_e, c_a = [], []
    for i in range(len(texts)):
        r_e, r_a = token_rows(ctx[i], tokens[i], eot), token_rows(ctx[len(texts) + i], tokens[len(texts) + i], eot)
        m = min(len(r_e), len(r_a))
        c_e.append(r_e[:m]), c_a.append(r_a[:m])
    if preserve:   # every row of a kept text (its start, words, end and padding), as UCE's script keeps them
        c_p = _encode(model, preserve)[0].flatten(0, 1)
    else:
        c_p = ctx.new_zeros((0, ctx.shape[-1]))
    projections = [p for _, m in model.unet.cross_attentions() for p in (m.to_k, m.to_v)]
    uce_edit(projections, (torch.cat(c_e), torch.cat(c_a)), c_p, lam, preserve_scale)


class Uce:
    """UCE as a method: no training loop, one closed-form edit per request (uce_request)."""
    name, reference, replays = "uce", "phin", False

    def __init__(self, cfg: BaselineConfig):
        self.lam, self.preserve = cfg.uce_lambda, cfg.uce_preserve

    @torch.no_grad()
    def edit(self, model, req):
        """Every concept of req.plan.unlearn (this one; with replay, also the ledger's) onto its anchor:
        its name alone and the request's prompts that end in it, the concepts of plan.memory kept. With
        reference phi0 the edit starts from phi_0's keys and values, so with replay it is UCE's own
        multi-concept form: everything forgotten so far erased at once from the original."""
        if self.reference == "phi0":
            put(model.unet, req.phi0.tensors)
        texts, anchors, p = [], [], req.prompts
        for concept, anchor in req.plan.unlearn:   # the request's own prompts of each concept
            own = list(dict.fromkeys([concept] + [t for t, c in zip(p.targets, p.names) if c == concept
                                                  and t.endswith(concept)]))
            texts, anchors = texts + own, anchors + [anchor_prompt(t, concept, anchor) for t in own]
        uce_request(model, texts, anchors, req.plan.memory, self.lam, self.preserve)


# -----------------------------------------------------------------------------------------------
# CUIG's gradient projection, usable with any method


@torch.no_grad()
def concept_embeddings(model, names):
    """One text embedding per concept: the mean of its word tokens' rows when the text is the name
    alone (as CUIG takes the concept tokens of its anchor prompts). -> (len(names), D)"""
    ctx, tokens = _encode(model, names)
    ends = (tokens == model.tokenizer.eot_id).int().argmax(dim=1)        # the first end-of-text token
    return torch.stack([c[1:e].mean(0) for c, e in zip(ctx, ends.tolist())])


def protected_subspace(embeddings, energy=0.99, max_rank=None):
    """An orthonormal basis U (D, k) of the span of the retained concepts' text embeddings (rows),
    keeping the directions that hold `energy` of their squared norm (at most max_rank)."""
    u, s, _ = torch.linalg.svd(embeddings.T.double(), full_matrices=False)
    keep = int((torch.cumsum(s ** 2, 0) / (s ** 2).sum() < energy).sum()) + 1
    keep = min(keep, max_rank or keep)
    return u[:, :keep].to(embeddings.dtype)


def project_out(matrix, basis):
    """matrix (out, D) restricted to the orthogonal complement of span(basis) on the input side:
    M (I - U U^T). A key / value update of this form leaves W c unchanged for every c in the span."""
    return matrix - (matrix @ basis) @ basis.T


class GradientProjection:
    """CUIG's semantic-aware gradient projection: the key / value updates are kept orthogonal to the
    subspace spanned by the retained neighbouring concepts' text embeddings, so what those prompts
    attend to and retrieve cannot move. The gradient is projected before the optimizer step (so
    AdamW's moments live in the allowed space) and the applied update after it (AdamW's per-entry
    scaling would otherwise leak into the protected directions): the update is exactly orthogonal."""

    def __init__(self, params, basis):
        self.params = {n: p for n, p in params.items() if n.endswith(KEYS_AND_VALUES)}   # by name: a square
        # to_q or to_out has the context's width too, but does not read the context
        self.basis = basis

    def before_step(self):
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        for p in self.params.values():
            if p.grad is not None:
                p.grad.copy_(project_out(p.grad, self.basis.to(p.grad)))

    @torch.no_grad()
    def after_step(self):
        for n, p in self.params.items():
            p.copy_(self.start[n] + project_out(p - self.start[n], self.basis.to(p)))
