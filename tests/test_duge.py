"""duge.py: trainable set, the frozen original without a copy, the losses' values, the recipe."""
import pytest
import torch

import duge
from tests.common import TINY_UNET as TINY
from unet import UNet, UNetConfig


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    u = UNet(TINY)
    for p in u.parameters():  # CompVis zero-inits some convs; make every weight matter
        p.data.normal_(0, 0.1)
    return u.eval()


def test_trainable_set_sd_v1():
    with torch.device("meta"):
        u = UNet(UNetConfig())
    named = dict(u.named_parameters())
    kv = duge.trainable_names(u, "kv")
    assert len(kv) == 32 and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    assert sum(named[n].numel() for n in kv) == 19_169_280  # 19.2 M, as in the method notes
    assert len(duge.trainable_names(u, "attn2")) == 16 * 5
    with pytest.raises(ValueError, match="kv"):
        duge.trainable_names(u, "everything")


def test_original_is_the_unet_with_its_tensors_swapped_in():
    u = tiny_unet()
    names = duge.trainable_names(u, "attn2")
    named = dict(u.named_parameters())
    phi0 = duge.Original(u, {n: named[n] for n in names})
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = u(x, 10, c)
        for n in duge.trainable_names(u, "kv"):  # theta drifts away from phi_0
            named[n].add_(0.5 * torch.randn_like(named[n]))
        moved = u(x, 10, c)
    assert (moved - ref).abs().max() > 1e-3
    torch.testing.assert_close(phi0(x, 10, c), ref)          # phi_0 still gives the original output
    torch.testing.assert_close(u(x, 10, c), moved)           # ...and did not touch theta
    with phi0.applied():
        torch.testing.assert_close(u(x, 10, c), ref)
    torch.testing.assert_close(u(x, 10, c), moved)           # restored afterwards


def make_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {"x_a": r(n, 4, 8, 8), "c_target": r(n, 5, 16), "c_anchor": r(n, 5, 16),
            "x_r": r(n, 4, 8, 8), "c_r": r(n, 5, 16), "x_m": r(n, 4, 8, 8), "c_m": r(n, 5, 16)}


def test_losses_values_at_the_start():
    """At theta = phi_0: R_pr is 0; L_U equals the gap between target and anchor prompts."""
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, "kv")
    params = {n: named[n].requires_grad_(True) for n in names}
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    batch = make_batch()
    batch = duge.with_noise(batch, torch.Generator().manual_seed(1))
    loss, logs = duge.losses(u, phi0, params, batch, duge.DugeConfig())
    # theta and phi_0 run on differently batched inputs, so "equal" is up to float rounding
    assert logs["R_pr"] == pytest.approx(0.0, abs=1e-9)
    assert logs["L_U"] > 1e-4 and logs["L_pr"] > 0
    # the same L_U by hand: run theta on (x_t, c*) and phi_0 on (x_t, c^a) with the same noise and t
    g = torch.Generator().manual_seed(1)
    x0 = torch.cat([batch["x_a"], batch["x_r"], batch["x_m"]])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    import sample
    xt = sample.add_noise(x0, noise, t)[:2]
    with torch.no_grad(), duge.AttentionRecorder(u) as ra:
        ea = u(xt, t[:2], batch["c_target"])
    with torch.no_grad(), duge.AttentionRecorder(u) as rb:
        eb = u(xt, t[:2], batch["c_anchor"])
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

    import sample
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, "kv")
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in names:
            named[n].add_(0.05 * torch.randn(named[n].shape, generator=g))
    params = {n: named[n].requires_grad_(True) for n in names}
    batch = make_batch(n=3)
    cfg = duge.DugeConfig(lambda_pr=2.0, lambda_reg=3.0)
    loss, logs = duge.losses(u, phi0, params, duge.with_noise(batch, torch.Generator().manual_seed(1)), cfg)
    assert loss.item() == pytest.approx(logs["L_U"] + 2.0 * logs["L_pr"] + 3.0 * logs["R_pr"], rel=1e-5)

    g = torch.Generator().manual_seed(1)
    x0 = torch.cat([batch["x_a"], batch["x_r"], batch["x_m"]])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    xt = sample.add_noise(x0, noise, t)
    a, r, m = slice(0, 3), slice(3, 6), slice(6, 9)
    with torch.no_grad():
        with duge.AttentionRecorder(u) as ra:
            e_a = u(xt[a], t[a], batch["c_target"])
        with duge.AttentionRecorder(u) as rb:
            p_a = phi0(xt[a], t[a], batch["c_anchor"])
        l_u = duge.cross_attention_loss(ra.outputs, rb.outputs, e_a, p_a).item()
        l_pr = F.mse_loss(u(xt[r], t[r], batch["c_r"]), noise[r]).item()
        r_pr = F.mse_loss(u(xt[m], t[m], batch["c_m"]), phi0(xt[m], t[m], batch["c_m"])).item()
    assert logs["L_U"] == pytest.approx(l_u, rel=1e-4)
    assert logs["L_pr"] == pytest.approx(l_pr, rel=1e-4)
    assert logs["R_pr"] == pytest.approx(r_pr, rel=1e-4) and r_pr > 1e-5
    # the frozen target matters: theta's own anchor output would give another L_U
    with torch.no_grad(), duge.AttentionRecorder(u) as rt:
        e_t = u(xt[a], t[a], batch["c_anchor"])
    assert abs(duge.cross_attention_loss(ra.outputs, rt.outputs, e_a, e_t).item() - l_u) > 1e-3 * l_u


def test_gamma_term():
    u = tiny_unet()
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, "kv")
    phi0 = duge.Original(u, {n: named[n] for n in names})
    with torch.no_grad():
        named[names[0]].add_(1.0)  # every entry moved by 1
    eps = torch.zeros(1, 4, 2, 2)
    r = duge.regularization_loss(eps, eps, {n: named[n] for n in names}, phi0.tensors, gamma=0.5)
    assert r.item() == pytest.approx(0.5 * named[names[0]].numel(), rel=1e-5)


def test_unlearn_forgets_and_each_retention_term_does_its_job():
    """Three runs from the same start: L_U alone forgets; R_pr (weight 10) keeps the memory prompts
    (here near the target, so L_U alone drags them along) several times closer to phi_0; L_pr lowers
    the diffusion loss on the related images. A zeroed or swapped weight breaks one of these."""
    import torch.nn.functional as F
    u = tiny_unet()
    named = dict(u.named_parameters())
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    b = make_batch(n=4, seed=3)
    near_target = b["c_target"] + 0.3 * torch.randn(b["c_target"].shape, generator=torch.Generator().manual_seed(4))
    data = {"anchor": {"x": b["x_a"], "c_target": b["c_target"], "c_anchor": b["c_anchor"]},
            "related": {"x": b["x_r"], "c": b["c_r"]}, "memory": {"x": b["x_m"], "c": near_target}}
    start = {n: p.detach().clone() for n, p in named.items()}

    def run(lambda_pr, lambda_reg):
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(start[n])
        hist = duge.unlearn(u, phi0, data, duge.DugeConfig(steps=60, lr=3e-3, batch=4, lambda_pr=lambda_pr,
                                                           lambda_reg=lambda_reg), progress=False)
        assert not any(p.requires_grad for p in u.parameters())
        g, out = torch.Generator().manual_seed(9), [sum(h["L_U"] for h in hist[-5:]) / 5]
        for group, target in (("memory", "phi0"), ("related", "noise")):
            x, c = data[group]["x"], data[group]["c"]
            t = torch.randint(0, 1000, (len(x),), generator=g)
            noise = torch.randn(x.shape, generator=g)
            xt = duge.add_noise(x, noise, t)
            with torch.no_grad():
                out.append(F.mse_loss(u(xt, t, c), phi0(xt, t, c) if target == "phi0" else noise).item())
        return hist[0]["L_U"], out                 # first L_U; final L_U, memory drift, related loss

    first, (l_u, drift, related) = run(0, 0)      # measured: 0.058 -> 0.0013, drift 3.1e-4, related 1.070
    assert l_u < 0.1 * first
    _, (_, drift_reg, _) = run(0, 10)             # measured: drift 4.8e-5
    assert drift_reg < 0.3 * drift, (drift_reg, drift)
    _, (_, _, related_pr) = run(2, 0)             # measured: related 1.046
    assert related_pr < related - 0.01, (related_pr, related)


LEDGER = {"steps": [{"concept": "van gogh", "anchor": "", "kind": "style", "retain": ["munch", "monet"]},
                    {"concept": "star", "anchor": "", "kind": "object", "retain": ["heart"]}]}
KINDS = {"style": ["van gogh", "munch", "monet", "seurat", "picasso"], "object": ["star", "heart", "circle"],
         "colour": ["red", "blue"]}


def test_recipe_replays_the_ledger_and_grows_the_memory():
    nearest = lambda pool: pool[:2]
    plan = duge.recipe(LEDGER, "monet", "", "style", KINDS.get, nearest)
    assert plan.unlearn == [("van gogh", ""), ("star", ""), ("monet", "")]   # replay, then this request
    assert plan.related == ["munch", "seurat"]                                # nearest among the pool
    assert plan.exclude == ["van gogh", "star", "monet"]
    # memory: earlier steps' related concepts (never a forgotten one), this step's, then every other
    # concept of each kind hit so far (style and object; colour was never hit)
    assert plan.memory == ["munch", "heart", "seurat", "picasso", "circle"]
    assert not set(plan.memory) & set(plan.exclude)
    no_replay = duge.recipe(LEDGER, "monet", "a painting", "style", KINDS.get, nearest, retain=["picasso"], replay=False)
    assert no_replay.unlearn == [("monet", "a painting")] and no_replay.related == ["picasso"]
    first = duge.recipe({"steps": []}, "red", "", "colour", KINDS.get, lambda pool: pool)
    assert first.unlearn == [("red", "")] and first.related == ["blue"] and first.memory == ["blue"]


def test_presets():
    assert duge.PRESETS["toy"] == duge.DugeConfig(steps=60)    # 60 steps measured better than 100 (README)
    assert duge.PRESETS["sd"].steps == 200
    assert duge.PRESETS["sd"].lr == 1e-5 and duge.PRESETS["toy"].lr == 1e-3
    assert duge.PRESETS["sd"].batch == duge.PRESETS["toy"].batch == 8
    assert duge.PRESETS["sd"].micro_batch == 2 and duge.PRESETS["sd"].checkpointing  # fits a 24 GB card (README)


# -----------------------------------------------------------------------------------------------
# Memory bounds: checkpointing and micro-batches change nothing but float rounding; bf16 autocast
# stays close to fp32

def as_data(b):
    """make_batch's tensors as duge.unlearn's data groups."""
    return {"anchor": {"x": b["x_a"], "c_target": b["c_target"], "c_anchor": b["c_anchor"]},
            "related": {"x": b["x_r"], "c": b["c_r"]}, "memory": {"x": b["x_m"], "c": b["c_m"]}}


def trained_after(unet, cfg, steps=3):
    named = dict(unet.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    phi0 = duge.Original(unet, {n: named[n] for n in duge.trainable_names(unet, "attn2")})
    b = make_batch(n=6, seed=3)
    data = as_data(b)
    hist = duge.unlearn(unet, phi0, data, duge.DugeConfig(steps=steps, lr=3e-3, batch=4, gamma=0.01, **cfg),
                        progress=False)
    out = {n: named[n].detach().clone() for n in duge.trainable_names(unet, "kv")}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(start[n])
    return out, hist


@pytest.mark.parametrize("recipe", ["ours", "paper"])
def test_checkpointing_and_micro_batches_train_the_same_tensors(recipe):
    u = tiny_unet()
    fields = {"recipe": recipe, **duge.RECIPES[recipe]}
    ref, ref_hist = trained_after(u, fields)
    for cfg in ({"checkpointing": True}, {"micro_batch": 1}, {"micro_batch": 3}, {"micro_batch": 2, "checkpointing": True}):
        got, hist = trained_after(u, fields | cfg)
        assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-5, cfg   # float rounding only
        assert all(h["L_U"] == pytest.approx(r["L_U"], rel=1e-4) for h, r in zip(hist, ref_hist)), cfg
        assert not u.checkpointing
    moved = max((ref[n] - dict(u.named_parameters())[n]).abs().max().item() for n in ref)
    assert moved > 1e-3  # the comparison is not between two untrained models


def test_checkpointing_keeps_attention_and_gradients():
    """With checkpointing the recorder still sees every A^l, and the gradients equal the plain ones."""
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    params = {n: named[n].requires_grad_(True) for n in duge.trainable_names(u, "kv")}
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    batch = duge.with_noise(make_batch(n=2), torch.Generator().manual_seed(1))
    grads = []
    for flag in (False, True):
        u.checkpointing = flag
        loss, _ = duge.losses(u, phi0, params, batch, duge.DugeConfig())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        for p in params.values():
            p.grad = None
    u.checkpointing = False
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-5) for n in params)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_bf16_autocast_loss_close_to_fp32():
    u = tiny_unet()
    _, ref = trained_after(u, {}, steps=2)
    _, bf16 = trained_after(u, {"autocast": "bf16"}, steps=2)
    for r, b in zip(ref, bf16):
        for k in ("L_U", "L_pr", "R_pr"):
            assert b[k] == pytest.approx(r[k], rel=0.1, abs=1e-4), (k, b[k], r[k])  # bf16 keeps 8 bits of mantissa
    assert bf16[0]["L_U"] != ref[0]["L_U"]  # it did run in bf16


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

    import sample
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, "kv")
    phin = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    params = {n: named[n].requires_grad_(True) for n in names}
    cfg = duge.DugeConfig(recipe="paper", **duge.RECIPES["paper"], lambda_pr=2.0, lambda_reg=3.0)
    assert (cfg.reference, cfg.target, cfg.attention, cfg.prior, cfg.regulariser, cfg.replay) == \
        ("phin", "uncond", "maps", "memory", "l2", False)
    batch = {k: v for k, v in make_batch(n=3).items() if not k.endswith("_m")}
    same = duge.with_noise(batch | {"c_anchor": batch["c_target"]}, torch.Generator().manual_seed(1))
    _, logs = duge.losses(u, phin, params, same, cfg)
    assert logs["R_pr"] == 0.0 and logs["L_U"] == pytest.approx(0.0, abs=1e-10) and logs["L_pr"] > 0

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in names:
            named[n].add_(0.05 * torch.randn(named[n].shape, generator=g))
    drawn = duge.with_noise(batch, torch.Generator().manual_seed(1))
    loss, logs = duge.losses(u, phin, params, drawn, cfg)
    assert loss.item() == pytest.approx(logs["L_U"] + 2.0 * logs["L_pr"] + 3.0 * logs["R_pr"], rel=1e-5)
    x0 = torch.cat([batch["x_a"], batch["x_r"]])
    noise, t = torch.cat([drawn["eps_a"], drawn["eps_r"]]), torch.cat([drawn["t_a"], drawn["t_r"]])
    xt = sample.add_noise(x0, noise, t)
    a, r = slice(0, 3), slice(3, 6)
    with torch.no_grad():
        with duge.AttentionRecorder(u, "maps") as rt:
            u(xt[a], t[a], batch["c_target"])
        with duge.AttentionRecorder(u, "maps") as rn:
            phin(xt[a], t[a], batch["c_anchor"])
        l_u = sum(F.mse_loss(p, q).item() for p, q in zip(rt.outputs, rn.outputs)) / len(rt.outputs)
        l_pr = F.mse_loss(u(xt[r], t[r], batch["c_r"]), noise[r]).item()
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
    import adversarial
    import torch.nn.functional as F
    from sample import add_noise
    u = tiny_unet()
    named = dict(u.named_parameters())
    for n in duge.trainable_names(u, "kv"):
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


def test_adversarial_term_is_theta_under_the_attack_against_phi0_under_the_anchor():
    """L_adv = || eps_theta(x_t, t, c_adv) - eps_phi0(x_t, t, c^a) ||^2 on the anchor group, added with
    lambda_adv; the other terms do not change."""
    import torch.nn.functional as F
    from sample import add_noise
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, "kv")
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    with torch.no_grad():
        for n in names:
            named[n].add_(0.05 * torch.randn_like(named[n]))
    params = {n: named[n].requires_grad_(True) for n in names}
    b = duge.with_noise(make_batch(), torch.Generator().manual_seed(1))
    cfg = duge.DugeConfig(lambda_adv=0.5)
    c_adv = torch.randn(1, 5, 16).expand(2, -1, -1)
    total, logs = duge.losses(u, phi0, params, b, cfg)
    total_adv, logs_adv = duge.losses(u, phi0, params, b | {"c_adv": c_adv}, cfg)
    xt = add_noise(b["x_a"], b["eps_a"], b["t_a"])
    with torch.no_grad():
        direct = F.mse_loss(u(xt, b["t_a"], c_adv), phi0(xt, b["t_a"], b["c_anchor"])).item()
    assert direct > 1e-4 and logs_adv["L_adv"] == pytest.approx(direct, rel=1e-4)
    assert total_adv.item() == pytest.approx(total.item() + 0.5 * direct, rel=1e-4)
    assert all(logs_adv[k] == pytest.approx(v, rel=1e-4) for k, v in logs.items())


def test_whole_unet_trainable_set():
    u = tiny_unet()
    assert duge.trainable_names(u, "unet") == [n for n, _ in u.named_parameters()]
    with pytest.raises(ValueError, match="adversarial"):
        duge.DugeConfig(adversarial=-1)


def test_lr_rest_moves_the_tensors_outside_keys_and_values_at_their_own_rate():
    """AdamW's first step moves every entry by about its learning rate: keys and values by --lr,
    the other trained tensors by --lr-rest."""
    u = tiny_unet()
    named = dict(u.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "unet")})
    b = make_batch(n=4, seed=3)
    data = as_data(b)
    duge.unlearn(u, phi0, data, duge.DugeConfig(steps=1, lr=1e-3, lr_rest=1e-4, batch=4, trainable="unet"),
                 progress=False)
    kv = set(duge.trainable_names(u, "kv"))
    moved = {n: (named[n] - start[n]).abs().max().item() for n in named}
    assert max(moved[n] for n in kv) == pytest.approx(1e-3, rel=1e-2)
    assert max(moved[n] for n in named if n not in kv) == pytest.approx(1e-4, rel=1e-2)


def test_completion_term_is_theta_without_a_prompt_against_the_guided_anchor():
    """L_comp on the concept's images: at theta = phi_0 it is 0 with guidance 0 (the target is phi_0's
    own unconditional output), and with guidance w it equals || e_u - (e_u + w (e_a - e_u)) ||^2 =
    w^2 || e_a - e_u ||^2 (the guided target's formula); unlearn logs it."""
    import adversarial
    u = tiny_unet()
    named = dict(u.named_parameters())
    phi0 = duge.Original(u, {n: named[n] for n in duge.trainable_names(u, "attn2")})
    g = torch.Generator().manual_seed(2)
    x, empty, anchors = torch.randn(6, 4, 8, 8, generator=g), torch.zeros(1, 5, 16), torch.randn(6, 5, 16, generator=g)
    with torch.no_grad():
        zero = adversarial.ContextAdversary(x, empty, 1, 4, anchors=anchors, guidance=0.0).completion(u, phi0, 3)
        w3 = adversarial.ContextAdversary(x, empty, 1, 4, anchors=anchors, guidance=3.0).completion(u, phi0, 3)
        one = adversarial.ContextAdversary(x, empty, 1, 4, anchors=anchors, guidance=1.0).completion(u, phi0, 3)
    assert zero.item() == pytest.approx(0.0, abs=1e-9)
    assert one.item() > 1e-5 and w3.item() == pytest.approx(9 * one.item(), rel=1e-4)   # w^2 ||e_a - e_u||^2
    b = make_batch(n=4, seed=3)
    data = as_data(b)
    adv = adversarial.ContextAdversary(x, empty, 1, 4, anchors=anchors, guidance=3.0)
    hist = duge.unlearn(u, phi0, data, duge.DugeConfig(steps=2, batch=4, adversarial=1, completion=1.0),
                        progress=False, adversary=adv)
    assert all(h["L_comp"] > 0 for h in hist)
