"""Export a trained LDM run (plus the autoencoder it was trained with) into a model registry.

``python -m model_training export --run LDM_RUN_DIR --id ID --registry Models.json [--weights-dir DIR]
[--autoencoder-name NAME] [--description ...] [--training-data ...] [--license ...]``

Writes (default ``<registry folder>/Models/``):

- ``<ID>-unet.pt``: the EMA U-Net weights as a plain state dict (float32 tensors only, ``weights_only`` loadable);
- ``<autoencoder-name>.pt`` (default ``<ID>-autoencoder``): the autoencoder state dict the run was trained on
  (its sha256 must still equal the one recorded at training time); several entries may share one file;
- ``<ID>-config.yaml`` only when the run's model config is not a bundled one (``small``/``paper``);

then adds or replaces the entry ``ID`` in the registry (format of DEVELOPERS.md / ``spine_ldm.registry``) and
checks it the way ``spine-ldm models verify`` does (sha256 of every file) and by loading both networks strictly.

``python -m model_training export-decoder --run AE_RUN_DIR --registry Models.json`` puts the autoencoder of a
``train: decoder`` run (``train-autoencoder``) in place of the one it was fine-tuned from, for every entry that
uses that one (same file path, new sha256; ``training.autoencoder_decoder_finetune`` records the run). It refuses
unless the encoder, codebook and ``latent_scale`` are bit-identical to the registered autoencoder's: only then do
the entries' LDMs, trained on those latents, stay valid.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from spine_ldm.errors import InputError, ModelError

from . import common as C


def _clean_state_dict(sd: dict, half: bool = False) -> dict:
    """CPU, contiguous; floating tensors float32 (or float16 with ``half``: loading casts them back to the
    module's float32, so only the stored precision changes)."""
    dt = torch.float16 if half else torch.float32
    return {k: v.detach().cpu().to(dt).contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
            for k, v in sd.items()}


def _config_ref(model_cfg_dict: dict, weights_dir: Path, model_id: str) -> str:
    from spine_ldm.models.config import config_from_dict, config_to_dict, load_config

    cfg = config_from_dict(model_cfg_dict)
    if cfg.name in ("small", "paper") and config_to_dict(load_config(cfg.name)) == config_to_dict(cfg):
        return cfg.name
    p = weights_dir / f"{model_id}-config.yaml"
    C.atomic_write_text(p, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return str(p.resolve())


def export_run(run_dir, model_id: str, registry, weights_dir=None, autoencoder_name: str | None = None,
               description: str = "", training_data: str = "", license: str = "",
               extra: dict | None = None, use_ema: bool = True, half: bool = False,
               training_extra: dict | None = None) -> dict:
    """Export ``run_dir`` as registry entry ``model_id``; returns the entry's JSON form.

    ``half`` stores the U-Net's floating tensors as float16 (half the size; the recipe checks the outputs stay
    within tolerance). ``extra`` adds top-level entry keys (e.g. ``"default": true``), ``training_extra`` keys of
    the ``training`` record (e.g. ``phantom_seeds``)."""
    from spine_ldm import registry as R

    run = Path(run_dir)
    info = C.read_run_info(run)
    if info.get("kind") != "ldm":
        raise InputError(f"{run} is a {info.get('kind')!r} run; export takes a train-ldm run (its autoencoder "
                         f"is exported with it)")
    if info.get("status") != "complete":
        raise ModelError(f"{run} is not complete (status {info.get('status')!r}); finish or resume training first")
    if not R._ID_RE.match(model_id):
        raise InputError(f"invalid model id {model_id!r} (letters, digits, '.', '_', '-'; at most 100)")
    reg = Path(registry)
    wdir = Path(weights_dir) if weights_dir else reg.parent / "Models"
    wdir.mkdir(parents=True, exist_ok=True)

    unet_src = run / ("unet.pt" if use_ema else "unet_raw.pt")
    ae_src = Path(info["autoencoder"])
    if not ae_src.is_file():
        raise ModelError(f"the autoencoder of {run} ({ae_src}) is gone")
    if C.file_sha256(ae_src) != info.get("autoencoder_sha256"):
        raise ModelError(f"autoencoder {ae_src} changed since {run} was trained (sha256 differs); retrain or "
                         f"restore it")
    unet_fp32 = torch.load(unet_src, map_location="cpu", weights_only=True)
    unet_sd = _clean_state_dict(unet_fp32, half=half)
    half_err = None
    if half:  # checked before anything is written: a model out of tolerance is never registered
        half_err = half_precision_error(unet_fp32, unet_sd, info["model_config"])
        if half_err > HALF_TOLERANCE:
            raise ModelError(f"{model_id}: the float16 U-Net's noise prediction differs from float32 by "
                             f"{half_err:.2e} (relative RMS; tolerance {HALF_TOLERANCE:g}); export without --half")
    ae_sd = _clean_state_dict(torch.load(ae_src, map_location="cpu", weights_only=True))
    unet_dst = wdir / f"{model_id}-unet.pt"
    ae_dst = wdir / f"{autoencoder_name or model_id + '-autoencoder'}.pt"
    C.atomic_torch_save(unet_sd, unet_dst)
    if not ae_dst.is_file() or _sd_differs(ae_dst, ae_sd):
        C.atomic_torch_save(ae_sd, ae_dst)
    cfg_ref = _config_ref(info["model_config"], wdir, model_id)

    files = {"autoencoder": R.FileRef("autoencoder", C.file_sha256(ae_dst), path=ae_dst.resolve()),
             "unet": R.FileRef("unet", C.file_sha256(unet_dst), path=unet_dst.resolve())}
    tc = info.get("train_config", {})
    ext = {"training": {"steps": info.get("steps_done"), "final_loss": info.get("final_loss"),
                        "conditions": info.get("conditions"), "sigma_mm": tc.get("sigma_mm"),
                        "roi_threshold": tc.get("roi_threshold"), "dataset_size": info.get("dataset_size"),
                        **(training_extra or {})}}
    if float(tc.get("healthy_fraction") or 0.0) > 0 and info.get("method") != "full":
        # the model learned the healthy null condition: pipeline.model_guidance allows a guidance scale
        ext["training"]["healthy_fraction"] = float(tc["healthy_fraction"])
    if half_err is not None:
        ext["training"]["float16_rel_rms"] = float(f"{half_err:.3g}")
    ext.update(extra or {})
    entry = R.ModelEntry(id=model_id, method=info["method"], config=cfg_ref, files=files,
                         description=description or f"{info['method']} LDM ({info['model_config'].get('name')}) "
                                                    f"exported from {run.name}",
                         training_data=training_data, license=license, extra=ext)
    old = R.read_registry(reg) if reg.exists() else []
    # replace in place when the id exists (keeps the order of the other entries), else append
    entries = [entry if e.id == model_id else e for e in old]
    if model_id not in {e.id for e in old}:
        entries.append(entry)
    R.write_registry(reg, entries)
    check_entry(model_id, reg)
    return next(e for e in R.read_registry(reg) if e.id == model_id).to_json(relative_to=reg.parent.resolve())


#: largest relative RMS difference of the noise prediction allowed for a float16-stored U-Net
HALF_TOLERANCE = 1e-2


def half_precision_error(fp32_sd: dict, half_sd: dict, model_config: dict) -> float:
    """Relative RMS difference between the noise predictions of the U-Net with its float16-stored weights and with
    the float32 ones, on seeded random latents at timesteps 999 / 500 / 50 for every condition and level (both run
    in float32: only the stored precision differs)."""
    from spine_ldm.conditions import CONDITIONS, LEVELS
    from spine_ldm.models.config import config_from_dict
    from spine_ldm.models.unet import build_unet

    cfg = config_from_dict(model_config)
    ref, low = build_unet(cfg).eval(), build_unet(cfg).eval()
    ref.load_state_dict(fp32_sd)
    low.load_state_dict(half_sd)  # cast back to the module's float32
    g = torch.Generator().manual_seed(0)
    n = len(CONDITIONS) * len(LEVELS)
    x = torch.randn((n, *cfg.latent_shape), generator=g)
    t = torch.tensor([999, 500, 50] * n)[:n]
    lvl = torch.arange(n) % len(LEVELS)
    cnd = torch.arange(n) // len(LEVELS)
    w = torch.ones((n, 1, *cfg.latent_shape[1:]))
    with torch.no_grad():
        a, b = low(x, t, lvl, cnd, w=w), ref(x, t, lvl, cnd, w=w)
    return float(torch.sqrt(((a - b) ** 2).mean()) / torch.sqrt((b ** 2).mean()).clamp_min(1e-12))


def _sd_differs(path: Path, sd: dict) -> bool:
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return True
    return C.state_dict_sha256(old) != C.state_dict_sha256(sd)


def check_entry(model_id: str, registry) -> None:
    """sha256 of every file (as ``spine-ldm models verify``) and a strict load of both networks."""
    from spine_ldm import registry as R

    st = R.verify(model_id, registry)
    bad = [s.message() for s in st.values() if s.status != "ok"]
    if bad:
        raise ModelError(f"exported model {model_id!r} does not verify: {'; '.join(bad)}")
    R.load(model_id, device="cpu", registry=registry)


def export_decoder(run_dir, registry) -> list[str]:
    """Swap the autoencoder of a ``train: decoder`` run into ``registry`` (see the module docstring); returns the
    ids of the entries updated."""
    from spine_ldm import registry as R

    run = Path(run_dir)
    info = C.read_run_info(run)
    if info.get("kind") != "autoencoder" or info.get("train") != "decoder":
        raise InputError(f"{run} is not a train-autoencoder run with train: decoder (kind {info.get('kind')!r}, "
                         f"train {info.get('train')!r})")
    if info.get("status") != "complete":
        raise ModelError(f"{run} is not complete (status {info.get('status')!r}); finish or resume training first")
    init_sha = info.get("init_weights_sha256")
    reg = Path(registry)
    entries = R.read_registry(reg, missing_ok=False)
    hit = [e for e in entries if e.files["autoencoder"].sha256 == init_sha]
    if not hit:
        raise InputError(f"no entry of {reg} uses the autoencoder {run} was fine-tuned from (sha256 {init_sha})")
    paths = {e.files["autoencoder"].local_path() for e in hit}
    if len(paths) != 1:
        raise InputError(f"the entries using that autoencoder keep it in {len(paths)} files; expected one")
    dst = paths.pop()
    if C.file_sha256(dst) != init_sha:
        raise ModelError(f"{dst} does not match its registry sha256; restore it first")
    new = _clean_state_dict(torch.load(run / "autoencoder.pt", map_location="cpu", weights_only=True))
    old = torch.load(dst, map_location="cpu", weights_only=True)
    if set(new) != set(old):
        raise ModelError(f"the autoencoder of {run} has other tensors than {dst}")
    moved = [k for k in old if not k.startswith("decoder.") and not torch.equal(new[k], old[k].to(new[k].dtype))]
    if moved:
        raise ModelError(f"the autoencoder of {run} differs from {dst} outside the decoder ({moved[0]!r}, ...): "
                         f"its latents are not the ones the registered LDMs were trained on")
    C.atomic_torch_save(new, dst)
    sha = C.file_sha256(dst)
    record = {"steps": info.get("steps_done"), "from_sha256": init_sha,
              "eval_l1_initial": info.get("eval_l1_initial"), "eval_l1_final": info.get("eval_l1_final_ema"),
              "dataset_size": info.get("dataset_size")}
    out = []
    for e in entries:
        if e.files["autoencoder"].sha256 == init_sha:
            e.files["autoencoder"] = R.FileRef("autoencoder", sha, path=e.files["autoencoder"].path)
            e.extra.setdefault("training", {})["autoencoder_decoder_finetune"] = record
            out.append(e.id)
    R.write_registry(reg, entries)
    for mid in out:
        check_entry(mid, reg)
    return out


def main_export_decoder(args) -> int:
    ids = export_decoder(args.run, args.registry)
    print(f"autoencoder swapped for {len(ids)} entries: {', '.join(ids)}")
    return 0


def main_export(args) -> int:
    extra = json.loads(args.extra) if args.extra else None
    d = export_run(args.run, args.id, args.registry, args.weights_dir, args.autoencoder_name, args.description,
                   args.training_data, args.license, extra, use_ema=not args.raw, half=args.half)
    print(json.dumps(d, indent=2))
    return 0
