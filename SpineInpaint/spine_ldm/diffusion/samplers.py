"""Inpainting samplers on latents: weighted (Hansen et al.), masked, latent RePaint, and full generation.

All samplers take a noise predictor ``model_fn(x, t_global, t_voxel) -> eps`` (``t_global``: (B,) long global
timestep, ``t_voxel``: (B, 1, *spatial) long per-voxel timestep), so they run with a U-Net
(:func:`unet_model_fn`) or an oracle in tests. They return ``(x0, info)`` with ``info["nfe"]`` (network
evaluations), ``info["timesteps"]`` and ``info["sampler"]``; they call ``progress(done, total)`` after every network
evaluation (``total`` = the expected nfe, e.g. 51 for PLMS with 50 steps: this is the CLI's ``{"step", "of"}``) and
raise :class:`spine_ldm.errors.CancelledError` when ``cancel()`` returns True (checked before every step).
``generator`` (a ``torch.Generator``, an int seed, or a list of those with one per batch element) drives all noise:
same seed -> identical output; with a list, batch element k draws only from generator k, so a sample is the same
whether it runs alone or in a batch (up to the network's batch numerics). Noise is drawn on the generator's device
and moved to the latent's device.

Timesteps follow DEVELOPERS.md: t = 0 is clean; the grid for ``steps`` is ``NoiseSchedule.timesteps(steps)``
([981, 961, ..., 21, 1, 0] for 50, the LDM / MONAI grid; ``spacing="trailing"`` selects [1000, 980, ..., 0], see
schedule.py).

- ``sample_weighted(model_fn, z0, W, ...)``: start from the weighted-noised healthy latent
  (t_v = round(W_v t_0)); at each step every voxel moves from its own t_v = round(W_v t) to round(W_v t_prev)
  (PLMS or DDIM math per voxel, :mod:`.steps`), except that a voxel that started noised keeps t_v >= 1 while
  t >= 1, so it ends with the grid's own last interval (1 -> 0 on the leading grid) rather than one coarse jump
  round(W_v t_k) -> 0. Voxels with t_v == t_prev_v keep their value exactly (``torch.where``), so voxels whose
  W_v t_0 rounds to 0 equal z0 bit for bit. The U-Net sees the global t. PLMS keeps its Adams-Bashforth history
  per voxel (only the steps in which the voxel moves; see :func:`_denoise`). ``eta`` only for DDIM.
- ``sample_masked(model_fn, z0, roi, ...)``: the weighted sampler with the binary weight W := roi (the masked
  LDM baseline): voxels inside the roi run the full schedule, voxels outside stay z0 exactly.
- ``sample_repaint(model_fn, z0, roi, steps=50, jump_length=10, jump_n_sample=10, sampler="ddpm")``: latent
  RePaint (Lugmayr et al. 2022). Inside the roi x_T is pure noise; at each denoising step t -> t_prev the roi
  takes the model's step (DDPM ancestral, or DDIM eta=0) and the outside takes z0 noised to t_prev with fresh noise
  (at t_prev = 0 that is z0 exactly). Resampling: the step-index schedule of the RePaint paper / diffusers
  ``RePaintScheduler``: at step indices 0, jump_length, 2 jump_length, ... (< steps - jump_length) the chain jumps
  back ``jump_length`` steps by re-noising (q(x_t'|x_t), no network call), ``jump_n_sample - 1`` times.
  nfe = steps + (jump_n_sample - 1) * jump_length * len(range(0, steps - jump_length, jump_length)):
  410 for the defaults (50, 10, 10); ``jump_n_sample=1`` gives plain RePaint with nfe = steps.
- ``sample_full(model_fn, shape, ...)``: generation from pure noise (the whole latent at the global t).

PLMS with steps=1 degenerates to one DDIM step (no warm-up evaluation at t=0).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..conditions import GUIDANCE_RANGE
from ..errors import CancelledError, InputError
from .schedule import NoiseSchedule
from .steps import ddim_step, ddpm_step, plms_eps, renoise

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_model_fn(unet, level_idx, cond_idx, w: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  null_cond_idx: int = 0) -> ModelFn:
    """Adapt a :class:`ConditionalUNet` to the sampler callable; ``w`` is passed only to W-channel U-Nets.

    ``guidance_scale`` s != 1: classifier-free guidance (Ho & Salimans 2022) against the null condition
    ``null_cond_idx`` (0 = healthy): ``eps = eps_null + s (eps_cond - eps_null)``, both from one U-Net call on the
    doubled batch (2 network evaluations per call). s = 1 is the plain conditional prediction (one evaluation)."""
    use_w = bool(getattr(unet, "w_channel", False))
    if use_w and w is None:
        raise InputError("this U-Net has a W input channel: pass w (the per-voxel weight on the latent grid)")
    scale = float(guidance_scale)
    lo, hi = GUIDANCE_RANGE
    if not (scale == scale and lo <= scale <= hi):
        raise InputError(f"guidance scale must be between {lo:g} and {hi:g}, got {guidance_scale!r}")

    def fn(x, t_global, t_voxel):
        if scale == 1.0:
            return unet(x, t_global, level_idx, cond_idx, w=w if use_w else None)
        b = x.shape[0]

        def per_sample(v):
            v = torch.as_tensor(v, device=x.device).long().reshape(-1)
            return v.expand(b) if v.numel() == 1 else v

        t, lvl, cnd = per_sample(t_global), per_sample(level_idx), per_sample(cond_idx)
        ww = None
        if use_w:
            ww = torch.as_tensor(w, device=x.device)
            ww = ww.expand(b, *ww.shape[1:]) if ww.shape[0] == 1 else ww
            ww = torch.cat([ww, ww])
        e = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([lvl, lvl]),
                 torch.cat([cnd, torch.full_like(cnd, int(null_cond_idx))]), w=ww).float()
        e_cond, e_null = e[:b], e[b:]
        return e_null + scale * (e_cond - e_null)

    return fn


# ---------------------------------------------------------------------------------------------------------
def _generator(generator):
    """None | torch.Generator | int seed | list of those (one per batch element)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool):
        raise InputError("generator must be a torch.Generator, an int seed, a list of those, or None")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if isinstance(generator, (list, tuple)) and generator and all(
            isinstance(g, torch.Generator) or (isinstance(g, int) and not isinstance(g, bool)) for g in generator):
        return [g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(g) for g in generator]
    raise InputError(f"generator must be a torch.Generator, an int seed, a list of those, or None; "
                     f"got {type(generator).__name__}")


def _randn(shape, like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise; a list of generators draws batch element k from generator k (so a sample's
    noise does not depend on which batch it runs in)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise InputError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_randn((1, *shape[1:]), like, g) for g in generator], 0)
    dev = generator.device if generator is not None else like.device
    n = torch.randn(tuple(shape), generator=generator, device=dev, dtype=torch.float32)
    return n.to(device=like.device, dtype=like.dtype)


def _check_latent(z0: torch.Tensor) -> None:
    if not isinstance(z0, torch.Tensor) or z0.ndim < 3:
        raise InputError(f"latent must be a tensor (B, C, *spatial), got {getattr(z0, 'shape', type(z0))}")


def _as_weight(W, z0: torch.Tensor, name: str = "W") -> torch.Tensor:
    """(B, 1, *spatial) float tensor on z0's device from (*spatial), (1|B, 1, *spatial) or bool masks."""
    W = torch.as_tensor(W, device=z0.device)
    sp = tuple(z0.shape[2:])
    if tuple(W.shape) == sp:
        W = W.reshape(1, 1, *sp)
    if W.ndim != z0.ndim or W.shape[1] != 1 or tuple(W.shape[2:]) != sp or W.shape[0] not in (1, z0.shape[0]):
        raise InputError(f"{name} must have shape {sp} or (B|1, 1, *{sp}) to match the latent {tuple(z0.shape)}, "
                         f"got {tuple(W.shape)}")
    W = W.to(torch.float32) if W.dtype == torch.bool else W.float()
    return W.expand(z0.shape[0], 1, *sp)


def _check_common(sampler: str, allowed: tuple[str, ...], steps: int, schedule: NoiseSchedule) -> None:
    if sampler not in allowed:
        raise InputError(f"sampler {sampler!r} unknown; use one of {', '.join(allowed)}")
    if not isinstance(steps, int) or steps < 1 or steps > schedule.T:
        raise InputError(f"steps must be an integer in 1..{schedule.T}, got {steps!r}")


def expected_nfe(sampler: str, steps: int, jump_length: int = 10, jump_n_sample: int = 10,
                 repaint: bool = False) -> int:
    """Number of network evaluations a sampler call will make."""
    if repaint:
        return sum(1 for a, b in zip(_repaint_schedule(steps, jump_length, jump_n_sample)[:-1],
                                     _repaint_schedule(steps, jump_length, jump_n_sample)[1:]) if b < a)
    return steps + 1 if (sampler == "plms" and steps >= 2) else steps


class _Tracker:
    def __init__(self, total: int, progress, cancel, steps: int):
        self.nfe, self.total, self.progress, self.cancel, self.steps = 0, total, progress, cancel, steps

    def check(self, step: int) -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError(f"sampling cancelled at step {step} of {self.steps}")

    def call(self, model_fn, x, tg, tv) -> torch.Tensor:
        eps = model_fn(x, tg, tv)
        if eps.shape != x.shape:
            raise InputError(f"noise predictor returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
        self.nfe += 1
        if self.progress is not None:
            self.progress(self.nfe, self.total)
        return eps


def _denoise(model_fn: ModelFn, x: torch.Tensor, tv_of, schedule: NoiseSchedule, steps: int, sampler: str,
             eta: float, generator, progress, cancel, spacing: str = "leading") -> tuple[torch.Tensor, dict]:
    """PLMS / DDIM loop with per-voxel timesteps tv_of(t) -> (B, 1, *spatial) long.

    PLMS keeps its Adams-Bashforth history **per voxel**: a voxel whose timestep does not change in a step
    (t_v == t_v_prev, e.g. small W near the end) neither moves nor records that step's eps, so its multistep
    formula only ever combines the eps of its own moves (order 2, 3, 4 after 1, 2, 3 moves; the first move is the
    Heun-like warm-up when it happens in the first step, else a DDIM step). Where every voxel moves in every step
    (W = 1, full generation) this is exactly the reference PLMS."""
    ts = schedule.timesteps(steps, spacing)
    B = x.shape[0]
    tr = _Tracker(expected_nfe(sampler, steps), progress, cancel, steps)
    hist: list[torch.Tensor] = []           # newest first: eps of each voxel's last 1..3 moves
    count = None                             # per voxel: number of moves recorded (0..3)
    for i in range(steps):
        tr.check(i)
        t, tp = ts[i], ts[i + 1]
        tv, tvp = tv_of(t), tv_of(tp)
        a_t = schedule.abar(tv, dtype=x.dtype)
        a_p = schedule.abar(tvp, dtype=x.dtype)
        stay = tv == tvp
        tg = torch.full((B,), t, dtype=torch.long, device=x.device)
        e = tr.call(model_fn, x, tg, tv)
        if sampler == "ddim":
            noise = _randn(x.shape, x, generator) if eta > 0 else None
            x_new = ddim_step(x, e, a_t, a_p, eta=eta, noise=noise)
        else:  # plms
            if count is None:
                count = torch.zeros_like(tv)
                hist = [torch.zeros_like(e) for _ in range(3)]
                first = e
                if steps >= 2:
                    x_tent = torch.where(stay, x, ddim_step(x, e, a_t, a_p))
                    tgp = torch.full((B,), tp, dtype=torch.long, device=x.device)
                    first = plms_eps(e, [], tr.call(model_fn, x_tent, tgp, tvp))
            else:
                first = e
            e_use = torch.where(count == 0, first,
                                torch.where(count == 1, plms_eps(e, hist[:1][::-1]),
                                            torch.where(count == 2, plms_eps(e, hist[:2][::-1]),
                                                        plms_eps(e, hist[::-1]))))
            move = ~stay
            hist = [torch.where(move, e, hist[0]), torch.where(move, hist[0], hist[1]),
                    torch.where(move, hist[1], hist[2])]
            count = torch.where(move, (count + 1).clamp_max(3), count)
            x_new = ddim_step(x, e_use, a_t, a_p)
        x = torch.where(stay, x, x_new)
    return x, {"nfe": tr.nfe, "timesteps": ts, "sampler": sampler, "steps": steps, "spacing": spacing}


def sample_weighted(model_fn: ModelFn, z0: torch.Tensor, W, steps: int = 50, sampler: str = "plms",
                    generator=None, schedule: NoiseSchedule | None = None, eta: float = 0.0,
                    progress=None, cancel=None, spacing: str = "leading") -> tuple[torch.Tensor, dict]:
    """Weighted-noise inpainting (Hansen et al.); see the module docstring."""
    _check_latent(z0)
    schedule = schedule or NoiseSchedule()
    _check_common(sampler, ("plms", "ddim"), steps, schedule)
    if eta and sampler != "ddim":
        raise InputError(f"eta={eta} only applies to the ddim sampler")
    g = _generator(generator)
    Wb = _as_weight(W, z0)
    schedule.weighted_timesteps(Wb, 0)  # validates W range

    active = schedule.weighted_timesteps(Wb, schedule.timesteps(steps, spacing)[0]) > 0

    def tv_of(t: int) -> torch.Tensor:
        tv = schedule.weighted_timesteps(Wb, t)
        # every voxel that starts noised reaches t_v >= 1 while t >= 1, so it ends with the grid's own last
        # interval (1 -> 0 on the leading grid) instead of one coarse jump round(W t_k) -> 0
        return torch.where(active & (t > 0), tv.clamp_min(1), tv) if t > 0 else tv

    x = schedule.add_noise(z0, _randn(z0.shape, z0, g), tv_of(schedule.timesteps(steps, spacing)[0]))
    x, info = _denoise(model_fn, x, tv_of, schedule, steps, sampler, eta, g, progress, cancel, spacing)
    info["method"] = "weighted"
    return x, info


def sample_masked(model_fn: ModelFn, z0: torch.Tensor, roi, steps: int = 50, sampler: str = "plms",
                  generator=None, schedule: NoiseSchedule | None = None, eta: float = 0.0,
                  progress=None, cancel=None, spacing: str = "leading") -> tuple[torch.Tensor, dict]:
    """Masked-LDM inpainting = :func:`sample_weighted` with the binary weight W := roi (bool or 0/1)."""
    roi_t = torch.as_tensor(roi)
    if roi_t.dtype != torch.bool:
        if roi_t.numel() and not bool(((roi_t == 0) | (roi_t == 1)).all()):
            raise InputError("roi must be a boolean / 0-1 mask (threshold the weight first, e.g. W > 0.1)")
        roi_t = roi_t != 0
    x, info = sample_weighted(model_fn, z0, roi_t, steps=steps, sampler=sampler, generator=generator,
                              schedule=schedule, eta=eta, progress=progress, cancel=cancel, spacing=spacing)
    info["method"] = "masked"
    return x, info


def sample_full(model_fn: ModelFn, shape, steps: int = 50, sampler: str = "plms", generator=None,
                schedule: NoiseSchedule | None = None, eta: float = 0.0, device=None, dtype=torch.float32,
                x_T: torch.Tensor | None = None, progress=None, cancel=None,
                spacing: str = "leading") -> tuple[torch.Tensor, dict]:
    """Generate a latent of ``shape`` (B, C, *spatial) from pure noise (or the given ``x_T``)."""
    schedule = schedule or NoiseSchedule()
    _check_common(sampler, ("plms", "ddim"), steps, schedule)
    g = _generator(generator)
    like = torch.empty(0, device=device, dtype=dtype)
    x = _randn(shape, like, g) if x_T is None else x_T.to(device=like.device, dtype=dtype)
    B, sp = x.shape[0], tuple(x.shape[2:])

    def tv_of(t: int) -> torch.Tensor:
        return torch.full((B, 1, *sp), t, dtype=torch.long, device=x.device)

    x, info = _denoise(model_fn, x, tv_of, schedule, steps, sampler, eta, g, progress, cancel, spacing)
    info["method"] = "full"
    return x, info


def _repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Sequence of 'remaining step' indices n (t = timesteps[steps - n]), from steps down to 0 with jumps back."""
    if jump_length < 1 or jump_n_sample < 1:
        raise InputError(f"jump_length and jump_n_sample must be >= 1, got {jump_length}, {jump_n_sample}")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    n, seq = steps, [steps]
    while n >= 1:
        n -= 1
        seq.append(n)
        if jumps.get(n, 0) > 0:
            jumps[n] -= 1
            for _ in range(jump_length):
                n += 1
                seq.append(n)
    return seq


def sample_repaint(model_fn: ModelFn, z0: torch.Tensor, roi, steps: int = 50, jump_length: int = 10,
                   jump_n_sample: int = 10, sampler: str = "ddpm", generator=None,
                   schedule: NoiseSchedule | None = None, progress=None, cancel=None,
                   spacing: str = "leading") -> tuple[torch.Tensor, dict]:
    """Latent RePaint (Lugmayr et al.); see the module docstring for the schedule and nfe."""
    _check_latent(z0)
    schedule = schedule or NoiseSchedule()
    _check_common(sampler, ("ddpm", "ddim"), steps, schedule)
    g = _generator(generator)
    roi_b = _as_weight(roi, z0, "roi") > 0.5
    ts = schedule.timesteps(steps, spacing)
    seq = _repaint_schedule(steps, jump_length, jump_n_sample)
    total = sum(1 for a, b in zip(seq[:-1], seq[1:]) if b < a)
    tr = _Tracker(total, progress, cancel, len(seq) - 1)
    B, sp = z0.shape[0], tuple(z0.shape[2:])

    def t_of(n: int) -> int:
        return ts[steps - n]

    def tv(t: int) -> torch.Tensor:
        return torch.full((B, 1, *sp), t, dtype=torch.long, device=z0.device)

    T0 = t_of(seq[0])
    x = torch.where(roi_b, _randn(z0.shape, z0, g), schedule.add_noise(z0, _randn(z0.shape, z0, g), T0))
    for k, (n, n_next) in enumerate(zip(seq[:-1], seq[1:])):
        tr.check(k)
        t, t_next = t_of(n), t_of(n_next)
        a_t = schedule.abar(t, dtype=z0.dtype, device=z0.device)
        a_n = schedule.abar(t_next, dtype=z0.dtype, device=z0.device)
        if n_next < n:  # denoise t -> t_next
            e = tr.call(model_fn, x, torch.full((B,), t, dtype=torch.long, device=z0.device), tv(t))
            if sampler == "ddpm":
                unknown = ddpm_step(x, e, a_t, a_n, _randn(z0.shape, z0, g))
            else:
                unknown = ddim_step(x, e, a_t, a_n)
            known = schedule.add_noise(z0, _randn(z0.shape, z0, g), t_next)
            x = torch.where(roi_b, unknown, known)
        else:  # resampling jump: re-noise t -> t_next (> t)
            x = renoise(x, a_t, a_n, _randn(z0.shape, z0, g))
    return x, {"nfe": tr.nfe, "timesteps": ts, "sampler": sampler, "steps": steps, "method": "repaint",
               "spacing": spacing, "jump_length": jump_length, "jump_n_sample": jump_n_sample}
