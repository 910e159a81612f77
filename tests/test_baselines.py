"""baselines.py: ESD's and CA's targets are their formulas, UCE's edit does what its equation says,
and the gradient projection leaves the update orthogonal to the protected subspace."""
import pytest
import torch
import torch.nn.functional as F

import baselines
import trainer
from tests.common import target_by_hand
from tests.test_duge import make_data, noised, tiny_unet


def _setup(trainable="kv", prediction_type="epsilon"):
    u = tiny_unet(prediction_type=prediction_type).requires_grad_(False)
    named = dict(u.named_parameters())
    names = trainer.trainable_names(u, trainable)
    ref = trainer.Original(u, {n: named[n] for n in names})
    with torch.no_grad():  # theta has moved away from the reference, as in any request after the first step
        for n in names:
            named[n].add_(0.05 * torch.randn_like(named[n]))
    params = {n: named[n].requires_grad_(True) for n in names}
    data = {"unlearn": make_data()["unlearn"]}
    return u, ref, params, data, noised(data, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_esd_target_is_negative_guidance_of_the_reference(prediction_type):
    """The same formula for a v model: ref's outputs are v, and their guided combination is the v target."""
    u, ref, params, _, batch = _setup("attn2", prediction_type)
    loss, _ = baselines.Esd(baselines.BaselineConfig(esd_eta=1.5)).loss(u, ref, batch)
    b = batch["unlearn"]
    e_u, e_c = ref(b["x_t"], b["t"], b["c_anchor"]), ref(b["x_t"], b["t"], b["c_target"])
    want = F.mse_loss(u(b["x_t"], b["t"], b["c_target"]), e_u - 1.5 * (e_c - e_u))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert e_u.sub(e_c).abs().max() > 1e-3                               # the two predictions differ
    loss.backward()                                                      # and only theta gets gradients
    assert all(p.grad is not None for p in params.values())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ca_target_is_the_reference_on_the_anchor_prompt_plus_anchor_prior(prediction_type):
    """The ablation term compares with ref's output (v for a v model, unchanged); the anchor prior's target
    is the noise for an eps model and v = sqrt(abar) eps - sqrt(1 - abar) x_0 for a v one."""
    u, ref, params, _, batch = _setup(prediction_type=prediction_type)
    loss, logs = baselines.Ca().loss(u, ref, batch)
    b = batch["unlearn"]
    ablate = F.mse_loss(u(b["x_t"], b["t"], b["c_target"]), ref(b["x_t"], b["t"], b["c_anchor"]))
    out = u(b["x_t"], b["t"], b["c_anchor"])
    prior = F.mse_loss(out, target_by_hand(b["x"], b["eps"], b["t"], prediction_type))
    assert logs["L_ca"] == pytest.approx(ablate.item(), rel=1e-5)
    assert logs["L_anchor"] == pytest.approx(prior.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ablate.item() + prior.item(), rel=1e-5)
    if prediction_type == "v_prediction":   # against eps it would be another number
        assert logs["L_anchor"] != pytest.approx(F.mse_loss(out, b["eps"]).item(), rel=1e-2)
    # at theta = ref and c* = c^a the ablation term vanishes
    with ref.applied():
        same = {"unlearn": dict(b, c_target=b["c_anchor"])}
        assert baselines.Ca().loss(u, ref, same)[1]["L_ca"] < 1e-10


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_finetune_is_the_plain_diffusion_loss_of_the_concept_prompt(prediction_type):
    """|| out_theta(x_t, t, c*) - target ||^2, the target eps, or v for a v model."""
    u, ref, params, _, batch = _setup(prediction_type=prediction_type)
    loss, logs = baselines.Finetune().loss(u, ref, batch)
    b = batch["unlearn"]
    out = u(b["x_t"], b["t"], b["c_target"])
    want = F.mse_loss(out, target_by_hand(b["x"], b["eps"], b["t"], prediction_type)).item()
    assert loss.item() == pytest.approx(want, rel=1e-6) and logs["L_ft"] == pytest.approx(want, rel=1e-6)
    if prediction_type == "v_prediction":
        assert loss.item() != pytest.approx(F.mse_loss(out, b["eps"]).item(), rel=1e-2)


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
    u, ref, params, data, _ = _setup()
    protected = torch.randn(4, 16)                                   # 4 retained concepts' embeddings (D = 16)
    basis = baselines.protected_subspace(protected)
    assert basis.shape == (16, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = trainer.TrainConfig(steps=3, batch=2, lr=1e-2)
    proj = baselines.GradientProjection(params, basis)
    trainer.unlearn(u, baselines.Finetune(), ref, data, cfg, progress=False, projection=proj)
    for n, p in params.items():
        delta = p.detach() - before[n]
        assert delta.abs().max() > 1e-4                                # it trained
        assert (delta @ protected.T).abs().max() < 1e-5                 # W c unchanged for every c kept
    # without the projection the same training moves the protected directions
    u2, ref2, params2, data2, _ = _setup()
    start = {n: p.detach().clone() for n, p in params2.items()}
    trainer.unlearn(u2, baselines.Finetune(), ref2, data2, cfg, progress=False)
    moved = max(((p.detach() - start[n]) @ protected.T).abs().max().item() for n, p in params2.items())
    assert moved > 1e-3


def test_gradient_projection_picks_keys_and_values_by_name_on_the_toy_model():
    """On the toy model to_q and to_out are square like to_k / to_v (128 x 128, the context's width):
    the projection must take the tensors that read the context, by name, and leave the others alone."""
    import checkpoint
    unet = checkpoint.load(checkpoint.TOY_WEIGHTS).unet
    named = dict(unet.named_parameters())
    attn2 = {n: named[n] for n in trainer.trainable_names(unet, "attn2")}
    width = unet.cfg.context_dim
    square = [n for n, p in attn2.items() if p.ndim == 2 and p.shape[1] == width]
    assert any(".to_q." in n or ".to_out." in n for n in square)        # the trap a shape test falls into
    proj = baselines.GradientProjection(attn2, torch.eye(width)[:, :2])
    assert sorted(proj.params) == sorted(trainer.trainable_names(unet, "kv"))


def test_uce_edit_is_solved_in_float64_when_the_preserve_weight_makes_it_ill_conditioned():
    """A large preserve weight over many rows makes UCE's system ill-conditioned (the benchmark's
    matched-forgetting ladder goes up to 10,000; the toy model's system then has condition number
    ~5e7): solved in float32 the edit went wrong after nine sequential requests (styles sequence,
    escher: 98.6% of the retained concepts kept when solved in float64, 13% in float32). Here the
    same closed form on float32 tensors agrees with it computed in float64 by hand, to 1e-5."""
    torch.manual_seed(0)
    d, out = 128, 64
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    keep = (torch.randn(300, 100) * torch.logspace(0, -3, 100)) @ basis[:, :100].T   # rank 100, wide range
    c_e, c_a = torch.randn(4, d), torch.randn(4, d)
    w = torch.nn.Linear(d, out, bias=False)
    W = w.weight.detach().double()
    k, e, a = keep.double(), c_e.double(), c_a.double()
    lhs = (a @ W.T).T @ e + 1e4 * (W @ k.T) @ k + 0.5 * W
    rhs = e.T @ e + 1e4 * k.T @ k + 0.5 * torch.eye(d, dtype=torch.float64)
    expected = lhs @ torch.linalg.inv(rhs)
    baselines.uce_edit([w], (c_e, c_a), keep, lam=0.5, preserve_scale=1e4)
    err = (w.weight.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err.item()
