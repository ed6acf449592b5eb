"""FSU-level suggestion from the landmark.

Rule (documented in the panel tooltip): when disc centres are known, i.e. a markups point list whose control
point labels name lumbar levels ('L4-L5', 'L4/5', 'l4l5', ... any spelling ``spine_ldm.conditions.parse_level``
accepts), the suggested level is the label of the disc centre *nearest* (Euclidean, world RAS) to the landmark.
Points whose labels are not levels are ignored. With no labelled disc centre there is no suggestion and the level
stays what the user chose.

A herniation or a stenosis is described at the disc level it sits on, and a landmark placed on a disc's posterior
margin is always closer to that disc's centre (a few mm to ~2 cm) than to its neighbours' (one vertebral body,
~3.5-4.5 cm, further), so nearest-centre is robust without any anatomical model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from spine_ldm.conditions import parse_level


@dataclass
class LevelSuggestion:
    level: str
    distanceMm: float
    discCenterRas: tuple
    margin: float  # distance to the second-nearest level minus distance to the nearest (inf if only one)


def parseLevelLabel(label: str) -> Optional[str]:
    try:
        return parse_level(label)
    except Exception:
        return None


def suggestLevel(landmarkRas: Sequence[float], discCenters: Sequence[tuple]) -> Optional[LevelSuggestion]:
    """Nearest labelled disc centre. ``discCenters``: iterable of (label, (r, a, s))."""
    p = np.asarray(landmarkRas, dtype=float)
    best: dict[str, tuple[float, tuple]] = {}
    for label, position in discCenters:
        level = parseLevelLabel(label)
        if level is None:
            continue
        q = tuple(float(v) for v in position)
        d = float(np.linalg.norm(np.asarray(q) - p))
        if level not in best or d < best[level][0]:
            best[level] = (d, q)
    if not best:
        return None
    ranked = sorted(best.items(), key=lambda kv: kv[1][0])
    level, (distance, center) = ranked[0]
    margin = ranked[1][1][0] - distance if len(ranked) > 1 else float("inf")
    return LevelSuggestion(level=level, distanceMm=distance, discCenterRas=center, margin=margin)


def suggestLevelFromMarkups(landmarkNode, discCentersNode) -> Optional[LevelSuggestion]:
    """Suggestion from the first landmark point and a labelled disc-centre point list (None if impossible)."""
    from .nodes import controlPointWorld, labelledPointsWorld

    if landmarkNode is None or discCentersNode is None or landmarkNode.GetNumberOfControlPoints() == 0:
        return None
    return suggestLevel(controlPointWorld(landmarkNode, 0), labelledPointsWorld(discCentersNode))
