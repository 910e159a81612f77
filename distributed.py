"""Several processes, one per GPU (or CPU share), started by torchrun:

    torchrun --nproc_per_node 2 train.py --forget "van gogh"
    torchrun --nproc_per_node 2 evaluate.py --weights MODEL --clip CLIP_FOLDER

Every process runs the same program on the same inputs. Image generation (phi_0's images, the
grid, the evaluation) is split between them, each drawing every size()-th item, and gathered so
that each holds all of it. Training is data parallel: every rank draws the same batch, takes its
share of the micro-batches, and the gradients are summed over ranks before the optimizer step
(what DistributedDataParallel does, done by hand: the UNet is run with swapped tensors and
recorded by hooks, which DDP's wrapper would have to see through). So every rank holds the same
model at every step, and rank 0 alone writes files and prints.

With one process (no torchrun) nothing here does anything: size() is 1, shard() returns its input.
Gathers exchange tensors only (JSON is sent as bytes), never pickles.
"""
import json
import os

import torch
import torch.distributed as dist


def init(device):
    """Join the process group when torchrun started several processes: NCCL on CUDA (one GPU per
    process, by LOCAL_RANK), gloo on the CPU. -> the device this process computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def shard(items):
    """This rank's share of a list: items rank, rank + size, ..."""
    return items[rank()::size()]


def unshard(parts):
    """The inverse of shard: every rank's share (a list per rank) -> the whole list, in order."""
    out = []
    for i in range(max(map(len, parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def _comm(t):
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


def _gather_flat(flat):
    """1-D tensors of different lengths (same dtype) from every rank -> a list, one per rank."""
    n = _comm(torch.tensor([flat.numel()]))
    ns = [torch.zeros_like(n) for _ in range(size())]
    dist.all_gather(ns, n)
    top = max(int(k) for k in ns)
    buf = _comm(torch.cat([flat.flatten(), flat.new_zeros(top - flat.numel())]))
    bufs = [torch.empty_like(buf) for _ in range(size())]
    dist.all_gather(bufs, buf)
    return [b[:int(k)] for b, k in zip(bufs, ns)]


def gather_json(obj):
    """Any JSON-able value from every rank -> the list of them, on every rank."""
    if size() == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(bytes(b.cpu().tolist()).decode()) for b in _gather_flat(data)]


def gather_dict(d):
    """A dict from every rank (JSON-able values) -> the union of them, on every rank."""
    out = {}
    for part in gather_json(d):
        out.update(part)
    return out


def gather_tensors(t):
    """A tensor from every rank (shapes may differ; None: nothing) -> the list of them, on every
    rank, on t's device."""
    if size() == 1:
        return [t]
    metas = gather_json(None if t is None else [list(t.shape), str(t.dtype).removeprefix("torch.")])
    dtype = getattr(torch, next(m[1] for m in metas if m is not None))
    flat = torch.zeros(0, dtype=dtype) if t is None else t.detach().flatten()
    device = t.device if t is not None else torch.device("cpu")
    parts = _gather_flat(flat)
    return [None if m is None else p.to(device).reshape(m[0]) for p, m in zip(parts, metas)]


def gather_rows(t_mine):
    """shard() of a list of rows, computed as one tensor (rows, ...) per rank -> all the rows, in
    the order of the list, as one tensor."""
    if size() == 1:
        return t_mine
    parts = gather_tensors(t_mine)
    return torch.stack(unshard([list(p) if p is not None else [] for p in parts]))


def sum_gradients(params):
    """Data parallel: each parameter's gradient summed over ranks (a rank that had no share of the
    batch adds zeros)."""
    if size() == 1:
        return
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        buf = _comm(g)
        dist.all_reduce(buf)
        p.grad = buf.to(p.device)


def sum_logs(logs):
    """Per-rank loss logs (each its weighted share) -> their sums, the same on every rank."""
    out = {}
    for d in gather_json(logs):
        out = {k: out.get(k, 0.0) + d.get(k, 0.0) for k in dict.fromkeys([*out, *d])}
    return out


def any_rank(flag):
    """True on every rank when it is true on one (e.g. asked to stop)."""
    return any(gather_json(bool(flag)))


def barrier():
    if size() > 1:
        dist.barrier()
