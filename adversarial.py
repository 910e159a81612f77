"""DUGE's robust variant: adversarial unlearning against context inversion (`train.py --adversarial K`).

The probes (probe.py) find that after DUGE, as after every method here, a context learned directly
(the cross-attention input, the text encoder bypassed) draws the forgotten concept again: editing
what prompts mean leaves what the UNet can draw. AdvUnlearn (Zhang et al., NeurIPS 2024) answers an
attack with a min-max: an inner loop finds the input that best restores the concept on the CURRENT
model, and the outer loop unlearns that input too. Here the inner loop is the probe's own attack:

    c_adv = argmin_c || eps - eps_theta(x_t, t, c) ||^2,                x_0 in X*, phi_0's images of the concept
    L_adv = || eps_theta(x_t, t, c_adv) - sg eps_phi0(x_t, t, c^a) ||^2,  x_0 in X^a, L_U's anchor images

    L = L_U + lambda_pr L_pr + lambda_reg R_pr + lambda_adv L_adv        (duge.losses)

so under the attacker's best context theta must denoise as the original does under the anchor
prompt. The context starts where the probe's does (the empty prompt's), takes WARMUP Adam steps
before the first training step, then K more on the current theta before every training step
(warm-started, as AdvUnlearn does). Only the concept of the request is attacked; the earlier ones
are kept by L_U's replay as before. A wider trainable set (`--trainable attn2`, or `unet` with
`--lr-rest` for the tensors outside keys and values) gives the outer loop more than keys and values
to move: with those alone a learned context can reach any keys and values of the toy model's first
level (its 128 x 128 [W_k; W_v] is square). What each setting leaks and costs: README, "Is it
really gone?".
"""
import torch
import torch.nn.functional as F

from sample import noised_rows

WARMUP = 100   # inner steps before the first training step (the probe's attack takes 300 from scratch)
LR = 5e-3      # Adam on the context, as the probe's inversion


class ContextAdversary:
    """The inner loop's state: the attacker's context (1, 77, D) and the concept images it learns on."""

    def __init__(self, latents, start, steps, batch, seed=0, anchors=None, guidance=1.0):
        self.x, self.ctx, self.empty = latents, start.detach().clone(), start.detach().clone()
        self.steps, self.batch, self.seed = steps, batch, seed
        self.anchors, self.guidance = anchors, guidance   # for completion(): each image's anchor context
        self.fresh = True   # False once warmed up, or restored from a resume point

    def __call__(self, unet, step):
        """Inner steps on the current theta (gradients to the context only) -> c_adv, detached."""
        ctx = self.ctx.clone().requires_grad_(True)
        opt = torch.optim.Adam([ctx], lr=LR)
        g = torch.Generator().manual_seed(self.seed * 100_003 + step + 50_000)  # the step alone: exact resume
        for _ in range(WARMUP if self.fresh else self.steps):
            _, xt, noise, t = noised_rows(self.x, self.batch, g)
            loss = F.mse_loss(unet(xt, t, ctx.expand(self.batch, -1, -1)), noise)
            ctx.grad, = torch.autograd.grad(loss, [ctx])
            opt.step()
        self.ctx, self.fresh = ctx.detach(), False
        return self.ctx

    def completion(self, unet, ref, step):
        """L_comp, against diffusion completion (the probe: the concept's images noised, denoised with no
        prompt): with the empty context, theta denoises the concept's images as the original does under
        the guided anchor prompt (which, on the toy base model, completes van gogh in 0 of 16 images):

            L_comp = || eps_theta(x_t, t, "") - sg[e_u + w (e_a - e_u)] ||^2,  e_u, e_a = eps_phi0(x_t, t, "" | c^a)

        x_0 in X*, w the model's guidance scale."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + step + 70_000)
        idx, xt, _, t = noised_rows(self.x, self.batch, g)
        empty = self.empty.expand(self.batch, -1, -1)
        e_u, e_a = ref(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([empty, self.anchors[idx]])).chunk(2)
        return F.mse_loss(unet(xt, t, empty), e_u + self.guidance * (e_a - e_u))

    def state(self):
        return {"adversary.context": self.ctx.cpu().contiguous()}

    def load(self, state):
        if "adversary.context" in state:
            self.ctx, self.fresh = state["adversary.context"].to(self.x), False
