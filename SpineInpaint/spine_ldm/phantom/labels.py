"""Label values of the phantom and their T2 appearance.

Every value here is written to ``landmarks.json`` (``"labels"``) and used by the renderer, so the label map and
the image agree by construction. The label map is the tissue at the **centre** of each voxel (the image is the
slice-thickness average, so edges are partial-volume blends).
"""
from __future__ import annotations

import numpy as np

# Segment -> vertebral body marrow label.
BODY_LABEL = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "S1": 6, "S2": 6, "S3": 6, "S4": 6, "T12": 7, "T11": 8}
# Disc name -> (annulus label, nucleus label). LEVELS order is L1-L2 .. L5-S1 -> 11..15 / 21..25.
DISC_LABELS = {"T11-T12": (9, 19), "T12-L1": (10, 20), "L1-L2": (11, 21), "L2-L3": (12, 22), "L3-L4": (13, 23), "L4-L5": (14, 24),
               "L5-S1": (15, 25)}

AIR = 0
CSF = 30
NEURAL = 31  # spinal cord, conus medullaris, cauda equina roots, dorsal root ganglia
EPIDURAL_FAT = 32  # epidural + foraminal fat
POSTERIOR_MARROW = 33  # marrow of pedicles, laminae, articular and spinous processes
CORTEX = 34  # cortical bone of every bone (vertebral endplates and walls included), fused sacral disc remnants
FLAVUM = 35  # ligamentum flavum
MUSCLE = 36  # skeletal muscle: paraspinal and abdominal wall
SUBCUT_FAT = 37
LIGAMENT = 38  # interspinous / supraspinous / anterior longitudinal ligaments
PSOAS = 39
HERNIATION = 40  # herniated disc material beyond the normal posterior disc margin
HERNIATION_RIM = 41  # its low-signal rim (outer annulus / posterior longitudinal ligament / dura)
FACET_JOINT = 42  # facet joint cartilage and fluid
BASIVERTEBRAL = 43  # basivertebral vein (posterior mid-body venous channel)
ABDOMEN = 50  # abdominal / pelvic contents (bowel, mesenteric and retroperitoneal fat), textured
VESSEL = 51  # aorta / inferior vena cava (flow void)
SKIN = 52

LABELS: dict[int, str] = {
    0: "background (air)",
    1: "L1 vertebral body (marrow)",
    2: "L2 vertebral body (marrow)",
    3: "L3 vertebral body (marrow)",
    4: "L4 vertebral body (marrow)",
    5: "L5 vertebral body (marrow)",
    6: "S1 / sacrum (marrow)",
    7: "T12 vertebral body (marrow)",
    8: "T11 vertebral body (marrow)",
    9: "T11-T12 disc annulus",
    10: "T12-L1 disc annulus",
    11: "L1-L2 disc annulus",
    12: "L2-L3 disc annulus",
    13: "L3-L4 disc annulus",
    14: "L4-L5 disc annulus",
    15: "L5-S1 disc annulus",
    19: "T11-T12 disc nucleus",
    20: "T12-L1 disc nucleus",
    21: "L1-L2 disc nucleus",
    22: "L2-L3 disc nucleus",
    23: "L3-L4 disc nucleus",
    24: "L4-L5 disc nucleus",
    25: "L5-S1 disc nucleus",
    CSF: "cerebrospinal fluid (thecal sac)",
    NEURAL: "spinal cord / conus / cauda equina / nerve roots",
    EPIDURAL_FAT: "epidural and foraminal fat",
    POSTERIOR_MARROW: "posterior elements (pedicles, laminae, articular and spinous processes; marrow)",
    CORTEX: "cortical bone and vertebral endplates",
    FLAVUM: "ligamentum flavum",
    MUSCLE: "skeletal muscle (paraspinal, abdominal wall)",
    SUBCUT_FAT: "subcutaneous fat",
    LIGAMENT: "interspinous / supraspinous / anterior longitudinal ligament",
    PSOAS: "psoas muscle",
    HERNIATION: "disc herniation (disc material beyond the posterior disc margin)",
    HERNIATION_RIM: "disc herniation rim (outer annulus / PLL)",
    FACET_JOINT: "facet joint (cartilage, fluid)",
    BASIVERTEBRAL: "basivertebral vein",
    ABDOMEN: "abdominal / pelvic soft tissue",
    VESSEL: "aorta / inferior vena cava (flow void)",
    SKIN: "skin",
}

DISC_ANNULUS_LABELS = tuple(v[0] for v in DISC_LABELS.values())
DISC_NUCLEUS_LABELS = tuple(v[1] for v in DISC_LABELS.values())
BONE_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, POSTERIOR_MARROW, CORTEX)
CANAL_LABELS = (CSF, NEURAL)  # thecal sac content: what "canal cross-section" measures

# Base T2 intensities (arbitrary units, fat ~ 800) and texture amplitudes (fraction of the base value) of a fine
# (~0.8 mm) and a coarse (~5 mm) smooth random texture. Per-case jitter is applied by the renderer.
_BASE = {
    AIR: 0.0, CSF: 930.0, NEURAL: 250.0, EPIDURAL_FAT: 720.0, POSTERIOR_MARROW: 360.0, CORTEX: 40.0,
    FLAVUM: 105.0, MUSCLE: 185.0, SUBCUT_FAT: 800.0, LIGAMENT: 85.0, PSOAS: 190.0, HERNIATION: 560.0,
    HERNIATION_RIM: 120.0, FACET_JOINT: 520.0, BASIVERTEBRAL: 560.0, ABDOMEN: 330.0, VESSEL: 60.0, SKIN: 330.0,
}
_FINE = {
    CSF: 0.02, NEURAL: 0.08, EPIDURAL_FAT: 0.05, POSTERIOR_MARROW: 0.08, CORTEX: 0.2, FLAVUM: 0.1, MUSCLE: 0.12,
    SUBCUT_FAT: 0.04, LIGAMENT: 0.1, PSOAS: 0.1, HERNIATION: 0.08, HERNIATION_RIM: 0.1, ABDOMEN: 0.07,
    VESSEL: 0.3, SKIN: 0.1,
}
_STRIATED = {MUSCLE: 0.22, PSOAS: 0.18, SUBCUT_FAT: 0.05}  # texture elongated superior-inferior (fibres, septa)
_COARSE = {ABDOMEN: 0.35, SUBCUT_FAT: 0.04, MUSCLE: 0.06, EPIDURAL_FAT: 0.05}


def intensity_tables(marrow: dict[int, float], nucleus: dict[int, float], annulus: float = 210.0,
                     gain: dict[int, float] | None = None):
    """(base, fine, coarse, striated) float32 lookup tables of length 256 indexed by label."""
    base = np.zeros(256, np.float32)
    striated = np.zeros(256, np.float32)
    for k, v in _STRIATED.items():
        striated[k] = v
    fine = np.zeros(256, np.float32)
    coarse = np.zeros(256, np.float32)
    for k, v in _BASE.items():
        base[k] = v
    for k, v in marrow.items():
        base[k] = v
        fine[k] = 0.08
        coarse[k] = 0.06
    for a in DISC_ANNULUS_LABELS:
        base[a] = annulus
        fine[a] = 0.1
    for k, v in nucleus.items():
        base[k] = v
        fine[k] = 0.06
    for k, v in _FINE.items():
        fine[k] = v
    for k, v in _COARSE.items():
        coarse[k] = v
    if gain:
        for k, g in gain.items():
            base[k] *= g
    # texture tables hold absolute amplitudes (base * fraction) so the renderer can average them over sub-slices
    return base, base * fine, base * coarse, base * striated
