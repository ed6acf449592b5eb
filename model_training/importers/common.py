"""Helpers shared by the importers: image headers, physical geometry, skip reports."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from spine_ldm.errors import InputError


@dataclass
class ImageHeader:
    """Geometry of an image file read without its voxels."""

    path: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ImageHeader":
        path = str(path)
        if not os.path.isfile(path):
            raise InputError(f"image {path!r} does not exist")
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        try:
            r.ReadImageInformation()
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
            raise InputError(f"cannot read image header of {path!r}: {first}") from None
        if r.GetDimension() != 3:
            raise InputError(f"image {path!r} is {r.GetDimension()}D; a 3D volume is required")
        return cls(path, tuple(int(v) for v in r.GetSize()), tuple(float(v) for v in r.GetSpacing()),
                   tuple(float(v) for v in r.GetOrigin()), tuple(float(v) for v in r.GetDirection()))

    @classmethod
    def of(cls, image: sitk.Image, path: str = "") -> "ImageHeader":
        return cls(path, tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def matrix(self) -> np.ndarray:
        """M with p_lps = origin + M @ (i, j, k)."""
        return np.asarray(self.direction, float).reshape(3, 3) * np.asarray(self.spacing, float)[None, :]

    def index_to_physical(self, ijk) -> np.ndarray:
        """Continuous ITK index (N, 3) or (3,) -> LPS mm."""
        a = np.asarray(ijk, float)
        return np.asarray(self.origin, float) + a @ self.matrix.T

    def physical_to_index(self, p) -> np.ndarray:
        a = np.asarray(p, float)
        return np.linalg.solve(self.matrix, (a - np.asarray(self.origin, float)).T).T

    def distance_outside_mm(self, p) -> float:
        """0 inside the voxel extent, else the distance (mm) to it."""
        idx = self.physical_to_index(p)
        size = np.asarray(self.size, float)
        excess = np.maximum(np.maximum(-0.5 - idx, idx - (size - 0.5)), 0.0) * np.asarray(self.spacing)
        return float(np.linalg.norm(excess))

    def axis_closest_to(self, lps_vector) -> np.ndarray:
        """Unit direction column (ITK axis) closest to ``lps_vector``, signed to point along it."""
        d = np.asarray(self.direction, float).reshape(3, 3)
        v = np.asarray(lps_vector, float)
        dots = v @ d
        p = int(np.argmax(np.abs(dots)))
        return d[:, p] * (1.0 if dots[p] >= 0 else -1.0)

    def axis_spacing_closest_to(self, lps_vector) -> float:
        d = np.asarray(self.direction, float).reshape(3, 3)
        return float(self.spacing[int(np.argmax(np.abs(np.asarray(lps_vector, float) @ d)))])


@dataclass
class SkipLog:
    """What an importer left out and why (printed by the CLI)."""

    messages: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        self.messages.append(msg)

    def __len__(self) -> int:
        return len(self.messages)

    def summary(self, limit: int = 20) -> str:
        if not self.messages:
            return "nothing skipped"
        head = "\n".join(f"  - {m}" for m in self.messages[:limit])
        more = f"\n  ... and {len(self.messages) - limit} more" if len(self.messages) > limit else ""
        return f"{len(self.messages)} skipped:\n{head}{more}"
