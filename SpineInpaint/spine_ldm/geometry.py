"""FSU geometry: the functional-spinal-unit frame, extraction, paste-back, latent grid,
LPS<->RAS, intensity normalisation and disc-centre estimation.

Conventions (see DEVELOPERS.md):

* All coordinates are LPS mm (ITK). Slicer shows RAS = (-x, -y, z).
* An FSU is a ``SimpleITK.Image`` whose ITK axes are ``i`` = patient right<-left
  (increasing i goes from patient left to right, canonical direction (-1, 0, 0)),
  ``j`` = anterior->posterior (0, 1, 0) and ``k`` = superior->inferior (0, 0, -1).
  Its numpy array is therefore ``(SI, AP, LR)``.
* The FSU axes are the **input volume's own axes**, permuted and sign-flipped to be
  closest to the canonical directions, so an oblique sagittal scan keeps its own
  in-plane axes and no rotation is invented. ``up_lps`` optionally rotates the SI axis
  within the sagittal plane (plane normal = the FSU's LR axis).
* All resampling is done by SimpleITK (``sitk.Resample``, linear); no hand-written
  interpolation.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .conditions import parse_condition, parse_level
from .errors import InputError
from .weighting import gaussian_weight, index_to_physical_matrix, weight_radius_mm

__all__ = [
    "lps_to_ras",
    "ras_to_lps",
    "FSUSpec",
    "CANONICAL_DIRECTIONS",
    "canonical_axes",
    "fsu_frame",
    "extract_fsu",
    "fraction_inside",
    "distance_outside_mm",
    "check_point_inside",
    "paste_back",
    "latent_frame",
    "Normalization",
    "DISC_OFFSET_MM",
    "DISC_TILT_DEG",
    "estimate_disc_center",
    "disc_frame_index",
    "physical_to_index",
    "as_point",
]

# Canonical FSU axis directions in LPS, columns = ITK axes (i, j, k).
CANONICAL_DIRECTIONS = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]).T


# ----------------------------------------------------------------------------- LPS <-> RAS
def lps_to_ras(point) -> tuple[float, float, float]:
    """LPS (ITK) -> RAS (Slicer): ``(-x, -y, z)``."""
    x, y, z = (float(v) for v in np.asarray(point, dtype=np.float64).reshape(3))
    return (-x, -y, z)


def ras_to_lps(point) -> tuple[float, float, float]:
    """RAS (Slicer) -> LPS (ITK): ``(-x, -y, z)`` (the map is its own inverse)."""
    x, y, z = (float(v) for v in np.asarray(point, dtype=np.float64).reshape(3))
    return (-x, -y, z)


def _fmt_point(p) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in np.asarray(p).reshape(3)) + ")"


def as_point(p, what: str = "point") -> np.ndarray:
    """3 finite LPS coordinates (mm) as a float64 array, else InputError naming ``what``."""
    try:
        a = np.asarray(p, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be 3 LPS coordinates in mm, got {p!r}") from None
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise InputError(f"{what} must be 3 finite LPS coordinates in mm, got {p!r}")
    return a


def _require_3d(image: sitk.Image, what: str = "image") -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"{what} must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{what} must be 3D, got {image.GetDimension()}D")


# ----------------------------------------------------------------------------- FSU spec
@dataclass(frozen=True)
class FSUSpec:
    """FSU grid size, numpy order ``(SI, AP, LR)``.

    The paper config is 128 x 64 x 32 voxels over 80 x 80 x 50 mm
    (0.625 mm SI, 1.25 mm AP, 1.5625 mm LR); :meth:`small` halves every axis.
    """

    shape: tuple[int, int, int] = (128, 64, 32)
    size_mm: tuple[float, float, float] = (80.0, 80.0, 50.0)

    def __post_init__(self):
        shape = tuple(int(v) for v in self.shape)
        size = tuple(float(v) for v in self.size_mm)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"FSU shape must be 3 positive integers (SI, AP, LR), got {self.shape!r}")
        if len(size) != 3 or not all(math.isfinite(v) and v > 0 for v in size):
            raise InputError(f"FSU size must be 3 positive mm values (SI, AP, LR), got {self.size_mm!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "size_mm", size)

    @classmethod
    def small(cls) -> "FSUSpec":
        return cls(shape=(64, 32, 16), size_mm=(80.0, 80.0, 50.0))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing in numpy order (SI, AP, LR)."""
        return tuple(s / n for s, n in zip(self.size_mm, self.shape))

    @property
    def itk_size(self) -> tuple[int, int, int]:
        """Grid size in ITK order (LR, AP, SI)."""
        return tuple(reversed(self.shape))

    @property
    def itk_spacing(self) -> tuple[float, float, float]:
        """Spacing in ITK order (LR, AP, SI)."""
        return tuple(reversed(self.spacing_mm))

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "size_mm": list(self.size_mm)}

    @classmethod
    def from_dict(cls, d: dict) -> "FSUSpec":
        return cls(shape=tuple(d["shape"]), size_mm=tuple(d["size_mm"]))


# ----------------------------------------------------------------------------- frame
def canonical_axes(direction) -> np.ndarray:
    """The input's direction columns permuted and sign-flipped to be closest to the
    canonical FSU directions (LR, AP, SI). Returns a 3x3 matrix (columns = FSU ITK axes).

    The permutation maximises ``sum |<canonical_a, input_p(a)>|`` over all 6 permutations;
    each chosen column is flipped so that it points along its canonical direction.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    dots = CANONICAL_DIRECTIONS.T @ d  # dots[a, p] = <canonical_a, input column p>
    best = max(itertools.permutations(range(3)), key=lambda perm: sum(abs(dots[a, perm[a]]) for a in range(3)))
    cols = []
    for a, p in enumerate(best):
        s = 1.0 if dots[a, p] >= 0 else -1.0
        cols.append(s * d[:, p])
    return np.stack(cols, axis=1)


def _apply_up(axes: np.ndarray, up_lps) -> np.ndarray:
    """Rotate the SI axis within the sagittal plane (normal = LR axis) to follow ``up_lps``.

    ``up_lps`` points towards superior (its sign is fixed so that it does: a vector between
    two neighbouring disc centres may be given in either order)."""
    up0 = as_point(up_lps, "up vector")
    lr = axes[:, 0]
    up = up0 - np.dot(up0, lr) * lr
    n = np.linalg.norm(up)
    if n <= 1e-3 * np.linalg.norm(up0):
        raise InputError(f"up vector {_fmt_point(up_lps)} is (nearly) parallel to the left-right axis")
    up = up / n
    k = -up  # k goes superior -> inferior
    if np.dot(k, axes[:, 2]) < 0:  # the given vector pointed inferior: flip it
        k = -k
    j = np.cross(k, lr)
    if np.dot(j, axes[:, 1]) < 0:
        j = -j
    return np.stack([lr, j, k], axis=1)


def fsu_frame(image: sitk.Image, center_lps, spec: FSUSpec | None = None, up_lps=None) -> sitk.Image:
    """Empty reference grid (uint8, zeros) of the FSU centred exactly at ``center_lps``.

    Directions: the input's own axes, permuted/flipped to be closest to canonical
    (LR, AP, SI) (see :func:`canonical_axes`); optionally rotated by ``up_lps``. The
    physical centre of the grid (continuous index ``(size - 1) / 2``) is ``center_lps``.
    """
    _require_3d(image)
    spec = spec or FSUSpec()
    c = as_point(center_lps, "FSU centre")
    axes = canonical_axes(image.GetDirection())
    if up_lps is not None:
        axes = _apply_up(axes, up_lps)
    size = spec.itk_size
    spacing = np.asarray(spec.itk_spacing)
    half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    origin = c - axes @ (spacing * half)
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection([float(v) for v in axes.reshape(-1)])
    ref.SetOrigin([float(v) for v in origin])
    return ref


def physical_to_index(image: sitk.Image, points_lps) -> np.ndarray:
    """Continuous ITK index (i, j, k) of LPS point(s); shape (3,) or (N, 3). Vectorised."""
    m, origin = index_to_physical_matrix(image)
    pts = np.asarray(points_lps, dtype=np.float64)
    single = pts.ndim == 1
    pts = pts.reshape(-1, 3)
    idx = np.linalg.solve(m, (pts - origin[None, :]).T).T
    return idx[0] if single else idx


def disc_frame_index(fsu: sitk.Image, point_lps, order: str = "itk") -> np.ndarray:
    """Continuous index of a physical point in an FSU (or any) grid.

    ``order="itk"`` -> ``(i, j, k)`` = (LR, AP, SI); ``order="numpy"`` -> ``(k, j, i)`` = (SI, AP, LR).
    """
    idx = physical_to_index(fsu, as_point(point_lps))
    if order == "itk":
        return idx
    if order == "numpy":
        return idx[::-1].copy()
    raise ValueError(f"order must be 'itk' or 'numpy', got {order!r}")


def _voxel_centre_indices_in(target: sitk.Image, source: sitk.Image):
    """Continuous indices (in ``target``) of every voxel centre of ``source``, as three
    broadcastable arrays (c0, c1, c2) in source numpy order, without building dense coords."""
    mt, ot = index_to_physical_matrix(target)
    ms, os_ = index_to_physical_matrix(source)
    a = np.linalg.solve(mt, ms)  # target index = a @ source_index + b
    b = np.linalg.solve(mt, os_ - ot)
    ni, nj, nk = source.GetSize()
    ii = np.arange(ni, dtype=np.float64)[None, None, :]
    jj = np.arange(nj, dtype=np.float64)[None, :, None]
    kk = np.arange(nk, dtype=np.float64)[:, None, None]
    return [a[c, 0] * ii + a[c, 1] * jj + a[c, 2] * kk + b[c] for c in range(3)]


def _inside_mask(target: sitk.Image, source: sitk.Image) -> np.ndarray:
    """Bool array in ``source`` numpy order: voxel centre lies inside ``target``'s voxel extent
    (continuous index in [-0.5, N - 0.5), the region where ITK's linear resampler has data)."""
    size = target.GetSize()
    inside = None
    for c, comp in enumerate(_voxel_centre_indices_in(target, source)):
        m = (comp >= -0.5) & (comp < size[c] - 0.5)
        inside = m if inside is None else inside & m
    return inside


def fraction_inside(image: sitk.Image, frame: sitk.Image) -> float:
    """Fraction of ``frame``'s voxel centres that lie inside ``image``."""
    return float(np.mean(_inside_mask(image, frame)))


def distance_outside_mm(image: sitk.Image, point_lps) -> float:
    """Distance (mm) from ``point_lps`` to the volume's voxel extent; 0 when inside."""
    idx = physical_to_index(image, as_point(point_lps))
    size = np.asarray(image.GetSize(), dtype=np.float64)
    lo = -0.5 - idx
    hi = idx - (size - 0.5)
    excess = np.maximum(np.maximum(lo, hi), 0.0) * np.asarray(image.GetSpacing())
    return float(np.linalg.norm(excess))


def check_point_inside(image: sitk.Image, point_lps, what: str = "landmark") -> None:
    """Raise ``InputError('landmark (x, y, z) LPS is 12.3 mm outside the volume')`` when the
    point lies outside the voxel extent of ``image``."""
    _require_3d(image)
    p = as_point(point_lps, what)
    dist = distance_outside_mm(image, p)
    if dist > 0:
        raise InputError(f"{what} {_fmt_point(p)} LPS is {max(dist, 0.05):.1f} mm outside the volume")


_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _check_interpolation(interpolation: str, allowed) -> None:
    if interpolation not in allowed:
        raise InputError("interpolation must be " + " or ".join(repr(a) for a in allowed) + f", got {interpolation!r}")


def extract_fsu(image: sitk.Image, center_lps, spec: FSUSpec | None = None, up_lps=None,
                min_inside: float = 0.5, interpolation: str = "linear") -> sitk.Image:
    """Resample the FSU around ``center_lps`` (float32, linear, outside = 0).

    ``interpolation="nearest"`` (for label maps) keeps the input pixel type instead; ``"bspline"`` (cubic
    B-spline, float32) is for resolution studies only (``benchmarks/c2st_bounds.py``): the bundled models were
    trained on linearly resampled FSUs.
    Raises ``InputError`` when less than ``min_inside`` of the FSU voxels lie inside the
    volume, stating the fraction and how far (mm) the centre is outside / from the edge.
    """
    _check_interpolation(interpolation, ("linear", "nearest", "bspline"))
    _require_3d(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is required")
    spec = spec or FSUSpec()
    c = as_point(center_lps, "FSU centre")
    ref = fsu_frame(image, c, spec, up_lps)
    frac = fraction_inside(image, ref)
    if frac < min_inside:
        dist = distance_outside_mm(image, c)
        where = f"its centre {_fmt_point(c)} LPS is {dist:.1f} mm outside the volume" if dist > 0 else \
            f"its centre {_fmt_point(c)} LPS is inside but near the edge of the volume"
        raise InputError(
            f"only {frac * 100:.0f}% of the FSU ({spec.size_mm[0]:g}x{spec.size_mm[1]:g}x{spec.size_mm[2]:g} mm) "
            f"lies inside the volume (need {min_inside * 100:.0f}%): {where}")
    if interpolation == "nearest":
        return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
    return sitk.Resample(image, ref, sitk.Transform(), _INTERPOLATORS[interpolation], 0.0, sitk.sitkFloat32)


# ----------------------------------------------------------------------------- paste back
def _corners(image: sitk.Image) -> np.ndarray:
    """LPS corners (8, 3) of the voxel extent of ``image``."""
    m, origin = index_to_physical_matrix(image)
    size = np.asarray(image.GetSize(), dtype=np.float64)
    cs = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))
    return origin[None, :] + cs @ m.T


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _face_distance_mm(fsu: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Distance (mm, numpy order of ``grid``) of each voxel centre of ``grid`` to the nearest face of the
    FSU box (voxel extent of ``fsu``), measured along the FSU axes; negative outside."""
    size = fsu.GetSize()
    sp = fsu.GetSpacing()
    out = None
    for c, comp in enumerate(_voxel_centre_indices_in(fsu, grid)):
        d = np.minimum(comp + 0.5, size[c] - 0.5 - comp) * sp[c]
        out = d if out is None else np.minimum(out, d)
    return out


def paste_back(original: sitk.Image, inpainted_fsu: sitk.Image, landmark_lps, sigma_mm: float,
               threshold: float = 1e-3, edge_taper_mm: float = 0.0,
               reference_fsu: sitk.Image | None = None, interpolation: str = "linear",
               weight_saturation: float = 1.0) -> sitk.Image:
    """Blend an inpainted FSU back into the original volume.

    ``out = W * inpainted + (1 - W) * original`` on the original grid, with ``W`` the
    Gaussian around ``landmark_lps`` (:func:`spine_ldm.weighting.gaussian_weight`) and the
    inpainted FSU resampled linearly onto the original grid.

    With ``reference_fsu`` (an image on the same FSU grid, e.g. the autoencoder's reconstruction of the input
    FSU) only the *change* is added: ``out = original + W * (inpainted - reference)``. Anatomy the model did not
    change then keeps the scan's own detail (the autoencoder's smoothing cancels), and the pathology is not swamped
    by the reconstruction error. Only voxels with
    ``W >= threshold`` **and** inside the FSU box are touched; every other voxel is
    bit-identical to the input. Integer outputs are rounded and clipped to the dtype range.
    Origin, spacing, direction and metadata are preserved; ``original`` is never modified.
    Only the bounding box of the blended region is resampled (fast on large volumes).

    ``edge_taper_mm > 0`` (optional, default 0 = the plain contract above) additionally multiplies W
    by a smoothstep ramp from 0 at the FSU faces to 1 at ``edge_taper_mm`` inside them, which
    removes the seam where W is still large at a face (with sigma 16 mm, W = 0.29 at the LR faces
    25 mm from a central landmark). Voxels with a tapered weight below ``threshold`` stay untouched.

    Two knobs for resolution studies (``benchmarks/c2st_bounds.py``, ``benchmarks/paste_knobs.py``; the pipeline
    keeps the defaults, which ``paste_knobs.py`` measured best on the bundled models' outputs):
    ``interpolation="bspline"`` resamples the FSU(s) onto the scan with a cubic B-spline instead of linearly, and
    ``weight_saturation = s < 1`` pastes with ``min(1, W / s)`` (the full change wherever ``W >= s``, the same support ``W >= threshold * s``) instead of W.
    """
    _require_3d(original, "original volume")
    _require_3d(inpainted_fsu, "inpainted FSU")
    if reference_fsu is not None:
        _require_3d(reference_fsu, "reference FSU")
        if (reference_fsu.GetSize() != inpainted_fsu.GetSize()
                or not np.allclose(reference_fsu.GetOrigin(), inpainted_fsu.GetOrigin(), atol=1e-4)
                or not np.allclose(reference_fsu.GetSpacing(), inpainted_fsu.GetSpacing(), atol=1e-6)
                or not np.allclose(reference_fsu.GetDirection(), inpainted_fsu.GetDirection(), atol=1e-6)):
            raise InputError("reference FSU must lie on the inpainted FSU's grid (size, origin, spacing, direction)")
    if original.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("original volume must be scalar (1 component per voxel)")
    lm = as_point(landmark_lps, "landmark")
    if not (math.isfinite(float(edge_taper_mm)) and float(edge_taper_mm) >= 0):
        raise InputError(f"edge_taper_mm must be >= 0, got {edge_taper_mm!r}")
    _check_interpolation(interpolation, ("linear", "bspline"))
    try:
        sat = float(weight_saturation)
    except (TypeError, ValueError):
        sat = float("nan")
    if not (math.isfinite(sat) and 0.0 < sat <= 1.0):
        raise InputError(f"weight_saturation must be in (0, 1], got {weight_saturation!r}")
    radius = weight_radius_mm(sigma_mm, threshold * sat)

    src = sitk.GetArrayViewFromImage(original)
    out_arr = np.array(src, copy=True)

    # Bounding box (original index space) of: sphere W >= threshold  ∩  FSU box.
    size = np.asarray(original.GetSize())
    sphere = lm[None, :] + np.array(list(itertools.product((-radius, radius), repeat=3)))
    boxes = []
    for pts in (sphere, _corners(inpainted_fsu)):
        idx = physical_to_index(original, pts)
        boxes.append((idx.min(axis=0), idx.max(axis=0)))
    lo = np.maximum(np.maximum(boxes[0][0], boxes[1][0]), -0.5)
    hi = np.minimum(np.minimum(boxes[0][1], boxes[1][1]), size - 0.5)
    start = np.maximum(np.floor(lo).astype(int), 0)
    stop = np.minimum(np.ceil(hi).astype(int) + 1, size)
    if np.any(stop <= start):
        result = sitk.GetImageFromArray(out_arr)
    else:
        roi_size = (stop - start).tolist()
        ref = sitk.Image([int(v) for v in roi_size], sitk.sitkUInt8)
        ref.SetSpacing(original.GetSpacing())
        ref.SetDirection(original.GetDirection())
        ref.SetOrigin(original.TransformIndexToPhysicalPoint([int(v) for v in start]))
        interp = _INTERPOLATORS[interpolation]
        inp = sitk.GetArrayFromImage(
            sitk.Resample(inpainted_fsu, ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat64))
        if reference_fsu is not None:
            inp = inp - sitk.GetArrayFromImage(
                sitk.Resample(reference_fsu, ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat64))
        w = gaussian_weight(ref, lm, sigma_mm).astype(np.float64)
        if sat < 1.0:
            w = np.minimum(1.0, w / sat)
        if edge_taper_mm and edge_taper_mm > 0:
            u = np.clip(_face_distance_mm(inpainted_fsu, ref) / float(edge_taper_mm), 0.0, 1.0)
            w = w * (u * u * (3.0 - 2.0 * u))
        mask = (w >= threshold) & _inside_mask(inpainted_fsu, ref)
        n_bad = int(np.count_nonzero(~np.isfinite(inp[mask])))
        if n_bad:
            raise InputError(f"inpainted FSU has {n_bad} NaN/Inf voxels in the blended region; nothing was pasted")
        sl = (slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0]))
        block = out_arr[sl]
        orig_vals = block[mask].astype(np.float64)
        wm = w[mask]
        if reference_fsu is None:
            block[mask] = _cast_like(wm * inp[mask] + (1.0 - wm) * orig_vals, out_arr.dtype)
        else:
            block[mask] = _cast_like(orig_vals + wm * inp[mask], out_arr.dtype)
        result = sitk.GetImageFromArray(out_arr)
    result.CopyInformation(original)
    for key in original.GetMetaDataKeys():
        result.SetMetaData(key, original.GetMetaData(key))
    return result


# ----------------------------------------------------------------------------- latent grid
def latent_frame(fsu_frame_image: sitk.Image, factors=(4, 4, 1)) -> sitk.Image:
    """Geometry of the latent grid of an FSU (uint8 zeros).

    ``factors`` are the downsampling factors in numpy order (SI, AP, LR). Latent voxel
    ``m`` covers FSU voxels ``f*m .. f*m + f - 1`` along each axis; its centre is the mean
    of those FSU voxel centres, i.e. at FSU continuous index ``f*m + (f - 1) / 2``.
    """
    _require_3d(fsu_frame_image, "FSU frame")
    f_itk = np.asarray(list(reversed([int(v) for v in factors])), dtype=np.int64)
    if f_itk.shape != (3,) or np.any(f_itk < 1):
        raise InputError(f"latent factors must be 3 positive integers (SI, AP, LR), got {factors!r}")
    size = np.asarray(fsu_frame_image.GetSize(), dtype=np.int64)
    if np.any(size % f_itk):
        raise InputError(f"FSU size {tuple(size[::-1])} (SI, AP, LR) is not divisible by latent factors {tuple(factors)}")
    m, origin = index_to_physical_matrix(fsu_frame_image)
    ref = sitk.Image([int(v) for v in size // f_itk], sitk.sitkUInt8)
    ref.SetSpacing([float(s * f) for s, f in zip(fsu_frame_image.GetSpacing(), f_itk)])
    ref.SetDirection(fsu_frame_image.GetDirection())
    ref.SetOrigin([float(v) for v in origin + m @ ((f_itk - 1) / 2.0)])
    return ref


# ----------------------------------------------------------------------------- normalisation
@dataclass
class Normalization:
    """Invertible affine intensity normalisation fitted on an FSU.

    ``fit`` takes the ``p_low`` / ``p_high`` percentiles (default 0.5 / 99.5) of the FSU
    intensities, ``lo`` / ``hi``, and maps them affinely to [-1, 1]:

        forward(x) = 2 (x - lo) / (hi - lo) - 1
        inverse(y) = (y + 1) (hi - lo) / 2 + lo

    No clipping, so ``inverse(forward(x)) == x`` up to float rounding (values beyond the
    percentiles map slightly outside [-1, 1]). When ``hi - lo`` is 0 (constant FSU) the
    scale falls back to 1 so the map stays invertible. Works on numpy arrays and torch
    tensors alike. ``to_dict`` / ``from_dict`` record it in provenance.
    """

    lo: float = 0.0
    hi: float = 1.0
    p_low: float = 0.5
    p_high: float = 99.5
    method: str = field(default="percentile_affine")

    def __post_init__(self):
        self.lo = float(self.lo)
        self.hi = float(self.hi)
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            raise InputError(f"normalisation range must be finite, got lo={self.lo}, hi={self.hi}")
        if self.hi <= self.lo:
            self.hi = self.lo + 2.0  # scale (hi - lo) / 2 == 1: identity slope

    @classmethod
    def fit(cls, array, p_low: float = 0.5, p_high: float = 99.5) -> "Normalization":
        if isinstance(array, sitk.Image):
            array = sitk.GetArrayViewFromImage(array)
        a = np.asarray(array, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            raise InputError("cannot fit intensity normalisation: no finite voxels")
        lo, hi = np.percentile(finite, [p_low, p_high])
        return cls(lo=float(lo), hi=float(hi), p_low=float(p_low), p_high=float(p_high))

    @property
    def scale(self) -> float:
        return 2.0 / (self.hi - self.lo)

    def forward(self, x):
        return (x - self.lo) * self.scale - 1.0

    def inverse(self, y):
        return (y + 1.0) / self.scale + self.lo

    def to_dict(self) -> dict:
        return {"method": self.method, "lo": self.lo, "hi": self.hi, "p_low": self.p_low, "p_high": self.p_high}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(lo=d["lo"], hi=d["hi"], p_low=d.get("p_low", 0.5), p_high=d.get("p_high", 99.5),
                   method=d.get("method", "percentile_affine"))


# ----------------------------------------------------------------------------- disc centre
#: Typical anterior distance (mm) from the pathology landmark to the disc centre.
#: DH landmark = posterior disc margin / herniation tip: an adult lumbar disc is ~30-40 mm
#: deep (AP), so its posterior margin lies ~15-20 mm behind the centre and a herniation tip a
#: few mm further: 20 mm. (On the bundled real IVD cases the mid-sagittal posterior margin of
#: L1-L2..L4-L5 lies 12-20 mm, median ~16 mm, behind the disc centroid; L5-S1 ~8-10 mm.)
#: CCS landmark = inside the central canal behind the disc: ~8 mm further posterior than
#: the disc margin (canal AP diameter ~15 mm), so ~28 mm.
#: The FSU is 80 mm in AP, so an error of +-10 mm still keeps disc and canal inside it.
DISC_OFFSET_MM = {"none": 0.0, "dh": 20.0, "ccs": 28.0}


#: Typical sagittal tilt (degrees) of each disc's own AP axis against the scan's AP axis, positive when the disc
#: centre lies inferior of a point behind it (the lordosis tips the lower discs: L5-S1 most). Measured on the three
#: real IVD scans of ../shared/data/lumbar_t2 (posterior margin -> labelled centroid along the disc's principal
#: axis, mid-sagittal): L1-L2 -7, L2-L3 -8, L3-L4 -5, L4-L5 +6, L5-S1 +28 (24-34); the phantom's mean landmark ->
#: disc-centre direction: -8, -3, +4, +12, +26. The table is between the two. At L5-S1 an AP-only offset of 20 mm
#: misses the centre by 8-12 mm on the real scans (phantoms: 10-13 mm on average); turned by the tilt, by
#: 0.8-3.0 mm (phantoms: 3-5 mm on average).
DISC_TILT_DEG = {"L1-L2": -8.0, "L2-L3": -5.0, "L3-L4": 0.0, "L4-L5": 9.0, "L5-S1": 27.0}


def _axis_towards(image: sitk.Image | None, lps_axis: int, sign: float, skip: int | None = None) -> tuple:
    """(column index, unit vector): the image's own direction column closest to LPS axis ``lps_axis`` (0 x, 1 y,
    2 z), other than column ``skip``, oriented so that its ``lps_axis`` component has sign ``sign``; the pure LPS
    axis (index ``lps_axis``) when ``image`` is None."""
    if image is None:
        e = np.zeros(3)
        e[lps_axis] = sign
        return lps_axis, e
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    dots = np.abs(d[lps_axis, :])  # component of each column along the LPS axis
    if skip is not None:
        dots[skip] = -1.0
    p = int(np.argmax(dots))
    col = d[:, p]
    return p, (col if d[lps_axis, p] * sign > 0 else -col)


def estimate_disc_center(landmark_lps, condition: str, image: sitk.Image | None = None, level: str | None = None,
                         offset_mm: float | None = None):
    """Estimate the disc centre (FSU centre) from a pathology landmark.

    The landmark is shifted by a typical distance (:data:`DISC_OFFSET_MM`):

    * ``dh_*`` (landmark at the posterior disc margin / herniation): 20 mm
    * ``ccs_*`` (landmark in the central canal behind the disc): 28 mm
    * ``none``: 0 mm (the landmark is taken as the disc centre)

    ``offset_mm`` replaces that distance (e.g. a dataset's own convention). Direction: the image's own AP axis (the direction column closest to LPS y, towards anterior = -y; pure -y
    when ``image`` is None). With ``level`` it is turned in the image's sagittal plane (AP axis and the column
    closest to LPS z) by that disc's typical tilt (:data:`DISC_TILT_DEG`, positive towards inferior), since the
    landmark lies behind the disc along the disc's own axis, not the scan's: this matters at L5-S1 (27 degrees).

    Returns an LPS tuple. Pass an explicit disc centre whenever one is known.
    """
    p = as_point(landmark_lps, "landmark")
    cond = parse_condition(condition)
    dist = DISC_OFFSET_MM[cond.split("_")[0]] if offset_mm is None else float(offset_mm)
    if not math.isfinite(dist) or dist < 0:
        raise InputError(f"disc-centre offset must be a finite distance >= 0 mm, got {offset_mm!r}")
    ap, u = _axis_towards(image, 1, -1.0)
    if level is not None:
        tilt = math.radians(DISC_TILT_DEG[parse_level(level)])
        sup = _axis_towards(image, 2, 1.0, skip=ap)[1]  # another column, so orthogonal to u
        u = math.cos(tilt) * u - math.sin(tilt) * sup  # turned towards inferior
    c = p + dist * u
    return tuple(float(v) for v in c)


#: Where a herniation's landmark goes: the centre of the extruded disc material, this far (mm) behind the posterior
#: disc margin (half the protrusion beyond the margin; the phantom draws 2-4 mm for a small, 6-10 mm for a
#: moderate/large herniation). The bundled models were trained with landmarks there (the phantom's pathology
#: landmark): the herniation is drawn centred on the landmark, so a point on the margin itself puts part of it inside
#: the disc, where it does not show (measured by ``benchmarks/landmark_placement.py``, table in docs/results).
HERNIATION_CENTRE_MM = {"dh_small": 1.5, "dh_moderate_large": 4.0}


def herniation_landmark(posterior_margin_lps, disc_center_lps, condition: str) -> tuple[float, float, float]:
    """The landmark of a herniation of ``condition`` to create on a disc: :data:`HERNIATION_CENTRE_MM` behind the
    posterior disc margin, along the disc's own AP axis (disc centre -> posterior margin). LPS tuple."""
    cond = parse_condition(condition)
    if cond not in HERNIATION_CENTRE_MM:
        raise InputError(f"herniation_landmark needs a herniation condition ({', '.join(HERNIATION_CENTRE_MM)}), "
                         f"got {cond!r}")
    m, c = as_point(posterior_margin_lps, "posterior disc margin"), as_point(disc_center_lps, "disc centre")
    u = m - c
    n = float(np.linalg.norm(u))
    if n < 1.0:
        raise InputError(f"posterior disc margin {tuple(np.round(m, 1))} and disc centre {tuple(np.round(c, 1))} "
                         f"are {n:.2f} mm apart; the margin must lie behind the centre")
    return tuple(float(v) for v in m + HERNIATION_CENTRE_MM[cond] * u / n)


