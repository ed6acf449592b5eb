"""Benchmark cases: a healthy phantom H and its pathological twin P (same seed: ``P - H`` is exactly the
pathology), the landmarks the generator reports, and the level drawn per seed.

Phantoms are generated at :data:`PHANTOM_SPACING` (the spacing the bundled models were trained on,
``model_training.demo_weights.PHANTOM_SPACING``) unless a spacing is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from spine_ldm.conditions import parse_condition, parse_level

from ..demo_weights import PHANTOM_SPACING

DEFAULT_LEVELS = ("L3-L4", "L4-L5", "L5-S1")


def draw_level(seed: int, levels) -> str:
    """The level of a seed's cases: drawn uniformly from ``levels`` with a generator seeded by the phantom seed
    (the same seed always gets the same level for the same list)."""
    levels = [parse_level(lv) for lv in levels]
    if len(levels) == 1:
        return levels[0]
    return levels[int(np.random.default_rng([int(seed), 20251]).integers(len(levels)))]


@dataclass
class Twin:
    """One phantom image with the generator's landmarks (``spine_ldm.phantom.PhantomCase`` fields)."""

    seed: int
    image: sitk.Image
    landmarks: dict
    labels: sitk.Image | None = None

    def disc(self, level: str) -> dict:
        return self.landmarks["discs"][level]

    def pathology(self, level: str) -> dict:
        return next(p for p in self.landmarks["pathologies"] if p["level"] == level)


def phantom(seed: int, pathologies: dict | None = None, spacing=PHANTOM_SPACING) -> Twin:
    """``spine_ldm.phantom.generate(seed, pathologies=...)`` at ``spacing``."""
    from spine_ldm.phantom import generate

    c = generate(int(seed), spacing=tuple(spacing), pathologies=pathologies or None)
    return Twin(int(seed), c.image, c.landmarks, c.labels)


@dataclass
class Case:
    """Healthy H, truth P with ``condition`` at ``level``; points in LPS mm from the generator."""

    seed: int
    level: str
    condition: str
    healthy: Twin
    truth: Twin
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.seed}_{self.level}_{self.condition}"

    @property
    def landmark(self) -> tuple:
        return tuple(float(v) for v in self.info["landmark_LPS_mm"])

    @property
    def disc_center(self) -> tuple:
        return tuple(float(v) for v in self.truth.disc(self.level)["center_LPS_mm"])

    @property
    def posterior_margin(self) -> tuple:
        return tuple(float(v) for v in self.truth.disc(self.level)["posterior_margin_LPS_mm"])


def sample_seed(case_seed: int) -> int:
    """The pipeline seed a benchmark script samples a case with: the same in every script, so their outputs of one
    case pair up."""
    return (int(case_seed) * 1000) % (2 ** 62)


def make_case(seed: int, level: str, condition: str, healthy: Twin | None = None, spacing=PHANTOM_SPACING) -> Case:
    """H (reused when given) and P with ``condition`` at ``level``."""
    level, condition = parse_level(level), parse_condition(condition)
    h = healthy if healthy is not None else phantom(seed, spacing=spacing)
    p = phantom(seed, {level: condition}, spacing=spacing)
    return Case(int(seed), level, condition, h, p, p.pathology(level))
