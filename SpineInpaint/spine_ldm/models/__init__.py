"""Models: VQGAN autoencoder, conditional U-Net, versioned configs.

``load_config("small" | "paper" | path)``, ``build_models(cfg) -> (autoencoder, unet)``, ``count_params(module)``.
"""
from __future__ import annotations

import torch.nn as nn

from .autoencoder import VQAutoencoder, VQGANLoss, build_autoencoder, build_discriminator
from .config import ModelConfig, available_configs, config_from_dict, config_to_dict, load_config
from .unet import ConditionalUNet, ConditionEncoder, build_unet


def build_models(cfg: ModelConfig | str = "small") -> tuple[VQAutoencoder, ConditionalUNet]:
    """(autoencoder, unet) from a config object, a bundled config name or a YAML path."""
    cfg = load_config(cfg)
    return build_autoencoder(cfg), build_unet(cfg)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ModelConfig", "load_config", "available_configs", "config_from_dict", "config_to_dict",
    "VQAutoencoder", "VQGANLoss", "build_autoencoder", "build_discriminator",
    "ConditionalUNet", "ConditionEncoder", "build_unet", "build_models", "count_params",
]
