"""duge.py and trainer.py: trainable set, the frozen original without a copy, the losses' values, the plan,
the memory bounds, the paper's terms and the robust variant's."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import adversarial
import baselines
import duge
import sample
import trainer
from sample import add_noise
from tests.common import TINY_UNET as TINY
from tests.common import target_by_hand
from unet import UNet, UNetConfig


def tiny_unet(seed=0, prediction_type="epsilon"):
    torch.manual_seed(seed)
    u = UNet(dataclasses.replace(TINY, prediction_type=prediction_type))   # the same weights either way
    for p in u.parameters():  # CompVis zero-inits some convs; make every weight matter
        p.data.normal_(0, 0.1)
    return u.eval()


def test_trainable_set_sd_v1():
    with torch.device("meta"):
        u = UNet(UNetConfig())
    named = dict(u.named_parameters())
    kv = trainer.trainable_names(u, "kv")
    assert len(kv) == 32 and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    assert sum(named[n].numel() for n in kv) == 19_169_280  # 19.2 M, as in the method notes
    assert len(trainer.trainable_names(u, "attn2")) == 16 * 5
    with pytest.raises(ValueError, match="kv"):
        trainer.trainable_names(u, "everything")


def test_original_is_the_unet_with_its_tensors_swapped_in():
    u = tiny_unet()
    names = trainer.trainable_names(u, "attn2")
    named = dict(u.named_parameters())
    phi0 = trainer.Original(u, {n: named[n] for n in names})
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = u(x, 10, c)
        for n in trainer.trainable_names(u, "kv"):  # theta drifts away from phi_0
            named[n].add_(0.5 * torch.randn_like(named[n]))
        moved = u(x, 10, c)
    assert (moved - ref).abs().max() > 1e-3
    torch.testing.assert_close(phi0(x, 10, c), ref)          # phi_0 still gives the original output
    torch.testing.assert_close(u(x, 10, c), moved)           # ...and did not touch theta
    with phi0.applied():
        torch.testing.assert_close(u(x, 10, c), ref)
    torch.testing.assert_close(u(x, 10, c), moved)           # restored afterwards


def make_data(n=2, seed=0, memory=True):
    """Random data groups as request.prepare gives them: unlearn (X^a with c*, c^a), prior, memory."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    data = {"unlearn": {"x": r(n, 4, 8, 8), "c_target": r(n, 5, 16), "c_anchor": r(n, 5, 16)},
            "prior": {"x": r(n, 4, 8, 8), "c": r(n, 5, 16)}, "memory": {"x": r(n, 4, 8, 8), "c": r(n, 5, 16)}}
    return data if memory else {k: v for k, v in data.items() if k != "memory"}


def noised(data, seed=1, prediction_type="epsilon"):
    """A step's batch: as many rows as each group has, drawn with their noise, t, x_t and target."""
    return trainer.draw_batch(data, len(data["unlearn"]["x"]), torch.Generator().manual_seed(seed), prediction_type)


def method(**kw):
    return duge.Duge(duge.DugeConfig(**kw))


def frozen_unet_with_phi0(move=0.0, seed=5, prediction_type="epsilon"):
    """A tiny UNet whose keys and values train (moved by `move` from phi_0), phi_0 of its attn2."""
    u = tiny_unet(prediction_type=prediction_type).requires_grad_(False)
    named = dict(u.named_parameters())
    names = trainer.trainable_names(u, "kv")
    phi0 = trainer.Original(u, {n: named[n] for n in trainer.trainable_names(u, "attn2")})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            named[n].add_(move * torch.randn(named[n].shape, generator=g))
    return u, named, names, phi0, {n: named[n].requires_grad_(True) for n in names}


def test_losses_values_at_the_start():
    """At theta = phi_0: R_pr is 0; L_U equals the gap between target and anchor prompts."""
    u, named, names, phi0, _ = frozen_unet_with_phi0()
    b = noised(make_data())
    loss, logs = method().loss(u, phi0, b)
    # theta and phi_0 run on differently batched inputs, so "equal" is up to float rounding
    assert logs["R_pr"] == pytest.approx(0.0, abs=1e-9)
    assert logs["L_U"] > 1e-4 and logs["L_pr"] > 0
    # the same L_U by hand: theta on (x_t, c*) and phi_0 on (x_t, c^a)
    a = b["unlearn"]
    with torch.no_grad(), duge.AttentionRecorder(u) as ra:
        ea = u(a["x_t"], a["t"], a["c_target"])
    with torch.no_grad(), duge.AttentionRecorder(u) as rb:
        eb = u(a["x_t"], a["t"], a["c_anchor"])
    by_hand = duge.cross_attention_loss(ra.outputs, rb.outputs, ea, eb)
    assert logs["L_U"] == pytest.approx(by_hand.item(), rel=1e-4)
    loss.backward()
    assert all(named[n].grad is not None for n in names)
    assert all(p.grad is None for n, p in named.items() if n not in names)


def test_total_is_the_weighted_sum_and_every_target_is_frozen():
    """Off the start (theta != phi_0): the total is L_U + lambda_pr L_pr + lambda_reg R_pr with two
    different lambdas, and each term equals its formula computed by hand, with L_U's and R_pr's
    targets from phi_0 (not theta) and L_pr's from the noise."""
    import torch.nn.functional as F
    u, named, names, phi0, _ = frozen_unet_with_phi0(move=0.05)
    b = noised(make_data(n=3))
    loss, logs = method(lambda_pr=2.0, lambda_reg=3.0).loss(u, phi0, b)
    assert loss.item() == pytest.approx(logs["L_U"] + 2.0 * logs["L_pr"] + 3.0 * logs["R_pr"], rel=1e-5)
    a, r, m = b["unlearn"], b["prior"], b["memory"]
    with torch.no_grad():
        with duge.AttentionRecorder(u) as ra:
            e_a = u(a["x_t"], a["t"], a["c_target"])
        with duge.AttentionRecorder(u) as rb:
            p_a = phi0(a["x_t"], a["t"], a["c_anchor"])
        l_u = duge.cross_attention_loss(ra.outputs, rb.outputs, e_a, p_a).item()
        l_pr = F.mse_loss(u(r["x_t"], r["t"], r["c"]), r["eps"]).item()
        r_pr = F.mse_loss(u(m["x_t"], m["t"], m["c"]), phi0(m["x_t"], m["t"], m["c"])).item()
    assert logs["L_U"] == pytest.approx(l_u, rel=1e-4)
    assert logs["L_pr"] == pytest.approx(l_pr, rel=1e-4)
    assert logs["R_pr"] == pytest.approx(r_pr, rel=1e-4) and r_pr > 1e-5
    # the frozen target matters: theta's own anchor output would give another L_U
    with torch.no_grad(), duge.AttentionRecorder(u) as rt:
        e_t = u(a["x_t"], a["t"], a["c_anchor"])
    assert abs(duge.cross_attention_loss(ra.outputs, rt.outputs, e_a, e_t).item() - l_u) > 1e-3 * l_u


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prior_preservation_targets_what_the_unet_predicts(prediction_type):
    """Issue 31: L_pr is the diffusion loss against the UNet's own kind of output, the noise for an eps
    model and v = sqrt(abar) eps - sqrt(1 - abar) x_0 for a v one (SD 2.x 768-v); L_U and R_pr compare
    theta with phi_0, v with v, and keep their formulas. A v model's L_pr against eps is another number."""
    u, named, names, phi0, _ = frozen_unet_with_phi0(move=0.05, prediction_type=prediction_type)
    b = noised(make_data(n=3), prediction_type=prediction_type)
    _, logs = method().loss(u, phi0, b)
    a, r, m = b["unlearn"], b["prior"], b["memory"]
    want = target_by_hand(r["x"], r["eps"], r["t"], prediction_type)
    torch.testing.assert_close(r["target"], want, atol=1e-6, rtol=0)
    with torch.no_grad():
        out = u(r["x_t"], r["t"], r["c"])
        l_pr, against_eps = F.mse_loss(out, want).item(), F.mse_loss(out, r["eps"]).item()
        r_pr = F.mse_loss(u(m["x_t"], m["t"], m["c"]), phi0(m["x_t"], m["t"], m["c"])).item()
        with duge.AttentionRecorder(u) as ra:
            e_a = u(a["x_t"], a["t"], a["c_target"])
        with duge.AttentionRecorder(u) as rb:
            p_a = phi0(a["x_t"], a["t"], a["c_anchor"])
        l_u = duge.cross_attention_loss(ra.outputs, rb.outputs, e_a, p_a).item()
    assert logs["L_pr"] == pytest.approx(l_pr, rel=1e-4)
    assert logs["R_pr"] == pytest.approx(r_pr, rel=1e-4) and logs["L_U"] == pytest.approx(l_u, rel=1e-4)
    if prediction_type == "v_prediction":   # 100x the tolerance above (here 1.076 against v, 1.044 against eps)
        assert abs(l_pr - against_eps) > 1e-2 * l_pr, (l_pr, against_eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loop_hands_every_method_the_target_of_its_unet(prediction_type):
    """trainer.unlearn draws each step's batch with the target of the UNet's cfg.prediction_type, so a
    method's loss on b["target"] trains a v model on v."""
    u = tiny_unet(prediction_type=prediction_type)
    named = dict(u.named_parameters())
    ref = trainer.Original(u, {n: named[n] for n in trainer.trainable_names(u)})
    seen = []

    class Recording(baselines.Finetune):
        def loss(self, unet, ref, batch):
            seen.append({k: v.detach().clone() for k, v in batch["unlearn"].items()})
            return super().loss(unet, ref, batch)
    trainer.unlearn(u, Recording(), ref, {"unlearn": make_data()["unlearn"]}, trainer.TrainConfig(steps=2, batch=2),
                    progress=False)
    assert len(seen) == 2
    for b in seen:
        want = target_by_hand(b["x"], b["eps"], b["t"], prediction_type)
        torch.testing.assert_close(b["target"], want, atol=1e-6, rtol=0)
        assert prediction_type == "epsilon" or (want - b["eps"]).abs().mean() > 0.05


def test_kv_preservation_term_is_its_formula_and_only_its_kept_tokens_are_held():
    """R_kv (--lambda-kv): off the start it adds lambda_kv times its formula, computed here token by
    token (not from the Gram matrix), over the anchors', L_pr's and the memory's contexts; at phi_0 it
    is 0; and its gradient vanishes for a key/value change orthogonal to every kept token."""
    u, named, names, phi0, params = frozen_unet_with_phi0(move=0.05)
    b = noised(make_data(n=3))
    base, logs0 = method().loss(u, phi0, b)
    loss, logs = method(lambda_kv=4.0).loss(u, phi0, b)
    kept = torch.cat([b["unlearn"]["c_anchor"], b["prior"]["c"], b["memory"]["c"]]).reshape(-1, 16)
    with torch.no_grad():
        by_hand = torch.stack([sum(((named[n] - phi0.tensors[n]) @ c).square().sum() for c in kept)
                               / sum((phi0.tensors[n] @ c).square().sum() for c in kept) for n in names]).mean()
    assert "R_kv" not in logs0 and logs["R_kv"] == pytest.approx(by_hand.item(), rel=1e-4) and by_hand > 1e-4
    assert loss.item() == pytest.approx(base.item() + 4.0 * by_hand.item(), rel=1e-5)
    # at phi_0 it is zero
    u2, _, _, phi0_2, _ = frozen_unet_with_phi0()
    assert method(lambda_kv=1.0).loss(u2, phi0_2, b)[1]["R_kv"] == pytest.approx(0.0, abs=1e-12)
    # a change confined to directions orthogonal to every kept token is free: R_kv's gradient is 0
    few = kept[:3]                                         # three kept tokens (all of them span the 16 dims)
    basis, _ = torch.linalg.qr(few.T)                      # (16, 3)
    with torch.no_grad():
        for n in names:
            d = torch.randn_like(named[n])
            named[n].copy_(phi0.tensors[n] + 0.1 * (d - d @ basis @ basis.T))
    r = duge.kv_preservation_loss(params, phi0.tensors, few)
    r2 = duge.kv_preservation_loss(params, phi0.tensors, kept)
    assert abs(r.item()) < 1e-5 * r2.item() and r2.item() > 1e-4     # 0 up to float rounding


def test_gamma_term_adds_its_gradient_to_any_method():
    """CUIG's L2 add-on (trainer): gamma ||theta - theta_0||^2 is logged and adds exactly
    2 gamma (theta - theta_0) to the method's gradient."""
    u, named, names, phi0, params = frozen_unet_with_phi0(move=0.05)
    b = noised(make_data())
    grads, logs = [], []
    for gamma in (0.0, 0.5):
        for p in params.values():
            p.grad = None
        logs.append(trainer.gradients(u, method(), phi0, params, b, trainer.TrainConfig(gamma=gamma), phi0.tensors))
        grads.append({n: p.grad.clone() for n, p in params.items()})
    l2 = trainer.l2_to_original(params, phi0.tensors).item()
    assert l2 > 1e-3 and logs[1]["L2"] == pytest.approx(l2, rel=1e-5) and "L2" not in logs[0]
    for n in names:
        torch.testing.assert_close(grads[1][n] - grads[0][n], 2 * 0.5 * (named[n] - phi0.tensors[n]),
                                   atol=1e-6, rtol=1e-4)


def test_unlearn_forgets_and_each_retention_term_does_its_job():
    """Three runs from the same start: L_U alone forgets; R_pr (weight 10) keeps the memory prompts
    (here near the target, so L_U alone drags them along) several times closer to phi_0; L_pr lowers
    the diffusion loss on the prior group's images. A zeroed or swapped weight breaks one of these."""
    import torch.nn.functional as F
    u = tiny_unet()
    named = dict(u.named_parameters())
    phi0 = trainer.Original(u, {n: named[n] for n in trainer.trainable_names(u, "attn2")})
    data = make_data(n=4, seed=3)
    near_target = data["unlearn"]["c_target"] + 0.3 * torch.randn((4, 5, 16), generator=torch.Generator().manual_seed(4))
    data["memory"]["c"] = near_target
    start = {n: p.detach().clone() for n, p in named.items()}

    def run(lambda_pr, lambda_reg):
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(start[n])
        hist = trainer.unlearn(u, method(lambda_pr=lambda_pr, lambda_reg=lambda_reg), phi0, data,
                               trainer.TrainConfig(steps=60, lr=3e-3, batch=4), progress=False)
        assert not any(p.requires_grad for p in u.parameters())
        g, out = torch.Generator().manual_seed(9), [sum(h["L_U"] for h in hist[-5:]) / 5]
        for group, target in (("memory", "phi0"), ("prior", "noise")):
            x, c = data[group]["x"], data[group]["c"]
            t = torch.randint(0, 1000, (len(x),), generator=g)
            noise = torch.randn(x.shape, generator=g)
            xt = add_noise(x, noise, t)
            with torch.no_grad():
                out.append(F.mse_loss(u(xt, t, c), phi0(xt, t, c) if target == "phi0" else noise).item())
        return hist[0]["L_U"], out                 # first L_U; final L_U, memory drift, prior loss

    first, (l_u, drift, prior) = run(0, 0)        # ratios with a margin over one run's: L_U / 45, drift / 6
    assert l_u < 0.1 * first
    _, (_, drift_reg, _) = run(0, 10)
    assert drift_reg < 0.3 * drift, (drift_reg, drift)
    _, (_, _, prior_pr) = run(2, 0)
    assert prior_pr < prior - 0.01, (prior_pr, prior)


LEDGER = {"steps": [{"concept": "van gogh", "anchor": "", "kind": "style", "retain": ["munch", "monet"]},
                    {"concept": "star", "anchor": "", "kind": "object", "retain": ["heart"]}]}
KINDS = {"style": ["van gogh", "munch", "monet", "seurat", "picasso"], "object": ["star", "heart", "circle"],
         "colour": ["red", "blue"]}


def test_plan_replays_the_ledger_and_grows_the_memory():
    nearest = lambda pool: pool[:2]
    plan = duge.plan(LEDGER, "monet", "", "style", KINDS.get, nearest)
    assert plan.unlearn == [("van gogh", ""), ("star", ""), ("monet", "")]   # replay, then this request
    assert plan.related == ["munch", "seurat"]                                # nearest among the pool
    assert plan.exclude == ["van gogh", "star", "monet"]
    # memory: earlier steps' related concepts (never a forgotten one), this step's, then every other
    # concept of each kind hit so far (style and object; colour was never hit)
    assert plan.memory == ["munch", "heart", "seurat", "picasso", "circle"]
    assert not set(plan.memory) & set(plan.exclude)
    no_replay = duge.plan(LEDGER, "monet", "a painting", "style", KINDS.get, nearest, retain=["picasso"], replay=False)
    assert no_replay.unlearn == [("monet", "a painting")] and no_replay.related == ["picasso"]
    first = duge.plan({"steps": []}, "red", "", "colour", KINDS.get, lambda pool: pool)
    assert first.unlearn == [("red", "")] and first.related == ["blue"] and first.memory == ["blue"]


def test_presets():
    assert trainer.PRESETS["toy"] == trainer.TrainConfig(steps=60)    # the toy default (docs/results.md)
    assert trainer.PRESETS["sd"].steps == 200
    assert trainer.PRESETS["sd"].lr == 1e-5 and trainer.PRESETS["toy"].lr == 1e-3
    assert trainer.PRESETS["sd"].batch == trainer.PRESETS["toy"].batch == 8
    assert trainer.PRESETS["sd"].micro_batch == 2 and trainer.PRESETS["sd"].checkpointing  # fits a 24 GB card (README)


# -----------------------------------------------------------------------------------------------
# Memory bounds: checkpointing and micro-batches change nothing but float rounding; bf16 autocast
# stays close to fp32

def step_gradients(unet, m, ref, data, **bounds):
    """One step's accumulated gradients of the keys and values (trainer.gradients) on one fixed batch."""
    named = dict(unet.named_parameters())
    unet.requires_grad_(False)
    params = {n: named[n].requires_grad_(True) for n in trainer.trainable_names(unet, "kv")}
    cfg = trainer.TrainConfig(batch=4, **bounds)
    unet.checkpointing = cfg.checkpointing
    try:
        logs = trainer.gradients(unet, m, ref, params, noised(data), cfg, ref.tensors)
    finally:
        unet.checkpointing = False
        unet.requires_grad_(False)
    grads = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads, logs


@pytest.mark.parametrize("recipe", ["ours", "paper"])
def test_checkpointing_and_micro_batches_give_the_same_gradients(recipe):
    """Micro-batches and checkpointing change only the order of float sums: one step's gradients on the
    same batch equal the whole batch's to 1e-5 of the largest entry (float32 rounding is ~1e-7 of it;
    a micro-batch weighted wrongly, or dropped, is off by a quarter or more). Gradients, not trained
    tensors, are compared: AdamW's update divides each entry by its own size, so rounding in an entry
    near zero can flip that entry's step by the whole learning rate."""
    u = tiny_unet()
    phi0 = trainer.Original(u, {n: p for n, p in u.named_parameters() if n in trainer.trainable_names(u, "attn2")})
    with torch.no_grad():
        for n, p in u.named_parameters():
            if n in trainer.trainable_names(u, "kv"):
                p.add_(0.05 * torch.randn_like(p))        # off the start, so that every term has a gradient
    m = method(recipe=recipe, **duge.RECIPES[recipe])
    data = make_data(n=4, seed=3, memory=recipe == "ours")
    ref, ref_logs = step_gradients(u, m, phi0, data)
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 1e-4
    for bounds in ({"checkpointing": True}, {"micro_batch": 1}, {"micro_batch": 3},
                   {"micro_batch": 2, "checkpointing": True}):
        got, logs = step_gradients(u, m, phi0, data, **bounds)
        assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-5 * scale, bounds
        assert logs["L_U"] == pytest.approx(ref_logs["L_U"], rel=1e-4), bounds


def test_checkpointing_keeps_attention_and_gradients():
    """With checkpointing the recorder still sees every A^l, and the gradients equal the plain ones."""
    u, named, names, phi0, params = frozen_unet_with_phi0()
    batch = noised(make_data())
    grads = []
    for flag in (False, True):
        u.checkpointing = flag
        loss, _ = method().loss(u, phi0, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        for p in params.values():
            p.grad = None
    u.checkpointing = False
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-5) for n in params)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_bf16_autocast_loss_close_to_fp32():
    u = tiny_unet()
    phi0 = trainer.Original(u, {n: p for n, p in u.named_parameters() if n in trainer.trainable_names(u, "attn2")})
    _, ref = step_gradients(u, method(), phi0, make_data(n=4, seed=3))
    _, bf16 = step_gradients(u, method(), phi0, make_data(n=4, seed=3), autocast="bf16")
    for k in ("L_U", "L_pr", "R_pr"):
        assert bf16[k] == pytest.approx(ref[k], rel=0.1, abs=1e-4), (k, bf16[k], ref[k])  # bf16: 8 bits of mantissa
    assert bf16["L_U"] != ref["L_U"]  # it did run in bf16


# -----------------------------------------------------------------------------------------------
# The paper's recipe (duge.RECIPES["paper"])

def test_recorded_maps_are_the_softmax_probabilities():
    """AttentionRecorder(what="maps"): per attn2 layer (B, H, N, T), rows sum to 1, equal to
    softmax(q k^T / sqrt(d)) computed here from the layer's inputs and weights."""
    u = tiny_unet()
    layers = [m for _, m in u.cross_attentions()]
    inputs = []
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.append(args)) for m in layers]
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad(), duge.AttentionRecorder(u, "maps") as rec:
        u(x, 10, c)
    for h in handles:
        h.remove()
    assert len(rec.outputs) == len(layers) == len(inputs) > 0
    for m, maps, (xi, ci) in zip(layers, rec.outputs, inputs):
        B, N, C = xi.shape
        H, d = m.heads, C // m.heads
        q = (xi @ m.to_q.weight.T).view(B, N, H, d).permute(0, 2, 1, 3)
        k = (ci @ m.to_k.weight.T).view(B, ci.shape[1], H, d).permute(0, 2, 1, 3)
        logits = torch.einsum("bhnd,bhtd->bhnt", q, k) / d ** 0.5
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        assert maps.shape == (B, H, N, 5)
        torch.testing.assert_close(maps.sum(-1), torch.ones(B, H, N), atol=1e-6, rtol=0)
        torch.testing.assert_close(maps, e / e.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_paper_terms_at_and_off_the_start():
    """The paper's recipe: L_U compares theta's maps for the target with phi_n's for the
    unconditional context; L_pr is the diffusion loss; R_pr the mean square parameter pull, 0 at
    theta = phi_n; no memory group is needed. Off the start every term equals its formula."""
    import torch.nn.functional as F
    u, named, names, phin, _ = frozen_unet_with_phi0()
    m = method(recipe="paper", **duge.RECIPES["paper"], lambda_pr=2.0, lambda_reg=3.0)
    cfg = m.cfg
    assert (cfg.reference, cfg.target, cfg.attention, cfg.prior, cfg.regulariser, cfg.replay) == \
        ("phin", "uncond", "maps", "memory", "l2", False)
    data = make_data(n=3, memory=False)
    same = noised({**data, "unlearn": {**data["unlearn"], "c_anchor": data["unlearn"]["c_target"]}})
    _, logs = m.loss(u, phin, same)
    assert logs["R_pr"] == 0.0 and logs["L_U"] == pytest.approx(0.0, abs=1e-10) and logs["L_pr"] > 0

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in names:
            named[n].add_(0.05 * torch.randn(named[n].shape, generator=g))
    b = noised(data)
    loss, logs = m.loss(u, phin, b)
    assert loss.item() == pytest.approx(logs["L_U"] + 2.0 * logs["L_pr"] + 3.0 * logs["R_pr"], rel=1e-5)
    a, r = b["unlearn"], b["prior"]
    with torch.no_grad():
        with duge.AttentionRecorder(u, "maps") as rt:
            u(a["x_t"], a["t"], a["c_target"])
        with duge.AttentionRecorder(u, "maps") as rn:
            phin(a["x_t"], a["t"], a["c_anchor"])
        l_u = sum(F.mse_loss(p, q).item() for p, q in zip(rt.outputs, rn.outputs)) / len(rt.outputs)
        l_pr = F.mse_loss(u(r["x_t"], r["t"], r["c"]), r["eps"]).item()
    diffs = torch.cat([(named[n] - phin.tensors[n]).flatten() for n in names])
    assert logs["L_U"] == pytest.approx(l_u, rel=1e-4) and l_u > 0
    assert logs["L_pr"] == pytest.approx(l_pr, rel=1e-4)
    assert logs["R_pr"] == pytest.approx((diffs ** 2).mean().item(), rel=1e-5) and logs["R_pr"] > 0
    loss.backward()
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in names)


def test_recipe_choices_are_checked():
    for field, bad in (("recipe", "theirs"), ("reference", "phi1"), ("attention", "weights"), ("regulariser", "l1")):
        with pytest.raises(ValueError, match=field):
            duge.DugeConfig(**{field: bad})


# -----------------------------------------------------------------------------------------------
# The robust variant (adversarial.py): the attacker's context, and L_adv

def test_adversary_learns_a_context_for_the_concept_and_leaves_theta_alone():
    """The inner loop lowers the diffusion loss of the concept's images under its context, takes
    WARMUP steps first and K after, touches no gradient of theta, and resumes exactly from its state."""
    import torch.nn.functional as F
    u = tiny_unet()
    named = dict(u.named_parameters())
    for n in trainer.trainable_names(u, "kv"):
        named[n].requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x, start = torch.randn(6, 4, 8, 8, generator=g), torch.zeros(1, 5, 16)
    noise, t = torch.randn(x.shape, generator=g), torch.randint(0, 1000, (6,), generator=g)
    held = lambda c: F.mse_loss(u(add_noise(x, noise, t), t, c.expand(6, -1, -1)), noise).item()
    calls = []
    u.register_forward_pre_hook(lambda m, a: calls.append(1))
    adv = adversarial.ContextAdversary(x, start, steps=3, batch=4)
    first = adv(u, 0)
    assert len(calls) == adversarial.WARMUP and not first.requires_grad
    assert held(first) < held(start) - 3e-3     # the attack works on held-out draws (random model: 1.089 -> 1.083)
    assert torch.equal(start, torch.zeros(1, 5, 16))             # the starting context is not modified
    assert all(p.grad is None for p in u.parameters())           # theta's gradients untouched
    calls.clear()
    second = adv(u, 1)
    assert len(calls) == 3 and not torch.equal(first, second)
    again = adversarial.ContextAdversary(x, start, steps=3, batch=4)
    again.load({"adversary.context": first})                      # a resume point after step 0
    assert torch.equal(again(u, 1), second)


def test_a_v_models_adversary_attacks_on_v():
    """The attacker of a v model learns its context against v, not eps: one inner step (after warm-up) is
    one Adam step on || v - v_theta(x_t, t, c) ||^2 over ContextAdversary's own draw of rows, eps and t."""
    u = tiny_unet(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x, start = torch.randn(6, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    adv = adversarial.ContextAdversary(x, start, steps=1, batch=4, seed=2)
    adv.load({"adversary.context": start})        # as from a resume point: warmed up, one step per call
    got = adv(u, 7)

    def one_step(prediction_type):
        draw = torch.Generator().manual_seed(2 * 100_003 + 7 + 50_000)   # the step's generator, as the adversary's
        idx, x_t, eps, t = sample.noised_rows(x, 4, draw, "epsilon")
        ctx = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([ctx], lr=adversarial.LR)
        loss = F.mse_loss(u(x_t, t, ctx.expand(4, -1, -1)), target_by_hand(x[idx], eps, t, prediction_type))
        ctx.grad, = torch.autograd.grad(loss, [ctx])
        opt.step()
        return ctx.detach()
    torch.testing.assert_close(got, one_step("v_prediction"), atol=1e-6, rtol=0)
    assert (got - one_step("epsilon")).abs().max() > adversarial.LR    # Adam's first step: +-LR, signs differ


def robust_batch(n=2):
    data = make_data(n)
    data["concept"] = {"x": torch.randn(n, 4, 8, 8), "c_anchor": torch.randn(n, 5, 16), "c_empty": torch.zeros(n, 5, 16)}
    return noised(data)


def test_adversarial_term_is_theta_under_the_attack_against_phi0_under_the_anchor():
    """L_adv = || eps_theta(x_t, t, c_adv) - eps_phi0(x_t, t, c^a) ||^2 on the unlearn group, added with
    lambda_adv; DUGE's terms do not change."""
    import torch.nn.functional as F
    u, named, names, phi0, _ = frozen_unet_with_phi0(move=0.05)
    b = robust_batch()
    robust = adversarial.RobustDuge(duge.DugeConfig(), adversarial.RobustConfig(adversarial=1, lambda_adv=0.5), 2)
    robust.c_adv = torch.randn(1, 5, 16)
    total, logs = method().loss(u, phi0, b)
    total_adv, logs_adv = robust.loss(u, phi0, b)
    a = b["unlearn"]
    with torch.no_grad():
        direct = F.mse_loss(u(a["x_t"], a["t"], robust.c_adv.expand(2, -1, -1)),
                            phi0(a["x_t"], a["t"], a["c_anchor"])).item()
    assert direct > 1e-4 and logs_adv["L_adv"] == pytest.approx(direct, rel=1e-4)
    assert total_adv.item() == pytest.approx(total.item() + 0.5 * direct, rel=1e-4)
    assert all(logs_adv[k] == pytest.approx(v, rel=1e-4) for k, v in logs.items())


def test_whole_unet_trainable_set():
    u = tiny_unet()
    assert trainer.trainable_names(u, "unet") == [n for n, _ in u.named_parameters()]
    with pytest.raises(ValueError, match="adversarial"):
        adversarial.RobustConfig(adversarial=-1)


def test_lr_rest_moves_the_tensors_outside_keys_and_values_at_their_own_rate():
    """AdamW's first step moves every entry by about its learning rate: keys and values by --lr,
    the other trained tensors by --lr-rest."""
    u = tiny_unet()
    named = dict(u.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    phi0 = trainer.Original(u, {n: named[n] for n in trainer.trainable_names(u, "unet")})
    trainer.unlearn(u, method(), phi0, make_data(n=4, seed=3),
                    trainer.TrainConfig(steps=1, lr=1e-3, lr_rest=1e-4, batch=4, trainable="unet"), progress=False)
    kv = set(trainer.trainable_names(u, "kv"))
    moved = {n: (named[n] - start[n]).abs().max().item() for n in named}
    assert max(moved[n] for n in kv) == pytest.approx(1e-3, rel=1e-2)
    assert max(moved[n] for n in named if n not in kv) == pytest.approx(1e-4, rel=1e-2)


def test_completion_term_is_theta_without_a_prompt_against_the_guided_anchor():
    """L_comp on the concept's images: at theta = phi_0 it is 0 with guidance 0 (the target is phi_0's
    own unconditional output), and with guidance w it equals || e_u - (e_u + w (e_a - e_u)) ||^2 =
    w^2 || e_a - e_u ||^2 (the guided target's formula); training logs it."""
    u = tiny_unet()
    named = dict(u.named_parameters())
    phi0 = trainer.Original(u, {n: named[n] for n in trainer.trainable_names(u, "attn2")})
    c = robust_batch(4)["concept"]
    with torch.no_grad():
        comp = lambda w: adversarial.completion_loss(u, phi0, c["x_t"], c["t"], c["c_empty"], c["c_anchor"], w).item()
        zero, one, w3 = comp(0.0), comp(1.0), comp(3.0)
    assert zero == pytest.approx(0.0, abs=1e-9)
    assert one > 1e-5 and w3 == pytest.approx(9 * one, rel=1e-4)   # w^2 ||e_a - e_u||^2
    data = make_data(n=4, seed=3)
    data["concept"] = {"x": torch.randn(6, 4, 8, 8), "c_anchor": torch.randn(6, 5, 16), "c_empty": torch.zeros(6, 5, 16)}
    robust = adversarial.RobustDuge(duge.DugeConfig(), adversarial.RobustConfig(adversarial=1, completion=1.0), 4,
                                    guidance=3.0)
    hist = trainer.unlearn(u, robust, phi0, data, trainer.TrainConfig(steps=2, batch=4), progress=False)
    assert all(h["L_comp"] > 0 and h["L_adv"] > 0 for h in hist)
