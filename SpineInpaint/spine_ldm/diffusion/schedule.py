"""Noise schedule with the project's timestep convention (DEVELOPERS.md, "Diffusion conventions").

- T = 1000 by default. **Timestep 0 means clean**: abar(0) = 1 and abar(t) = prod_{s=1..t} (1 - beta_s) for
  t = 1..T. The betas are MONAI's (``DDPMScheduler(...).betas``, ``linear_beta`` or ``scaled_linear_beta``), so our
  abar(t) equals MONAI's ``alphas_cumprod[t - 1]`` (shifted by one index). The table is kept in float64.
- Weighted noising (Hansen et al.): per-voxel timestep ``t_v = round(W_v * t)`` with **round half up**
  (``floor(W t + 0.5)``; torch.round would round half to even). The same function is used in training and sampling.
- ``add_noise(x0, eps, t_voxel) = sqrt(abar(t_v)) x0 + sqrt(1 - abar(t_v)) eps`` per voxel; voxels with t_v = 0
  return x0 bit-identically.
- ``timesteps(steps)`` (default ``spacing="leading"``, the LDM / MONAI PNDM grid the paper used): stride
  T // steps, [T - stride + 1, ..., 1, 0]: steps=50 -> [981, 961, ..., 21, 1, 0]. Its last interval is 1 -> 0, so
  the probability-flow ODE endpoint is integrated accurately (exact-score Gaussian test: PLMS-50 error 0.0017
  leading vs 0.036 trailing). ``spacing="trailing"`` (diffusers): t_i = round(T (steps - i) / steps), i = 0..steps
  (integer arithmetic, half up), strictly decreasing from T to 0: steps=50 -> [1000, 980, ..., 20, 0]; steps=30 ->
  [1000, 967, 933, 900, ...]; it starts at t = T, the level the U-Net was trained on for pure noise.
"""
from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from ..errors import InputError


def _compute_dtype(device) -> torch.dtype:
    """float64 for schedule arithmetic, except on devices that lack it (Apple MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class NoiseSchedule:
    def __init__(self, T: int = 1000, beta_schedule: str = "scaled_linear_beta", beta_start: float = 0.0015,
                 beta_end: float = 0.0195):
        if beta_schedule not in ("linear_beta", "scaled_linear_beta"):
            raise InputError(f"beta_schedule {beta_schedule!r} unknown; use linear_beta or scaled_linear_beta")
        if int(T) < 1:
            raise InputError(f"T must be >= 1, got {T}")
        self.T = int(T)
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        monai = DDPMScheduler(num_train_timesteps=self.T, schedule=beta_schedule, beta_start=beta_start,
                              beta_end=beta_end)
        betas = monai.betas.double()
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])       # betas[t], t = 1..T; betas[0] = 0
        self.abar_table = torch.cumprod(1.0 - self.betas, dim=0)                    # abar_table[0] = 1 exactly

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        """From a ModelConfig (or its ``schedule`` section)."""
        s = getattr(cfg, "schedule", cfg)
        return cls(T=s.T, beta_schedule=s.beta_schedule, beta_start=s.beta_start, beta_end=s.beta_end)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.T}, beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end})")

    # ------------------------------------------------------------------------------------------------
    def abar(self, t, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """abar(t) for an int or an integer tensor of any shape (values 0..T)."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise InputError("timesteps must be integers (use weighted_timesteps to round W*t)")
            t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.T):
            raise InputError(f"timesteps must lie in 0..{self.T}, got range {int(t.min())}..{int(t.max())}")
        out = self._table(t.device)[t.long()]
        return out.to(dtype=dtype, device=device if device is not None else t.device)

    def _table(self, device: torch.device) -> torch.Tensor:
        """abar table on ``device`` (cached; float64, or float32 on devices without float64 such as MPS)."""
        key = str(device)
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = self.abar_table.to(device=device, dtype=_compute_dtype(device))
        return cache[key]

    def weighted_timesteps(self, W: torch.Tensor, t) -> torch.Tensor:
        """Per-voxel timesteps ``round(W * t)`` (half up), long tensor.

        ``W`` in [0, 1], shape (B, 1, *spatial) (or anything broadcastable); ``t`` an int or a (B,) tensor.
        """
        W = torch.as_tensor(W)
        if W.numel() and (float(W.min()) < 0.0 or float(W.max()) > 1.0 or not torch.isfinite(W).all()):
            raise InputError(f"weight W must lie in [0, 1], got range {float(W.min()):.4g}..{float(W.max()):.4g}")
        t = torch.as_tensor(t, device=W.device)
        if t.ndim == 1 and W.ndim > 1:
            t = t.reshape(-1, *([1] * (W.ndim - 1)))
        cd = _compute_dtype(W.device)
        return torch.floor(W.to(cd) * t.to(cd) + 0.5).long()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t_voxel) -> torch.Tensor:
        """``sqrt(abar(t_v)) x0 + sqrt(1 - abar(t_v)) eps``; t_voxel (B,), an int, or broadcastable to x0."""
        t = torch.as_tensor(t_voxel, device=x0.device)
        if t.ndim == 1 and x0.ndim > 1 and t.shape[0] == x0.shape[0]:
            t = t.reshape(-1, *([1] * (x0.ndim - 1)))
        cd = _compute_dtype(x0.device)
        a = self.abar(t, dtype=cd)
        xt = (a.sqrt() * x0.to(cd) + (1.0 - a).sqrt() * eps.to(cd)).to(x0.dtype)
        return torch.where(t == 0, x0, xt)

    def timesteps(self, steps: int = 50, spacing: str = "leading") -> list[int]:
        """Sampling grid with ``steps`` intervals, ending at 0 (see module docstring).

        ``leading`` (default; LDM / MONAI PNDM grid): [T - stride + 1, ..., 1, 0] with stride = T // steps, i.e.
        [981, 961, ..., 21, 1, 0] for 50 steps. ``trailing``: [T, ..., 0] evenly spaced.
        """
        steps = int(steps)
        if steps < 1 or steps > self.T:
            raise InputError(f"steps must lie in 1..{self.T}, got {steps}")
        if spacing == "trailing":
            return [(2 * self.T * (steps - i) + steps) // (2 * steps) for i in range(steps + 1)]
        if spacing == "leading":
            stride = self.T // steps
            return [stride * (steps - 1 - i) + 1 for i in range(steps)] + [0]
        raise InputError(f"spacing {spacing!r} unknown; use trailing or leading")
