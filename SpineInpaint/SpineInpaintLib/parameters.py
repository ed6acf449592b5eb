"""Module parameters: one dataclass shared by the widget, the logic, batch scripts and tests.

In the panel they live in the module's parameter node through Slicer's ``parameterNodeWrapper``
(``SpineInpaintParameterNode`` in ``SpineInpaint.py``: the same field names plus the selected nodes, validated with
the ranges below, connected to the widgets), so the panel state is saved with the scene and a scene load or a
script change updates the panel. ``fromParameterNode`` turns that node into ``InpaintParameters`` for the logic.

The remote token is deliberately *not* a field: a scene file can be shared, a bearer token must not be.
The widget keeps it in memory (or reads it from a token file whose path is persisted).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from spine_ldm.conditions import CONDITIONS, LEVELS, PATHOLOGIES, parse_condition, parse_level
from spine_ldm.conditions import GUIDANCE_RANGE as _BACKEND_GUIDANCE

#: Inpainting methods understood by the backend (``spine-ldm inpaint --method``) and their panel labels.
METHODS = ("weighted", "masked", "repaint")
METHOD_LABELS = {"weighted": "weighted", "masked": "masked", "repaint": "RePaint"}
DEVICES = ("auto", "cuda", "cpu", "mps")
BACKENDS = ("local", "remote")

#: Valid ranges (inclusive): the dataclass's validate() and the parameter node's validators use these.
SAMPLES_RANGE = (1, 16)
STEPS_RANGE = (1, 1000)
SIGMA_RANGE_MM = (0.5, 100.0)
#: sigmaMm value meaning "the sigma the selected model was trained with" (registry ``training.sigma_mm``: the bundled
#: herniation models 8 mm, the stenosis models 16 mm); the panel's sigma box shows it as "model's".
MODEL_SIGMA = 0.0
#: Classifier-free guidance scales the panel offers: the backend's range from 1 up (it also takes 0..1, a research
#: setting: the CLI).
GUIDANCE_RANGE = (1.0, _BACKEND_GUIDANCE[1])
#: guidanceScale value meaning "the model's own" (registry ``guidance_scale``: the bundled herniation models 2 for
#: DH small and 1.25 for DH moderate/large, the stenosis models 1 = unguided); the panel's guidance box shows it as
#: "model's".
MODEL_GUIDANCE = 0.0

#: Pathology combo box entries (panel) -> severities. "none" = healthy (no pathology inserted).
PATHOLOGY_LABELS = {"dh": "Disc herniation (DH)", "ccs": "Central canal stenosis (CCS)", "none": "Healthy (no pathology)"}
SEVERITY_LABELS = {"small": "small", "moderate_large": "moderate/large", "moderate": "moderate", "severe": "severe"}


def conditionFromPathologySeverity(pathology: str, severity: str = "") -> str:
    """('dh', 'moderate_large') -> 'dh_moderate_large'; ('none', *) -> 'none'."""
    pathology = str(pathology).strip().lower()
    if pathology in ("none", "healthy", ""):
        return "none"
    if pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; expected one of none, {', '.join(PATHOLOGIES)}")
    if severity not in PATHOLOGIES[pathology]:
        raise ValueError(f"unknown severity {severity!r} for {pathology}; expected one of {', '.join(PATHOLOGIES[pathology])}")
    return parse_condition(f"{pathology}_{severity}")


def pathologySeverityFromCondition(condition: str) -> tuple[str, str]:
    """'dh_moderate_large' -> ('dh', 'moderate_large'); 'none' -> ('none', '')."""
    condition = parse_condition(condition)
    if condition == "none":
        return "none", ""
    pathology, severity = condition.split("_", 1)
    return pathology, severity


@dataclass
class InpaintParameters:
    """Everything the panel sets, with the defaults of the paper / the backend."""

    level: str = "L4-L5"
    condition: str = "dh_moderate_large"
    method: str = "weighted"
    samples: int = 1
    seed: int = 0
    sigmaMm: float = MODEL_SIGMA  # MODEL_SIGMA = the model's own; else 0.5..100 mm (differing from the model's warns)
    steps: int = 50
    guidanceScale: float = MODEL_GUIDANCE  # MODEL_GUIDANCE = the model's own; else 1..20 (1 = no guidance)
    device: str = "auto"
    model: str = ""  # registry id; "" = the backend's default model
    levelAuto: bool = True  # keep the level in sync with the suggestion from the disc centres
    compareMethods: bool = False  # run weighted, masked and RePaint with the same seed (compare layout)
    backend: str = "local"
    remoteUrl: str = "http://127.0.0.1:8000"
    remoteTokenFile: str = ""
    registry: str = ""  # Models.json path; "" = the module's bundled Resources/Models.json

    # ------------------------------------------------------------------ validation
    def validate(self) -> list[str]:
        """Human-readable problems (empty list = valid). Does not look at nodes."""
        errors = []
        try:
            parse_level(self.level)
        except Exception:
            errors.append(f"Level {self.level!r} is not one of {', '.join(LEVELS)}.")
        try:
            parse_condition(self.condition)
        except Exception:
            errors.append(f"Condition {self.condition!r} is not one of {', '.join(CONDITIONS)}.")
        if self.method not in METHODS:
            errors.append(f"Method {self.method!r} is not one of {', '.join(METHODS)}.")
        for name, value, (lo, hi) in (("Samples", self.samples, SAMPLES_RANGE), ("Steps", self.steps, STEPS_RANGE)):
            if not lo <= float(value) <= hi:
                errors.append(f"{name} must be {lo:g}..{hi:g} (got {value}).")
        lo, hi = SIGMA_RANGE_MM
        if float(self.sigmaMm) != MODEL_SIGMA and not lo <= float(self.sigmaMm) <= hi:
            errors.append(f"Sigma must be {lo:g}..{hi:g} mm, or {MODEL_SIGMA:g} for the model's own "
                          f"(got {self.sigmaMm}).")
        lo, hi = GUIDANCE_RANGE
        if float(self.guidanceScale) != MODEL_GUIDANCE and not lo <= float(self.guidanceScale) <= hi:
            errors.append(f"Guidance must be {lo:g}..{hi:g}, or {MODEL_GUIDANCE:g} for the model's own "
                          f"(got {self.guidanceScale}).")
        if int(self.seed) < 0:
            errors.append(f"Seed must be >= 0 (got {self.seed}).")
        if self.device not in DEVICES:
            errors.append(f"Device {self.device!r} is not one of {', '.join(DEVICES)}.")
        if self.backend not in BACKENDS:
            errors.append(f"Backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        if self.backend == "remote" and not str(self.remoteUrl).startswith(("http://", "https://")):
            errors.append(f"Remote URL must start with http:// or https:// (got {self.remoteUrl!r}).")
        return errors

    def normalized(self) -> "InpaintParameters":
        """Copy with canonical level / condition names (raises ValueError on invalid values)."""
        errors = self.validate()
        if errors:
            raise ValueError(" ".join(errors))
        return dataclasses.replace(self, level=parse_level(self.level), condition=parse_condition(self.condition),
                                   samples=int(self.samples), seed=int(self.seed), steps=int(self.steps),
                                   sigmaMm=float(self.sigmaMm), guidanceScale=float(self.guidanceScale))

    def sigmaForBackend(self) -> float | None:
        """The ``sigma_mm`` to send: None = the model's own (:data:`MODEL_SIGMA`)."""
        return None if float(self.sigmaMm) == MODEL_SIGMA else float(self.sigmaMm)

    def sigmaText(self) -> str:
        return "the model's sigma" if self.sigmaForBackend() is None else f"sigma {float(self.sigmaMm):g} mm"

    def guidanceForBackend(self) -> float | None:
        """The ``guidance_scale`` to send: None = the model's own (:data:`MODEL_GUIDANCE`)."""
        return None if float(self.guidanceScale) == MODEL_GUIDANCE else float(self.guidanceScale)

    def guidanceText(self) -> str:
        g = self.guidanceForBackend()
        return "the model's guidance" if g is None else f"guidance {g:g}"

    def methodsToRun(self) -> list[str]:
        return list(METHODS) if self.compareMethods else [self.method]


def fromParameterNode(node) -> InpaintParameters:
    """``InpaintParameters`` from anything with the same attribute names (the module's parameter node wrapper)."""
    return InpaintParameters(**{f.name: getattr(node, f.name) for f in fields(InpaintParameters)})
