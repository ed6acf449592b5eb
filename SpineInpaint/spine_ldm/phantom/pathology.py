"""Parametric pathology of the phantom: disc herniation (DH) and central canal stenosis (CCS).

Severity ranges (the exact numbers; each case draws uniformly inside the "drawn" range with its own generator):

Disc herniation: a focal posterior / paracentral extrusion of disc material (nucleus signal, low-signal rim) from
the posterior disc margin into the anterior epidural space; it indents the thecal sac.

=================  ========================  ===================  ====================  ===================
severity           protrusion beyond margin  half width (LR)      half height (SI)      cranio-caudal shift
=================  ========================  ===================  ====================  ===================
small              2 - 4 mm                  4 - 6 mm             3 - 4.5 mm            0
moderate_large     6 - 10 mm                 6 - 9 mm             4.5 - 7 mm            -3 .. +3 mm
=================  ========================  ===================  ====================  ===================

Its centre is 1.5 - 6 mm left or right of the midline (paracentral). Shape: a dome on the posterior disc margin
(from 2.5 mm inside the disc, where the annulus is torn and shows nucleus signal, to ``protrusion`` mm beyond it),
labelled 40 (disc material) with a 1 mm low-signal rim labelled 41; it replaces CSF / roots / epidural fat, never
bone. The landmark is the centre of the extruded part: ``protrusion / 2`` behind the posterior disc margin.
Measured volumes (labels 40 + 41, seeds 0-7, all levels): small 50 - 250 mm^3, moderate_large 440 - 1350 mm^3.

Central canal stenosis: diffuse (broad-based) disc bulge + ligamentum flavum thickening + facet hypertrophy that
compress the thecal sac at the disc level. The thecal sac (CSF + cauda equina) cross-section at the disc level is
reduced by the fraction ``r``:

==========  =====================  ===================================================================
severity    documented reduction   drawn
==========  =====================  ===================================================================
moderate    35 - 50 %              40 - 46 % (some CSF left between the roots)
severe      65 - 80 %              69 - 75 % (CSF around the cauda obliterated: sac filled with roots)
==========  =====================  ===================================================================

The reduction is full over +-plateau (2.5 - 4 mm) of arc length around the disc level and tapers to zero over a
further 6 - 9 mm (cosine), so other levels are untouched. The anterior-posterior diameter shrinks by
``(1 - r) ** gamma`` and the width by ``(1 - r) ** (1 - gamma)``, gamma 0.6 - 0.7. The landmark is the centre of
the thecal sac at the disc level. Measured on 1 mm isotropic phantoms (seeds 0-9, all levels, label map sampled
perpendicular to the canal): moderate 38 - 48 %, severe 68 - 75 % (voxel counting adds ~ +-4 % of the area at
1 mm, hence the margin between the drawn and the documented ranges).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DH_SEVERITIES = ("small", "moderate_large")
CCS_SEVERITIES = ("moderate", "severe")
DH_PROTRUSION_MM = {"small": (2.0, 4.0), "moderate_large": (6.0, 10.0)}
DH_HALF_WIDTH_MM = {"small": (4.0, 6.0), "moderate_large": (6.0, 9.0)}
DH_HALF_HEIGHT_MM = {"small": (3.0, 4.5), "moderate_large": (4.5, 7.0)}
DH_SHIFT_MM = {"small": (0.0, 0.0), "moderate_large": (-3.0, 3.0)}
CCS_REDUCTION = {"moderate": (0.35, 0.50), "severe": (0.65, 0.80)}  # documented (what tests check)
CCS_REDUCTION_DRAWN = {"moderate": (0.40, 0.46), "severe": (0.69, 0.75)}
CCS_CROWDING = 0.55  # where the local reduction exceeds this, the sac is filled with roots (no CSF)


@dataclass
class Herniation:
    level: str
    severity: str
    protrusion: float
    half_width: float
    half_height: float
    shift: float
    lateral: float  # signed left-right offset from the midline (mm, + = patient left)

    @property
    def condition(self) -> str:
        return f"dh_{self.severity}"


@dataclass
class Stenosis:
    level: str
    severity: str
    reduction: float
    plateau: float
    taper: float
    gamma: float

    @property
    def condition(self) -> str:
        return f"ccs_{self.severity}"

    def profile(self, ds):
        """Local reduction r * B(ds) at arc-length distance ds from the disc level (exact zeros outside)."""
        t = (np.abs(ds) - self.plateau) / self.taper
        b = np.where(t <= 0, 1.0, np.where(t >= 1, 0.0, 0.5 * (1 + np.cos(np.pi * np.clip(t, 0, 1)))))
        return (self.reduction * b).astype(np.float32)


def _lerp(rng_pair, q):
    a, b = rng_pair
    return float(a + (b - a) * q)


def draw_herniation(rng: np.random.Generator, level: str, severity: str) -> Herniation:
    q = rng.uniform(size=6)  # same draws for both severities: only the ranges differ
    side = 1.0 if q[4] < 0.5 else -1.0
    return Herniation(level, severity, _lerp(DH_PROTRUSION_MM[severity], q[0]), _lerp(DH_HALF_WIDTH_MM[severity], q[1]),
                      _lerp(DH_HALF_HEIGHT_MM[severity], q[2]), _lerp(DH_SHIFT_MM[severity], q[3]),
                      side * (1.5 + 4.5 * q[5]))


def draw_stenosis(rng: np.random.Generator, level: str, severity: str) -> Stenosis:
    q = rng.uniform(size=4)
    return Stenosis(level, severity, _lerp(CCS_REDUCTION_DRAWN[severity], q[0]), 2.5 + 1.5 * q[1], 6.0 + 3.0 * q[2],
                    0.6 + 0.1 * q[3])
