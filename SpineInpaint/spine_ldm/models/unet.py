"""Conditional latent denoiser: MONAI ``DiffusionModelUNet`` + conditioning encoder tau.

tau (Rombach et al. LDM): one-hot FSU level (5, ``spine_ldm.conditions.LEVELS``) concatenated with one-hot
condition (5, ``CONDITIONS``) -> MLP (Linear, SiLU, Linear) -> ``context_tokens`` tokens of size
``cross_attention_dim``, fed to the U-Net's cross-attention (spatial transformers exist only where
``attention_levels`` is True; configs put them at the lowest level only, for CPU speed).

``forward(x, t, level_idx, cond_idx, w=None) -> eps`` (same shape as x). ``t`` is the global timestep (B,) long,
0 = clean (DEVELOPERS.md, diffusion conventions); the U-Net embeds it as given. With ``w_channel: true`` the
network input is ``concat(x, w)`` (w = per-voxel weight W in [0, 1], shape (B, 1, *spatial)), so the network knows
each voxel's own noise level t_v = round(W_v t); ``w`` is then required. With ``class_embedding: true`` the
condition index also selects a learned embedding that MONAI adds to the timestep embedding, so it reaches every
residual block (FiLM-like), not only the cross-attention levels: the small config needs that for a herniation to
come out different from a stenosis.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from ..conditions import CONDITIONS, LEVELS
from ..errors import InputError
from .config import ModelConfig, UNetConfig


class ConditionEncoder(nn.Module):
    """tau: (level_idx, cond_idx) -> context tokens (B, n_tokens, cross_attention_dim)."""

    def __init__(self, cross_attention_dim: int, n_tokens: int = 2, hidden: int = 128):
        super().__init__()
        self.n_tokens = n_tokens
        self.dim = cross_attention_dim
        n_in = len(LEVELS) + len(CONDITIONS)
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_tokens * cross_attention_dim))

    def forward(self, level_idx: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        level_idx = torch.as_tensor(level_idx, device=self.mlp[0].weight.device).long().reshape(-1)
        cond_idx = torch.as_tensor(cond_idx, device=self.mlp[0].weight.device).long().reshape(-1)
        if level_idx.numel() and (level_idx.min() < 0 or level_idx.max() >= len(LEVELS)):
            raise InputError(f"level index out of range 0..{len(LEVELS) - 1}: {level_idx.tolist()}")
        if cond_idx.numel() and (cond_idx.min() < 0 or cond_idx.max() >= len(CONDITIONS)):
            raise InputError(f"condition index out of range 0..{len(CONDITIONS) - 1}: {cond_idx.tolist()}")
        onehot = torch.cat([F.one_hot(level_idx, len(LEVELS)), F.one_hot(cond_idx, len(CONDITIONS))], dim=1)
        out = self.mlp(onehot.to(self.mlp[0].weight.dtype))
        return out.view(-1, self.n_tokens, self.dim)


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: UNetConfig | ModelConfig, latent_channels: int = 3):
        super().__init__()
        if isinstance(cfg, ModelConfig):
            latent_channels = cfg.autoencoder.latent_channels
            cfg = cfg.unet
        self.cfg = cfg
        self.latent_channels = latent_channels
        self.w_channel = bool(cfg.w_channel)
        self.tau = ConditionEncoder(cfg.cross_attention_dim, cfg.context_tokens, cfg.context_hidden)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels + (1 if self.w_channel else 0),
            out_channels=latent_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=tuple(cfg.channels),
            attention_levels=tuple(bool(a) for a in cfg.attention_levels),
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
            with_conditioning=True,
            transformer_num_layers=cfg.transformer_num_layers,
            cross_attention_dim=cfg.cross_attention_dim,
            num_class_embeds=len(CONDITIONS) if cfg.class_embedding else None,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, level_idx: torch.Tensor, cond_idx: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.latent_channels:
            raise InputError(f"U-Net input must be (B, {self.latent_channels}, SI, AP, LR), got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).long().reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if t.numel() != b:
            raise InputError(f"timesteps must have shape ({b},), got {tuple(t.shape)}")
        level_idx = torch.as_tensor(level_idx).reshape(-1)
        cond_idx = torch.as_tensor(cond_idx).reshape(-1)
        if level_idx.numel() == 1:
            level_idx = level_idx.expand(b)
        if cond_idx.numel() == 1:
            cond_idx = cond_idx.expand(b)
        context = self.tau(level_idx, cond_idx).to(x.dtype)
        if self.w_channel:
            if w is None:
                raise InputError("this U-Net was built with w_channel=true: pass the per-voxel weight w (B,1,*spatial)")
            w = torch.as_tensor(w, dtype=x.dtype, device=x.device)
            if w.ndim == 4:
                w = w.unsqueeze(1)
            x = torch.cat([x, w.expand(b, 1, *x.shape[2:])], dim=1)
        class_labels = cond_idx.to(x.device).long() if self.cfg.class_embedding else None
        return self.unet(x, timesteps=t, context=context, class_labels=class_labels)


def build_unet(cfg: ModelConfig) -> ConditionalUNet:
    return ConditionalUNet(cfg)
