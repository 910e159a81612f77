"""The benchmark's protocol: held-out concepts no method sees, matched forgetting request by request,
baselines given what DUGE has, resumable state, and tables written whatever groups are empty."""
import dataclasses
import json
import re

import pytest
import torch

import adversarial
import baselines
import checkpoint
import concepts
import duge
import request
import trainer
from tests.test_train import FAST, tiny_sd
from toy.concepts import HELD_OUT, ToyConcepts

ALL_METHODS = {
    "duge": lambda: duge.Duge(duge.DugeConfig()),
    "duge-paper": lambda: duge.Duge(duge.DugeConfig(**duge.RECIPES["paper"])),
    "duge-related": lambda: duge.Duge(duge.DugeConfig(prior="related")),
    "robust": lambda: adversarial.RobustDuge(duge.DugeConfig(), adversarial.RobustConfig(adversarial=5), 8, 0, 3.0),
    "esd": lambda: baselines.Esd(baselines.BaselineConfig()),
    "esd-captions": lambda: baselines.Esd(baselines.BaselineConfig(esd_prompt="captions")),
    "ca": baselines.Ca, "finetune": baselines.Finetune,
}


def mentions(texts, names):
    return {n for t in texts for n in names if re.search(rf"\b{re.escape(n)}\b", t)}


@pytest.mark.parametrize("world,sequence", [
    (ToyConcepts(0), ["van gogh", "star", "red", "monet", "circle", "blue", "picasso", "square", "green"]),
    (ToyConcepts(3), ["seurat", "warhol", "turner", "kusama", "mondrian"]),
    (concepts.SDConcepts(), ["van gogh", "apple", "dog", "picasso", "cat", "car"]),
])
def test_held_out_concepts_never_reach_any_method(world, sequence):
    """Request after request, for every method with and without replay: no prompt of any data group,
    no concept of the memory (DUGE's R_pr / L_pr, UCE's preserve set, the gradient projection's
    subspace), no related concept and no generic caption names a held-out concept, even when the
    related set takes every candidate; the evaluation still measures them."""
    held = world.held_out
    assert held and all(h in world.known(world.kind(h)) for h in held)          # measured ...
    assert not {h for k in ("style", "object", "colour") for h in world.candidates(k)} & set(held)   # ... never given
    for name, make in ALL_METHODS.items():
        for replay in (True, False):
            ledger = {"steps": []}
            for c in sequence:
                kind = world.kind(c)
                plan = duge.plan(ledger, c, "", kind, world.candidates, lambda pool: pool, replay=replay)
                p = request.prompts_for(world, plan, 8, 24)
                method = make()
                texts = [t for g in method.data(p).values() for ts in g.values() for t in ts]
                seen = mentions(texts + plan.memory + plan.related + p.memory + p.targets, held)   # UCE: targets
                assert not seen, (name, c, seen)
                assert mentions(p.memory, [s for s in plan.memory])                 # the memory is there
                ledger["steps"].append({"concept": c, "anchor": "", "kind": kind, "retain": plan.related})


def test_summary_reports_held_out_apart_with_its_worst_concept():
    from toy import evaluate
    acc = {c: 1.0 for c in evaluate.concepts()} | {"van gogh": 0.0, "munch": 0.5, "monet": 0.75, "moon": 0.25}
    base = {c: 1.0 for c in acc}
    n = {c: 32 for c in acc}
    s = evaluate.summarise(acc, base, ["van gogh"], n)
    held = [c for c in HELD_OUT]
    assert s["retained_held_out"] == pytest.approx((0.5 + 0.25 + len(held) - 2) / len(held))
    assert s["retained_held_out_worst"] == "moon" and s["retained_held_out_worst_acc"] == 0.25
    seen = [c for c in acc if c not in held and c != "van gogh"]
    assert s["retained_seen"] == pytest.approx((0.75 + len(seen) - 1) / len(seen))
    assert s["retained_seen_worst"] == "monet"
    lo, hi = s["retained_held_out_worst_ci"]
    assert lo < 0.25 < hi
    lines = "\n".join(evaluate.summary_lines(s))
    assert "retained, held out from every method" in lines and "worst moon 25%" in lines


def test_matched_forgetting_stops_at_the_first_rung_that_meets_the_target(tmp_path):
    """steps_until checks only at the rungs and stops at the first at or under the target; the model
    it stops with is what training that many steps gives (the same run continued)."""
    said = iter([0.5, 0.25, 0.10, 0.0])
    enough, checks = request.steps_until(lambda: next(said), [2, 4, 6, 8], 0.10)
    stop = next(k for k in range(1, 9) if enough(k))
    assert stop == 6 and checks == [(2, 0.5), (4, 0.25), (6, 0.10)]   # <= target: 10% itself meets it

    w = tiny_sd(tmp_path / "m.safetensors")
    cfg = dataclasses.replace(trainer.PRESETS["sd"], steps=8, num_prompts=1, images_per_prompt=1, generic=2,
                              num_related=1, batch=1, micro_batch=0, checkpointing=False)
    trained = []
    for steps, enough in ((8, request.steps_until(iter([0.5, 0.3, 0.05, 0.0]).__next__, [2, 4, 6, 8])[0]),
                          (6, None)):
        model = checkpoint.load(w)
        method = baselines.Finetune()
        req = request.prepare(model, method, concepts.SDConcepts(), "apple", dataclasses.replace(cfg, steps=steps),
                              cache=tmp_path / "cache", sampling={"steps": 2})
        history = request.train(model, method, req, dataclasses.replace(cfg, steps=steps), progress=False,
                                enough=enough)
        trained.append((len(history), {n: p.detach().clone() for n, p in model.unet.named_parameters()}))
    assert trained[0][0] == trained[1][0] == 6
    assert all(torch.equal(v, trained[1][1][n]) for n, v in trained[0][1].items())


def test_shrink_back_bisects_to_the_smallest_change_that_still_forgets():
    """--shrink: theta = towards + a (theta - towards) at the smallest a of `rounds` halvings whose check
    meets the target; when every try fails the trained tensors are kept exactly."""
    unet = torch.nn.Linear(2, 1, bias=False)
    trainer.put(unet, {"weight": torch.tensor([[2.0, 4.0]])})
    towards = {"weight": torch.zeros(1, 2)}
    forgets = lambda: 0.0 if unet.weight[0, 0].item() >= 0.6 else 0.5       # holds for a >= 0.3
    checks = request.shrink_back(unet, towards, forgets, 0.10, rounds=3)
    assert checks == [(0.5, 0.0), (0.25, 0.5), (0.375, 0.0)]
    assert torch.equal(unet.weight.detach(), torch.tensor([[0.75, 1.5]]))
    trainer.put(unet, {"weight": torch.tensor([[0.1, 0.2]])})
    assert request.shrink_back(unet, towards, lambda: 0.5, 0.10, rounds=2) == [(0.5, 0.5), (0.75, 0.5)]
    assert torch.equal(unet.weight.detach(), torch.tensor([[0.1, 0.2]]))


def test_shrink_towards_phi0_checks_every_forgotten_concept_and_writes_the_shrunk_model(tmp_path, monkeypatch):
    """train.py --shrink phi0: every try checks this request's concept first, then each earlier one, and
    stops at the first over the target; the written model is phi_0 + a (trained - phi_0) for the a the
    checks chose, where the same run without --shrink writes `trained`."""
    import train
    from toy import evaluate
    asked = []

    def recognised(model, concept, forgotten=(), n=16):
        asked.append(concept)
        return 0.5 if concept == "van gogh" and len(asked) == 3 else 0.0   # the first try lets van gogh back
    common = ["--no-eval", "--no-grid", "--cache", str(tmp_path / "c"), "--match-forgetting", "0.1"]
    first = tmp_path / "1.safetensors"
    monkeypatch.setattr(evaluate, "recognised", lambda *a, **k: 0.0)
    assert train.main(["--forget", "van gogh", "--method", "uce", "--out", str(first), *common]) == 0
    monkeypatch.setattr(evaluate, "recognised", recognised)
    flags = ["--forget", "monet", "--method", "finetune", "--weights", str(first), "--ladder", "2", "--save-dtype",
             "fp32", *common]   # (the toy file is fp16: written so, a + b rounds unlike a and b)
    assert train.main([*flags, "--out", str(tmp_path / "s.safetensors"), "--shrink", "phi0"]) == 0
    # the rung's check (monet), then a = 0.5 (monet, van gogh: over), 0.75 and 0.625 (both kept)
    assert asked == ["monet", "monet", "van gogh", "monet", "van gogh", "monet", "van gogh"]
    m = json.loads(checkpoint.load(tmp_path / "s.safetensors").meta["duge.ledger"])["steps"][1]["metrics"]
    assert m["shrink"] == [[0.5, 0.5], [0.75, 0.0], [0.625, 0.0]]
    assert train.main([*flags, "--out", str(tmp_path / "t.safetensors")]) == 0
    phi0 = dict(checkpoint.load(checkpoint.TOY_WEIGHTS).unet.named_parameters())
    shrunk, trained = (dict(checkpoint.load(tmp_path / f).unet.named_parameters()) for f in ("s.safetensors",
                                                                                              "t.safetensors"))
    moved = [n for n in trained if not torch.equal(trained[n], phi0[n])]
    assert moved and all(n.endswith(trainer.KEYS_AND_VALUES) for n in moved)
    for n in moved:
        torch.testing.assert_close(shrunk[n], phi0[n] + 0.625 * (trained[n] - phi0[n]))
    assert train.main([*flags[:-4], "--out", str(tmp_path / "u.safetensors"), "--shrink", "start"]) == 2
    # --shrink-target 0: a try must show no check image recognised; 1 of 16 everywhere: the change is kept whole
    monkeypatch.setattr(evaluate, "recognised", lambda *a, **k: 1 / 16)
    assert train.main([*flags, "--out", str(tmp_path / "z.safetensors"), "--shrink", "start", "--shrink-target", "0"]) == 0
    m = json.loads(checkpoint.load(tmp_path / "z.safetensors").meta["duge.ledger"])["steps"][1]["metrics"]
    assert m["shrink"] == [[0.5, 1 / 16], [0.75, 1 / 16], [0.875, 1 / 16]]
    kept = dict(checkpoint.load(tmp_path / "z.safetensors").unet.named_parameters())
    assert all(torch.equal(kept[n], trained[n]) for n in trained)
    assert train.main([*flags, "--out", str(tmp_path / "y.safetensors"), "--shrink", "start", "--shrink-target",
                       "1.5"]) == 2


def test_uce_matched_forgetting_takes_its_mildest_preserve_weight_that_forgets(tmp_path, monkeypatch):
    """train.py --method uce --match-forgetting: each rung re-solved from the request's start; the
    first weight whose check meets the target is kept (the model equals --uce-preserve at that weight)."""
    import train
    from toy import evaluate
    said = iter([0.5, 0.05, 0.0])
    monkeypatch.setattr(evaluate, "recognised", lambda *a, **k: next(said))
    out, plain = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    common = ["--forget", "van gogh", "--method", "uce", "--no-eval", "--no-grid", "--cache", str(tmp_path / "c")]
    assert train.main([*common, "--out", str(out), "--match-forgetting", "0.1"]) == 0
    m = json.loads(checkpoint.load(out).meta["duge.ledger"])["steps"][0]["metrics"]
    assert m["checks"] == [[train.UCE_LADDER[0], 0.5], [train.UCE_LADDER[1], 0.05]]
    assert m["steps_taken"] == m["image_gradients"] == 0                  # a weight is not a step
    assert train.main([*common, "--out", str(plain), "--uce-preserve", str(train.UCE_LADDER[1])]) == 0
    a, b = (dict(checkpoint.load(p).unet.named_parameters()) for p in (out, plain))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_uce_plus_matched_forgetting_checks_every_concept_it_re_solves(tmp_path, monkeypatch):
    """uce+ re-solves every forgotten concept from phi_0 at each rung, so a rung is met only when the
    earlier concepts stay forgotten too (it let seurat back to 100% when only the current concept was
    checked); plain UCE, which starts from the previous model, checks its own concept alone."""
    import train
    from toy import evaluate
    asked = []

    def recognised(model, concept, forgotten=(), n=16):
        asked.append(concept)
        rung = sum(c == "monet" for c in asked)           # monet is checked first at every rung
        return 0.5 if concept == "van gogh" and rung == 1 else 0.0
    common = ["--no-eval", "--no-grid", "--cache", str(tmp_path / "c"), "--match-forgetting", "0.1"]
    first = tmp_path / "1.safetensors"
    monkeypatch.setattr(evaluate, "recognised", lambda *a, **k: 0.0)
    assert train.main(["--forget", "van gogh", "--method", "uce", "--out", str(first), *common]) == 0
    monkeypatch.setattr(evaluate, "recognised", recognised)
    for flags, out in ((["--reference", "phi0", "--replay"], "plus"), ([], "plain")):
        asked.clear()
        assert train.main(["--forget", "monet", "--method", "uce", "--weights", str(first), *flags,
                           "--out", str(tmp_path / f"{out}.safetensors"), *common]) == 0
        m = json.loads(checkpoint.load(tmp_path / f"{out}.safetensors").meta["duge.ledger"])["steps"][1]["metrics"]
        if out == "plus":
            assert asked == ["monet", "van gogh", "monet", "van gogh"]
            assert m["checks"] == [[train.UCE_LADDER[0], 0.5], [train.UCE_LADDER[1], 0.0]]
        else:
            assert asked == ["monet"] and m["checks"] == [[train.UCE_LADDER[0], 0.0]]


def test_equipped_baseline_trains_on_phi0s_images_of_every_forgotten_concept(tmp_path):
    """--reference phi0 --replay for a baseline: request 2's reference is phi_0, its images are the
    ORIGINAL model's, and its concept rows hold the first request's concept too; plain, the images are
    the current model's and only this request's concept is there."""
    import sample
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    first = tmp_path / "first.safetensors"
    assert train.main(["--forget", "van gogh", "--weights", str(w), "--out", str(first), "--method", "esd",
                       "--no-grid", *FAST, "--steps", "20", "--lr", "0.05", "--cache", str(tmp_path / "c1")]) == 0
    model, base = checkpoint.load(first), checkpoint.load(w)
    cfg = dataclasses.replace(trainer.PRESETS["sd"], num_prompts=1, images_per_prompt=1, generic=2, num_related=1)
    sampling = {"steps": 2, "guidance": model.guidance}
    for equip in (True, False):
        own = [baselines.BaselineConfig(reference="phi0", replay=True) if equip else baselines.BaselineConfig()]
        method = train.new_method("esd", cfg, own, model.guidance)
        req = request.prepare(model, method, concepts.SDConcepts(), "apple", cfg, cache=tmp_path / f"c{equip}",
                              sampling=sampling)
        x, c = req.data["unlearn"]["x"], req.data["unlearn"]["c_target"]
        assert (req.ref is req.phi0) == equip
        assert req.prompts.names == (["van gogh", "apple"] if equip else ["apple"])
        torch.testing.assert_close(c, sample.encode_prompts(model, req.prompts.names))   # ESD: the name alone
        who = base if equip else model
        assert torch.equal(x, sample.generate_cached(who, req.prompts.targets, 1, tmp_path / f"d{equip}", **sampling))


def test_equipped_uce_is_solved_from_phi0_over_every_concept_so_far(tmp_path):
    """uce --reference phi0 --replay: request 2 does not depend on what request 1 did (it starts from the
    original and erases both concepts at once), so two different first requests give the same model."""
    import train
    w = tiny_sd(tmp_path / "m.safetensors")
    finals = []
    for k, first in enumerate((["--uce-preserve", "10"], ["--reference", "phi0", "--replay"])):
        a, b = tmp_path / f"a{k}.safetensors", tmp_path / f"b{k}.safetensors"
        assert train.main(["--forget", "van gogh", "--weights", str(w), "--out", str(a), "--method", "uce",
                           *first, "--no-grid", *FAST]) == 0
        assert train.main(["--forget", "apple", "--weights", str(a), "--out", str(b), "--method", "uce", "--reference",
                           "phi0", "--replay", "--no-grid", *FAST]) == 0
        finals.append(dict(checkpoint.load(b).unet.named_parameters()))
    assert all(torch.equal(v, finals[1][n]) for n, v in finals[0].items())
    base = dict(checkpoint.load(w).unet.named_parameters())
    assert any(not torch.equal(v, base[n]) for n, v in finals[0].items())


def test_benchmark_state_rebuilds_the_same_model_in_a_new_checkout(tmp_path):
    """What the benchmark commits after a request (trained tensors and ledger) rebuilds the model file
    and the delta file train.py wrote, tensor for tensor."""
    import train
    from experiments import benchmark
    from safetensors.torch import load_file
    out = tmp_path / "run" / "step01-van-gogh.safetensors"
    assert train.main(["--forget", "van gogh", "--out", str(out), "--method", "uce", "--no-eval", "--no-grid",
                       "--cache", str(tmp_path / "c")]) == 0
    state = tmp_path / "state.safetensors"
    benchmark.save_state(out, state)
    assert state.stat().st_size < 2_000_000                       # small enough to commit
    again = benchmark.rebuild(state, tmp_path / "new")
    a, b = checkpoint.load(out, dtype=None), checkpoint.load(again, dtype=None)
    assert a.meta["duge.ledger"] == b.meta["duge.ledger"]
    pa, pb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    assert all(torch.equal(v, pb[n]) and v.dtype == pb[n].dtype for n, v in pa.items())
    da, db = (load_file(str(request.output_paths(p)["delta"])) for p in (out, again))
    assert set(da) == set(db) and all(torch.equal(v, db[k]) for k, v in da.items())


def test_tables_and_figure_are_written_whatever_groups_are_empty(tmp_path):
    """The mixed sequence hits every kind: no cross-domain concept is left, and that column stays empty
    instead of failing (it raised KeyError). Several seeds: mean and range."""
    from PIL import Image

    from experiments import benchmark
    summary = lambda k: {"forgotten": 0.0, "retained_seen": 0.9 - 0.1 * k, "retained_seen_base": 1.0,
                         "retained_seen_worst": "monet", "retained_seen_worst_acc": 0.5,
                         "retained_seen_ci": (0.8, 0.95), "retained_seen_worst_ci": (0.3, 0.7),
                         "retained_held_out": 0.8, "retained_held_out_base": 1.0, "retained_held_out_worst": "munch",
                         "retained_held_out_worst_acc": 0.25 * k, "retained_in_domain": 0.7,
                         "retained_cross_domain": float("nan"), "quality_fd": 3.0 + k, "quality_fd_base": 2.0}
    rows = [benchmark.row(v, s, k, ["van gogh", "star"], {"eval": {"van gogh": 0.0, "star": 0.125 * s},
                                                          "summary": summary(k), "steps_taken": 30, "image_gradients": 720,
                                                          "seconds": {"training": 60.0}})
            for v, seeds in (("duge", (0, 1)), ("esd", (0,))) for s in seeds for k in (1, 2)]
    md = benchmark.write_outputs(rows, ["van gogh", "star"], tmp_path, "benchmark-mixed").splitlines()
    duge_row = next(line for line in md if line.startswith("| duge |"))
    assert duge_row.startswith("| duge | 2 | 2 | 0.5 | 12% | 70% (70-70) | monet 50% (seed 0) | 80% (80-80) "
                               "| munch 50% (seed 0) | 5.0 (5.0-5.0) (2.0) |")   # seed 1 missed star (12.5%)
    assert duge_row.endswith("| 60 | 1,440 | 2.0 |")                        # per seed: 2 x 30 steps, 2 x 60 s
    esd_row = next(line for line in md if line.startswith("| esd |"))
    assert "| 70% [80, 95] (100%) | monet 50% [30, 70] |" in esd_row
    assert any(line.startswith("| duge | 1 | 2 | star | 30 | 12% |") for line in md)
    assert Image.open(tmp_path / "benchmark-mixed.png").size[0] == 4 * 330
    saved = list(__import__("csv").DictReader(open(tmp_path / "benchmark-mixed.csv")))
    assert saved[1]["retained_cross_domain"] == "" and saved[1]["retained_seen"] == "0.7"


def test_summary_puts_every_sequence_side_by_side(tmp_path):
    """--all's docs/benchmark-summary.md: per variant and sequence, missed requests (mean over seeds),
    held out and seen at the last request (mean, range), FD over base; a variant absent from a
    sequence gets dashes; the minutes are the sum of every request's seconds."""
    from experiments import benchmark
    summary = lambda s: {"retained_seen": 0.9, "retained_held_out": 0.6 + 0.1 * s, "quality_fd": 3.0 + s,
                         "quality_fd_base": 2.0}
    make = lambda v, s, k, seq: benchmark.row(v, s, k, seq, {"eval": {seq[0]: 0.0, seq[1]: 0.5 * s},
                                                          "summary": summary(s), "seconds": {"training": 30.0}})
    a, b = ["van gogh", "monet"], ["seurat", "warhol"]
    by = {"styles": [make("duge", s, k, a) for s in (0, 1) for k in (1, 2)] + [make("esd", 0, k, a) for k in (1, 2)],
          "styles-b": [make("duge", 0, k, b) for k in (1, 2)]}
    md = benchmark.write_summary(by, tmp_path).splitlines()
    assert "| duge | 0.5 | 65% (60-70) | 90% (90-90) | 1.75x | 0.0 | 60% | 90% | 1.50x |" in md
    assert "| esd | 0.0 | 60% | 90% | 1.50x | - | - | - | - |" in md
    assert any(line.startswith("4 runs (8 requests) took 4 minutes") for line in md)
    assert (tmp_path / "benchmark-summary.md").read_text().splitlines() == md


def test_goal_table_takes_each_requests_mean_over_seeds_then_the_worst_request(tmp_path):
    """The summary's "Against the continual goal": per criterion the mean over seeds at each request,
    then the worst request (the goal holds after every request), one value per sequence; the steps
    summed over requests, mean over seeds."""
    from experiments import benchmark

    def make(v, s, k, seq, held, fd):
        summary = {"retained_held_out": held, "retained_held_out_base": 0.8, "retained_held_out_worst_acc": held / 2,
                   "retained_seen": 0.9, "retained_seen_base": 0.9, "retained_seen_worst_acc": 0.5,
                   "quality_fd": fd, "quality_fd_base": 2.0}
        return benchmark.row(v, s, k, seq, {"eval": {seq[0]: 0.1 * s, seq[1]: 0.0}, "summary": summary,
                                            "steps_taken": 10 * k, "image_gradients": 1, "seconds": {}})
    a, b = ["van gogh", "monet"], ["circle", "red"]
    # styles: request 1 held out 0.8 / 0.6 (mean 0.7), request 2 0.4 / 0.8 (mean 0.6: the worst)
    by = {"styles": [make("duge", 0, 1, a, 0.8, 3.0), make("duge", 1, 1, a, 0.6, 5.0),
                     make("duge", 0, 2, a, 0.4, 2.0), make("duge", 1, 2, a, 0.8, 2.0)],
          "mixed": [make("duge", 0, k, b, 0.8, 2.2) for k in (1, 2)] + [make("esd", 0, 1, b, 0.2, 9.0)]}
    md = benchmark.write_summary(by, tmp_path).split("## Against the continual goal")[1].splitlines()
    # forgotten: seed 1's van gogh at 10% -> mean 5%; held out 0.6 / 0.8 of base 0.8; worst held out min of
    # means of halves (0.35 at request 1... 0.3 at request 2); FD worst mean 4.0 / 2.0 = 2x; steps 10 + 20
    assert "| duge | 5% / 0% | 75% / 100% | 30% / 40% | 100% / 100% | 50% / 50% | 2.00x / 1.10x | 30 / 30 |" in md
    assert "| esd | - / 0% | - / 25% | - / 10% | - / 100% | - / 50% | - / 4.50x | - / 10 |" in md


def test_every_variant_keeps_its_own_state_and_models():
    """"esd" and "esd+" once shared a state file (a slug drops the "+"), so esd+ read back esd's run."""
    from experiments import benchmark
    names = [benchmark.file_name(v) for v in benchmark.VARIANTS]
    assert len(set(names)) == len(names)
    assert benchmark.state_path("d", "styles", "esd+", 0) != benchmark.state_path("d", "styles", "esd", 0)


def test_probes_find_the_benchmarks_models(tmp_path):
    from experiments import probes
    want = tmp_path / "styles" / "esd-plus" / "seed0" / "step01-van-gogh.safetensors"
    want.parent.mkdir(parents=True)
    for p in (want, want.with_name("step01-van-gogh.delta.safetensors")):
        p.write_bytes(b"")
    assert probes.model_path(tmp_path, "esd+", 1) == want


def test_erosion_kv_moved_is_zero_at_phi0_and_sees_a_moved_key(tmp_path):
    """experiments.erosion --kv: ||(W - W_0) c|| / ||W_0 c|| per token is 0 for a state holding phi_0's
    keys and values, and 1 on every token for a key doubled (one of the 14 tensors: 1/14 on average).
    Its span table: all zero at phi_0; a change that is zero on the forgotten styles' span moves the
    forgotten styles (almost) not at all and nothing through the span."""
    from safetensors.torch import save_file

    from experiments import erosion
    model = checkpoint.load(checkpoint.TOY_WEIGHTS)
    named = dict(model.unet.named_parameters())
    kv = trainer.trainable_names(model.unet, "kv")
    gone = ["van gogh", "monet", "picasso"]
    meta = {"duge.ledger": json.dumps({"steps": [{"concept": c} for c in gone]})}
    save_file({f"theta.{n}": named[n].detach().clone() for n in kv}, str(tmp_path / "same.safetensors"), meta)
    save_file({f"theta.{kv[0]}": 2 * named[kv[0]].detach()}, str(tmp_path / "moved.safetensors"), meta)
    same = erosion.kv_moved(model, tmp_path / "same.safetensors")
    moved = erosion.kv_moved(model, tmp_path / "moved.safetensors")
    assert all(set(line.split("|")[3].strip()) <= set("0.") for line in same[2:22])
    assert moved[2].split("|")[3].strip() == f"{1 / len(kv):.2f}"
    assert [line.split("|")[2:5] for line in same[-3:]] == [[" 0.00 "] * 3] * 3
    with torch.no_grad():
        c = model.text_encoder(model.tokenizer([f"a painting in the style of {s}" for s in gone])).flatten(0, 1)
        values, vectors = torch.linalg.eigh(c.T @ c)
        values, vectors = values.flip(0), vectors.flip(1)
        rank = int((values.cumsum(0) / values.sum() < 0.999).sum()) + 1
        rest = torch.eye(c.shape[1]) - vectors[:, :rank] @ vectors[:, :rank].T
    save_file({f"theta.{n}": named[n].detach() + named[n].detach() @ rest for n in kv}, str(tmp_path / "r.safetensors"),
              meta)
    table = erosion.kv_moved(model, tmp_path / "r.safetensors")[-3:]
    assert float(table[0].split("|")[2]) < 0.05                      # the forgotten styles: barely moved
    assert all(line.split("|")[3].strip() == "0.00" and float(line.split("|")[4]) > 0 for line in table)

def test_erosion_image_similarity_finds_the_worlds_neighbours():
    """experiments.erosion's image similarity, on the world's own images: by pixels the colours that
    are mixtures sit next to their parts (orange by yellow and red, purple by blue), and both spaces
    give unit rows, one per concept asked for, in its order."""
    from experiments import erosion
    from toy import world
    names = world.COLOURS + ["munch", "house"]
    for space in erosion.SPACES:
        e = erosion.image_embeddings(names, space, n=16)
        assert e.shape[0] == len(names)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(names)))
    e = erosion.image_embeddings(world.COLOURS, "pixels", n=16)
    cos = e @ e.T
    nearest = lambda c: sorted((k for k in world.COLOURS if k != c), key=lambda k: -cos[world.COLOURS.index(c),
                                                                                        world.COLOURS.index(k)])
    assert set(nearest("orange")[:2]) == {"yellow", "red"} and nearest("purple")[0] == "blue"


def test_erosion_fd_by_group_is_flat_for_the_base_model_and_counts_every_kept_image(tmp_path):
    """experiments.erosion --fd on a run whose trained tensors are phi_0's own: every group's paired
    distance equals the base model's (x 1.00, no rise to share), the FD equals the base's, and the
    groups hold every kept image of the evaluation (forgotten concepts' images left out)."""
    from safetensors.torch import save_file

    from experiments import erosion
    from toy import evaluate
    model = checkpoint.load(checkpoint.TOY_WEIGHTS)
    named = dict(model.unet.named_parameters())
    kv = trainer.trainable_names(model.unet, "kv")
    ledger = {"steps": [{"concept": "van gogh", "anchor": "", "kind": "style", "retain": []}]}
    save_file({f"theta.{n}": named[n].detach().clone() for n in kv}, str(tmp_path / "s.safetensors"),
              metadata={"duge.ledger": json.dumps(ledger), "file": "m.safetensors"})
    lines = erosion.fd_by_group(model, tmp_path / "s.safetensors", 1, tmp_path / "out")
    base, after = re.match(r"FD of the (\d+) kept images: base ([\d.]+), after ([\d.]+)", lines[0]).group(2, 3)
    assert base == after
    rows = [line.split("|") for line in lines[4:]]
    assert all(r[5].strip() == "1.00" and r[6].strip() == "-" for r in rows)
    kept = [it for it in evaluate.items(1, ["van gogh"]) if "van gogh" not in it.names()]
    assert sum(int(r[2]) for r in rows) == len(kept) == int(lines[0].split()[3])
    # every value doubled: the model draws other images, and the groups' shares of the rise add up to 100%
    save_file({f"theta.{n}": 2 * named[n].detach() for n in kv}, str(tmp_path / "d.safetensors"),
              metadata={"duge.ledger": json.dumps(ledger), "file": "d.safetensors"})
    lines = erosion.fd_by_group(model, tmp_path / "d.safetensors", 1, tmp_path / "out")
    assert lines[0].split(", after ")[1].split()[0] != base
    assert abs(sum(float(line.split("|")[6].strip(" %")) for line in lines[4:]) - 100) <= 2   # (rounded)


def test_tables_only_rewrites_from_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    """--ablations --tables: the plan cut to the runs whose committed state holds all 12 requests; the
    tables are written from their ledgers and train.py is never called. The ablation plan holds DUGE
    and R_kv at 3 seeds on every sequence."""
    import shutil

    import train
    from experiments import benchmark
    assert all((q, v, s) in benchmark.ABLATIONS for q in benchmark.SEQUENCES for v in ("duge", "duge+kv")
               for s in range(3))
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("--tables trained"))
    docs = tmp_path / "docs"
    state = benchmark.state_path(docs, "styles", "duge", 0)
    state.parent.mkdir(parents=True)
    shutil.copy(benchmark.state_path("docs", "styles", "duge", 0), state)
    part = benchmark.state_path(docs, "styles", "duge+kv", 0)   # a cut run: 11 requests
    tensors, meta = checkpoint.read_safetensors(state)
    steps = json.loads(meta["duge.ledger"])
    steps["steps"] = steps["steps"][:11]
    from safetensors.torch import save_file
    save_file(tensors, str(part), {**meta, "duge.ledger": json.dumps(steps)})
    assert benchmark.main(["--ablations", "--tables", "--docs", str(docs), "--out", str(tmp_path / "out")]) == 0
    table = (docs / "benchmark.md").read_text()
    assert "| duge | 1 | 12 |" in table and "duge+kv" not in table
    assert not (docs / "benchmark-mixed.md").exists()
