"""Module parameters, persisted in a ``vtkMRMLScriptedModuleNode`` (the module's parameter node).

The parameters are a plain dataclass so that the widget, the logic, batch scripts and tests share one
definition. ``saveToNode`` / ``loadFromNode`` store every field as a string parameter and the selected
nodes as node references, so the panel state is saved with the scene and restored when it is loaded
(the same role ``slicer.parameterNodeWrapper`` plays in SlicerNNUnet, but usable without the GUI and
under headless ``slicer-core``).

The remote token is deliberately *not* a field: a scene file can be shared, a bearer token must not be.
The widget keeps it in memory (or reads it from a token file whose path is persisted).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Optional

from spine_ldm.conditions import CONDITIONS, LEVELS, PATHOLOGIES, parse_condition, parse_level

MODULE_NAME = "SpineInpaint"

#: Inpainting methods understood by the backend (``spine-ldm inpaint --method``) and their panel labels.
METHODS = ("weighted", "masked", "repaint")
METHOD_LABELS = {"weighted": "weighted", "masked": "masked", "repaint": "RePaint"}
DEVICES = ("auto", "cuda", "cpu", "mps")
BACKENDS = ("local", "remote")

#: Node reference roles in the parameter node.
REF_INPUT = "InputVolume"
REF_LANDMARK = "Landmark"
REF_DISC_CENTERS = "DiscCenters"
NODE_REFERENCES = (REF_INPUT, REF_LANDMARK, REF_DISC_CENTERS)

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
    sigmaMm: float = 16.0
    steps: int = 50
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
        if not 1 <= int(self.samples) <= 16:
            errors.append(f"Samples must be 1..16 (got {self.samples}).")
        if not 1 <= int(self.steps) <= 1000:
            errors.append(f"Steps must be 1..1000 (got {self.steps}).")
        if not 0.5 <= float(self.sigmaMm) <= 100:
            errors.append(f"Sigma must be 0.5..100 mm (got {self.sigmaMm}).")
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
                                   sigmaMm=float(self.sigmaMm))

    def methodsToRun(self) -> list[str]:
        return list(METHODS) if self.compareMethods else [self.method]

    # ------------------------------------------------------------------ persistence
    def saveToNode(self, parameterNode) -> None:
        """Write every field as a string parameter of ``parameterNode`` (one Modified event)."""
        wasModifying = parameterNode.StartModify()
        try:
            for f in fields(self):
                value = getattr(self, f.name)
                parameterNode.SetParameter(f.name, _toString(value))
        finally:
            parameterNode.EndModify(wasModifying)

    @classmethod
    def loadFromNode(cls, parameterNode) -> "InpaintParameters":
        """Read fields back; missing or unparsable values keep their defaults."""
        instance = cls()
        for f in fields(cls):
            text = parameterNode.GetParameter(f.name)
            if not text:
                continue
            default = getattr(instance, f.name)
            try:
                setattr(instance, f.name, _fromString(text, type(default)))
            except ValueError:
                continue
        return instance


def _toString(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fromString(text: str, kind: type):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(text)
    return kind(text)


# ---------------------------------------------------------------------- parameter node
def getParameterNode(scene=None, create: bool = True):
    """The module's singleton ``vtkMRMLScriptedModuleNode`` (created with defaults if absent)."""
    import slicer

    scene = scene or slicer.mrmlScene
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference in Python
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        InpaintParameters().saveToNode(node)
        node = scene.AddNode(node)
    return node


def setNodeReference(parameterNode, role: str, node: Optional[object]) -> None:
    if role not in NODE_REFERENCES:
        raise ValueError(f"unknown node reference role {role!r}")
    parameterNode.SetNodeReferenceID(role, node.GetID() if node is not None else None)


def getNodeReference(parameterNode, role: str):
    if role not in NODE_REFERENCES:
        raise ValueError(f"unknown node reference role {role!r}")
    return parameterNode.GetNodeReference(role)
