"""Synthetic lumbar sagittal T2 phantom with paired, parametric pathology.

>>> from spine_ldm.phantom import generate, write_case, LABELS
>>> case = generate(seed=0, dh={"L4-L5": "moderate_large"}, ccs={"L3-L4": "severe"})
>>> paths = write_case(case, "out/")   # t2.nrrd, labels.nrrd, landmarks.json

Geometry (like a sagittal DICOM series): ITK axes ``i`` = columns, anterior -> posterior, direction (0, 1, 0);
``j`` = rows, superior -> inferior, direction (0, 0, -1); ``k`` = slices, patient left -> right, direction
(-1, 0, 0) (determinant +1). ``spacing`` is given in that order: (in-plane AP, in-plane SI, slice LR) mm; the
default (0.625, 0.625, 4.3) gives 448 x 448 x 15 voxels. The field of view is fixed in millimetres
(280 AP x 280 SI x 64.5 LR, centred at LPS (0, 0, 0)), so any spacing puts the anatomy at the same physical
place; ``shape=(ni, nj, nk)`` overrides the voxel counts (field of view = shape x spacing, same centre).
The numpy array (``sitk.GetArrayFromImage``) is ``[k, j, i]`` = (LR, SI, AP): ``arr[k]`` is a sagittal slice with
superior up and anterior left.

Image: float32, T2-like arbitrary units (fat ~ 800, CSF ~ 930, nucleus ~ 650-750, marrow ~ 330-430,
muscle ~ 185, annulus / ligaments ~ 90-110, cortical bone ~ 40), with slice-thickness partial volume (box slice
profile, odd number of sub-slices ~0.9 mm apart), fine and coarse tissue texture, a small in-plane blur
(0.35 mm), a smooth multiplicative bias field and Rician noise (``noise=False`` turns only the Rician noise off).
Labels: uint8, the tissue at each voxel centre; values in :data:`LABELS`.

Pairing: the seed is split (``numpy.random.SeedSequence(seed).spawn``) into fixed streams for anatomy, texture,
bias, noise and one stream per (pathology, level). The anatomy, texture, bias and noise never depend on the
pathology flags, and every pathology acts through shapes with compact support, so ``generate(seed, dh=...)``
minus ``generate(seed)`` is exactly zero farther than 25 mm from a DH landmark and 27 mm from a CCS landmark
(the facet hypertrophy reaches the lateral recesses).

Severity ranges: see :mod:`spine_ldm.phantom.pathology`. Label values: :data:`LABELS`
(:mod:`spine_ldm.phantom.labels`): 1-5 L1-L5 bodies, 6 sacrum, 7 T12, 8 T11, 9-15 disc annulus (T11-T12 .. L5-S1;
11-15 = L1-L2 .. L5-S1), 19-25 disc nucleus (21-25 = L1-L2 .. L5-S1), 30 CSF, 31 cord / conus / cauda / roots,
32 epidural fat, 33 posterior element marrow, 34 cortical bone and endplates, 35 ligamentum flavum, 36 muscle,
37 subcutaneous fat, 38 ligaments, 39 psoas, 40 herniated disc material, 41 herniation rim, 42 facet joint,
43 basivertebral vein, 50 abdomen / pelvis, 51 aorta / IVC, 52 skin.

``landmarks`` / ``landmarks.json`` (all points in LPS and RAS mm, RAS = (-x, -y, z)):
``space``, ``seed``, ``spacing``, ``size``, ``origin_LPS_mm``, ``direction``; ``discs[level]``: ``center_*``
(disc centre), ``posterior_margin_*`` (midline posterior disc margin), ``herniation_landmark_*`` ({condition:
point}: where the landmark of a herniation to create on this disc goes, ``geometry.herniation_landmark``), height,
depth, label values;
``vertebrae[T12..S1]``: body centres; ``canal[level]``: ``area_mm2`` (thecal sac cross-section perpendicular to
the canal, measured on the label map), ``ap_mm``, ``center_*`` (sac centre at the disc level);
``pathologies``: list of ``{condition, level, landmark_LPS_mm, landmark_RAS_mm, volume_mm3 (DH; None for CCS), ...}``
with the drawn parameters (``protrusion_mm`` ... / ``area_reduction``); ``conus_tip_LPS_mm``; ``labels``;
``label_voxels``; ``severity_ranges``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..conditions import LEVELS, parse_condition, parse_level
from ..errors import InputError
from ..geometry import HERNIATION_CENTRE_MM, herniation_landmark
from . import labels as _lab
from .anatomy import build as _build_anatomy
from .labels import LABELS
from .pathology import (CCS_REDUCTION, CCS_SEVERITIES, DH_PROTRUSION_MM, DH_SEVERITIES, draw_herniation,
                        draw_stenosis)
from .render import DIRECTION as _DIR
from .render import Grid, form_image, render_labels, subslices_per_slice

try:  # the one home of LPS <-> RAS
    from ..geometry import lps_to_ras as _lps_to_ras
except ImportError:  # pragma: no cover - geometry.py not there yet
    def _lps_to_ras(p):
        x, y, z = (float(v) for v in p)
        return (-x, -y, z)

__all__ = ["generate", "write_case", "generate_to_dir", "LABELS", "PhantomCase", "DEFAULT_SPACING", "FOV_MM",
           "DH_PROTRUSION_MM", "CCS_REDUCTION"]

DEFAULT_SPACING = (0.625, 0.625, 4.3)
FOV_MM = (280.0, 280.0, 64.5)  # (AP, SI, LR) = ITK axes (i, j, k)
MAX_VOXELS = 25_000_000  # ~1 GB peak memory
_STREAMS = ("anatomy", "texture", "bias", "noise") + tuple(f"dh:{lv}" for lv in LEVELS) + tuple(
    f"ccs:{lv}" for lv in LEVELS)


@dataclass
class PhantomCase:
    image: sitk.Image  # float32, LPS geometry
    labels: sitk.Image  # uint8 label map on the same grid
    landmarks: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.landmarks.get("seed")


def _r3(p):
    return [round(float(v), 3) for v in p]


def _norm_severity(kind: str, sev) -> str:
    allowed = DH_SEVERITIES if kind == "dh" else CCS_SEVERITIES
    s = str(sev).strip().lower().replace("-", "_").replace("/", "_")
    if s.startswith(kind + "_"):
        s = parse_condition(s)[len(kind) + 1:]
    if kind == "dh" and s in ("moderate", "large", "mod_large"):
        s = "moderate_large"
    if s not in allowed:
        raise InputError(f"{kind} severity {sev!r} unknown; expected one of {', '.join(allowed)}")
    return s


def _parse_pathologies(dh, ccs, pathologies):
    out = {"dh": {}, "ccs": {}}
    for kind, spec in (("dh", dh), ("ccs", ccs)):
        if not spec:
            continue
        items = spec.items() if isinstance(spec, dict) else (str(x).replace("=", ":").split(":", 1) for x in spec)
        for lv, sev in items:
            out[kind][parse_level(lv)] = _norm_severity(kind, sev)
    for lv, conds in (pathologies or {}).items():
        for cond in ([conds] if isinstance(conds, str) else conds):
            c = parse_condition(cond)
            if c == "none":
                continue
            kind, sev = c.split("_", 1)
            out[kind][parse_level(lv)] = sev
    return out


def _check_spacing(spacing):
    try:
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be 3 numbers (mm), got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(v) for v in sp):
        raise InputError(f"spacing must be 3 finite numbers (mm), got {spacing!r}")
    for v in sp:
        if not 0.1 <= v <= 20.0:
            raise InputError(f"spacing {v} mm is outside 0.1 - 20 mm")
    return sp


def generate(seed: int = 0, spacing=DEFAULT_SPACING, dh=None, ccs=None, shape=None, noise: bool = True,
             pathologies=None) -> PhantomCase:
    """One phantom case.

    ``dh`` / ``ccs``: dict level -> severity (``{"L4-L5": "moderate_large"}``; DH ``small | moderate_large``, CCS
    ``moderate | severe``) or a list of ``"LEVEL:SEVERITY"`` strings. ``pathologies``: alternative dict
    level -> condition name(s) (``{"L4-L5": "dh_small"}``). ``shape``: voxel counts (ni, nj, nk) overriding the
    default field of view. Raises :class:`InputError` on bad arguments.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    sp = _check_spacing(spacing)
    if shape is None:
        size = tuple(max(1, int(round(f / s))) for f, s in zip(FOV_MM, sp))
    else:
        try:
            size = tuple(int(v) for v in shape)
        except (TypeError, ValueError):
            raise InputError(f"shape must be 3 positive integers (ni, nj, nk), got {shape!r}") from None
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"shape must be 3 positive integers (ni, nj, nk), got {shape!r}")
    nvox = size[0] * size[1] * size[2]
    if nvox > MAX_VOXELS:
        raise InputError(f"phantom of {size[0]}x{size[1]}x{size[2]} = {nvox / 1e6:.0f} M voxels exceeds the "
                         f"{MAX_VOXELS / 1e6:.0f} M limit by {nvox / MAX_VOXELS:.1f}x; use a coarser spacing")
    path = _parse_pathologies(dh, ccs, pathologies)

    streams = dict(zip(_STREAMS, np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))))
    rng = {k: np.random.default_rng(v) for k, v in streams.items()}
    anat = _build_anatomy(rng["anatomy"])
    dhs = [draw_herniation(rng[f"dh:{lv}"], lv, sev) for lv, sev in sorted(path["dh"].items())]
    ccss = [draw_stenosis(rng[f"ccs:{lv}"], lv, sev) for lv, sev in sorted(path["ccs"].items())]

    grid = Grid.centred(sp, size)
    S = subslices_per_slice(sp[2])
    lv, info = render_labels(anat, dhs, ccss, grid, S)
    tables = _lab.intensity_tables(anat.marrow, anat.nucleus)
    arr, lab = form_image(lv, grid, S, tables, rng["texture"], rng["bias"], rng["noise"], noise, anat)

    image = sitk.GetImageFromArray(arr)
    labels = sitk.GetImageFromArray(lab)
    for im in (image, labels):
        im.SetSpacing(grid.spacing)
        im.SetOrigin(tuple(float(v) for v in grid.origin))
        im.SetDirection(grid.direction_tuple())
    landmarks = _landmarks(anat, dhs, ccss, grid, lab, int(seed), sp, info)
    return PhantomCase(image, labels, landmarks)


def _lps(anat, s, n, x=None):
    y, z = anat.curve.point(s, n)
    if x is None:
        x = float(anat.xm(np.array([s], np.float32))[0])
    return (float(x), float(y), float(z))


def _sample_labels(lab, grid: Grid, pts_lps):
    """Nearest-neighbour label values at LPS points (outside -> 0)."""
    idx = np.linalg.solve(np.asarray(_DIR), (np.asarray(pts_lps) - grid.origin).T).T / np.asarray(grid.spacing)
    ii = np.rint(idx).astype(int)
    ok = np.all((ii >= 0) & (ii < np.asarray(grid.size)), axis=1)
    out = np.zeros(len(ii), lab.dtype)
    v = ii[ok]
    out[ok] = lab[v[:, 2], v[:, 1], v[:, 0]]
    return out


def canal_cross_section(anat, lab, grid: Grid, level: str, step: float = 0.2):
    """Thecal sac (CSF + neural labels) area in mm^2 and AP extent in mm, perpendicular to the canal at the disc
    level, measured on the label map by nearest-neighbour sampling (``step`` mm); only the connected region at the
    sac centre counts (not nerve roots that already left the sac)."""
    s_l = anat.gap_s[level]
    xm = float(anat.xm(np.array([s_l], np.float32))[0])
    ns = np.arange(-5.0, 30.0, step)
    xs = np.arange(-25.0, 25.0, step)
    yz = anat.curve.point(np.full(ns.size, s_l), ns)
    pts = np.empty((ns.size, xs.size, 3))
    pts[..., 0] = xm + xs[None, :]
    pts[..., 1] = yz[:, None, 0]
    pts[..., 2] = yz[:, None, 1]
    v = _sample_labels(lab, grid, pts.reshape(-1, 3)).reshape(ns.size, xs.size)
    inside = np.isin(v, _lab.CANAL_LABELS)
    # the thecal sac is the connected CSF/neural region at the sac centre (exiting roots outside it do not count)
    cc, ncc = ndimage.label(inside)
    if ncc > 1:
        nc, _, _ = anat.sac(np.array([s_l], np.float32))
        c = cc[int(np.argmin(np.abs(ns - float(nc[0])))), int(np.argmin(np.abs(xs)))]
        inside = cc == (c if c else 1 + int(np.argmax(np.bincount(cc.ravel())[1:])))
    rows = np.flatnonzero(inside.any(axis=1))
    ap = float((rows[-1] - rows[0] + 1) * step) if rows.size else 0.0
    return float(inside.sum() * step * step), ap


def _landmarks(anat, dhs, ccss, grid, lab, seed, sp, info):
    gap = {g.name: g for g in anat.gaps}
    vox = float(np.prod(grid.spacing))
    discs = {}
    for lv in LEVELS:
        g = gap[lv]
        x = float(anat.xm(np.array([anat.gap_s[lv]], np.float32))[0])
        c = (x, float(g.c[0]), float(g.c[1]))
        pm = g.point(0.0, g.D / 2 + 0.8)
        pmp = (x, float(pm[0]), float(pm[1]))
        hl = {k: herniation_landmark(pmp, c, k) for k in HERNIATION_CENTRE_MM}
        discs[lv] = {"center_LPS_mm": _r3(c), "center_RAS_mm": _r3(_lps_to_ras(c)),
                     "posterior_margin_LPS_mm": _r3(pmp), "posterior_margin_RAS_mm": _r3(_lps_to_ras(pmp)),
                     "herniation_landmark_LPS_mm": {k: _r3(v) for k, v in hl.items()},
                     "herniation_landmark_RAS_mm": {k: _r3(_lps_to_ras(v)) for k, v in hl.items()},
                     "height_mm": round(g.h_mid, 2), "depth_mm": round(g.D, 2),
                     "annulus_label": _lab.DISC_LABELS[lv][0], "nucleus_label": _lab.DISC_LABELS[lv][1]}
    vertebrae = {}
    for sg in anat.segments:
        if sg.name in ("T12", "L1", "L2", "L3", "L4", "L5", "S1"):
            x = float(anat.xm(np.array([0.5 * sum(anat.seg_s[sg.name])], np.float32))[0])
            c = (x, float(sg.c[0]), float(sg.c[1]))
            vertebrae[sg.name] = {"center_LPS_mm": _r3(c), "center_RAS_mm": _r3(_lps_to_ras(c)),
                                  "label": _lab.BODY_LABEL[sg.name]}
    canal = {}
    for lv in LEVELS:
        nc, an, ax = anat.sac(np.array([anat.gap_s[lv]], np.float32))
        area, ap = canal_cross_section(anat, lab, grid, lv)
        c = _lps(anat, anat.gap_s[lv], float(nc[0]))
        canal[lv] = {"area_mm2": round(area, 1), "ap_mm": round(ap, 2),
                     "healthy_model_area_mm2": round(float(np.pi * an[0] * ax[0]), 1),
                     "center_LPS_mm": _r3(c), "center_RAS_mm": _r3(_lps_to_ras(c))}
    paths = []
    counts = np.bincount(lab.ravel(), minlength=256)
    for hn in dhs:
        h = info["herniation"][hn.level]
        p = _lps(anat, h["s"], h["n"], h["x"])
        # volume of this herniation: count labels 40/41 near it (several DH levels are > 25 mm apart)
        vol = _label_volume_near(lab, grid, p, (_lab.HERNIATION, _lab.HERNIATION_RIM), 25.0) * vox
        paths.append({"condition": hn.condition, "level": hn.level, "landmark_LPS_mm": _r3(p),
                      "landmark_RAS_mm": _r3(_lps_to_ras(p)), "volume_mm3": round(vol, 1),
                      "protrusion_mm": round(hn.protrusion, 2), "half_width_mm": round(hn.half_width, 2),
                      "half_height_mm": round(hn.half_height, 2), "lateral_offset_mm": round(hn.lateral, 2)})
    for cs in ccss:
        nc, _, _ = anat.sac(np.array([anat.gap_s[cs.level]], np.float32))
        p = _lps(anat, anat.gap_s[cs.level], float(nc[0]))
        paths.append({"condition": cs.condition, "level": cs.level, "landmark_LPS_mm": _r3(p),
                      "landmark_RAS_mm": _r3(_lps_to_ras(p)), "volume_mm3": None,
                      "area_reduction": round(cs.reduction, 4),
                      "area_reduction_range": list(CCS_REDUCTION[cs.severity]),
                      "canal_area_mm2": canal[cs.level]["area_mm2"]})
    return {
        "space": "LPS", "seed": seed, "spacing": [float(v) for v in sp], "size": list(grid.size),
        "origin_LPS_mm": _r3(grid.origin), "direction": list(grid.direction_tuple()),
        "image_dtype": "float32", "discs": discs, "vertebrae": vertebrae, "pathologies": paths, "canal": canal,
        "conus_tip_LPS_mm": _r3(_lps(anat, anat.s_conus, float(anat.sac(np.array([anat.s_conus], np.float32))[0][0]))),
        "labels": {str(k): v for k, v in LABELS.items()},
        "label_voxels": {str(k): int(counts[k]) for k in LABELS if counts[k]},
        "severity_ranges": {"dh_protrusion_mm": {k: list(v) for k, v in DH_PROTRUSION_MM.items()},
                            "ccs_area_reduction": {k: list(v) for k, v in CCS_REDUCTION.items()}},
        "generator": "spine_ldm.phantom",
    }


def _label_volume_near(lab, grid: Grid, p_lps, values, radius):
    idx = grid.index_of(p_lps)
    r = radius / np.asarray(grid.spacing)
    lo = np.maximum(np.floor(idx - r).astype(int), 0)
    hi = np.minimum(np.ceil(idx + r).astype(int) + 1, np.asarray(grid.size))
    sub = lab[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    return float(np.isin(sub, values).sum())


def write_case(case: PhantomCase, out_dir) -> dict:
    """Write ``t2.nrrd`` (float32), ``labels.nrrd`` (uint8) and ``landmarks.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = case.landmarks
    img = sitk.Image(case.image)
    img.SetMetaData("spine_ldm_phantom_seed", str(lm.get("seed")))
    img.SetMetaData("spine_ldm_phantom_pathologies",
                    json.dumps([{k: p[k] for k in ("condition", "level")} for p in lm.get("pathologies", [])]))
    paths = {"t2": str(out / "t2.nrrd"), "labels": str(out / "labels.nrrd"),
             "landmarks": str(out / "landmarks.json")}
    sitk.WriteImage(img, paths["t2"], True)
    sitk.WriteImage(case.labels, paths["labels"], True)
    with open(paths["landmarks"], "w") as f:
        json.dump(lm, f, indent=1)
    return paths


def generate_to_dir(out_dir, seed: int = 0, spacing=DEFAULT_SPACING, dh=None, ccs=None, pathologies=None,
                    shape=None, noise: bool = True) -> dict:
    """generate + write_case (what ``spine-ldm phantom`` calls). Returns the written paths and the pathologies."""
    case = generate(seed=seed, spacing=spacing, dh=dh, ccs=ccs, pathologies=pathologies, shape=shape, noise=noise)
    res = write_case(case, out_dir)
    res["pathologies"] = [{k: p[k] for k in ("condition", "level", "landmark_LPS_mm", "landmark_RAS_mm")}
                          for p in case.landmarks["pathologies"]]
    return res
