"""The training loop every method shares: it owns the loop, a method owns its loss (as minGPT's
trainer knows nothing of the task it trains).

    trainable_names  which tensors train: the cross-attention keys and values by default
    Original         a frozen model as a function: the same UNet run with other values of the
                     trained tensors swapped in (phi_0, or the model a request starts from)
    draw_batch       a step's batch: rows of every data group, their noise, timesteps, x_t and target
    gradients        one step's gradients: micro-batches, autocast, torchrun's ranks summed
    unlearn          the steps: AdamW, CUIG's add-ons (gamma, gp), the resume hook

A method is any object with these (the smallest one: baselines.Finetune):

    name         str, as in the ledger
    reference    "phi0" (the original model) or "phin" (the model the request starts from): the
                 frozen model its loss compares with, which also draws its training images
    replays      whether the concepts forgotten earlier are unlearned again with this one
    data(p)      -> {group: {"x": prompts whose images it trains on, "c_...": prompts to encode}},
                 p a request.Prompts; every key of a group is row-aligned with its images
    loss(unet, ref, batch) -> (loss, {name: float}); batch[group] holds a random row of each of
                 its keys, plus eps, t, x_t = add_noise(x, eps, t) and target, what the UNet is
                 trained to output at x_t: eps, or v for a v-prediction model (SD 2.x 768-v);
                 ref(x_t, t, c) -> the frozen model's output, in the same terms as unet's

and optionally begin_step(unet, ref, step, data) (before each step's batch: the robust variant's
attacker), state() and load_state(tensors) (what it adds to the resume point).
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch.func import functional_call
from tqdm import tqdm

import distributed
from sample import NUM_TRAIN_TIMESTEPS, add_noise, training_target


def setting(default, help, low=None, above=None, choices=None):
    """A config field with its --help text and the values it takes (check() enforces them)."""
    return field(default=default, metadata={"help": help, "low": low, "above": above, "choices": choices})


def check(cfg):
    """Refuse settings that would train nothing, or nonsense, in one line."""
    for f in fields(cfg):
        v, m = getattr(cfg, f.name), f.metadata
        if m.get("choices") and v not in m["choices"]:
            raise ValueError(f"{f.name} {v!r}: choose one of {', '.join(map(repr, m['choices']))}")
        low, above = m.get("low"), m.get("above")
        if (low is not None and not (math.isfinite(v) and v >= low)) or (
                above is not None and not (math.isfinite(v) and v > above)):
            raise ValueError(f"{f.name} {v}: must be {f'at least {low}' if low is not None else 'positive'}")


@dataclass
class TrainConfig:
    """What every method shares: a request's data and the loop; PRESETS: the toy model's and real SD's."""
    steps: int = setting(200, "training steps", low=1)
    lr: float = setting(1e-3, "AdamW learning rate", above=0)
    lr_rest: float = setting(0.0, "learning rate of the trained tensors outside the attn2 keys and values (0: --lr)",
                             low=0)
    batch: int = setting(8, "images per data group in each step", low=1)
    seed: int = setting(0, "seed of the training draws and of the prompts")
    trainable: str = setting("kv", "trained tensors: attn2 keys and values, every attn2 tensor, or the whole UNet",
                             choices=("kv", "attn2", "unet"))
    num_prompts: int = setting(8, "prompts per concept", low=1)
    images_per_prompt: int = setting(2, "images per prompt", low=1)
    num_related: int = setting(3, "related concepts, nearest by text embedding, kept in the memory", low=0)
    generic: int = setting(24, "generic prompts in the memory", low=0)
    # CUIG's add-ons (Lee et al., ICLR 2026), for any trained method
    gamma: float = setting(0.0, "CUIG's L2 pull of the trained tensors towards phi_0: gamma ||theta - theta_0||^2",
                           low=0)
    gamma_to: str = setting("phi0", "what --gamma pulls towards: phi_0 (CUIG), or the tensors the request starts from "
                            "(ours)", choices=("phi0", "start"))
    gp: bool = setting(False, "CUIG's gradient projection: key/value updates orthogonal to the kept concepts")
    # memory bounds: the same training up to float rounding (README, "Real SD on a GPU")
    micro_batch: int = setting(0, "images per group in one forward/backward, gradients accumulated (0: all)", low=0)
    checkpointing: bool = setting(False, "recompute the UNet blocks' activations in backward")
    autocast: str = setting("", "forward in this dtype, trained tensors in fp32 ('': off)", choices=("", "bf16", "fp16"))

    def __post_init__(self):
        check(self)


# Toy: 60 steps, chosen over 100 when toy model v5 came (docs/results.md; that run is not committed).
# SD: 3 x 8 images per step in micro-batches of 2, checkpointed: one UNet plus a few GB, not ~45 GB
# (docs/performance.md).
PRESETS = {"toy": TrainConfig(steps=60), "sd": TrainConfig(lr=1e-5, micro_batch=2, checkpointing=True)}


KEYS_AND_VALUES = ("attn2.to_k.weight", "attn2.to_v.weight")   # the tensors that multiply the context


def trainable_names(unet, which="kv"):
    """Names of the trained tensors (SD v1: 16 attn2 x (to_k, to_v) = 19.2 M parameters; SD 2.x, its
    context 1024 wide: 25.6 M). Keys and values are where the prompt enters the UNet: editing them
    changes what a prompt means, not what it can draw."""
    parts = {"kv": ("to_k.weight", "to_v.weight"),
             "attn2": ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")}
    if which == "unet":   # everything: what the UNet can draw, not only what prompts mean (adversarial.py)
        return [n for n, _ in unet.named_parameters()]
    if which not in parts:
        raise ValueError(f"unknown trainable set {which!r}: choose 'kv', 'attn2' or 'unet'")
    return [f"{name}.{p}" for name, _ in unet.cross_attentions() for p in parts[which]]


@torch.no_grad()
def put(unet, tensors):
    """Copy tensors (by parameter name) into the UNet's parameters."""
    named = dict(unet.named_parameters())
    for n, v in tensors.items():
        named[n].copy_(v)


class Original:
    """A frozen model as a function: the same UNet module run with `tensors` (by parameter name)
    swapped in, e.g. phi_0's values of the trained tensors. Never a second UNet in memory."""

    def __init__(self, unet, tensors):
        self.unet = unet
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}

    @torch.no_grad()
    def __call__(self, x, t, context):
        return functional_call(self.unet, self.tensors, (x, t, context))

    @contextmanager
    def applied(self):
        """Temporarily put these tensors into the UNet, e.g. to sample from the original model."""
        named = dict(self.unet.named_parameters())
        saved = {k: named[k].detach().clone() for k in self.tensors}
        put(self.unet, self.tensors)
        try:
            yield self.unet
        finally:
            put(self.unet, saved)


def draw_batch(data, n, generator, prediction_type="epsilon"):
    """n random rows of every group (in data's order), then the noise and timestep of every row,
    drawn for all groups at once: {group: {its keys, eps, t, x_t, target}}, the target the noise eps
    or v as the UNet predicts (its cfg.prediction_type; sample.training_target)."""
    batch = {}
    for name, group in data.items():
        idx = torch.randint(0, len(group["x"]), (n,), generator=generator)
        batch[name] = {k: v[idx.to(v.device)] for k, v in group.items()}
    x = next(iter(batch.values()))["x"]
    noise = torch.randn((n * len(batch), *x.shape[1:]), generator=generator).to(x).split(n)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n * len(batch),), generator=generator).to(x.device).split(n)
    for b, e, s in zip(batch.values(), noise, t):
        b.update(eps=e, t=s, x_t=add_noise(b["x"], e, s),                      # x_t (n, 4, h, w)
                 target=training_target(b["x"], e, s, prediction_type))
    return batch


def l2_to_original(trained, original):
    """||theta - theta_0||^2 over the trained tensors: CUIG's L2 add-on (--gamma); theta_0 is phi_0's
    tensors, or with --gamma-to start the request's first (no pull back on earlier requests' changes)."""
    return sum(((p - original[n]) ** 2).sum() for n, p in trained.items())


def gradients(unet, method, ref, params, batch, cfg, original=None):
    """The gradients of one step's loss on `batch`, accumulated in params' .grad. Each loss is a mean
    over images, so micro-batch k adds w_k times its own gradient, w_k its share of the images; under
    torchrun each rank takes its share of the micro-batches and the gradients are summed over ranks.
    -> the step's loss logs (the same on every rank)."""
    n = len(next(iter(batch.values()))["x"])
    mb = min(cfg.micro_batch or n, -(-n // distributed.size()))
    device = next(unet.parameters()).device.type
    autocast = (torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast])
                if cfg.autocast else nullcontext())
    logs = {}
    for j in distributed.shard(range(0, n, mb)):
        part = {g: {k: v[j:j + mb] for k, v in b.items()} for g, b in batch.items()}
        w = min(mb, n - j) / n
        with autocast:
            loss, part_logs = method.loss(unet, ref, part)
            if cfg.gamma > 0:
                l2 = l2_to_original(params, original)
                loss, part_logs = loss + cfg.gamma * l2, {**part_logs, "L2": l2.item()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} ({part_logs}); lower --lr or use --dtype fp32")
        (w * loss).backward()
        logs = {k: logs.get(k, 0.0) + w * v for k, v in part_logs.items()}
    distributed.sum_gradients(params.values())
    return distributed.sum_logs(logs)


def unlearn(unet, method, ref, data, cfg: TrainConfig, original=None, progress=True, start_step=0,
            optimizer_state=None, on_step=None, projection=None):
    """Train the method's loss for cfg.steps; -> the loss logs of every step. data: {group: {"x": latents,
    "c_...": contexts}} (request.prepare). ref: the frozen model of the loss; original: phi_0's tensors
    (or what --gamma-to names). on_step(step, logs, optimizer) runs after every step (the resume point);
    projection (baselines.GradientProjection) keeps the updates in an allowed subspace."""
    names = trainable_names(unet, cfg.trainable)
    named = dict(unet.named_parameters())
    unet.requires_grad_(False)
    params = {n: named[n].requires_grad_(True) for n in names}
    rest = set(params) - set(trainable_names(unet, "kv")) if cfg.lr_rest else set()   # --lr-rest's tensors
    groups = [{"params": [p for n, p in params.items() if (n in rest) == r], "lr": cfg.lr_rest if r else cfg.lr}
              for r in (False, True)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    g, history = torch.Generator(), []
    unet.checkpointing = cfg.checkpointing
    bar = tqdm(range(start_step, cfg.steps), desc="unlearning", disable=not progress, initial=start_step,
               total=cfg.steps)
    try:
        for step in bar:
            g.manual_seed(cfg.seed * 100_003 + step)  # each step's draws depend on the step alone: exact resume
            if hasattr(method, "begin_step"):
                method.begin_step(unet, ref, step, data)
            batch = draw_batch(data, cfg.batch, g, unet.cfg.prediction_type)
            opt.zero_grad(set_to_none=True)
            try:
                logs = gradients(unet, method, ref, params, batch, cfg, original)
            except FloatingPointError as e:
                raise FloatingPointError(f"at step {step}: {e}") from None
            if projection is not None:
                projection.before_step()
            opt.step()
            if projection is not None:
                projection.after_step()
            history.append(logs)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            if on_step is not None:
                on_step(step, logs, opt)
    finally:
        unet.requires_grad_(False)
        unet.checkpointing = False
    return history
