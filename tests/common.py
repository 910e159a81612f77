"""What several test files share: the tiny UNet config, and our models
built on the tensors of their diffusers twins. Test-only: diffusers is never imported here; the
reference models are built by the caller."""

import checkpoint
import sample
import vae
from unet import UNetConfig

# two levels, attention at both, 2 heads: every code path of the SD v1 UNet in milliseconds
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=2, context_dim=16, norm_groups=8)


def target_by_hand(x0, eps, t, prediction_type):
    """What a UNet is trained to output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, written out from the
    schedule (not from sample.training_target): eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    if prediction_type == "epsilon":
        return eps
    abar = sample.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def unet_from_diffusers(cfg, ref):
    """Our UNet holding the diffusers model's tensors (strict load, shared storage: no copy)."""
    return checkpoint.unet_from_diffusers_tensors(cfg, ref.state_dict())


def vae_from_diffusers(cfg, ref):
    """Our VAE holding a copy of the diffusers AutoencoderKL's tensors (strict load)."""
    inverse = {d: k for k, d in vae.diffusers_key_map(cfg).items()}
    sd = {inverse[k]: vae.from_diffusers_tensor(k, t) for k, t in ref.state_dict().items()}
    model = vae.VAE(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
