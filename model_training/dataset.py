"""FSU dataset: manifest rows -> normalised FSU crops, Gaussian weight maps and labels, cached on disk.

Item (a dict; ``model_training.common.collate`` stacks it):

=================  ======================================  ==========================================================
key                type / shape                            meaning
=================  ======================================  ==========================================================
image              float32 tensor (1, SI, AP, LR)          FSU crop (``geometry.extract_fsu``), normalised with
                                                           ``geometry.Normalization`` fitted on the crop
weight             float32 tensor (1, SI, AP, LR)          ``W = exp(-d^2 / 2 sigma^2)`` around the landmark
                                                           (``spine_ldm.weighting.gaussian_weight`` on the FSU grid),
                                                           zeros when the row has no landmark
level              int64 tensor ()                         ``LEVELS`` index
condition          int64 tensor ()                         ``CONDITIONS`` index
landmark_index     float32 tensor (3,)                     continuous FSU voxel index of the landmark in numpy order
                                                           (SI, AP, LR), NaN when no landmark
has_landmark       bool tensor ()                          landmark present
study_id           str                                     for grouping / logging
row_index          int                                     index into ``dataset.rows``
=================  ======================================  ==========================================================

Cache: each crop (raw float32 intensities + its FSU grid: origin, spacing, direction) is saved as
``<cache_dir>/<key>.npz`` where ``key = sha256(abs image path, file mtime_ns and size, disc centre, up vector,
spec shape and size, CACHE_VERSION)``. The landmark, normalisation and augmentation are applied on the fly, so
one cached crop serves any landmark/condition of that FSU and epochs never re-resample. Writes are atomic
(temp file + rename), so several DataLoader workers can fill the cache concurrently. ``dataset.stats`` counts
``extracted`` crops and ``cache_hits`` (per process).

Augmentation (:class:`Augment`) works on the cached crop in FSU space and keeps anatomy plausible:
rotation in the sagittal plane (about the LR axis, default +-5 deg) and isotropic scaling (+-5 %) about the
FSU centre, computed in mm (the FSU voxels are anisotropic) and applied with ``torch.nn.functional.grid_sample``
(trilinear, border padding); left-right flip (exact array flip); intensity gamma and scale. The landmark index
is mapped through the *same* transform, and W is recomputed exactly from the moved landmark on the FSU grid
(rather than warped, so sigma stays sigma mm after scaling). Randomness is a pure function of
``(seed, epoch, index, draw)``, where ``draw`` counts how often this process has served ``index`` since the
last :meth:`FSUDataset.set_epoch`; pass ``dataset[(index, aug_seed)]`` to pin an item's augmentation exactly
(e.g. from a resumable sampler).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from spine_ldm.conditions import CONDITIONS, parse_condition
from spine_ldm.errors import InputError

from .manifest import Row

CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# augmentation

@dataclass
class Augment:
    """Anatomy-preserving augmentation in FSU space. All ranges are symmetric and uniform unless noted.

    rotate_deg: max rotation in the sagittal (SI-AP) plane, degrees.   scale: max relative isotropic scale.
    flip_lr: probability of a left-right flip.   gamma: (min, max) gamma, log-uniform, applied on the crop's
    min-max range.   intensity_scale: max relative multiplicative intensity change.
    p_spatial: probability that rotation/scale is applied at all.
    """

    rotate_deg: float = 5.0
    scale: float = 0.05
    flip_lr: float = 0.5
    gamma: tuple[float, float] = (0.8, 1.25)
    intensity_scale: float = 0.1
    p_spatial: float = 1.0

    def sample(self, rng: np.random.Generator) -> dict:
        """Draw one set of parameters (the only place randomness is consumed)."""
        spatial = rng.random() < self.p_spatial
        g0, g1 = self.gamma
        return {
            "angle_deg": float(rng.uniform(-self.rotate_deg, self.rotate_deg)) if spatial else 0.0,
            "scale": float(rng.uniform(1 - self.scale, 1 + self.scale)) if spatial else 1.0,
            "flip_lr": bool(rng.random() < self.flip_lr),
            "gamma": float(math.exp(rng.uniform(math.log(g0), math.log(g1)))) if g0 > 0 and g1 > 0 else 1.0,
            "intensity_scale": float(rng.uniform(1 - self.intensity_scale, 1 + self.intensity_scale)),
        }

    @staticmethod
    def spatial_matrix(params: dict) -> np.ndarray:
        """3x3 forward map of offsets in mm, numpy axis order (SI, AP, LR): q_out = A @ q_in."""
        a = math.radians(params["angle_deg"])
        c, s = math.cos(a), math.sin(a)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return rot * float(params["scale"])

    def apply(self, image: torch.Tensor, landmark_index: np.ndarray | None, spacing_np: Sequence[float],
              params: dict) -> tuple[torch.Tensor, np.ndarray | None]:
        """Apply ``params`` to image (1, SI, AP, LR) and the landmark index (SI, AP, LR); returns new ones."""
        shape = np.array(image.shape[1:], dtype=np.float64)
        sp = np.array(spacing_np, dtype=np.float64)  # copy: may be a reversed view
        ctr = (shape - 1) / 2.0
        out = image
        lm = None if landmark_index is None else np.asarray(landmark_index, dtype=np.float64).copy()
        A = self.spatial_matrix(params)
        if not np.allclose(A, np.eye(3)):
            Ainv = np.linalg.inv(A)
            # output voxel u -> q_out (mm) -> q_in = A^-1 q_out -> normalised input coord (align_corners=True)
            axes = [torch.arange(int(n), dtype=torch.float64) for n in shape]
            uu = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (SI,AP,LR,3)
            q_out = (uu - torch.from_numpy(ctr)) * torch.from_numpy(sp)
            q_in = q_out @ torch.from_numpy(Ainv).T
            half = torch.from_numpy(sp * np.maximum(shape - 1, 1) / 2.0)
            g = (q_in / half).flip(-1)  # grid_sample wants (x=LR, y=AP, z=SI)
            out = F.grid_sample(out[None].float(), g[None].float(), mode="bilinear", padding_mode="border",
                                align_corners=True)[0]
            if lm is not None:
                lm = (A @ ((lm - ctr) * sp)) / sp + ctr
        if params.get("flip_lr"):
            out = torch.flip(out, dims=[-1])
            if lm is not None:
                lm[2] = (shape[2] - 1) - lm[2]
        gamma = float(params.get("gamma", 1.0))
        if gamma != 1.0:
            lo, hi = out.amin(), out.amax()
            rng_ = (hi - lo).clamp_min(1e-6)
            out = ((out - lo) / rng_).clamp(0, 1).pow(gamma) * rng_ + lo
        out = out * float(params.get("intensity_scale", 1.0))
        return out.contiguous(), lm


# ---------------------------------------------------------------------------------------------------------
# helpers

def _geometry():
    from spine_ldm import geometry  # imported lazily: keeps `import model_training.dataset` cheap

    return geometry


def _read_image(path: str) -> sitk.Image:
    try:
        from spine_ldm.io import read_volume  # validation (NaN, 4D, absurd spacing) when available
    except ImportError:  # pragma: no cover - io.py is written by another part of the tree
        read_volume = None
    if not os.path.isfile(path):
        raise InputError(f"image {path!r} does not exist")
    if read_volume is not None:
        img = read_volume(path)
    else:  # pragma: no cover
        img = sitk.ReadImage(path)
    return img


def _spec_tuple(spec) -> tuple:
    return (tuple(int(v) for v in spec.shape), tuple(float(v) for v in spec.size_mm))


def resolve_conditions(conditions) -> tuple[str, ...] | None:
    """None -> None (all); 'pathological' -> every condition but 'none'; names -> canonical names."""
    if conditions is None:
        return None
    if isinstance(conditions, str):
        if conditions.strip().lower() in ("pathological", "pathology", "patho"):
            return tuple(c for c in CONDITIONS if c != "none")
        if conditions.strip().lower() == "all":
            return None
        conditions = [c for c in conditions.replace(",", " ").split() if c]
    return tuple(dict.fromkeys(parse_condition(c) for c in conditions))


def spine_up_vectors(rows: Sequence[Row]) -> list[tuple[float, float, float] | None]:
    """Per row, the superior-pointing vector between the neighbouring disc centres of the same image
    (superior neighbour minus inferior neighbour, or one-sided at the ends); None when the image has one level."""
    by_img: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for r in rows:
        by_img.setdefault((r.study_id, r.image_path), {})[r.level_index] = np.asarray(r.disc_center_lps, float)
    out = []
    for r in rows:
        lv = by_img[(r.study_id, r.image_path)]
        i = r.level_index
        sup = lv.get(i - 1)  # L1-L2 is index 0: smaller index = superior
        inf = lv.get(i + 1)
        me = lv[i]
        if sup is not None and inf is not None:
            v = sup - inf
        elif sup is not None:
            v = sup - me
        elif inf is not None:
            v = me - inf
        else:
            out.append(None)
            continue
        n = float(np.linalg.norm(v))
        out.append(tuple(float(x) for x in v / n) if n > 1e-6 else None)
    return out


# ---------------------------------------------------------------------------------------------------------
# dataset

class FSUDataset(torch.utils.data.Dataset):
    """Manifest rows -> FSU items (see module docstring).

    Parameters
    ----------
    rows: manifest rows (e.g. ``read_manifest(...)``).
    spec: ``spine_ldm.geometry.FSUSpec`` (shape/size of the crop).
    cache_dir: folder for the ``.npz`` crop cache (created). ``None`` disables the disk cache.
    conditions: None = all rows; ``"pathological"`` = all but 'none'; or a list of condition names.
    augment: :class:`Augment` or None.
    sigma_mm: Gaussian sigma of the weight map.
    require_landmark: keep only rows with a landmark (weighted / masked training).
    split: keep only rows of this split ('train' | 'val' | 'test').
    up_from_neighbours: align the FSU SI axis with the vector between neighbouring disc centres of the same
        image (``extract_fsu(up_lps=...)``); off by default, matching the inference pipeline's default frame.
    seed: base seed of the augmentation.
    """

    def __init__(self, rows: Iterable[Row], spec, cache_dir: str | os.PathLike | None, conditions=None,
                 augment: Augment | None = None, sigma_mm: float = 16.0, *, require_landmark: bool = False,
                 split: str | None = None, up_from_neighbours: bool = False, seed: int = 0):
        all_rows = list(rows)
        self.spec = spec
        self.conditions = resolve_conditions(conditions)
        self.sigma_mm = float(sigma_mm)
        if not (math.isfinite(self.sigma_mm) and self.sigma_mm > 0):
            raise InputError(f"sigma_mm must be positive, got {sigma_mm!r}")
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        ups = spine_up_vectors(all_rows) if up_from_neighbours else [None] * len(all_rows)
        keep = []
        for r, up in zip(all_rows, ups):
            if self.conditions is not None and r.condition not in self.conditions:
                continue
            if require_landmark and not r.has_landmark:
                continue
            if split is not None and r.split != split:
                continue
            keep.append((r, up))
        self.rows: list[Row] = [r for r, _ in keep]
        self._ups = [u for _, u in keep]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stats = {"extracted": 0, "cache_hits": 0}
        self._draws: dict[int, int] = {}
        self._last_image: tuple[str, sitk.Image] | None = None
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for DataLoader workers started with 'spawn' (macOS / Windows)
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_last_image"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- basics ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (and reset the per-index draw counters)."""
        self.epoch = int(epoch)
        self._draws.clear()

    def support(self) -> dict[str, dict[str, int]]:
        from .manifest import support_table

        return support_table(self.rows)

    # -- caching --------------------------------------------------------------------------------------------
    def cache_key(self, index: int) -> str:
        r = self.rows[index]
        path = os.path.abspath(r.image_path)
        try:
            st = os.stat(path)
            stamp = [st.st_mtime_ns, st.st_size]
        except OSError:
            stamp = None
        up = self._ups[index]
        payload = json.dumps({
            "v": CACHE_VERSION, "path": path, "stamp": stamp,
            "center": [round(float(v), 4) for v in r.disc_center_lps],
            "up": None if up is None else [round(float(v), 6) for v in up],
            "spec": _spec_tuple(self.spec),
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def cache_path(self, index: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.cache_key(index)}.npz"

    def _image(self, path: str) -> sitk.Image:
        with self._lock:
            if self._last_image is not None and self._last_image[0] == path:
                return self._last_image[1]
        img = _read_image(path)
        with self._lock:
            self._last_image = (path, img)
        return img

    def _extract(self, index: int) -> dict:
        r = self.rows[index]
        geo = _geometry()
        img = self._image(r.image_path)
        try:
            fsu = geo.extract_fsu(img, r.disc_center_lps, self.spec, up_lps=self._ups[index])
        except InputError as e:
            raise InputError(f"study {r.study_id!r} {r.level} ({os.path.basename(r.image_path)}): {e}") from None
        self.stats["extracted"] += 1
        return {
            "array": sitk.GetArrayFromImage(fsu).astype(np.float32, copy=False),
            "origin": np.asarray(fsu.GetOrigin(), np.float64),
            "spacing": np.asarray(fsu.GetSpacing(), np.float64),
            "direction": np.asarray(fsu.GetDirection(), np.float64),
        }

    def load_crop(self, index: int) -> dict:
        """Raw crop + grid ``{array (SI,AP,LR) float32, origin, spacing (ITK order), direction}``, from the
        cache when present (counted in ``stats['cache_hits']``), else extracted and written to the cache."""
        p = self.cache_path(index)
        if p is not None and p.is_file():
            try:
                with np.load(p) as z:
                    crop = {k: z[k] for k in ("array", "origin", "spacing", "direction")}
                if crop["array"].shape == tuple(int(v) for v in self.spec.shape):
                    self.stats["cache_hits"] += 1
                    return crop
            except (OSError, ValueError, KeyError, EOFError):
                pass  # corrupt / foreign file: re-extract and overwrite
        crop = self._extract(index)
        if p is not None:
            tmp = p.with_name(f".{p.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
            np.savez(tmp, **crop)
            os.replace(tmp, p)
        return crop

    def precompute(self, progress: Callable[[int, int], None] | None = None,
                   skip_errors: bool = False) -> list[tuple[int, str]]:
        """Fill the cache for every row (images read once, rows grouped by image). Returns
        ``[(index, message)]`` of rows that failed (only with ``skip_errors``; else the first error raises)."""
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].image_path)
        failed = []
        for n, i in enumerate(order):
            try:
                self.load_crop(i)
            except InputError as e:
                if not skip_errors:
                    raise
                failed.append((i, str(e)))
            if progress is not None:
                progress(n + 1, len(order))
        return failed

    # -- geometry helpers ------------------------------------------------------------------------------------
    @staticmethod
    def grid_image(crop: dict) -> sitk.Image:
        """An (empty) SimpleITK image with the crop's FSU grid (for physical <-> index conversions)."""
        shape = crop["array"].shape
        g = sitk.Image([int(shape[2]), int(shape[1]), int(shape[0])], sitk.sitkUInt8)
        g.SetOrigin(tuple(float(v) for v in crop["origin"]))
        g.SetSpacing(tuple(float(v) for v in crop["spacing"]))
        g.SetDirection(tuple(float(v) for v in crop["direction"]))
        return g

    def fsu_image(self, index: int) -> sitk.Image:
        """The un-normalised, un-augmented FSU crop as a SimpleITK image (evaluation / debugging)."""
        crop = self.load_crop(index)
        img = sitk.GetImageFromArray(crop["array"])
        img.CopyInformation(self.grid_image(crop))
        return img

    def landmark_index(self, index: int, crop: dict | None = None) -> np.ndarray | None:
        """Continuous FSU index (SI, AP, LR) of the row's landmark, or None."""
        r = self.rows[index]
        if r.landmark_lps is None:
            return None
        crop = crop if crop is not None else self.load_crop(index)
        ijk = self.grid_image(crop).TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in r.landmark_lps))
        return np.asarray(ijk[::-1], dtype=np.float64)

    # -- items ----------------------------------------------------------------------------------------------
    def _aug_rng(self, index: int, aug_seed: int | None) -> np.random.Generator:
        if aug_seed is not None:
            return np.random.default_rng([self.seed, int(aug_seed) & 0xFFFFFFFF, index, 1])
        k = self._draws.get(index, 0)
        self._draws[index] = k + 1
        return np.random.default_rng([self.seed, self.epoch, index, k, 0])

    def __getitem__(self, index):
        aug_seed = None
        if isinstance(index, (tuple, list)):
            index, aug_seed = int(index[0]), int(index[1])
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} FSUs")
        r = self.rows[index]
        crop = self.load_crop(index)
        geo = _geometry()
        arr = crop["array"]
        norm = geo.Normalization.fit(arr)
        x = torch.from_numpy(np.asarray(norm.forward(arr), dtype=np.float32))[None]
        lm = self.landmark_index(index, crop)
        if self.augment is not None:
            params = self.augment.sample(self._aug_rng(index, aug_seed))
            sp_np = np.asarray(crop["spacing"], np.float64)[::-1]
            x, lm = self.augment.apply(x, lm, sp_np, params)
        if lm is not None:
            grid = self.grid_image(crop)
            p = grid.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in lm[::-1]))
            from spine_ldm.weighting import gaussian_weight

            w = torch.from_numpy(gaussian_weight(grid, p, self.sigma_mm))[None]
            lm_t = torch.tensor(lm, dtype=torch.float32)
        else:
            w = torch.zeros_like(x)
            lm_t = torch.full((3,), float("nan"), dtype=torch.float32)
        return {
            "image": x.float().contiguous(),
            "weight": w.float().contiguous(),
            "level": torch.tensor(r.level_index, dtype=torch.long),
            "condition": torch.tensor(r.condition_index, dtype=torch.long),
            "landmark_index": lm_t,
            "has_landmark": torch.tensor(lm is not None),
            "study_id": r.study_id,
            "row_index": index,
        }
