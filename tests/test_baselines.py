"""baselines.py: ESD's and CA's targets are their formulas, UCE's edit does what its equation says,
and the gradient projection leaves the update orthogonal to the protected subspace."""
import functools

import pytest
import torch
import torch.nn.functional as F

import baselines
import duge
from sample import add_noise
from tests.test_duge import make_batch, tiny_unet


def _setup(trainable="kv"):
    u = tiny_unet().requires_grad_(False)
    named = dict(u.named_parameters())
    names = duge.trainable_names(u, trainable)
    ref = duge.Original(u, {n: named[n] for n in names})
    with torch.no_grad():  # theta has moved away from the reference, as in any request after the first step
        for n in names:
            named[n].add_(0.05 * torch.randn_like(named[n]))
    params = {n: named[n].requires_grad_(True) for n in names}
    batch = make_batch()
    batch |= {"eps_a": torch.randn_like(batch["x_a"]), "t_a": torch.tensor([100, 700])}
    return u, ref, params, batch


def test_esd_target_is_negative_guidance_of_the_reference():
    u, ref, params, batch = _setup("attn2")
    cfg = duge.DugeConfig(esd_eta=1.5, gamma=0.0)
    loss, _ = baselines.esd_loss(u, ref, params, batch, cfg, original=ref.tensors)
    x_t = add_noise(batch["x_a"], batch["eps_a"], batch["t_a"])
    e_u, e_c = ref(x_t, batch["t_a"], batch["c_anchor"]), ref(x_t, batch["t_a"], batch["c_target"])
    want = F.mse_loss(u(x_t, batch["t_a"], batch["c_target"]), e_u - 1.5 * (e_c - e_u))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert e_u.sub(e_c).abs().max() > 1e-3                               # the two predictions differ
    loss.backward()                                                      # and only theta gets gradients
    assert all(p.grad is not None for p in params.values())


def test_ca_target_is_the_reference_on_the_anchor_prompt_plus_anchor_prior():
    u, ref, params, batch = _setup()
    cfg = duge.DugeConfig()
    loss, logs = baselines.ca_loss(u, ref, params, batch, cfg, original=ref.tensors)
    x_t = add_noise(batch["x_a"], batch["eps_a"], batch["t_a"])
    ablate = F.mse_loss(u(x_t, batch["t_a"], batch["c_target"]), ref(x_t, batch["t_a"], batch["c_anchor"]))
    prior = F.mse_loss(u(x_t, batch["t_a"], batch["c_anchor"]), batch["eps_a"])
    assert logs["L_ca"] == pytest.approx(ablate.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ablate.item() + prior.item(), rel=1e-5)
    # at theta = ref and c* = c^a the ablation term vanishes
    with ref.applied():
        same = dict(batch, c_target=batch["c_anchor"])
        assert baselines.ca_loss(u, ref, params, same, cfg)[1]["L_ca"] < 1e-10
    # CUIG's L2 add-on adds gamma ||theta - theta_0||^2
    l2 = sum(((p - ref.tensors[n]) ** 2).sum() for n, p in params.items()).item()
    with_l2, _ = baselines.ca_loss(u, ref, params, batch, duge.DugeConfig(gamma=2.0), original=ref.tensors)
    assert with_l2.item() == pytest.approx(loss.item() + 2.0 * l2, rel=1e-5)


def test_uce_maps_erased_embeddings_onto_their_anchors_and_keeps_the_preserved():
    torch.manual_seed(0)
    d, out = 16, 8
    layers = [torch.nn.Linear(d, out, bias=False) for _ in range(2)]
    old = [w.weight.detach().clone() for w in layers]
    c_e, c_a = torch.randn(3, d), torch.randn(3, d)
    keep = torch.randn(5, d)
    baselines.uce_edit(layers, (c_e, c_a), keep, lam=1e-6, preserve_scale=1.0)
    for w, w0 in zip(layers, old):
        torch.testing.assert_close(c_e @ w.weight.T, c_a @ w0.T, atol=1e-3, rtol=1e-3)   # erased -> anchor's value
        torch.testing.assert_close(keep @ w.weight.T, keep @ w0.T, atol=1e-3, rtol=1e-3)  # preserved stay
        assert (w.weight - w0).abs().max() > 0.1
    # with nothing to erase or keep, lam holds W where it was
    w = torch.nn.Linear(d, out, bias=False)
    w0 = w.weight.detach().clone()
    baselines.uce_edit([w], (torch.zeros(0, d), torch.zeros(0, d)), torch.zeros(0, d), lam=0.1)
    torch.testing.assert_close(w.weight, w0)


def test_gradient_projection_update_is_orthogonal_to_the_protected_subspace():
    u, ref, params, batch = _setup()
    protected = torch.randn(4, 16)                                   # 4 retained concepts' embeddings (D = 16)
    basis = baselines.protected_subspace(protected)
    assert basis.shape == (16, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = duge.DugeConfig(steps=3, batch=2, lr=1e-2, method="finetune", gp=True)
    data = {"anchor": {"x": batch["x_a"], "c_target": batch["c_target"], "c_anchor": batch["c_anchor"]}}
    proj = baselines.GradientProjection(params, basis)
    duge.unlearn(u, ref, data, cfg, progress=False, projection=proj,
                 loss_fn=functools.partial(baselines.finetune_loss, original=ref.tensors))
    for n, p in params.items():
        delta = p.detach() - before[n]
        assert delta.abs().max() > 1e-4                                # it trained
        assert (delta @ protected.T).abs().max() < 1e-5                 # W c unchanged for every c kept
    # without the projection the same training moves the protected directions
    u2, ref2, params2, batch2 = _setup()
    start = {n: p.detach().clone() for n, p in params2.items()}
    duge.unlearn(u2, ref2, data, dataclasses_replace(cfg, gp=False), progress=False,
                 loss_fn=functools.partial(baselines.finetune_loss, original=ref2.tensors))
    moved = max(((p.detach() - start[n]) @ protected.T).abs().max().item() for n, p in params2.items())
    assert moved > 1e-3


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)
