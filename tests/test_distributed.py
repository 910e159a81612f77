"""distributed.py: torchrun with gloo on the CPU gives the same request as one process, and only
rank 0 writes."""
import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed

ROOT = Path(__file__).resolve().parent.parent
# CI-size settings of a toy request: every phase runs (phi_0's images, training split over the ranks
# by micro-batches of 1, evaluation, grid), in seconds
SMALL = ["--forget", "van gogh", "--steps", "4", "--num-prompts", "1", "--images-per-prompt", "1", "--generic", "2",
         "--gen-steps", "2", "--num-related", "1", "--batch", "2", "--eval-n", "1"]


@pytest.mark.parametrize("n", range(8))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_unshard_undoes_shard(n, world):
    items = [f"item{i}" for i in range(n)]
    parts = [items[r::world] for r in range(world)]   # what shard() gives rank r
    assert distributed.unshard(parts) == items


def torchrun(script, *args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_gathers_across_two_processes(tmp_path):
    """Each gather, with gloo between two real processes: shapes that differ by rank, a rank with
    nothing, JSON, gradients and logs summed."""
    script = tmp_path / "gathers.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        import distributed
        distributed.init(torch.device("cpu"))
        r = distributed.rank()
        assert distributed.size() == 2
        assert distributed.gather_json({{"rank": r, "x": [r] * (r + 1)}}) == [{{"rank": 0, "x": [0]}}, {{"rank": 1, "x": [1, 1]}}]
        assert distributed.gather_dict({{f"k{{r}}": r, "both": 1}}) == {{"k0": 0, "k1": 1, "both": 1}}
        parts = distributed.gather_tensors(torch.full((r + 1, 3), float(r)) if r else None)
        assert parts[0] is None and parts[1].shape == (2, 3) and (parts[1] == 1).all(), parts
        items = list(range(5))
        mine = distributed.shard(items)
        rows = distributed.gather_rows(torch.tensor([[10.0 * i, i] for i in mine]))
        assert rows.tolist() == [[10.0 * i, i] for i in items], rows
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([1.0, 2.0]) * (r + 1)           # q has no gradient on either rank
        distributed.sum_gradients([p, q])
        assert p.grad.tolist() == [3.0, 6.0] and q.grad.tolist() == [0.0, 0.0]
        assert distributed.sum_logs({{"L": 0.25 * (r + 1)}}) == {{"L": 0.75}}
        assert distributed.any_rank(r == 1) and not distributed.any_rank(False)
        distributed.close()
    """))
    r = torchrun(script, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_torchrun_request_equals_one_process_and_only_rank0_writes(tmp_path):
    """torchrun --nproc_per_node 2 train.py on the toy model, against one process.

    What data parallelism must guarantee, and why each check holds on any CPU:
    - phi_0's images, drawn half by each rank and gathered, equal one process's up to float rounding:
      the same prompts, seeds and sampler, only drawn in batches of another size, which changes the
      order of float32 sums (measured 7.5e-6 on latents of size ~1; bound 1e-4; a wrong prompt or
      seed moves a latent by far more than 0.1);
    - on the SAME images, training is bit for bit the same: each rank's share of a batch of 2 is one
      micro-batch of 1 image, so one process with --micro-batch 1 (and the one thread torchrun gives
      each rank) computes the same per-image gradients, and the all-reduce of two ranks is one float
      addition, which commutes. Comparing trained tensors needs this exactness: AdamW divides each
      gradient entry by its own size, so rounding in an entry near zero can flip its update by the
      whole learning rate (4.6e-4 of the 4.0e-3 the tensors moved on one AVX-512 machine, when the
      two runs drew their images separately);
    - the same evaluation table, each concept within one image (its images are drawn in other
      batches: rounding can tip an image that sits on the classifier's boundary), and the same files;
      rank 1 never writes one (its atomic_path, the project's only way to write, raises)."""
    script = tmp_path / "ranked_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import checkpoint
        if int(os.environ["RANK"]) > 0:
            def refuse(path, *args, **kw):
                raise AssertionError(f"rank {{os.environ['RANK']}} wrote {{path}}")
            checkpoint.atomic_path = refuse
        import train
        sys.exit(train.main())
    """))
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}   # what torchrun gives each rank
    two = torchrun(script, *SMALL, "--out", "two/m.safetensors", "--cache", "two/cache", cwd=tmp_path, env=one_thread)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, "--out", "one/m.safetensors", "--cache",
                          "one/cache"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    files = lambda d: sorted(str(p.relative_to(tmp_path / d)) for p in (tmp_path / d).rglob("*"))
    assert files("two") == files("one") and "m.eval.csv" in files("one")
    latents = sorted((tmp_path / "one/cache").rglob("*.safetensors"))
    assert len(latents) > 5
    for f in latents:
        a, b = load_file(str(f))["latents"], load_file(str(tmp_path / "two" / f.relative_to(tmp_path / "one")))["latents"]
        assert (a - b).abs().max() < 1e-4, f
    a, b = read_csv(tmp_path / "one/m.eval.csv"), read_csv(tmp_path / "two/m.eval.csv")
    assert [r["concept"] for r in a] == [r["concept"] for r in b] and len(a) > 20
    for ra, rb in zip(a, b):
        n = int(ra["images"])
        assert rb["images"] == ra["images"] and n > 0
        for col in ("base", "after"):
            assert abs(float(ra[col]) - float(rb[col])) * n <= 1 + 1e-9, (ra, rb)

    shutil.copytree(tmp_path / "two/cache", tmp_path / "same/cache")   # the two ranks' images, bit for bit
    same = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, "--micro-batch", "1", "--no-eval",
                           "--no-grid", "--out", "same/m.safetensors", "--cache", "same/cache"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=one_thread)
    assert same.returncode == 0, same.stderr[-3000:]
    d1, d2 = load_file(str(tmp_path / "same/m.delta.safetensors")), load_file(str(tmp_path / "two/m.delta.safetensors"))
    theta = [k for k in d1 if k.startswith("theta.")]
    assert max((d1[k] - d1["phi0." + k[6:]]).abs().max().item() for k in theta) > 1e-3   # it trained
    assert sorted(d1) == sorted(d2) and all(torch.equal(d1[k], d2[k]) for k in d1)
    assert "forgotten:" in two.stderr and two.stderr.count("forgotten:") == 1   # rank 0 alone prints
