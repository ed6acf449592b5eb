"""Diffusion core: schedule (t=0 clean, per-voxel noising), PLMS/DDIM/DDPM step math, inpainting samplers, losses."""
from .losses import diffusion_loss
from .samplers import (expected_nfe, sample_full, sample_masked, sample_repaint, sample_weighted,
                       unet_model_fn)
from .schedule import NoiseSchedule
from .steps import ddim_step, ddpm_step, plms_eps, predict_x0, renoise

__all__ = [
    "NoiseSchedule", "ddim_step", "ddpm_step", "plms_eps", "predict_x0", "renoise",
    "sample_weighted", "sample_masked", "sample_repaint", "sample_full", "expected_nfe", "unet_model_fn",
    "diffusion_loss",
]
