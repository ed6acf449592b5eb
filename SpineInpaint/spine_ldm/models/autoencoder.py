"""VQGAN autoencoder (generator + patch discriminator + losses) built from MONAI blocks.

Architecture: MONAI ``vqvae.Encoder`` / ``vqvae.Decoder`` with per-axis down/up-sampling (each level:
stride (2, 2, 1), kernel (4, 4, 3), padding 1 -> x4 in SI and AP, LR kept; MONAI's ``VQVAE`` class only takes
isotropic strides), and MONAI's ``VectorQuantizer(EMAQuantizer)`` codebook (EMA updates in train mode).

Latent convention (Rombach et al. VQ-LDM): the diffusion model works on the **pre-quantization** encoder
output, scaled so latents have about unit std:

- ``encode(x) -> z = encoder(x) * latent_scale``            (B, 3, SI/4, AP/4, LR)
- ``decode(z) -> x = decoder(quantize(z / latent_scale))``  (quantizes by default; ``quantize=False`` skips it)
- ``forward(x) -> (recon, quantization_loss)``              (training; EMA codebook update in train mode)

``latent_scale`` is a registered buffer initialised from the config and stored with the weights;
training calls :meth:`VQAutoencoder.fit_latent_scale` (1 / std of encoder outputs) once the autoencoder is trained.

Input spatial sizes must be divisible by the latent factors (MONAI would silently crop): we raise InputError.

Losses: :class:`VQGANLoss` = L1 + quantization (commitment) + adversarial (least squares or hinge, MONAI
``PatchAdversarialLoss``) + optional perceptual loss. The perceptual loss is OFF by default; it is only built
from a user-given local weights file (MONAI's PerceptualLoss would download weights, which is not allowed).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses.adversarial_loss import PatchAdversarialLoss
from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer
from monai.networks.nets import PatchDiscriminator
from monai.networks.nets.vqvae import Decoder, Encoder

from ..errors import InputError, ModelError
from .config import AutoencoderConfig, AutoencoderLossConfig, DiscriminatorConfig, ModelConfig


class VQAutoencoder(nn.Module):
    """VQGAN generator: 1 x SI x AP x LR  <->  latent_channels x SI/4 x AP/4 x LR (paper/small configs)."""

    def __init__(self, cfg: AutoencoderConfig | ModelConfig):
        super().__init__()
        if isinstance(cfg, ModelConfig):
            cfg = cfg.autoencoder
        self.cfg = cfg
        ks = cfg.level_kernels()
        down = [(tuple(int(v) for v in s), k, 1, cfg.padding) for s, k in zip(cfg.strides, ks)]
        up = [(tuple(int(v) for v in s), k, 1, cfg.padding, 0) for s, k in zip(reversed(cfg.strides), reversed(ks))]
        self.factors = tuple(int(torch.tensor([s[a] for s in cfg.strides]).prod()) for a in range(3))
        self.encoder = Encoder(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.latent_channels,
            channels=tuple(cfg.channels), num_res_layers=cfg.num_res_layers,
            num_res_channels=tuple(cfg.num_res_channels), downsample_parameters=down,
            dropout=cfg.dropout, act="RELU",
        )
        self.decoder = Decoder(
            spatial_dims=3, in_channels=cfg.latent_channels, out_channels=cfg.in_channels,
            channels=tuple(cfg.channels), num_res_layers=cfg.num_res_layers,
            num_res_channels=tuple(cfg.num_res_channels), upsample_parameters=up,
            dropout=cfg.dropout, act="RELU", output_act=None,
        )
        self.quantizer = VectorQuantizer(EMAQuantizer(
            spatial_dims=3, num_embeddings=cfg.num_embeddings, embedding_dim=cfg.latent_channels,
            commitment_cost=cfg.commitment_cost, decay=cfg.decay, epsilon=cfg.epsilon, ddp_sync=True,
        ))
        self.register_buffer("latent_scale", torch.tensor(float(cfg.latent_scale)))

    # -- shapes -------------------------------------------------------------------------------------
    def latent_spatial_shape(self, spatial: tuple[int, ...]) -> tuple[int, int, int]:
        return tuple(int(n) // f for n, f in zip(spatial, self.factors))  # type: ignore[return-value]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise InputError(f"autoencoder input must be (B, {self.cfg.in_channels}, SI, AP, LR), got {tuple(x.shape)}")
        bad = [(n, f) for n, f in zip(x.shape[2:], self.factors) if n % f]
        if bad:
            raise InputError(f"autoencoder input spatial shape {tuple(x.shape[2:])} is not divisible by the "
                             f"downsampling factors {self.factors}")

    # -- API ----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Scaled latent ``encoder(x) * latent_scale`` (pre-quantization unless ``quantize=True``)."""
        self._check_input(x)
        h = self.encoder(x)
        if quantize:
            h = self._quantize_eval(h)
        return h * self.latent_scale

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Image from a scaled latent; snaps to the codebook first unless ``quantize=False``."""
        h = z / self.latent_scale
        if quantize:
            h = self._quantize_eval(h)
        return self.decoder(h)

    def _quantize_eval(self, h: torch.Tensor) -> torch.Tensor:
        """Nearest codebook vectors, without EMA side effects (straight-through gradient)."""
        q = self.quantizer.quantizer
        _, _, idx = q.quantize(h)
        e = q.embed(idx).to(h.dtype)
        return h + (e - h).detach()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, quantization loss); updates the EMA codebook in train mode."""
        self._check_input(x)
        q_loss, q = self.quantizer(self.encoder(x))
        return self.decoder(q), q_loss

    @torch.no_grad()
    def codebook_usage(self, x_or_h: torch.Tensor, is_latent: bool = False) -> dict:
        """Codebook statistics for logging: fraction of codes used, perplexity, number of used codes.

        ``x_or_h`` is an image batch (default) or an unscaled encoder output (``is_latent=True``).
        """
        h = x_or_h if is_latent else self.encoder(x_or_h)
        _, _, idx = self.quantizer.quantizer.quantize(h)
        n = self.cfg.num_embeddings
        counts = torch.bincount(idx.flatten(), minlength=n).float()
        p = counts / counts.sum()
        used = int((counts > 0).sum())
        perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        return {"used": used, "num_embeddings": n, "fraction": used / n, "perplexity": perplexity}

    @torch.no_grad()
    def init_codebook(self, x_or_h: torch.Tensor, is_latent: bool = False,
                      generator: torch.Generator | None = None) -> None:
        """Data-dependent codebook init: codes := random encoder output vectors (+ small jitter).

        Also sets the EMA state consistently (``ema_w`` = codes, ``ema_cluster_size`` = 1). With MONAI's default state
        (cluster size 0) every code unused in the first EMA update is divided by ~epsilon and becomes unreachable, which
        is the usual cause of codebook collapse; call this once before autoencoder training (and optionally to
        restart dead codes). ``x_or_h``: image batch (default) or unscaled encoder outputs (``is_latent=True``).
        Under DDP call it on the unwrapped module with identical data on every rank (or on rank 0, then broadcast
        the quantizer state): the codebook is not a trained parameter, so DDP does not re-sync it.
        """
        q = self.quantizer.quantizer
        h = x_or_h if is_latent else self.encoder(x_or_h)
        flat = h.permute(0, *range(2, h.ndim), 1).reshape(-1, h.shape[1]).float()
        n = q.num_embeddings
        idx = torch.randint(0, flat.shape[0], (n,), generator=generator, device=generator.device if generator else None)
        codes = flat[idx.to(flat.device)]
        jitter = torch.randn(codes.shape, generator=generator, device=generator.device if generator else None)
        codes = codes + 1e-3 * (flat.std() + 1e-8) * jitter.to(codes.device)
        q.embedding.weight.data.copy_(codes)
        q.ema_w.data.copy_(codes)
        q.ema_cluster_size.data.fill_(1.0)

    @torch.no_grad()
    def fit_latent_scale(self, x: torch.Tensor | list[torch.Tensor]) -> float:
        """Set ``latent_scale = 1 / std(encoder(x))`` over the given image batch(es); returns the new value."""
        xs = x if isinstance(x, (list, tuple)) else [x]
        hs = torch.cat([self.encoder(b).flatten() for b in xs])
        std = float(hs.float().std())
        if not std > 0:
            raise ModelError(f"cannot fit latent_scale: encoder output std is {std}")
        self.latent_scale.fill_(1.0 / std)
        return 1.0 / std


def build_autoencoder(cfg: ModelConfig | AutoencoderConfig) -> VQAutoencoder:
    return VQAutoencoder(cfg)


def build_discriminator(cfg: ModelConfig | DiscriminatorConfig, in_channels: int = 1) -> PatchDiscriminator:
    """MONAI PatchDiscriminator (forward returns a list of features; the last entry is the logits)."""
    if isinstance(cfg, ModelConfig):
        in_channels = cfg.autoencoder.in_channels
        cfg = cfg.discriminator
    return PatchDiscriminator(
        spatial_dims=3, channels=cfg.channels, in_channels=in_channels, out_channels=1,
        num_layers_d=cfg.num_layers_d, kernel_size=cfg.kernel_size, norm=cfg.norm,
    )


def _load_perceptual(path: str | None):
    """A user-given TorchScript / full-module file producing features from (B,1,SI,AP,LR). No downloads."""
    if not path:
        raise ModelError("perceptual_weight > 0 needs autoencoder_loss.perceptual_weights_path (a local file); "
                         "downloads are disabled")
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"perceptual network file {path!r} not found")
    try:
        net = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"perceptual network {path!r} is not a TorchScript file: {e}") from None
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    return net


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of the VQGAN.

    ``generator_loss(x, recon, q_loss, disc)`` -> (total, parts dict); parts: l1, quantization, adversarial,
    perceptual. ``discriminator_loss(x, recon, disc)`` -> scalar (real vs detached fake).
    The adversarial term uses the last discriminator output (logits).
    """

    def __init__(self, cfg: ModelConfig | AutoencoderLossConfig):
        super().__init__()
        if isinstance(cfg, ModelConfig):
            cfg = cfg.autoencoder_loss
        if cfg.adversarial_criterion not in ("least_squares", "hinge"):
            raise ModelError(f"adversarial_criterion {cfg.adversarial_criterion!r} unknown; use least_squares or hinge")
        self.cfg = cfg
        self.adv = PatchAdversarialLoss(criterion=cfg.adversarial_criterion, reduction="mean")
        self.perceptual = _load_perceptual(cfg.perceptual_weights_path) if cfg.perceptual_weight > 0 else None

    def generator_loss(self, x, recon, q_loss, disc: nn.Module | None = None):
        c = self.cfg
        l1 = F.l1_loss(recon.float(), x.float())
        parts = {"l1": l1, "quantization": q_loss.float()}
        total = c.l1_weight * l1 + c.quantization_weight * q_loss.float()
        if disc is not None and c.adversarial_weight > 0:
            logits = disc(recon.contiguous().float())[-1]
            adv = self.adv(logits, target_is_real=True, for_discriminator=False)
            parts["adversarial"] = adv
            total = total + c.adversarial_weight * adv
        if self.perceptual is not None:
            perc = F.mse_loss(self.perceptual(recon.float()), self.perceptual(x.float()))
            parts["perceptual"] = perc
            total = total + c.perceptual_weight * perc
        return total, parts

    def discriminator_loss(self, x, recon, disc: nn.Module) -> torch.Tensor:
        fake = disc(recon.detach().contiguous().float())[-1]
        real = disc(x.contiguous().float())[-1]
        return 0.5 * (self.adv(fake, target_is_real=False, for_discriminator=True)
                      + self.adv(real, target_is_real=True, for_discriminator=True))
