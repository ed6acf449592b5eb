"""``python -m model_training benchmark-phantoms``: the paired-truth phantom benchmark.

For every seed (the level drawn per seed from ``--levels``), condition and sigma: the healthy phantom H and its
pathological twin P (same seed, :mod:`.cases`); H is inpainted at P's landmark with every method through
``spine_ldm.pipeline.inpaint`` (K samples in one batch; ``model=None`` unless ``--models`` names one, so the
pipeline picks its default per method and condition; ``sigma_mm`` / ``paste_mode`` only when given); every output G
is measured against P (:mod:`.metrics`), read by the automatic readers (:mod:`.readers`) and the truth's own
autoencoder reconstruction, pasted into H the way the pipeline pastes (``cos_ceiling``), is measured too.

Work is split per seed (H generated once, P once per condition) over ``--jobs`` worker processes of ``--threads``
torch threads each. Every finished case is written to ``DIR/.work/`` (a JSON record + an ``.npz`` of crops, Inception
features and figure views), so an interrupted run continues where it stopped; a case is recomputed when the
settings or the registry entries of the models its condition uses changed (``fingerprint``). The report
(:mod:`.report`) is then built from those files: ``results.csv``, ``table1.md``, ``table2.md``, ``summary.json``,
``figures/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from spine_ldm.conditions import CONDITIONS, parse_condition, parse_level
from spine_ldm.errors import InputError

from . import cases as CS
from . import metrics as M
from .seeds import check_disjoint, format_seeds, parse_seeds, recorded_seeds

METHODS = ("weighted", "masked", "repaint")
PATHOLOGIES = tuple(c for c in CONDITIONS if c != "none")
DEFAULT_REPAINT_RESAMPLE = 5
VIEW_MM = 72.0
VIEW_PIXEL_MM = 0.4
WORK = ".work"


# --------------------------------------------------------------------------- settings
def parse_models(spec) -> dict:
    """``weighted=ID,masked=ID`` (or a list of such strings) -> {method: id}."""
    out = {}
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    for s in items:
        for part in str(s or "").split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise InputError(f"--models expects METHOD=ID[,METHOD=ID], got {part!r}")
            k, v = (x.strip() for x in part.split("=", 1))
            if k.lower() not in METHODS:
                raise InputError(f"--models: unknown method {k!r} (weighted, masked, repaint)")
            out[k.lower()] = v
    return out


def _list(spec, allowed=None, parse=None) -> list[str]:
    vals = [v.strip() for v in str(spec).split(",") if v.strip()]
    vals = [parse(v) if parse else v.lower() for v in vals]
    if allowed is not None:
        for v in vals:
            if v not in allowed:
                raise InputError(f"{v!r} is not one of {', '.join(allowed)}")
    if not vals:
        raise InputError(f"empty list {spec!r}")
    return list(dict.fromkeys(vals))


def settings_from_args(args) -> dict:
    sweep = [float(v) for v in str(args.sigma_sweep).split(",") if v.strip()] if args.sigma_sweep else None
    if sweep and args.sigma_mm is not None:
        raise InputError("give --sigma-mm or --sigma-sweep, not both")
    conds = _list(args.conditions, parse=parse_condition)
    if "none" in conds:
        raise InputError("--conditions: 'none' is not a pathology to inpaint")
    s = {
        "seeds": parse_seeds(args.seeds), "conditions": conds, "methods": _list(args.methods, METHODS),
        "levels": _list(args.levels, parse=parse_level), "samples": int(args.samples), "steps": int(args.steps),
        "models": parse_models(args.models), "sigmas": sweep or [args.sigma_mm], "sweep": bool(sweep),
        "paste_mode": args.paste_mode, "repaint_resample": int(args.repaint_resample),
        "decode_quantize": {None: None, "on": True, "off": False}[getattr(args, "decode_quantize", None)],
        "spacing": [float(v) for v in str(args.spacing).split(",")] if args.spacing else list(CS.PHANTOM_SPACING),
        "device": args.device, "registry": str(Path(args.registry).resolve()) if args.registry else None,
        "reader": args.reader, "features": args.features, "fid_slices": int(args.fid_slices),
        "fid_samples": int(args.fid_samples), "save_volumes": bool(args.save_volumes),
        "figure_cases": int(args.figure_cases), "jobs": max(1, int(args.jobs)), "threads": int(args.threads),
        "n_boot": int(args.n_boot), "guidance_scale": getattr(args, "guidance_scale", None),
    }
    if not 1 <= s["samples"] <= 64:
        raise InputError(f"--samples must be 1..64, got {s['samples']}")
    if len(s["spacing"]) != 3:
        raise InputError(f"--spacing must be 3 numbers (mm), got {args.spacing!r}")
    return s


def registry_file(settings) -> Path:
    from spine_ldm import registry as reg

    return Path(settings["registry"]) if settings["registry"] else reg.default_registry_path()


def fingerprint(settings, reader_sha: str | None, condition: str | None = None) -> str:
    """What makes a stored case reusable: every setting that changes its numbers, the reader's sha256 and the
    models. With ``condition`` (a case's fingerprint) the models are the registry entries that condition's cases use
    (id, method, config, weight sha256s, training record incl. sigma): new weights for one pathology recompute only
    that pathology's cases. Without it (the run's fingerprint, checked between cases) the bytes of the whole
    registry file: weights registered while the benchmark runs stop it."""
    keys = ("methods", "samples", "steps", "models", "paste_mode", "repaint_resample", "spacing", "features",
            "fid_slices", "fid_samples", "decode_quantize")
    if condition is None:
        reg = registry_file(settings)
        models = hashlib.sha256(reg.read_bytes()).hexdigest() if reg.is_file() else "none"
    else:
        models = _models_digest(settings, condition)
    # guidance only when set, so the fingerprints of runs without it stay what they were
    g = settings.get("guidance_scale")
    blob = json.dumps({**{k: settings[k] for k in keys}, **({"guidance_scale": g} if g is not None else {}),
                       "reader": reader_sha, "registry": models}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _models_digest(settings, condition: str) -> dict:
    """{method: the resolved registry entry (weights by sha256, no paths) and the values of its model config} of the
    models a case of ``condition`` runs: a changed config default (e.g. ``sampling.decode_quantize``) recomputes the
    cases just as new weights do. With an explicit ``--guidance-scale`` the entry's own ``guidance_scale`` is left
    out (it does not change the outputs then): a new registry default keeps a guidance sweep's cases."""
    from spine_ldm import pipeline, registry as reg
    from spine_ldm.models.config import config_to_dict

    out = {}
    for m in settings["methods"]:
        mid = settings["models"].get(m) or pipeline.default_model_for(m, condition, settings["registry"])
        e = reg.resolve(mid, settings["registry"])
        j = e.to_json()
        j["files"] = {k: f.sha256 for k, f in e.files.items()}
        j["config_values"] = config_to_dict(reg.load_config_for(e))
        if settings.get("guidance_scale") is not None:
            j.pop("guidance_scale", None)
        out[m] = j
    return out


def models_in_play(settings) -> dict[str, object]:
    """{model id: registry entry} of every model the run can use (explicit --models, else the pipeline's default
    per method and condition)."""
    from spine_ldm import pipeline, registry as reg

    out = {}
    for m in settings["methods"]:
        for c in settings["conditions"]:
            mid = settings["models"].get(m) or pipeline.default_model_for(m, c, settings["registry"])
            if mid not in out:
                out[mid] = reg.resolve(mid, settings["registry"])
    return out


def check_seeds(settings, reader_entry: dict | None, log=print) -> dict:
    """Refuse seeds that a model in play or the reader was trained on; returns {id: recorded seeds or None}."""
    used = {mid: recorded_seeds(e) for mid, e in models_in_play(settings).items()}
    if reader_entry:
        used[f"reader {reader_entry.get('id')}"] = recorded_seeds(reader_entry)
    unknown = check_disjoint(settings["seeds"], used, "benchmark")
    if unknown:
        log(f"[benchmark] warning: {', '.join(unknown)} record(s) no training phantom seeds "
            f"(training.phantom_seeds); disjointness cannot be checked for them")
    return used


# --------------------------------------------------------------------------- composition
def compose(healthy, fsu, landmark, provenance: dict, reference_fsu):
    """Paste an FSU into H exactly as the pipeline composed its output (sigma, threshold, edge taper and paste mode
    from the output's provenance; ``reference_fsu`` = the reconstruction of H's FSU, used in ``change`` mode).
    ``paste_interpolation`` / ``paste_weight_saturation`` (never set by the pipeline: linear, 1) are the resolution
    studies' knobs (``benchmarks/c2st_bounds.py``)."""
    from spine_ldm import geometry, pipeline

    mode = provenance.get("paste_mode", "blend")
    return geometry.paste_back(healthy, fsu, landmark, float(provenance["sigma_mm"]),
                               threshold=float(provenance.get("paste_threshold", pipeline.PASTE_THRESHOLD)),
                               edge_taper_mm=float(provenance.get("edge_taper_mm", pipeline.EDGE_TAPER_MM)),
                               reference_fsu=reference_fsu if mode == "change" else None,
                               interpolation=provenance.get("paste_interpolation", "linear"),
                               weight_saturation=float(provenance.get("paste_weight_saturation", 1.0)))


# --------------------------------------------------------------------------- views for figures
def views(image, case: CS.Case) -> dict:
    """Sagittal slice (columns anterior -> posterior, rows superior -> inferior) and axial reformat perpendicular
    to the canal (columns patient right -> left, rows anterior -> posterior) through the landmark, :data:`VIEW_MM`
    wide at :data:`VIEW_PIXEL_MM`."""
    u_ap, u_lr, _ = M.disc_axes(case.disc_center, case.posterior_margin)
    half = VIEW_MM / 2
    return {"sag": M.plane_image(image, case.landmark, (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), half, VIEW_PIXEL_MM),
            "ax": M.plane_image(image, case.landmark, u_lr, u_ap, half, VIEW_PIXEL_MM)}


# --------------------------------------------------------------------------- one case
class Context:
    """Per-process state: settings, reader, feature network (loaded once)."""

    def __init__(self, settings, out: Path, fp: str):
        self.s, self.out, self.fp = settings, Path(out), fp
        self._reader = self._features = None
        self._case_fp: dict = {}

    def case_fp(self, condition: str) -> str:
        """The fingerprint stored with (and required of) every case of ``condition``."""
        if condition not in self._case_fp:
            self._case_fp[condition] = fingerprint(self.s, self.reader_sha, condition)
        return self._case_fp[condition]

    @property
    def reader_sha(self) -> str | None:
        return _reader_sha(self.reader)

    @property
    def reader(self):
        if self._reader is None and self.s["reader"] != "none":
            from .readers import load_reader

            self._reader = load_reader(self.s["reader"], self.s["registry"])
        return self._reader

    @property
    def features(self):
        if self._features is None and self.s["features"] != "none":
            from ..evaluate import make_features

            self._features = make_features(self.s["features"])
        return self._features

    def feats(self, crops) -> np.ndarray:
        """Inception (or ``--features``) features of the central ``fid_slices`` sagittal slices of each crop."""
        if self.features is None or not len(crops):
            return np.zeros((0, 0), np.float16)
        c = np.asarray(crops)
        lr = c.shape[-1]
        n = min(self.s["fid_slices"], lr) if self.s["fid_slices"] > 0 else lr
        lo = (lr - n) // 2
        return self.features(c[..., lo:lo + n]).numpy().astype(np.float16)


def case_name(case_key: str, sigma) -> str:
    return f"{case_key}_s{'model' if sigma is None else f'{float(sigma):g}'}"


def run_case(ctx: Context, case: CS.Case, sigma) -> dict:
    """Inpaint one case with every method and measure; returns the case record and writes its files."""
    import SimpleITK as sitk

    from spine_ldm import pipeline

    from .readers import crop, crop_normalization

    s = ctx.s
    lm, disc = case.landmark, case.disc_center
    H, P = case.healthy.image, case.truth.image
    nb = M.Neighbourhood(H, lm, M.COS_RADIUS_MM)
    h, p = nb.array(H), nb.array(P)
    m_cos, m_sharp = nb.ball(M.COS_RADIUS_MM), nb.ball(M.SHARP_RADIUS_MM)
    u_ap, u_lr, _ = M.disc_axes(disc, case.posterior_margin)
    dh = case.condition.startswith("dh")
    disc_ref = M.disc_reference(H, disc) if dh else None

    def geom(img, arr, ref_arr):
        if dh:
            return M.protrusion_mm3(arr, ref_arr, h, nb, disc_ref, case.posterior_margin, u_ap)
        return M.canal_area_mm2(img, H, lm, u_ap, u_lr)

    truth_geom, healthy_geom = geom(P, p, h), geom(H, h, h)
    grad_p = M.mean_gradient(p, nb.spacing, m_sharp)
    norm = crop_normalization(H, disc)
    crops = {"H": crop(H, lm, norm)[None], "P": crop(P, lm, norm)[None]}
    reader = ctx.reader
    rec = {"key": case.key, "seed": case.seed, "level": case.level, "condition": case.condition,
           "sigma_requested": sigma, "fingerprint": ctx.case_fp(case.condition), "landmark_lps": list(lm),
           "disc_center_lps": list(disc),
           "geom_metric": "protrusion_mm3" if dh else "canal_area_mm2", "geom_truth": truth_geom,
           "geom_healthy": healthy_geom, "truth_info": {k: v for k, v in case.info.items() if k != "landmark_RAS_mm"},
           "present_truth": float(reader.present_prob(crops["P"], case.condition)[0]) if reader else None,
           "present_healthy": float(reader.present_prob(crops["H"], case.condition)[0]) if reader else None,
           "methods": {}, "rows": []}
    fig = case.seed in s.get("figure_seeds", [])
    arrays = {"crop_H": crops["H"], "crop_P": crops["P"], "feat_P": ctx.feats(crops["P"])}
    if fig:
        for name, img in (("H", H), ("P", P)):
            for v, a in views(img, case).items():
                arrays[f"view_{v}_{name}"] = a.astype(np.float32)
    vol_dir = ctx.out / "cases" / case.key if s["save_volumes"] else None
    if vol_dir is not None:
        from spine_ldm.io import write_volume

        write_volume(H, vol_dir / "healthy.nrrd")
        write_volume(P, vol_dir / "truth.nrrd")
        (vol_dir / "landmark.json").write_text(json.dumps({
            "space": "LPS", "landmark_lps": list(lm), "disc_center_lps": list(disc), "seed": case.seed,
            "level": case.level, "condition": case.condition, "truth": rec["truth_info"]}, indent=2) + "\n")
    recon_cache: dict = {}
    for method in s["methods"]:
        kw = {}
        if sigma is not None:
            kw["sigma_mm"] = float(sigma)
        if s["paste_mode"]:
            kw["paste_mode"] = s["paste_mode"]
        if s.get("decode_quantize") is not None:
            kw["decode_quantize"] = s["decode_quantize"]
        if method == "repaint":
            kw["repaint_resample"] = s["repaint_resample"]
        elif s.get("guidance_scale") is not None:
            kw["guidance_scale"] = s["guidance_scale"]
        tc = time.process_time()
        res = pipeline.inpaint(H, lm, case.level, case.condition, method=method, samples=s["samples"],
                               seed=CS.sample_seed(case.seed), steps=s["steps"], device=s["device"],
                               model=s["models"].get(method), disc_center_lps=disc, registry=s["registry"], **kw)
        cpu = time.process_time() - tc
        prov = res.provenance
        mid = prov["model_id"]
        _check_model_seeds(ctx, mid, case.seed)
        sig = float(prov["sigma_mm"])
        mode = prov.get("paste_mode", "blend")
        recon_h = res.fsu_reconstruction
        # the benchmark's composition must be the pipeline's: recompose sample 1 and compare
        again = sitk.GetArrayFromImage(compose(H, res.fsu_outputs[0], lm, prov, recon_h))
        if not np.array_equal(again, sitk.GetArrayFromImage(res.outputs[0])):
            raise RuntimeError(f"the benchmark's paste-back differs from the pipeline's output ({method}, {mid}); "
                               f"model_training.benchmark.run.compose must follow pipeline.inpaint")
        shas = prov.get("weights_sha256")
        ae = shas.get("autoencoder", mid) if isinstance(shas, dict) else mid
        ckey = (ae, tuple(prov.get("fsu_shape", ())), tuple(prov.get("fsu_size_mm", ())), sig, mode,
                prov.get("decode_quantize"))  # one per AE and decode
        if ckey not in recon_cache:
            # the truth's own reconstruction: the frame, normalisation, autoencoder and decode of the output
            _, recon_p = pipeline.reconstruct(P, lm, case.condition, method, model=mid, disc_center_lps=disc,
                                              device=s["device"], registry=s["registry"],
                                              decode_quantize=prov.get("decode_quantize"))
            ceiling = compose(H, recon_p, lm, prov, recon_h)
            null = compose(H, recon_h, lm, prov, recon_h)
            c_arr, null_arr = nb.array(ceiling), nb.array(null)
            p_fsu = M.through_grid(P, res.fsu_input, nb)
            cc, cr = M.cos_r2(c_arr, h, p, m_cos)
            grad_pf = M.mean_gradient(p_fsu, nb.spacing, m_sharp)
            c_crop = crop(ceiling, lm, norm)[None]
            recon_cache[ckey] = {
                "cos": cc, "r2": cr, "grad_pfsu": grad_pf,
                "sharp": M.mean_gradient(c_arr, nb.spacing, m_sharp) / grad_pf,
                "geom": geom(ceiling, c_arr, null_arr), "null_arr": null_arr, "crop": c_crop,
                "present": float(reader.present_prob(c_crop, case.condition)[0]) if reader else None}
        ce = recon_cache[ckey]
        g_crops, rows = [], []
        for k, G in enumerate(res.outputs):
            g = nb.array(G)
            cos, r2 = M.cos_r2(g, h, p, m_cos)
            grad_g = M.mean_gradient(g, nb.spacing, m_sharp)
            gm = geom(G, g, ce["null_arr"])
            g_crops.append(crop(G, lm, norm))
            rows.append({
                "seed": case.seed, "level": case.level, "condition": case.condition, "method": method,
                "sample": k + 1, "sigma_mm": sig, "paste_mode": mode, "model_id": mid, "cos": cos, "r2": r2,
                "sharp": grad_g / ce["grad_pfsu"], "sharp_native": grad_g / grad_p, "geom_metric": rec["geom_metric"],
                "geom": gm, "geom_truth": truth_geom, "geom_healthy": healthy_geom,
                "geom_ratio": _ratio(gm, truth_geom, healthy_geom), "cos_ceiling": ce["cos"],
                "r2_ceiling": ce["r2"], "sharp_ceiling": ce["sharp"],
                "geom_ceiling_ratio": _ratio(ce["geom"], truth_geom, healthy_geom),
                "nfe": int(res.nfe), "seconds": round(float(res.seconds), 3), "cpu_seconds": round(cpu, 3),
                "seconds_per_sample": round(float(res.seconds) / s["samples"], 3)})
        g_crops = np.stack(g_crops)
        if reader:
            pp = reader.present_prob(g_crops, case.condition)
            cls = reader.predicted(g_crops)
            for r, v, c in zip(rows, pp, cls):
                r.update(present_prob=float(v), present=int(v > 0.5), reader_class=c,
                         present_ceiling=ce["present"])
        rec["rows"] += rows
        rec["methods"][method] = {"model_id": mid, "weights_sha256": prov.get("weights_sha256"),
                                  "sigma_mm": sig, "paste_mode": mode, "nfe": int(res.nfe),
                                  "seconds": float(res.seconds), "cpu_seconds": cpu, "sampler": prov.get("sampler"),
                                  "repaint_resample": prov.get("repaint_resample"),
                                  "ms_ssim_3d": _diversity_3d(g_crops), "ms_ssim_2d": _diversity_2d(g_crops)}
        arrays[f"crop_G_{method}"] = g_crops
        arrays[f"crop_C_{method}"] = ce["crop"]
        n_fid = len(g_crops) if s["fid_samples"] <= 0 else min(s["fid_samples"], len(g_crops))
        arrays[f"feat_G_{method}"] = ctx.feats(g_crops[:n_fid])
        if fig:
            for k, G in enumerate(res.outputs):
                for v, a in views(G, case).items():
                    arrays[f"view_{v}_{method}_{k + 1}"] = a.astype(np.float32)
        if vol_dir is not None:
            from spine_ldm.io import write_volume

            header = pipeline.provenance_header
            suffix = "" if not s["sweep"] else f"_s{sig:g}"
            for k, (G, pv) in enumerate(zip(res.outputs, res.provenances or [prov] * len(res.outputs))):
                write_volume(G, vol_dir / f"{method}{suffix}_{k + 1}.nrrd", metadata=header(pv))
    return rec, arrays


def _ratio(x, truth, healthy) -> float:
    d = truth - healthy
    return float((x - healthy) / d) if np.isfinite(x) and abs(d) > 1e-9 else float("nan")


def _diversity_3d(crops) -> float:
    from ..evaluate import ms_ssim_diversity

    return ms_ssim_diversity(crops)


def _diversity_2d(crops) -> float:
    """Mean pairwise MS-SSIM of the K samples per sagittal slice (2-D MONAI MS-SSIM, kernel 5 x 5), averaged over
    slices and pairs; NaN when K < 2."""
    import itertools

    import torch

    from ..evaluate import ms_ssim_metric

    x = torch.as_tensor(np.asarray(crops), dtype=torch.float32)
    if x.shape[0] < 2:
        return float("nan")
    m = ms_ssim_metric(tuple(x.shape[1:3]), kernel=(5, 5))
    pairs = list(itertools.combinations(range(x.shape[0]), 2))
    a = torch.cat([x[i].permute(2, 0, 1) for i, _ in pairs])[:, None]  # (pairs * LR, 1, SI, AP)
    b = torch.cat([x[j].permute(2, 0, 1) for _, j in pairs])[:, None]
    return float(m(a, b).mean())


def _check_model_seeds(ctx: Context, model_id: str, seed: int) -> None:
    """A model the pipeline picked at run time must not have been trained on this seed either."""
    checked = ctx.s.setdefault("_checked_models", {})
    if model_id not in checked:
        from spine_ldm import registry as reg

        checked[model_id] = recorded_seeds(reg.resolve(model_id, ctx.s["registry"]))
    check_disjoint([seed], {model_id: checked[model_id]}, "benchmark")


# --------------------------------------------------------------------------- seeds -> cases (worker)
def _work_dir(out: Path) -> Path:
    d = Path(out) / WORK / "cases"
    d.mkdir(parents=True, exist_ok=True)
    gi = Path(out) / WORK / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")  # intermediate files never go into a commit of the results folder
    return d


def case_done(out: Path, name: str, fp: str) -> bool:
    f = _work_dir(out) / f"{name}.json"
    if not (f.is_file() and (f.with_suffix(".npz")).is_file()):
        return False
    try:
        return json.loads(f.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def run_seed(settings, out: str, fp: str, seed: int) -> list[str]:
    """Every (condition, sigma) case of one seed that is not done yet; returns the names written."""
    from ..common import cpu_threads

    # the caller's thread count is restored: with --jobs 1 this runs in the caller's process (tests, notebooks)
    with cpu_threads(settings["threads"]):
        return _run_seed(settings, out, fp, seed)


def _run_seed(settings, out: str, fp: str, seed: int) -> list[str]:
    ctx = _CTX.get((out, fp)) or Context(settings, Path(out), fp)
    _CTX[(out, fp)] = ctx
    level = CS.draw_level(seed, settings["levels"])
    todo = [(c, sg) for c in settings["conditions"] for sg in settings["sigmas"]
            if not case_done(Path(out), case_name(f"{seed}_{level}_{c}", sg), ctx.case_fp(c))]
    if not todo:
        return []
    healthy = CS.phantom(seed, spacing=settings["spacing"])
    written = []
    for cond in dict.fromkeys(c for c, _ in todo):
        case = CS.make_case(seed, level, cond, healthy, settings["spacing"])
        for c2, sg in todo:
            if c2 != cond:
                continue
            t, tc = time.time(), time.process_time()
            _check_unchanged(ctx)
            rec, arrays = run_case(ctx, case, sg)
            _check_unchanged(ctx)  # a case that may have run on new weights is not kept
            # wall time depends on what else runs on the machine; CPU time of this process does much less
            rec["case_seconds"] = round(time.time() - t, 2)
            rec["case_cpu_seconds"] = round(time.process_time() - tc, 2)
            name = case_name(case.key, sg)
            d = _work_dir(Path(out))
            tmp = d / f".{name}.{os.getpid()}.npz"
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, d / f"{name}.npz")
            tmpj = d / f".{name}.{os.getpid()}.json"
            tmpj.write_text(json.dumps(rec, default=_json_default) + "\n")
            os.replace(tmpj, d / f"{name}.json")
            written.append(name)
            if not settings.get("quiet"):
                summ = ", ".join(f"{m} cos {np.nanmean([r['cos'] for r in rec['rows'] if r['method'] == m]):+.2f}"
                                 for m in settings["methods"])
                print(f"[benchmark] {name}: {summ} (ceiling {rec['rows'][0]['cos_ceiling']:+.2f}) "
                      f"{rec['case_seconds']:.0f} s", flush=True)
    return written


_CTX: dict = {}


def _check_unchanged(ctx: Context) -> None:
    if fingerprint(ctx.s, ctx.reader_sha) != ctx.fp:
        raise InputError(f"the model registry {registry_file(ctx.s)} changed while the benchmark ran (new "
                         f"weights?); run the command again (cases of the old weights are then recomputed)")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def run_benchmark(settings: dict, out, log=print, report_only: bool = False, argv=None) -> dict:
    """Run (or continue) the benchmark and build the report; returns the summary dict."""
    from . import report
    from .readers import load_reader

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reader = None if settings["reader"] == "none" else load_reader(settings["reader"], settings["registry"])
    fp = fingerprint(settings, _reader_sha(reader))
    used = check_seeds(settings, reader.entry if reader else None, log)
    settings["figure_seeds"] = settings["seeds"][:max(0, settings["figure_cases"])]
    t0 = time.time()
    if not report_only:
        seeds = settings["seeds"]
        jobs = min(settings["jobs"], len(seeds))
        log(f"[benchmark] {len(seeds)} seed(s) x {len(settings['conditions'])} condition(s) x "
            f"{len(settings['methods'])} method(s) x {settings['samples']} sample(s), "
            f"{len(settings['sigmas'])} sigma(s); {jobs} process(es) -> {out}")
        if jobs == 1:
            for sd in seeds:
                run_seed(settings, str(out), fp, sd)
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futs = [pool.submit(run_seed, settings, str(out), fp, sd) for sd in seeds]
                for f in cf.as_completed(futs):
                    f.result()
    run_seconds = time.time() - t0
    case_fps = {c: fingerprint(settings, _reader_sha(reader), c) for c in settings["conditions"]}
    meta = {"command": "python -m model_training " + " ".join(argv or ["benchmark-phantoms"]),  # argv: the CLI's
            "fingerprint": fp, "case_fingerprints": case_fps, "run_seconds": round(run_seconds, 1),
            "platform": platform.platform(),
            "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "training_seeds_recorded": {k: v is not None for k, v in used.items()},
            "reader": _reader_meta(reader), "registry": str(registry_file(settings))}
    return report.build(out, settings, case_fps, meta, log=log)


def _reader_sha(reader) -> str | None:
    if reader is None:
        return None
    return (reader.entry.get("file") or {}).get("sha256") or reader.entry.get("sha256")


def _reader_meta(reader) -> dict | None:
    if reader is None:
        return None
    e = reader.entry
    return {"id": e.get("id"), "sha256": _reader_sha(reader), "heldout": (e.get("training") or {}).get("heldout")}


# --------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--seeds", required=True, help="phantom seeds, e.g. 1000-1019 (must not be training seeds)")
    p.add_argument("--conditions", default=",".join(PATHOLOGIES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=3, help="K samples per case and method (one batch)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--levels", default=",".join(CS.DEFAULT_LEVELS),
                   help="levels; one is drawn per seed (default %(default)s)")
    p.add_argument("--models", action="append", metavar="METHOD=ID[,METHOD=ID]",
                   help="model per method (default: the pipeline's default model per method and condition)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sigma-mm", type=float, default=None, help="Gaussian sigma (default: the model's own)")
    p.add_argument("--sigma-sweep", help="comma list of sigmas, e.g. 8,12,16,24,32: every case at each sigma")
    p.add_argument("--paste-mode", choices=("change", "blend"), default=None,
                   help="paste-back mode passed to the pipeline (default: the pipeline's default)")
    p.add_argument("--decode-quantize", choices=("on", "off"), default=None,
                   help="snap sampled latents to the VQ codebook before decoding (default: the model config's "
                        "sampling.decode_quantize)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale for the weighted / masked models (default: each model's own)")
    p.add_argument("--repaint-resample", type=int, default=DEFAULT_REPAINT_RESAMPLE,
                   help="RePaint resamplings (paper 10 = 410 network evaluations at 50 steps; default %(default)s = "
                        "210, to fit 20 seeds x 4 conditions in an hour on 2 CPU cores)")
    p.add_argument("--save-volumes", action="store_true",
                   help="write DIR/cases/<seed>_<level>_<condition>/{healthy,truth,<method>_<k>}.nrrd + landmark.json")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one seed at a time each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0 = torch default)")
    p.add_argument("--spacing", help="phantom spacing AP,SI,LR mm (default: the bundled models' training spacing "
                                     f"{','.join(f'{v:g}' for v in CS.PHANTOM_SPACING)})")
    p.add_argument("--device", default="auto")
    p.add_argument("--registry", help="Models.json (default: the package registry / SPINE_LDM_REGISTRY)")
    p.add_argument("--reader", default=None, help="present-reader id in the registry, a .pt file, or none "
                                                  "(default: the bundled phantom-present-reader)")
    p.add_argument("--features", default="inception", help="FID/KID features: inception | random | FILE | none")
    p.add_argument("--fid-slices", type=int, default=6,
                   help="central sagittal slices of each crop that go into FID/KID (0 = all 16; default "
                        "%(default)s = +-9 mm around the landmark)")
    p.add_argument("--fid-samples", type=int, default=1,
                   help="samples per case that go into FID/KID (0 = all K; default %(default)s)")
    p.add_argument("--figure-cases", type=int, default=4, help="rows (first seeds) of the per-condition figures")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and figures from DIR/.work")
    p.add_argument("--quiet", action="store_true")


def main_benchmark(args, argv=None) -> int:
    settings = settings_from_args(args)
    settings["quiet"] = bool(args.quiet)
    if settings["reader"] is None:
        from .readers import DEFAULT_READER_ID

        settings["reader"] = DEFAULT_READER_ID
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    run_benchmark(settings, args.out, log=log, report_only=args.report_only, argv=argv)
    return 0


__all__ = ["run_benchmark", "run_case", "add_arguments", "main_benchmark", "compose", "format_seeds"]
