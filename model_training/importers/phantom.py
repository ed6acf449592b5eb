"""Phantom studies (``spine_ldm.phantom``) with a chosen pathology mix -> volumes on disk + manifest rows.

``import_phantoms(out_dir, n_studies, seed, mix={"dh_small": 0.2, ...}, spacing=...)``:

* **Mix**: ``mix[condition]`` is the fraction of studies that carry that pathology (one pathological level per
  study by default); the rest are healthy. Counts are ``round(fraction * n_studies)`` by largest remainder (so
  they add up), assigned to shuffled study slots with ``numpy.random.default_rng(seed)``; the pathological level
  of each study is drawn uniformly from ``levels`` (``level_weights={"L4-L5": 0.3, ...}`` draws them with those
  weights instead). ``pathologies_per_study=k`` puts ``k`` *different* pathologies at ``k`` distinct levels of
  each pathological study: the slot's own condition plus ``k - 1`` drawn from the mix's other pathologies
  (proportional to their fractions). The default mix is 0.2 of each of the four pathologies (0.2 healthy).
* **Studies**: study ``i`` is ``generate_to_dir(<out_dir>/phantom-s{seed}-{i:04d}, seed=<phantom seed>, ...)``
  (``t2.nrrd``, ``labels.nrrd``, ``landmarks.json``), with a phantom seed derived from ``(seed, i)``. A folder
  whose ``landmarks.json`` already records the same phantom seed, spacing and pathology is reused.
  ``healthy_twins=True`` also writes, for every pathological study, the same anatomy without pathology
  (``.../twin``; a healthy study has no twin: it would be the same image again); the twin rows get the
  **same study_id** (so a twin can never leak into another split) and their own image path.
* **Rows**: one per level per image. ``disc_center_lps`` = the generator's disc centre; ``condition`` = the
  pathology at its level, ``none`` elsewhere; ``landmark_lps`` = the generator's pathology landmark for the
  pathological level(s) (and for the same level(s) of the healthy twin: the exact spot where the pathology is
  missing); for the other healthy levels the candidate point set by ``healthy_landmark``: ``"posterior_margin"``
  (default; where a herniation would start), ``"canal"`` (thecal-sac centre at the disc level, where stenosis is
  graded) or ``"none"``. ``canal_lps`` = the generator's thecal-sac centre at the disc level
  (``landmarks.json`` ``canal[level]["center_LPS_mm"]``) on every row, twins included. ``source = "phantom"``,
  ``study_id = "phantom-s{seed}-{i:04d}"``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from spine_ldm.conditions import CONDITIONS, LEVELS, parse_condition, parse_level
from spine_ldm.errors import InputError

from ..manifest import Row

DEFAULT_MIX = {"dh_small": 0.2, "dh_moderate_large": 0.2, "ccs_moderate": 0.2, "ccs_severe": 0.2}


def _counts(mix: Mapping[str, float], n: int) -> dict[str, int]:
    fr = {parse_condition(k): float(v) for k, v in mix.items()}
    fr.pop("none", None)
    if any(not math.isfinite(v) or v < 0 for v in fr.values()) or sum(fr.values()) > 1.0 + 1e-9:
        raise InputError(f"pathology mix must be non-negative fractions summing to <= 1, got {dict(mix)}")
    fr["none"] = max(0.0, 1.0 - sum(fr.values()))
    raw = {k: v * n for k, v in fr.items()}
    cnt = {k: int(math.floor(v)) for k, v in raw.items()}
    order = sorted(raw, key=lambda k: (-(raw[k] - cnt[k]), CONDITIONS.index(k)))
    for k in order[: n - sum(cnt.values())]:
        cnt[k] += 1
    return cnt


def plan_studies(n_studies: int, seed: int, mix: Mapping[str, float] | None = None,
                 levels: Iterable[str] = LEVELS, *,
                 level_weights: Mapping[str, float] | None = None) -> list[tuple[str, str | None]]:
    """[(condition, level or None)] per study slot: the deterministic pathology plan of :func:`import_phantoms`
    with one pathology per study (see :func:`plan_pathologies` for several)."""
    out: list[tuple[str, str | None]] = []
    for p in plan_pathologies(n_studies, seed, mix, levels, level_weights=level_weights):
        out.append(("none", None) if not p else next((c, lv) for lv, c in p.items()))
    return out


def plan_pathologies(n_studies: int, seed: int, mix: Mapping[str, float] | None = None,
                     levels: Iterable[str] = LEVELS, *, pathologies_per_study: int = 1,
                     level_weights: Mapping[str, float] | None = None) -> list[dict[str, str]]:
    """{level: condition} per study slot (empty = healthy study); the plan of :func:`import_phantoms`.

    The first entry of each dict is the slot's own condition (drawn by the mix counts); with
    ``pathologies_per_study = k > 1`` the other ``k - 1`` conditions are drawn from the mix's remaining
    pathologies (probability proportional to their fraction, without repetition; fewer when the mix names fewer
    than ``k`` pathologies), and the ``k`` levels are distinct. ``level_weights`` (level -> weight, missing = 0)
    draws levels non-uniformly; default uniform.
    """
    if int(n_studies) < 1:
        raise InputError(f"n_studies must be >= 1, got {n_studies}")
    k = int(pathologies_per_study)
    if k < 1:
        raise InputError(f"pathologies_per_study must be >= 1, got {pathologies_per_study}")
    levels = [parse_level(lv) for lv in levels]
    if not levels:
        raise InputError("levels must name at least one level")
    if len(set(levels)) != len(levels):
        raise InputError(f"levels must be distinct, got {levels}")
    p_lv = None
    if level_weights is not None:
        w = {parse_level(lv): float(v) for lv, v in level_weights.items()}
        if any(not math.isfinite(v) or v < 0 for v in w.values()):
            raise InputError(f"level_weights must be non-negative numbers, got {dict(level_weights)}")
        p_lv = np.array([w.get(lv, 0.0) for lv in levels])
        if np.count_nonzero(p_lv) < k:
            raise InputError(f"level_weights give {np.count_nonzero(p_lv)} of the levels {', '.join(levels)} a "
                             f"positive weight; {k} pathologies per study need {k}")
        p_lv = p_lv / p_lv.sum()
    if k > len(levels):
        raise InputError(f"pathologies_per_study={k} needs {k} distinct levels, only {len(levels)} given")
    mix = DEFAULT_MIX if mix is None else mix
    cnt = _counts(mix, int(n_studies))
    frac = {parse_condition(c): float(v) for c, v in mix.items() if parse_condition(c) != "none" and float(v) > 0}
    slots = [c for c in CONDITIONS for _ in range(cnt.get(c, 0))]
    rng = np.random.default_rng([int(seed), 7177])
    rng.shuffle(slots)
    plan: list[dict[str, str]] = []
    for c in slots:
        if c == "none":
            plan.append({})
            continue
        if k == 1 and p_lv is None:  # the original draw (kept bit-identical for existing manifests)
            plan.append({levels[int(rng.integers(len(levels)))]: c})
            continue
        conds = [c]
        others = [o for o in CONDITIONS if o in frac and o != c]
        n_more = min(k - 1, len(others))
        if n_more:
            po = np.array([frac[o] for o in others])
            conds += [others[int(i)] for i in rng.choice(len(others), size=n_more, replace=False, p=po / po.sum())]
        lv_idx = rng.choice(len(levels), size=len(conds), replace=False, p=p_lv)
        plan.append({levels[int(i)]: cc for i, cc in zip(lv_idx, conds)})
    return plan


def _phantom_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0] % (2**31 - 1))


def _reusable(d: Path, pseed: int, spacing, patho: dict) -> dict | None:
    f = d / "landmarks.json"
    if not (f.is_file() and (d / "t2.nrrd").is_file()):
        return None
    try:
        lm = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    got = {p["level"]: p["condition"] for p in lm.get("pathologies", [])}
    if lm.get("seed") != pseed or got != patho or \
            not np.allclose(lm.get("spacing", []), [float(v) for v in spacing]):
        return None
    return lm


def _generate(d: Path, pseed: int, spacing, patho: dict, shape, noise, overwrite) -> dict:
    lm = None if overwrite else _reusable(d, pseed, spacing, patho)
    if lm is None:
        from spine_ldm.phantom import generate_to_dir

        generate_to_dir(d, seed=pseed, spacing=spacing, pathologies=patho or None, shape=shape, noise=noise)
        lm = json.loads((d / "landmarks.json").read_text())
    return lm


def _rows_for(lm: dict, image: Path, study_id: str, twin_points: Mapping[str, Iterable[float]],
              healthy_landmark: str, levels_out) -> list[Row]:
    rows = []
    sp = tuple(float(v) for v in lm["spacing"])
    found = {p["level"]: p for p in lm.get("pathologies", [])}
    for lv in levels_out:
        disc = lm["discs"][lv]
        canal = lm.get("canal", {}).get(lv, {}).get("center_LPS_mm")
        if lv in found:
            cond, point = found[lv]["condition"], tuple(found[lv]["landmark_LPS_mm"])
        elif lv in twin_points:  # healthy twin: where its sibling's pathology is
            cond, point = "none", tuple(twin_points[lv])
        else:
            cond = "none"
            point = {"posterior_margin": disc.get("posterior_margin_LPS_mm"), "canal": canal,
                     "none": None}[healthy_landmark]
            point = tuple(point) if point is not None else None
        rows.append(Row(study_id=study_id, image_path=str(image.resolve()), level=lv,
                        disc_center_lps=tuple(disc["center_LPS_mm"]), condition=cond, landmark_lps=point,
                        spacing=sp, split="", source="phantom",
                        canal_lps=tuple(canal) if canal is not None else None))
    return rows


def import_phantoms(out_dir: str | os.PathLike, n_studies: int, seed: int = 0,
                    mix: Mapping[str, float] | None = None, spacing=None, *, healthy_twins: bool = False,
                    levels: Iterable[str] = LEVELS, healthy_landmark: str = "posterior_margin", shape=None,
                    noise: bool = True, overwrite: bool = False, pathologies_per_study: int = 1,
                    level_weights: Mapping[str, float] | None = None, progress=None) -> list[Row]:
    """Generate ``n_studies`` phantom studies with the pathology ``mix`` (see module docstring) and return rows."""
    from spine_ldm.phantom import DEFAULT_SPACING

    if healthy_landmark not in ("posterior_margin", "canal", "none"):
        raise InputError(f"healthy_landmark must be posterior_margin, canal or none, got {healthy_landmark!r}")
    spacing = DEFAULT_SPACING if spacing is None else tuple(float(v) for v in spacing)
    plan = plan_pathologies(n_studies, seed, mix, levels, pathologies_per_study=pathologies_per_study,
                            level_weights=level_weights)
    out_dir = Path(out_dir)
    rows: list[Row] = []
    for i, patho in enumerate(plan):
        study = f"phantom-s{int(seed)}-{i:04d}"
        pseed = _phantom_seed(seed, i)
        d = out_dir / study
        lm = _generate(d, pseed, spacing, patho, shape, noise, overwrite)
        points = {p["level"]: p["landmark_LPS_mm"] for p in lm.get("pathologies", []) if p["level"] in patho}
        for level, cond in patho.items():
            if level not in points:
                raise InputError(f"phantom {study}: generator reported no landmark for {cond} at {level}")
        rows += _rows_for(lm, d / "t2.nrrd", study, points, healthy_landmark, LEVELS)
        if healthy_twins and patho:  # a healthy study's twin would be the same image again
            tw = d / "twin"
            lm_t = _generate(tw, pseed, spacing, {}, shape, noise, overwrite)
            rows += _rows_for(lm_t, tw / "t2.nrrd", study, points, healthy_landmark, LEVELS)
        if progress is not None:
            progress(i + 1, len(plan))
    return rows


__all__ = ["import_phantoms", "plan_studies", "plan_pathologies", "DEFAULT_MIX"]
