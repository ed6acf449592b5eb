"""FSU levels and pathology conditions: the one home for their names and indices."""
from __future__ import annotations

import re

from .errors import InputError

LEVELS: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
CONDITIONS: tuple[str, ...] = ("none", "dh_small", "dh_moderate_large", "ccs_moderate", "ccs_severe")
PATHOLOGIES = {"dh": ("small", "moderate_large"), "ccs": ("moderate", "severe")}
CONDITION_LABELS = {
    "none": "healthy",
    "dh_small": "DH-small",
    "dh_moderate_large": "DH-mod/large",
    "ccs_moderate": "CCS-moderate",
    "ccs_severe": "CCS-severe",
}
#: Classifier-free guidance scales accepted against the healthy condition "none" (1 = the plain conditional
#: prediction, 0 = the healthy one): the one home of the bounds (samplers, pipeline, Slicer panel).
GUIDANCE_RANGE: tuple[float, float] = (0.0, 20.0)


def parse_level(name: str) -> str:
    """Canonical level name ('L4-L5') from 'L4-L5', 'l4/l5', 'L4_L5', 'L4-5', 'l4l5'."""
    s = str(name).strip().upper().replace("/", "-").replace("_", "-").replace(" ", "")
    m = re.fullmatch(r"L([1-5])-?(L|S)?([1-5])", s)
    if m:
        a, b = int(m.group(1)), int(m.group(3))
        cand = f"L{a}-S1" if a == 5 else f"L{a}-L{b}"
        if cand in LEVELS and ((a < 5 and b == a + 1 and m.group(2) != "S") or (a == 5 and b == 1 and m.group(2) in ("S", None))):
            return cand
    raise InputError(f"unknown level {name!r}; expected one of {', '.join(LEVELS)}")


def parse_condition(name: str) -> str:
    """Canonical condition name; accepts e.g. 'dh_moderate_large', 'DH-moderate/large', 'ccs-severe'."""
    s = str(name).strip().lower().replace("-", "_").replace("/", "_").replace(" ", "_")
    aliases = {"healthy": "none", "normal": "none", "dh_moderate": "dh_moderate_large", "dh_large": "dh_moderate_large",
               "dh_mod_large": "dh_moderate_large"}
    s = aliases.get(s, s)
    if s in CONDITIONS:
        return s
    raise InputError(f"unknown condition {name!r}; expected one of {', '.join(CONDITIONS)}")


def pathology_family(condition: str) -> str:
    """'dh' | 'ccs' for a pathological condition, 'none' for healthy (DH and CCS are graded independently)."""
    c = parse_condition(condition)
    return c.split("_", 1)[0] if c != "none" else "none"


def level_index(name: str) -> int:
    return LEVELS.index(parse_level(name))


def condition_index(name: str) -> int:
    return CONDITIONS.index(parse_condition(name))
