"""DUGE's robust variant: adversarial unlearning against context inversion (`train.py --adversarial K`).

The probes (probe.py) find that after DUGE, as after every method here, a context learned directly
(the cross-attention input, the text encoder bypassed) draws the forgotten concept again: editing
what prompts mean leaves what the UNet can draw. AdvUnlearn (Zhang et al., NeurIPS 2024) answers an
attack with a min-max: an inner loop finds the input that best restores the concept on the CURRENT
model, and the outer loop unlearns that input too. Here the inner loop is the probe's own attack:

    c_adv = argmin_c || eps - eps_theta(x_t, t, c) ||^2,                x_0 in X*, phi_0's images of the concept
    L_adv = || eps_theta(x_t, t, c_adv) - sg eps_phi0(x_t, t, c^a) ||^2,  x_0 in X^a, L_U's anchor images

    L = L_U + lambda_pr L_pr + lambda_reg R_pr + lambda_adv L_adv (+ completion L_comp)   (RobustDuge.loss)

so under the attacker's best context theta must denoise as the original does under the anchor
prompt (a v-prediction model's attack targets v, not eps; L_adv and L_comp compare outputs, v with v).
The context starts where the probe's does (the empty prompt's), takes WARMUP Adam steps
before the first training step, then K more on the current theta before every training step
(warm-started, as AdvUnlearn does). Only the concept of the request is attacked; the earlier ones
are kept by L_U's replay as before. A wider trainable set (`--trainable attn2`, or `unet` with
`--lr-rest` for the tensors outside keys and values) gives the outer loop more than keys and values
to move: with those alone a learned context can reach any keys and values of the toy model's first
level (its 128 x 128 [W_k; W_v] is square). What each setting leaks and costs: docs/probes_and_robust.md.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duge import Duge
from sample import noised_rows
from trainer import check, setting

WARMUP = 100   # inner steps before the first training step (the probe's attack takes 300 from scratch)
LR = 5e-3      # Adam on the context, as the probe's inversion


@dataclass
class RobustConfig:
    adversarial: int = setting(0, "context-inversion steps against theta per training step (0: off)", low=0)
    lambda_adv: float = setting(1.0, "weight of L_adv: theta under the attacker's context vs phi_0 under the anchor",
                                low=0)
    completion: float = setting(0.0, "weight of L_comp: the concept's noised images, no prompt", low=0)

    def __post_init__(self):
        check(self)


class ContextAdversary:
    """The inner loop's state: the attacker's context (1, 77, D) and the concept images it learns on."""

    def __init__(self, latents, start, steps, batch, seed=0):
        self.x, self.ctx = latents, start.detach().clone()
        self.steps, self.batch, self.seed = steps, batch, seed
        self.fresh = True   # False once warmed up, or restored from a resume point

    def __call__(self, unet, step):
        """Inner steps on the current theta (gradients to the context only) -> c_adv, detached."""
        ctx = self.ctx.clone().requires_grad_(True)
        opt = torch.optim.Adam([ctx], lr=LR)
        g = torch.Generator().manual_seed(self.seed * 100_003 + step + 50_000)  # the step alone: exact resume
        for _ in range(WARMUP if self.fresh else self.steps):
            _, xt, target, t = noised_rows(self.x, self.batch, g, unet.cfg.prediction_type)   # eps (or v)
            loss = F.mse_loss(unet(xt, t, ctx.expand(self.batch, -1, -1)), target)
            ctx.grad, = torch.autograd.grad(loss, [ctx])
            opt.step()
        self.ctx, self.fresh = ctx.detach(), False
        return self.ctx

    def load(self, state):
        """Continue from a resume point's context (RobustDuge.state)."""
        if "adversary.context" in state:
            self.ctx, self.fresh = state["adversary.context"].to(self.x), False


class RobustDuge(Duge):
    """DUGE plus the attacker's term (and, with cfg.completion, the completion term)."""
    name = "duge"

    def __init__(self, cfg, robust: RobustConfig, batch, seed=0, guidance=1.0):
        super().__init__(cfg)
        self.robust, self.batch, self.seed, self.guidance = robust, batch, seed, guidance
        self.adversary, self.saved = None, {}

    def data(self, p):
        """DUGE's groups, and "concept": phi_0's images of this request's own prompts, which the attacker
        learns on, with their anchors and the empty prompt (the attacker's start)."""
        concept = {"x": p.concept, "c_anchor": p.concept_anchors, "c_empty": [""] * len(p.concept)}
        return super().data(p) | {"concept": concept}

    def begin_step(self, unet, ref, step, data):
        if self.adversary is None:   # the context starts where the probe's does: the empty prompt's
            c = data["concept"]
            self.adversary = ContextAdversary(c["x"], c["c_empty"][:1], self.robust.adversarial, self.batch, self.seed)
            self.adversary.load(self.saved)
        self.c_adv = self.adversary(unet, step)

    def loss(self, unet, ref, batch):
        total, logs = super().loss(unet, ref, batch)
        a, cpt = batch["unlearn"], batch["concept"]
        # under the attacker's best context, denoise as phi_0 does under the anchor
        e_adv = unet(a["x_t"], a["t"], self.c_adv.expand(len(a["x"]), -1, -1))
        l_adv = F.mse_loss(e_adv, ref(a["x_t"], a["t"], a["c_anchor"]))
        total, logs["L_adv"] = total + self.robust.lambda_adv * l_adv, l_adv.item()
        if self.robust.completion > 0:
            l_comp = completion_loss(unet, ref, cpt["x_t"], cpt["t"], cpt["c_empty"], cpt["c_anchor"], self.guidance)
            total, logs["L_comp"] = total + self.robust.completion * l_comp, l_comp.item()
        return total, logs

    def state(self):
        return {"adversary.context": self.adversary.ctx.cpu().contiguous()} if self.adversary else {}

    def load_state(self, tensors):
        self.saved = tensors


def completion_loss(unet, ref, x_t, t, empty, anchors, guidance):
    """L_comp, against diffusion completion (the probe: the concept's images noised, denoised with no
    prompt): with the empty context, theta denoises the concept's images as the original does under
    the guided anchor prompt (which, on the toy base model, completes van gogh in 0 of 16 images):

        L_comp = || eps_theta(x_t, t, "") - sg[e_u + w (e_a - e_u)] ||^2,  e_u, e_a = eps_phi0(x_t, t, "" | c^a)

    x_0 in X*, w the model's guidance scale."""
    e_u, e_a = ref(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty, anchors])).chunk(2)
    return F.mse_loss(unet(x_t, t, empty), e_u + guidance * (e_a - e_u))
