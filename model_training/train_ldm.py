"""Latent diffusion U-Net training: ``weighted`` (Hansen et al.), ``masked`` (ROI-only baseline) or ``full``
(whole-FSU LDM used by the RePaint sampler).

``python -m model_training train-ldm --method weighted --autoencoder AE_RUN_OR_PT --config ldm_small
--manifest M --out RUN_DIR [--resume]`` (``torchrun --nproc_per_node=N -m model_training train-ldm ...`` for DDP).

- The autoencoder is frozen; latents are ``autoencoder.encode(x)`` (pre-quantization, times ``latent_scale``),
  cached once per FSU (``cache_latents: true``; no augmentation then) or encoded on the fly.
- ``weighted`` / ``masked`` train ONLY on FSUs with a pathology condition and a landmark (``--conditions`` picks
  a subset); ``full`` on every FSU of the split (``pathology_repeat: k`` lists its pathological FSUs k times, so
  the rare conditions are not drowned by healthy FSUs). The U-Net is conditioned on (level, condition).
- W on the latent grid is the Gaussian (``sigma_mm``) around the landmark, computed in mm from the latent voxel
  centres (same geometry as ``spine_ldm.geometry.latent_frame``).
- The loss is ``spine_ldm.diffusion.diffusion_loss(method=...)``: the same noising code as the samplers use.
- ``condition_repeat: {dh_small: 2}`` lists one condition's FSUs k times (class balance within a family);
  ``healthy_fraction: f`` (weighted / masked) adds healthy FSUs (condition none, at their posterior-margin
  landmark) as about f of the set: the null condition of classifier-free guidance, which then contrasts the
  pathology with healthy anatomy (the paper has no guidance and trains on pathological FSUs only: f = 0);
  ``init_weights: PT`` starts from an exported U-Net state dict (fine-tuning; its sha256 goes into run.json).
- AdamW + linear warm-up, gradient clipping and accumulation, AMP on CUDA, EMA, atomic checkpoints with resume.
  At the end ``RUN_DIR/unet.pt`` (EMA state dict) and ``RUN_DIR/run.json`` are written.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from spine_ldm.conditions import CONDITIONS
from spine_ldm.errors import InputError
from spine_ldm.models.config import config_to_dict

from . import common as C
from .train_autoencoder import _null, _step, load_autoencoder

KIND = "ldm"
METHODS = ("weighted", "masked", "full")


# --------------------------------------------------------------------------- latents
class LatentDataset(torch.utils.data.Dataset):
    """Pre-encoded latents (cache_latents): items with latent, level, condition, landmark_index."""

    def __init__(self, z, level, condition, landmark_index):
        self.z, self.level, self.condition, self.landmark_index = z, level, condition, landmark_index

    def __len__(self):
        return self.z.shape[0]

    def __getitem__(self, i):
        return {"latent": self.z[i], "level": self.level[i], "condition": self.condition[i],
                "landmark_index": self.landmark_index[i]}


@torch.no_grad()
def encode_dataset(ae, dataset, device, batch_size: int = 8) -> LatentDataset:
    """Encode every item once with the frozen autoencoder. Rows listed more than once (``pathology_repeat``) of an
    un-augmented :class:`~model_training.dataset.FSUDataset` are encoded once and their latents shared."""
    n = len(dataset)
    rows = getattr(dataset, "rows", None)
    if rows is not None and len(rows) == n and getattr(dataset, "augment", None) is None:
        first: dict[int, int] = {}
        source = [first.setdefault(id(r), i) for i, r in enumerate(rows)]
    else:
        source = list(range(n))
    todo = sorted(set(source))
    zs, lv, cd, lm = [], [], [], []
    for start in range(0, len(todo), batch_size):
        items = [dataset[i] for i in todo[start:start + batch_size]]
        b = C.collate(items)
        zs.append(ae.encode(b["image"].to(device).float()).cpu())
        lv.append(b["level"].long().reshape(-1))
        cd.append(b["condition"].long().reshape(-1))
        lm.append(_landmarks(b).float())
    pos = {j: k for k, j in enumerate(todo)}
    idx = torch.tensor([pos[j] for j in source], dtype=torch.long)
    return LatentDataset(*(torch.cat(x)[idx] for x in (zs, lv, cd, lm)))


def _landmarks(batch) -> torch.Tensor:
    if "landmark_index" in batch:
        return torch.as_tensor(batch["landmark_index"]).float().reshape(-1, 3)
    return torch.full((len(batch["level"]), 3), float("nan"))


# --------------------------------------------------------------------------- loss
def compute_loss(unet, schedule, z0, level, cond, W, method, roi_threshold: float, autocast=None, generator=None,
                 roi_loss_weight: float = 0.0, snr_gamma: float = 0.0):
    """Diffusion loss of one batch via ``spine_ldm.diffusion.diffusion_loss`` (the sampler's noising code;
    random t and eps from ``generator`` or torch's global RNG). Returns a float32 scalar tensor."""
    from spine_ldm.diffusion import diffusion_loss

    def model_fn(x, t, t_voxel=None):
        return unet(x, t, level, cond, w=W if _w_channel(unet) else None)

    ctx = autocast() if autocast is not None else _null()
    with ctx:
        out = diffusion_loss(model_fn, z0, None if method == "full" else W, method=method, schedule=schedule,
                             generator=generator, roi_threshold=roi_threshold, roi_loss_weight=roi_loss_weight,
                             snr_gamma=snr_gamma)
    return out.float()


def lr_factor_fn(cfg: dict):
    """LR multiplier per optimizer step: linear warm-up over ``warmup_steps``, then constant; with
    ``lr_decay_start`` (a fraction of ``steps``, e.g. 0.7) a cosine decay from there to ``lr_final`` (a fraction of
    ``lr``, default 0.1) at the last step. A pure function of the step, so a resumed run (also one resumed with more
    ``steps``) follows the schedule of its final step count."""
    warm = int(cfg.get("warmup_steps", 0) or 0)
    steps = int(cfg["steps"])
    start = cfg.get("lr_decay_start")
    final = float(cfg.get("lr_final", 0.1))
    if start is not None and not (0.0 <= float(start) < 1.0 and 0.0 <= final <= 1.0):
        raise InputError(f"lr_decay_start must be in [0, 1) and lr_final in [0, 1], got {start}, {final}")
    d0 = None if start is None else int(round(float(start) * steps))

    def factor(s: int) -> float:
        f = min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        if d0 is not None and s >= d0:
            u = min(1.0, (s - d0) / max(1, steps - d0))
            f *= final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * u))
        return f

    return factor


def _w_channel(unet) -> bool:
    m = C.unwrap(unet)
    return bool(getattr(m, "w_channel", False))


@torch.no_grad()
def fixed_eval_loss(unet, schedule, z0, level, cond, W, method, roi_threshold=0.1, seed=1234, repeats=2) -> float:
    """Loss with fixed t / eps (forked RNG): comparable across training steps (tests, logging)."""
    was = unet.training
    unet.eval()
    tot = 0.0
    g = torch.Generator(device=z0.device).manual_seed(int(seed))
    for _ in range(repeats):
        tot += float(compute_loss(unet, schedule, z0, level, cond, W, method, roi_threshold, generator=g))
    unet.train(was)
    return tot / repeats


# --------------------------------------------------------------------------- training
def train_ldm(cfg: dict, method: str, autoencoder, out, manifest=None, dataset=None, resume: bool = False,
              device: str = "auto", conditions=None, cache_dir=None, max_steps: int | None = None,
              quiet: bool = False) -> dict:
    """Train (or resume) a latent diffusion U-Net. ``dataset`` (FSU items) overrides ``manifest`` (then the
    caller already selected rows: weighted/masked datasets must hold landmarked pathological FSUs)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    env = C.setup_distributed(device)
    try:
        with C.cpu_threads(cfg.get("threads") if env.device.type == "cpu" else None):
            return _train(cfg, method, autoencoder, Path(out), manifest, dataset, resume, env, conditions,
                          cache_dir, max_steps, quiet)
    finally:
        env.cleanup()


def _train(cfg, method, autoencoder, out: Path, manifest, dataset, resume, env, conditions, cache_dir, max_steps,
           quiet):
    from spine_ldm.diffusion.schedule import NoiseSchedule
    from spine_ldm.models.unet import build_unet

    dev = env.device
    seed = int(cfg.get("seed", 0))
    C.seed_everything(seed, env.rank)
    ae, model_cfg, ae_path = load_autoencoder(autoencoder, dev, cfg.get("model_config"))
    for p in ae.parameters():
        p.requires_grad_(False)
    if cfg.get("model_config") and cfg["model_config"] not in (model_cfg.name, None):
        if env.is_main and not quiet:
            print(f"[train-ldm] model_config {cfg['model_config']!r} differs from the autoencoder's "
                  f"{model_cfg.name!r}: using the autoencoder's (the pair must match)", flush=True)
    sigma = float(cfg.get("sigma_mm", 16.0))
    roi_thr = float(cfg.get("roi_threshold", 0.1))
    roi_lw = float(cfg.get("roi_loss_weight", 0.0) or 0.0)
    snr_g = float(cfg.get("snr_gamma", 0.0) or 0.0)
    conds = C.pathology_conditions(conditions) if method in ("weighted", "masked") else \
        (tuple(conditions) if conditions else None)
    if dataset is None:
        if manifest is None:
            raise InputError("train-ldm needs --manifest (or a dataset)")
        dataset = C.build_dataset(manifest, model_cfg, split="train", conditions=conds,
                                  require_landmark=method in ("weighted", "masked"),
                                  augment=bool(cfg.get("augment", False)) and not cfg.get("cache_latents", True),
                                  cache_dir=cache_dir, sigma_mm=sigma, seed=seed,
                                  pathology_repeat=cfg.get("pathology_repeat", 1) if method == "full" else 1,
                                  condition_repeat=cfg.get("condition_repeat"),
                                  healthy_fraction=cfg.get("healthy_fraction", 0.0) if method != "full" else 0.0)
    if len(dataset) == 0:
        raise InputError(f"train-ldm --method {method}: the training set is empty")

    bs = int(cfg["batch_size"])
    cache_lat = bool(cfg.get("cache_latents", True))
    if cache_lat:
        t_enc = time.time()
        data = encode_dataset(ae, dataset, dev, batch_size=max(bs, 8))
        if method in ("weighted", "masked") and not torch.isfinite(data.landmark_index).all():
            raise InputError(f"--method {method} needs a landmark for every training FSU; "
                             f"{int((~torch.isfinite(data.landmark_index).all(1)).sum())} have none")
        if env.is_main and not quiet:
            print(f"[train-ldm] encoded {len(data)} FSUs to latents {tuple(data.z.shape[1:])} "
                  f"(std {float(data.z.std()):.3f}) in {time.time() - t_enc:.1f}s", flush=True)
    else:
        data = dataset

    schedule = NoiseSchedule.from_config(model_cfg)
    unet = build_unet(model_cfg).to(dev)
    init_sha = C.load_init_weights(unet, cfg.get("init_weights"), "U-Net")
    ema = C.EMA(unet, float(cfg.get("ema_decay", 0.999)))
    opt = torch.optim.AdamW(unet.parameters(), lr=float(cfg["lr"]), betas=tuple(cfg.get("betas", (0.9, 0.999))),
                            weight_decay=float(cfg.get("weight_decay", 0.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(cfg))
    autocast, scaler, amp_mode = C.amp_setup(dev, cfg.get("amp", "auto"))

    start = 0
    ck = C.checkpoint_path(out)
    if resume and ck.is_file():
        st = C.load_checkpoint(ck)
        if st.get("method") != method:
            raise InputError(f"--resume: {out} holds a {st.get('method')!r} run, not {method!r}")
        unet.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        C.optimizer_to(opt, dev)
        sched.load_state_dict(st["lr_scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start = C.restore_rank_rng(st, env.rank, env.world_size, seed)
    elif resume and env.is_main and not quiet:
        print(f"[train-ldm] --resume: no checkpoint in {out}, starting from step 0", flush=True)
    ema.to(dev)

    model = unet
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(unet, device_ids=[dev.index] if dev.type == "cuda" else None)

    steps = int(cfg["steps"])
    stop = min(steps, int(max_steps)) if max_steps is not None else steps
    accum = max(1, int(cfg.get("grad_accum", 1)))
    loader = C.make_loader(data, bs, env, seed, start * accum, 0 if cache_lat else int(cfg.get("num_workers", 0)))
    it = iter(loader)
    clip = float(cfg.get("grad_clip", 0) or 0)
    log_every, ck_every = int(cfg.get("log_every", 50)), int(cfg.get("checkpoint_every", 500))
    img_every = int(cfg.get("image_every", 0) or 0)
    logger = C.TrainLogger(out, enabled=env.is_main, quiet=quiet)
    ae_sha = C.file_sha256(ae_path)
    if env.is_main:
        prev = C.read_run_info(out) if (start > 0 and (out / "run.json").is_file()) else {}
        C.write_run_info(out, {**{k: v for k, v in prev.items() if k.endswith("_initial")}, "kind": KIND, "method": method, "train_config": cfg,
                               "model_config": config_to_dict(model_cfg), "autoencoder": str(Path(ae_path).resolve()),
                               "autoencoder_sha256": ae_sha, "conditions": list(conds) if conds else list(CONDITIONS),
                               "world_size": env.world_size, "amp": amp_mode, "device": str(dev),
                               "dataset_size": len(data), "status": "running",
                               **({"init_weights_sha256": init_sha} if init_sha else {})})
    fixed = _fixed_batch(data, ae, model_cfg, sigma, dev, method, n=min(int(cfg.get("eval_batch", 8)), len(data)))
    if start == 0 and env.is_main:
        init_eval = fixed_eval_loss(unet, schedule, *fixed, method, roi_thr)
        C.write_run_info(out, {**C.read_run_info(out), "eval_loss_initial": init_eval})
        logger.scalars(0, {"eval_loss": init_eval}, prefix="eval")
    t0 = time.time()
    last = float("nan")
    for step in range(start, stop):
        model.train()
        opt.zero_grad(set_to_none=True)
        tot = 0.0
        batch = None
        for micro in range(accum):
            batch = next(it)
            z0, level, cond, W = _prepare(batch, ae, model_cfg, sigma, dev, method)
            sync = micro == accum - 1
            ctx = model.no_sync() if (env.distributed and not sync) else _null()
            with ctx:
                loss = compute_loss(model, schedule, z0, level, cond, W, method, roi_thr, autocast,
                                    roi_loss_weight=roi_lw, snr_gamma=snr_g)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            tot += float(loss.detach()) / accum
        _step(opt, scaler, unet.parameters(), clip)
        sched.step()
        ema.update(unet)
        done = step + 1
        last = tot
        if done % log_every == 0 or done == stop:
            logger.scalars(done, {"loss": env.all_reduce_mean(tot), "lr": opt.param_groups[0]["lr"],
                                  "steps_per_s": (done - start) / max(time.time() - t0, 1e-9)})
        if img_every and done % img_every == 0 and env.is_main:
            _log_images(logger, done, ema.shadow, ae, schedule, z0, level, cond, W, method,
                        quantize=model_cfg.sampling.decode_quantize)
        if done % ck_every == 0 or done == stop:
            if env.is_main:
                logger.scalars(done, {"eval_loss": fixed_eval_loss(unet, schedule, *fixed, method, roi_thr),
                                      "eval_loss_ema": fixed_eval_loss(ema.shadow, schedule, *fixed, method, roi_thr)},
                               prefix="eval")
            _checkpoint(out, env, done, unet, ema, opt, sched, scaler, cfg, model_cfg, method,
                        int(cfg.get("keep_every", 0) or 0))
    final = {"step": stop, "loss": last, "run_dir": str(out)}
    if stop >= steps and env.is_main:
        C.atomic_torch_save({k: v.detach().cpu() for k, v in ema.shadow.state_dict().items()}, out / "unet.pt")
        C.atomic_torch_save({k: v.detach().cpu() for k, v in unet.state_dict().items()}, out / "unet_raw.pt")
        info = C.read_run_info(out)
        info.update({"status": "complete", "steps_done": stop, "final_loss": last, "weights": "unet.pt",
                     "eval_loss_final": fixed_eval_loss(unet, schedule, *fixed, method, roi_thr),
                     "eval_loss_final_ema": fixed_eval_loss(ema.shadow, schedule, *fixed, method, roi_thr),
                     "seconds": round(time.time() - t0, 1)})
        C.write_run_info(out, info)
        final["weights"] = str(out / "unet.pt")
        logger.text(f"[train-ldm] {method}: done {stop} steps, last loss {last:.4f}; weights {out / 'unet.pt'}")
    if env.distributed:  # per-rank parameter hash: DDP keeps replicas identical (checked by the tests)
        C.atomic_write_text(out / f"param_sha256_rank{env.rank}.txt", C.state_dict_sha256(unet.state_dict()))
    env.barrier()
    logger.close()
    return final


def _fixed_batch(data, ae, model_cfg, sigma, dev, method, n: int = 8):
    """A fixed evaluation batch (first n items; augmentation pinned) -> (z0, level, cond, W)."""
    items = []
    for i in range(n):
        try:
            items.append(data[(i, 0)] if not isinstance(data, LatentDataset) else data[i])
        except (TypeError, KeyError, IndexError):
            items.append(data[i])
    return _prepare(C.collate(items), ae, model_cfg, sigma, dev, method)


def _prepare(batch, ae, model_cfg, sigma, dev, method):
    if "latent" in batch:
        z0 = batch["latent"].to(dev).float()
    else:
        with torch.no_grad():
            z0 = ae.encode(batch["image"].to(dev).float())
    level = torch.as_tensor(batch["level"]).long().reshape(-1).to(dev)
    cond = torch.as_tensor(batch["condition"]).long().reshape(-1).to(dev)
    if method == "full":
        W = torch.ones(z0.shape[0], 1, *z0.shape[2:], device=dev)
    else:
        W = C.latent_weight(_landmarks(batch), model_cfg, sigma).to(dev)
    return z0, level, cond, W


def _checkpoint(out, env, step, unet, ema, opt, sched, scaler, cfg, model_cfg, method, keep_every):
    rngs = C.gather_rng_states(env)
    if env.is_main:
        C.save_checkpoint(out, {
            "kind": KIND, "method": method, "model": unet.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "rng_per_rank": rngs, "train_config": cfg,
            "model_config": config_to_dict(model_cfg), "world_size": env.world_size,
        }, step, keep_every)
    env.barrier()


@torch.no_grad()
def _log_images(logger, step, unet, ae, schedule, z0, level, cond, W, method, t: int = 500,
                quantize: bool = False):
    """x0-prediction of the EMA model from a single noising at t (weighted: per-voxel t_v) -> decoded grid (decoded
    like the pipeline: ``quantize`` = the config's ``sampling.decode_quantize``)."""
    n = min(4, z0.shape[0])
    z0, level, cond, W = z0[:n], level[:n], cond[:n], W[:n]
    eps = torch.randn_like(z0)
    Wn = W if method != "masked" else (W > 0.1).float()
    tv = schedule.weighted_timesteps(Wn, torch.full((n,), t, device=z0.device)).to(z0.device)
    xt = schedule.add_noise(z0, eps, tv)
    e = unet(xt, torch.full((n,), t, device=z0.device, dtype=torch.long), level, cond,
             w=W if _w_channel(unet) else None)
    a = schedule.abar(tv, device=z0.device)
    x0 = torch.where(tv == 0, xt, (xt - (1 - a).sqrt() * e) / a.sqrt().clamp_min(1e-4))
    grid = torch.cat([ae.decode(z0, quantize=quantize), ae.decode(x0, quantize=quantize)]).float()
    logger.image_grid(step, f"ldm/{method}_input_vs_x0pred_t{t}", grid, nrow=n)
