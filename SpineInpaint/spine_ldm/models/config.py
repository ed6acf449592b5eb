"""Versioned model configurations (YAML -> frozen dataclasses).

One YAML file describes one model family: FSU geometry, VQGAN autoencoder, patch discriminator,
conditional U-Net, noise schedule and default sampling. Code never hard-codes sizes: everything
comes from here. Bundled configs live in ``models/configs/{small,paper}.yaml``:

- ``small``: FSU 1x64x32x16 -> latent 3x16x16x16 (x4 SI, x2 AP: 5 mm latent voxels in the sagittal plane).
  Fast on CPU; used by tests and the bundled demo weights. **Its architecture is frozen** (demo weights depend
  on it): add a new config instead.
- ``paper``: FSU 1x128x64x32 -> latent 3x32x16x32 (Hansen et al.), channel widths chosen so one U-Net
  step at batch 2 costs a few tenths of a second on CPU (attention only at the lowest level).

Shapes are in numpy/torch order ``(SI, AP, LR)`` (see DEVELOPERS.md, FSU frame). The autoencoder
downsamples by ``latent_factors`` = the product of its per-level strides ((4, 4, 1) for ``paper``: stride
(2, 2, 1), kernel (4, 4, 3), padding 1 per level; (4, 2, 1) for ``small``); kernels may be given per level and
must equal 2 * padding + stride on every axis (MONAI's VQVAE only takes isotropic strides, so we build it from
its blocks).

``load_config("small" | "paper" | path, **overrides)``; overrides are dotted keys, e.g.
``load_config("small", **{"unet.w_channel": True})``. ``config_to_dict`` / ``config_from_dict`` round-trip
a config through a checkpoint. Every YAML carries ``version: 1``; unknown versions or keys raise ModelError.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ModelError

CONFIG_VERSION = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 1
    latent_channels: int = 3
    channels: tuple[int, ...] = (32, 64)            # one entry per encoder level
    num_res_layers: int = 1
    num_res_channels: tuple[int, ...] = (32, 64)
    strides: tuple[tuple[int, int, int], ...] = ((2, 2, 1), (2, 2, 1))   # per level, (SI, AP, LR)
    # down/up-sampling convs: one (SI, AP, LR) triple for every level, or one triple per level. Each level
    # and axis needs kernel == 2 * padding + stride (exact /stride and xstride sizes).
    kernel_size: tuple = (4, 4, 3)
    padding: int = 1
    num_embeddings: int = 256                       # codebook size
    commitment_cost: float = 0.25
    decay: float = 0.99                             # EMA codebook decay
    epsilon: float = 1e-5
    dropout: float = 0.0
    # Latents handed to the diffusion model are ``encoder(x) * latent_scale`` (unit-std target).
    # The value here initialises a buffer of the module; training overwrites it (it is stored in the state
    # dict, so trained weights carry their own scale).
    latent_scale: float = 1.0

    def level_kernels(self) -> tuple[tuple[int, int, int], ...]:
        """The (SI, AP, LR) kernel of every level (``kernel_size`` expanded when it is a single triple)."""
        k = self.kernel_size
        if len(k) and all(isinstance(v, (int, float)) for v in k):
            return tuple(tuple(int(v) for v in k) for _ in self.strides)  # type: ignore[misc]
        return tuple(tuple(int(v) for v in kl) for kl in k)  # type: ignore[union-attr]


@dataclass(frozen=True)
class DiscriminatorConfig:
    channels: int = 32
    num_layers_d: int = 3
    norm: str = "BATCH"
    kernel_size: int = 4


@dataclass(frozen=True)
class AutoencoderLossConfig:
    l1_weight: float = 1.0
    quantization_weight: float = 1.0
    adversarial_weight: float = 0.01
    adversarial_criterion: str = "least_squares"    # or "hinge"
    perceptual_weight: float = 0.0                  # off by default (MONAI would download weights)
    perceptual_weights_path: str | None = None      # user-given local file only


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)   # attention at the lowest level only
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    num_head_channels: int = 32
    transformer_num_layers: int = 1
    cross_attention_dim: int = 64
    context_tokens: int = 2          # tau: one-hot(level) ++ one-hot(condition) -> MLP -> tokens
    context_hidden: int = 128
    w_channel: bool = False          # True: input = concat(x, W) so the net sees the per-voxel noise level
    class_embedding: bool = False    # True: condition embedding added to the timestep embedding (every res block)


@dataclass(frozen=True)
class ScheduleConfig:
    T: int = 1000
    beta_schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    sampler: str = "plms"
    spacing: str = "leading"   # timestep grid (NoiseSchedule.timesteps): leading = LDM/MONAI PNDM grid 981..1, 0
    # Snap the sampled latent to the VQ codebook before decoding (Rombach et al.'s VQ-LDM, MONAI's
    # decode_stage_2_outputs). Off by default: the LDMs learn the pre-quantization latent, and snapping drops every
    # change smaller than a code step (phantom benchmark, 20 held-out DH-small cases: the truth's own reconstruction
    # judged present 65 % snapped, 85 % as is; the weighted model's cos 0.39 -> 0.42; docs/results/).
    decode_quantize: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small"
    version: int = CONFIG_VERSION
    fsu_shape: tuple[int, int, int] = (64, 32, 16)          # (SI, AP, LR) voxels
    fsu_size_mm: tuple[float, float, float] = (80.0, 80.0, 50.0)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def latent_factors(self) -> tuple[int, int, int]:
        f = [1, 1, 1]
        for s in self.autoencoder.strides:
            for a in range(3):
                f[a] *= int(s[a])
        return tuple(f)  # type: ignore[return-value]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, SI, AP, LR) of the latent for one FSU."""
        f = self.latent_factors
        return (self.autoencoder.latent_channels,) + tuple(n // k for n, k in zip(self.fsu_shape, f))  # type: ignore

    @property
    def fsu_spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) / n for s, n in zip(self.fsu_size_mm, self.fsu_shape))  # type: ignore


_SECTIONS = {
    "autoencoder": AutoencoderConfig,
    "discriminator": DiscriminatorConfig,
    "autoencoder_loss": AutoencoderLossConfig,
    "unet": UNetConfig,
    "schedule": ScheduleConfig,
    "sampling": SamplingConfig,
}


def _tuplify(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


def _listify(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    return v


def _build_section(cls, data: dict, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelError(f"config section {where!r} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelError(f"unknown key(s) {unknown} in config section {where!r}; known: {sorted(names)}")
    return cls(**{k: _tuplify(v) for k, v in data.items()})


def config_from_dict(data: dict) -> ModelConfig:
    """Build and validate a ModelConfig from a plain dict (YAML content or checkpoint metadata)."""
    if not isinstance(data, dict):
        raise ModelError(f"model config must be a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    version = data.get("version")
    if version != CONFIG_VERSION:
        raise ModelError(f"model config version {version!r} is not supported (expected {CONFIG_VERSION})")
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ModelError(f"unknown top-level key(s) {unknown} in model config; known: {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        kwargs[k] = _build_section(_SECTIONS[k], v, k) if k in _SECTIONS else _tuplify(v)
    cfg = ModelConfig(**kwargs)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict:
    """Plain (YAML/JSON-serialisable) dict; ``config_from_dict(config_to_dict(c)) == c``."""
    return _listify_dict(dataclasses.asdict(cfg))


def _listify_dict(d: dict) -> dict:
    return {k: (_listify_dict(v) if isinstance(v, dict) else _listify(v)) for k, v in d.items()}


def validate_config(cfg: ModelConfig) -> None:
    ae, un = cfg.autoencoder, cfg.unet
    if len(cfg.fsu_shape) != 3 or len(cfg.fsu_size_mm) != 3:
        raise ModelError(f"fsu_shape and fsu_size_mm need 3 entries (SI, AP, LR), got {cfg.fsu_shape}, "
                         f"{cfg.fsu_size_mm}")
    if len(ae.channels) != len(ae.strides) or len(ae.channels) != len(ae.num_res_channels):
        raise ModelError(f"autoencoder channels {ae.channels}, num_res_channels {ae.num_res_channels} and strides "
                         f"{ae.strides} need the same length")
    try:
        kernels = ae.level_kernels()
    except TypeError:
        raise ModelError(f"autoencoder kernel_size {ae.kernel_size} must be one (SI, AP, LR) triple or one per "
                         f"level") from None
    if len(kernels) != len(ae.strides) or any(len(k) != 3 for k in kernels):
        raise ModelError(f"autoencoder kernel_size {ae.kernel_size} must be one (SI, AP, LR) triple or one per "
                         f"level ({len(ae.strides)} levels)")
    for lvl, (k, s) in enumerate(zip(kernels, ae.strides)):
        bad = [a for a in range(3) if int(k[a]) != 2 * int(ae.padding) + int(s[a])]
        if bad:
            raise ModelError(f"autoencoder level {lvl}: kernel {tuple(k)} with stride {tuple(s)} and padding "
                             f"{ae.padding} does not give exact sizes (need kernel = 2*padding + stride per axis)")
    for n, f in zip(cfg.fsu_shape, cfg.latent_factors):
        if n % f:
            raise ModelError(f"fsu_shape {cfg.fsu_shape} is not divisible by the autoencoder factors "
                             f"{cfg.latent_factors}")
    if len(un.channels) != len(un.attention_levels):
        raise ModelError(f"unet channels {un.channels} and attention_levels {un.attention_levels} differ in length")
    bad = [c for c in un.channels if c % un.norm_num_groups]
    if bad:
        raise ModelError(f"unet norm_num_groups={un.norm_num_groups} does not divide channels {bad}")
    down = 2 ** (len(un.channels) - 1)
    lat = cfg.latent_shape[1:]
    if any(n % down for n in lat):
        raise ModelError(f"latent spatial shape {lat} is not divisible by 2**(levels-1)={down} of the U-Net")
    if cfg.schedule.beta_schedule not in ("linear_beta", "scaled_linear_beta"):
        raise ModelError(f"beta_schedule {cfg.schedule.beta_schedule!r} unknown; use linear_beta or scaled_linear_beta")
    if cfg.sampling.sampler not in ("plms", "ddim"):
        raise ModelError(f"sampler {cfg.sampling.sampler!r} unknown; use plms or ddim")
    if cfg.sampling.spacing not in ("leading", "trailing"):
        raise ModelError(f"sampling spacing {cfg.sampling.spacing!r} unknown; use leading or trailing")


def _apply_overrides(data: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _listify(value)
    return data


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path | ModelConfig = "small", **overrides: Any) -> ModelConfig:
    """Load a bundled config by name ("small", "paper") or a YAML file path; apply dotted-key overrides."""
    if isinstance(name_or_path, ModelConfig):
        if not overrides:
            return name_or_path
        return config_from_dict(_apply_overrides(config_to_dict(name_or_path), overrides))
    s = str(name_or_path)
    path = CONFIG_DIR / f"{s}.yaml" if (CONFIG_DIR / f"{s}.yaml").is_file() else Path(s)
    if not path.is_file():
        raise ModelError(f"model config {s!r} not found; bundled: {', '.join(available_configs())}, "
                         "or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ModelError(f"model config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(_apply_overrides(data or {}, overrides))
