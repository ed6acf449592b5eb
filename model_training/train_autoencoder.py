"""VQGAN autoencoder training (shared by every LDM method).

``python -m model_training train-autoencoder --config ae_small --manifest M --out RUN_DIR [--resume]``
(``torchrun --nproc_per_node=N -m model_training train-autoencoder ...`` for DDP).

Loss (weights from the model config's ``autoencoder_loss``): L1 + quantization (commitment, EMA codebook) +
adversarial (PatchDiscriminator, least squares), the adversarial part only from ``disc_start`` on (warm-up).
Optional ``roi_l1_weight`` (train config) adds ``roi_l1_weight * sum(R |recon - x|) / sum(R)``, R a Gaussian of
``roi_sigma_mm`` (default 6) around the item's landmark (zero for rows without one): a herniation is ~20 FSU voxels
of 32,768, so a plain mean L1 (dominated by noise the autoencoder cannot and should not reproduce) lets it
vanish from the reconstructions; the narrow ROI term makes the few voxels where pathology lives count.
``pathology_repeat`` (train config) lists pathological FSUs that many times in the training set.
AdamW for generator and discriminator, gradient clipping, gradient accumulation, AMP on CUDA, EMA weights.
Every ``checkpoint_every`` steps ``RUN_DIR/checkpoints/last.pt`` is replaced atomically; ``--resume`` continues
from it with the same step, optimizer/scaler state, EMA and RNG states (per rank).

``init_weights: PT`` starts from an autoencoder state dict (e.g. an exported one; its sha256 goes into run.json).
``train: decoder`` (needs ``init_weights``) fine-tunes only the decoder: the encoder, the codebook and
``latent_scale`` stay bit-identical, so the latent space, and every LDM trained on it, stays valid. The decoder
learns on the encoder's *unquantized* output, the pipeline's default decode path (``decode(encode(x),
quantize=False)``, and how sampled latents are decoded: ``sampling.decode_quantize`` off); no quantization loss,
no codebook restarts, no latent-scale refit.

At the end ``latent_scale = 1/std(encoder output)`` is fitted on the EMA model and ``RUN_DIR/autoencoder.pt``
(EMA state dict, what ``export`` and ``train-ldm --autoencoder`` use) plus ``RUN_DIR/run.json`` are written.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
import torch.distributed as dist

from spine_ldm.errors import InputError
from spine_ldm.models.config import config_to_dict, load_config

from . import common as C

KIND = "autoencoder"


def _build(model_cfg, device):
    from spine_ldm.models.autoencoder import VQGANLoss, build_autoencoder, build_discriminator

    ae = build_autoencoder(model_cfg).to(device)
    disc = build_discriminator(model_cfg).to(device)
    loss = VQGANLoss(model_cfg).to(device)
    return ae, disc, loss


def train_autoencoder(cfg: dict, out, manifest=None, dataset=None, resume: bool = False, device: str = "auto",
                      cache_dir=None, max_steps: int | None = None, quiet: bool = False) -> dict:
    """Train (or resume) a VQGAN. ``dataset`` (items with ``image`` (1,SI,AP,LR)) overrides ``manifest``.

    ``max_steps`` stops early (after checkpointing) without changing the schedule (used by tests to simulate an
    interruption). Returns a summary dict (final step, last losses, paths)."""
    env = C.setup_distributed(device)
    try:
        with C.cpu_threads(cfg.get("threads") if env.device.type == "cpu" else None):
            return _train(cfg, Path(out), manifest, dataset, resume, env, cache_dir, max_steps, quiet)
    finally:
        env.cleanup()


def _train(cfg, out: Path, manifest, dataset, resume, env: C.DistEnv, cache_dir, max_steps, quiet):
    dev = env.device
    model_cfg = load_config(cfg.get("model_config", "small"))
    seed = int(cfg.get("seed", 0))
    C.seed_everything(seed, env.rank)
    torch.backends.cudnn.benchmark = False

    if dataset is None:
        if manifest is None:
            raise InputError("train-autoencoder needs --manifest (or a dataset)")
        dataset = C.build_dataset(manifest, model_cfg, split="train", augment=bool(cfg.get("augment", True)),
                                  cache_dir=cache_dir, pathology_repeat=cfg.get("pathology_repeat", 1))

    ae, disc, loss_fn = _build(model_cfg, dev)
    init_sha = C.load_init_weights(ae, cfg.get("init_weights"), "autoencoder")
    part = str(cfg.get("train", "all"))
    if part not in ("all", "decoder"):
        raise InputError(f"train must be 'all' or 'decoder', got {part!r}")
    decoder_only = part == "decoder"
    if decoder_only:
        if init_sha is None:
            raise InputError("train: decoder fine-tunes the decoder of a trained autoencoder: set init_weights")
        ae.encoder.requires_grad_(False)
        ae.quantizer.requires_grad_(False)
    ema = C.EMA(ae, float(cfg.get("ema_decay", 0.999)))
    betas = tuple(cfg.get("betas", (0.5, 0.9)))
    wd = float(cfg.get("weight_decay", 0.0))
    opt_g = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=float(cfg["lr"]), betas=betas,
                              weight_decay=wd)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=float(cfg.get("lr_d", cfg["lr"])), betas=betas, weight_decay=wd)
    autocast, scaler_g, amp_mode = C.amp_setup(dev, cfg.get("amp", "auto"))
    scaler_d = torch.amp.GradScaler("cuda") if scaler_g is not None else None

    start = 0
    ckpt_file = C.checkpoint_path(out)
    if resume and ckpt_file.is_file():
        st = C.load_checkpoint(ckpt_file)
        ae.load_state_dict(st["model"])
        disc.load_state_dict(st["discriminator"])
        ema.load_state_dict(st["ema"])
        opt_g.load_state_dict(st["optimizer"])
        opt_d.load_state_dict(st["optimizer_d"])
        C.optimizer_to(opt_g, dev)
        C.optimizer_to(opt_d, dev)
        if scaler_g is not None and st.get("scaler"):
            scaler_g.load_state_dict(st["scaler"])
            scaler_d.load_state_dict(st["scaler_d"])
        start = C.restore_rank_rng(st, env.rank, env.world_size, seed)
    elif resume and env.is_main and not quiet:
        print(f"[train-autoencoder] --resume: no checkpoint in {out}, starting from step 0", flush=True)
    if start == 0 and init_sha is None:  # data-dependent codebook init (anti-collapse), identical on every rank
        if env.is_main:
            x0 = torch.cat([b for b in _batches(dataset, 2, int(cfg["batch_size"]), seed)]).to(dev)
            ae.init_codebook(x0)
        if env.distributed:
            q = ae.quantizer.quantizer
            for t in (q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data):
                dist.broadcast(t, 0)
        ema = C.EMA(ae, float(cfg.get("ema_decay", 0.999)))
    ema.to(dev)

    model, dmodel = (_DecoderOnly(ae) if decoder_only else ae), disc
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dev.index] if dev.type == "cuda" else None
        model = DDP(model, device_ids=ids)
        dmodel = DDP(disc, device_ids=ids)

    steps = int(cfg["steps"])
    stop = min(steps, int(max_steps)) if max_steps is not None else steps
    accum = max(1, int(cfg.get("grad_accum", 1)))
    bs = int(cfg["batch_size"])
    loader = C.make_loader(dataset, bs, env, seed, start * accum, int(cfg.get("num_workers", 0)))
    it = iter(loader)
    disc_start = int(cfg.get("disc_start", 0))
    clip = float(cfg.get("grad_clip", 0) or 0)
    roi_w = float(cfg.get("roi_l1_weight", 0) or 0)
    # items carry W of the dataset's sigma; W ** (sigma / roi_sigma)^2 is the Gaussian of roi_sigma
    roi_pow = (float(getattr(dataset, "sigma_mm", 16.0)) / float(cfg.get("roi_sigma_mm", 6.0))) ** 2
    log_every, ck_every = int(cfg.get("log_every", 50)), int(cfg.get("checkpoint_every", 500))
    img_every = int(cfg.get("image_every", 0) or 0)
    logger = C.TrainLogger(out, enabled=env.is_main, quiet=quiet)
    if env.is_main:
        prev = C.read_run_info(out) if (start > 0 and (out / "run.json").is_file()) else {}
        C.write_run_info(out, {**{k: v for k, v in prev.items() if k.endswith("_initial")}, "kind": KIND, "train_config": cfg, "model_config": config_to_dict(model_cfg),
                               "world_size": env.world_size, "amp": amp_mode, "device": str(dev),
                               "dataset_size": len(dataset), "status": "running", "train": part,
                               **({"init_weights_sha256": init_sha} if init_sha else {})})
    fixed_x = torch.cat([b for b in _batches(dataset, 1, min(8, len(dataset)), seed + 1)]).to(dev)
    if start == 0 and env.is_main:
        C.write_run_info(out, {**C.read_run_info(out), "eval_l1_initial": eval_l1(ae, fixed_x, not decoder_only)})
    last = {}
    t0 = time.time()
    step = start
    for step in range(start, stop):
        ae.train()
        disc.train()
        if decoder_only:  # the frozen part must not update the codebook's EMA statistics either
            ae.encoder.eval()
            ae.quantizer.eval()
        use_adv = step >= disc_start
        opt_g.zero_grad(set_to_none=True)
        pairs = []
        parts_acc: dict[str, float] = {}
        for micro in range(accum):
            batch = next(it)
            x = batch["image"].to(dev, non_blocking=True).float()
            sync = micro == accum - 1
            ctx = model.no_sync() if (env.distributed and not sync) else _null()
            with ctx:
                with autocast():
                    recon, q_loss = model(x)
                    g_loss, parts = loss_fn.generator_loss(x, recon, q_loss, dmodel if use_adv else None)
                    if roi_w > 0:
                        roi = roi_l1(x, recon, batch["weight"].to(dev, non_blocking=True) ** roi_pow)
                        parts["roi_l1"] = roi
                        g_loss = g_loss + roi_w * roi
                (scaler_g.scale(g_loss / accum) if scaler_g else g_loss / accum).backward()
            pairs.append((x, recon.detach()))
            for k, v in parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + float(v.detach()) / accum
            parts_acc["g_total"] = parts_acc.get("g_total", 0.0) + float(g_loss.detach()) / accum
        _step(opt_g, scaler_g, ae.parameters(), clip)
        if use_adv:
            opt_d.zero_grad(set_to_none=True)
            for micro, (x, rec) in enumerate(pairs):
                sync = micro == accum - 1
                ctx = dmodel.no_sync() if (env.distributed and not sync) else _null()
                with ctx:
                    with autocast():
                        d_loss = loss_fn.discriminator_loss(x, rec, dmodel)
                    (scaler_d.scale(d_loss / accum) if scaler_d else d_loss / accum).backward()
                parts_acc["d_loss"] = parts_acc.get("d_loss", 0.0) + float(d_loss.detach()) / accum
            _step(opt_d, scaler_d, disc.parameters(), clip)
        restart_every = int(cfg.get("codebook_restart_every", 0) or 0)
        n_restarted = 0
        if restart_every and not decoder_only and (step + 1) % restart_every == 0 and step + 1 <= 0.8 * steps:
            n_restarted = restart_dead_codes(ae, pairs[-1][0], float(cfg.get("codebook_restart_threshold", 1.0)), env)
        ema.update(ae)
        done = step + 1
        last = parts_acc
        if done % log_every == 0 or done == stop:
            vals = {k: env.all_reduce_mean(v) for k, v in parts_acc.items()}
            usage = ae.codebook_usage(pairs[-1][0])
            vals.update({"codebook_fraction": usage["fraction"], "codes_restarted": n_restarted, "codebook_perplexity": usage["perplexity"],
                         "lr": opt_g.param_groups[0]["lr"], "adv_on": float(use_adv),
                         "steps_per_s": (done - start) / max(time.time() - t0, 1e-9)})
            logger.scalars(done, vals)
        if img_every and done % img_every == 0:
            x, rec = pairs[-1]
            logger.image_grid(done, "recon/input_vs_reconstruction", torch.cat([x[:4], rec[:4]]).float(), nrow=min(4, len(x)))
        if done % ck_every == 0 or done == stop:
            if env.is_main:
                q = not decoder_only
                logger.scalars(done, {"l1": eval_l1(ae, fixed_x, q), "l1_ema": eval_l1(ema.shadow, fixed_x, q)},
                               prefix="eval")
            _checkpoint(out, env, done, ae, disc, ema, opt_g, opt_d, scaler_g, scaler_d, cfg, model_cfg,
                        int(cfg.get("keep_every", 0) or 0))
    final = {"step": stop, "losses": last, "run_dir": str(out)}
    if env.distributed:  # per-rank parameter hash (before rank 0 fits latent_scale): replicas must be identical
        C.atomic_write_text(out / f"param_sha256_rank{env.rank}.txt", C.state_dict_sha256(ae.state_dict()))
    if stop >= steps and env.is_main:
        if decoder_only:  # the latent space is the init's: its scale stays
            scale = float(ema.shadow.latent_scale)
        else:
            scale = _fit_latent_scale(ema.shadow, dataset, int(cfg.get("latent_scale_batches", 8)), bs, dev, seed)
            _fit_latent_scale(ae, dataset, int(cfg.get("latent_scale_batches", 8)), bs, dev, seed)
        C.atomic_torch_save({k: v.detach().cpu() for k, v in ema.shadow.state_dict().items()}, out / "autoencoder.pt")
        C.atomic_torch_save({k: v.detach().cpu() for k, v in ae.state_dict().items()}, out / "autoencoder_raw.pt")
        usage = _usage_over(ema.shadow, dataset, bs, dev)
        info = C.read_run_info(out)
        info.update({"status": "complete", "steps_done": stop, "latent_scale": scale, "codebook_usage": usage,
                     "eval_l1_final": eval_l1(ae, fixed_x, not decoder_only),
                     "eval_l1_final_ema": eval_l1(ema.shadow, fixed_x, not decoder_only),
                     "final_losses": last, "weights": "autoencoder.pt", "seconds": round(time.time() - t0, 1)})
        C.write_run_info(out, info)
        final.update({"latent_scale": scale, "codebook_usage": usage, "weights": str(out / "autoencoder.pt")})
        logger.text(f"[train-autoencoder] done: {stop} steps, latent_scale={scale:.4g}, "
                    f"codebook used {usage['used']}/{usage['num_embeddings']}; weights {out / 'autoencoder.pt'}")
    env.barrier()
    logger.close()
    return final


def roi_l1(x: torch.Tensor, recon: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(W |recon - x|) / sum(W)`` over the batch (0 when every W is 0)."""
    w = weight.float()
    return (w * (recon.float() - x.float()).abs()).sum() / w.sum().clamp_min(1e-6)


@torch.no_grad()
def eval_l1(ae, x, quantize: bool = True) -> float:
    """L1 reconstruction error on a fixed batch in eval mode (codebook frozen); ``quantize=False``: the
    unquantized decode path (``decoder(encoder(x))``)."""
    was = ae.training
    ae.eval()
    recon = ae(x)[0] if quantize else ae.decoder(ae.encoder(x))
    ae.train(was)
    return float((recon.float() - x.float()).abs().mean())


class _DecoderOnly(torch.nn.Module):
    """``train: decoder``'s forward: the frozen encoder's unquantized output through the decoder (zero
    quantization loss); a module so that DDP syncs the decoder's gradients."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x):
        with torch.no_grad():
            h = self.ae.encoder(x)
        return self.ae.decoder(h), h.new_zeros(())


@torch.no_grad()
def restart_dead_codes(ae, x, threshold: float, env) -> int:
    """Re-seed codebook entries whose EMA cluster size fell below ``threshold`` with random encoder outputs of
    the current batch (fights codebook collapse: a normal(0,1) codebook vs near-zero initial encoder outputs
    otherwise maps everything to one code). Rank 0 decides; the codebook is broadcast under DDP."""
    q = ae.quantizer.quantizer
    dead = q.ema_cluster_size < threshold
    n = int(dead.sum())
    if n and env.is_main:
        h = ae.encoder(x)
        flat = h.permute(0, 2, 3, 4, 1).reshape(-1, h.shape[1]).float()
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        new = flat[pick] + 0.01 * flat.std() * torch.randn(n, flat.shape[1], device=flat.device)
        q.embedding.weight.data[dead] = new.to(q.embedding.weight.dtype)
        q.ema_w.data[dead] = new.to(q.ema_w.dtype)
        q.ema_cluster_size.data[dead] = 1.0
    if env.distributed:
        for t in (q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data):
            dist.broadcast(t, 0)
    return n


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _step(opt, scaler, params, clip):
    if scaler is not None:
        scaler.unscale_(opt)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(list(params), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _checkpoint(out, env, step, ae, disc, ema, opt_g, opt_d, scaler_g, scaler_d, cfg, model_cfg, keep_every):
    rngs = C.gather_rng_states(env)
    if env.is_main:
        C.save_checkpoint(out, {
            "kind": KIND, "model": ae.state_dict(), "discriminator": disc.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(),
            "scaler": scaler_g.state_dict() if scaler_g else None, "scaler_d": scaler_d.state_dict() if scaler_d else None,
            "rng_per_rank": rngs, "train_config": cfg, "model_config": config_to_dict(model_cfg),
            "world_size": env.world_size,
        }, step, keep_every)
    env.barrier()


def _batches(dataset, n_batches, bs, seed):
    g = torch.Generator().manual_seed(seed + 12345)
    perm = torch.randperm(len(dataset), generator=g).tolist()
    idx = list(itertools.islice(itertools.cycle(perm), n_batches * bs)) if perm else []
    for b in range(n_batches):
        items = [dataset[i] for i in idx[b * bs:(b + 1) * bs]]
        if items:
            yield C.collate(items)["image"].float()


@torch.no_grad()
def _fit_latent_scale(ae, dataset, n_batches, bs, dev, seed) -> float:
    ae.eval()
    xs = [x.to(dev) for x in _batches(dataset, max(1, min(n_batches, -(-len(dataset) // bs))), bs, seed)]
    return float(ae.fit_latent_scale(xs))


@torch.no_grad()
def _usage_over(ae, dataset, bs, dev, max_batches: int = 16) -> dict:
    ae.eval()
    hs = [ae.encoder(x.to(dev)) for x in _batches(dataset, max(1, min(max_batches, -(-len(dataset) // bs))), bs, 0)]
    return ae.codebook_usage(torch.cat(hs), is_latent=True)


def load_autoencoder(run_or_pt, device="cpu", model_config: str | None = None):
    """(autoencoder in eval mode, model config, weights path) from a training run dir or a state-dict .pt
    (a run dir gives its ``autoencoder.pt``; a .pt next to a run.json takes that run's model config, any other
    .pt the ``model_config`` given, default ``small``)."""
    from spine_ldm.errors import ModelError
    from spine_ldm.models.autoencoder import build_autoencoder
    from spine_ldm.models.config import config_from_dict

    p = Path(run_or_pt)
    if p.is_dir():
        info = C.read_run_info(p)
        if info.get("kind") != KIND:
            raise ModelError(f"{p} is a {info.get('kind')!r} run, not an autoencoder run")
        if not (p / "autoencoder.pt").is_file():
            raise ModelError(f"{p} has no autoencoder.pt yet (training not complete: status {info.get('status')!r})")
        model_cfg = config_from_dict(info["model_config"])
        pt = p / "autoencoder.pt"
    elif p.is_file():
        pt = p
        info_p = p.parent / "run.json"
        model_cfg = config_from_dict(C.read_run_info(p.parent)["model_config"]) if info_p.is_file() else None
    else:
        raise ModelError(f"autoencoder {run_or_pt} not found (give a train-autoencoder run dir or a .pt state dict)")
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    if model_cfg is None:
        model_cfg = load_config(model_config or "small")
    ae = build_autoencoder(model_cfg)
    try:
        ae.load_state_dict(sd)
    except RuntimeError as e:
        raise ModelError(f"autoencoder weights {pt} do not fit model config {model_cfg.name!r}: "
                         f"{str(e).splitlines()[0]}") from None
    return ae.to(device).eval(), model_cfg, pt
