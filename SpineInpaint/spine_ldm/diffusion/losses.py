"""Training objectives of the three latent inpainting models (eps prediction, MSE).

``diffusion_loss(unet_fn, z0, W, method, schedule, generator)``; ``unet_fn(x_t, t_global, t_voxel) -> eps`` uses
the sampler callable convention (close over level/condition and, for W-channel U-Nets, over W, e.g. with
:func:`spine_ldm.diffusion.samplers.unet_model_fn`). A global t ~ U{1..T} is drawn per sample and the U-Net is
told that global t (as in the paper); eps ~ N(0, I).

- ``weighted`` (Hansen et al.): t_v = round(W_v t) (half up); x_t = add_noise(z0, eps, t_v); the loss is the MSE
  over voxels with t_v > 0 only. Voxels with t_v = 0 are not noised (x_t = z0 exactly there), so they carry no
  information about eps: predicting eps there is impossible, and including them would add irreducible loss (=1
  per voxel) and push the net towards 0 outside the support; they are excluded.
- ``masked`` (masked LDM baseline): roi = W > roi_threshold (0.1, as for the baselines' roi); noise only inside
  the roi (t_v = t inside, 0 outside), MSE only inside the roi. W may also be given as a bool mask.
- ``full`` (for RePaint / unconditional): the whole latent at t; W is ignored (may be None).

The loss is the mean of (eps_pred - eps)^2 over the included voxels and channels of the batch (0 with a zero
gradient when no voxel is included). ``roi_loss_weight`` r > 0 (weighted / masked only; 0 = the paper) weights each
included voxel by ``1 + r W_v`` (normalised by the sum of the weights): the voxels near the landmark, the only ones
that carry the pathology, then count more than the lightly noised context. ``snr_gamma`` g > 0 (0 = the paper)
additionally weights each included voxel by ``min(SNR_v, g) / SNR_v`` with ``SNR_v = abar(t_v) / (1 - abar(t_v))``
(min-SNR-g weighting, Hang et al. 2023, applied per voxel): eps errors at barely noised voxels, which say little
about the image and dominate a weighted-noise batch, count less.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .schedule import NoiseSchedule

METHODS = ("weighted", "masked", "full")


def diffusion_loss(unet_fn, z0: torch.Tensor, W=None, method: str = "weighted",
                   schedule: NoiseSchedule | None = None, generator: torch.Generator | None = None,
                   roi_threshold: float = 0.1, t: torch.Tensor | None = None, return_info: bool = False,
                   roi_loss_weight: float = 0.0, snr_gamma: float = 0.0):
    if method not in METHODS:
        raise InputError(f"method {method!r} unknown; use one of {', '.join(METHODS)}")
    if z0.ndim < 3:
        raise InputError(f"latent must be (B, C, *spatial), got {tuple(z0.shape)}")
    schedule = schedule or NoiseSchedule()
    B, sp = z0.shape[0], tuple(z0.shape[2:])
    gdev = generator.device if generator is not None else z0.device
    if t is None:
        t = torch.randint(1, schedule.T + 1, (B,), generator=generator, device=gdev)
    t = torch.as_tensor(t).to(z0.device).long().reshape(B)
    eps = torch.randn(z0.shape, generator=generator, device=gdev, dtype=torch.float32).to(z0.device, z0.dtype)

    if method == "full":
        tv = t.reshape(B, 1, *([1] * len(sp))).expand(B, 1, *sp)
        include = torch.ones((B, 1, *sp), dtype=torch.bool, device=z0.device)
    else:
        if W is None:
            raise InputError(f"method {method!r} needs a weight / roi W")
        W = torch.as_tensor(W, device=z0.device)
        if tuple(W.shape) == sp:
            W = W.reshape(1, 1, *sp)
        if W.ndim != z0.ndim or W.shape[1] != 1 or tuple(W.shape[2:]) != sp or W.shape[0] not in (1, B):
            raise InputError(f"W must have shape {sp} or (B|1, 1, *{sp}), got {tuple(W.shape)}")
        W = W.expand(B, 1, *sp)
        if method == "weighted":
            tv = schedule.weighted_timesteps(W.float(), t)
            include = tv > 0
        else:
            roi = W if W.dtype == torch.bool else W > roi_threshold
            tv = torch.where(roi, t.reshape(B, *([1] * (z0.ndim - 1))), torch.zeros((), dtype=torch.long,
                                                                                      device=z0.device))
            include = roi

    x_t = schedule.add_noise(z0, eps, tv)
    pred = unet_fn(x_t, t, tv)
    if pred.shape != z0.shape:
        raise InputError(f"noise predictor returned shape {tuple(pred.shape)}, expected {tuple(z0.shape)}")
    m = include.to(pred.dtype)
    if roi_loss_weight and method != "full":
        if float(roi_loss_weight) < 0:
            raise InputError(f"roi_loss_weight must be >= 0, got {roi_loss_weight}")
        m = m * (1.0 + float(roi_loss_weight) * W.to(pred.dtype))
    if snr_gamma:
        if float(snr_gamma) < 0:
            raise InputError(f"snr_gamma must be >= 0, got {snr_gamma}")
        a = schedule.abar(tv, dtype=torch.float64, device=tv.device).clamp(max=1.0 - 1e-12)
        snr = a / (1.0 - a)
        m = m * (snr.clamp(max=float(snr_gamma)) / snr).to(pred.dtype)
    m = m.expand_as(pred)
    n = m.sum()
    loss = ((pred - eps) ** 2 * m).sum() / n.clamp_min(1)
    if return_info:
        return loss, {"t": t, "t_voxel": tv, "eps": eps, "x_t": x_t, "included_fraction": float(n / m.numel())}
    return loss
