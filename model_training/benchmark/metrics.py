"""Per-output metrics of the phantom benchmark: G (an inpainted healthy twin H) against the truth P (the same
phantom seed with the pathology), all on H's grid, distances in mm from voxel centres (``spine_ldm.weighting``).

* :func:`cos_r2`: cosine similarity and R^2 of the change ``G - H`` against the true change ``P - H`` over the voxels
  whose centres lie within :data:`COS_RADIUS_MM` (25 mm) of the landmark (the phantom pathology changes nothing
  farther than 25 mm from a herniation landmark, 27 mm from a stenosis one).
* :func:`mean_gradient`: mean gradient magnitude (``np.gradient`` with the voxel spacing, per mm) within
  :data:`SHARP_RADIUS_MM` (12 mm); ``sharp = mean_gradient(G) / mean_gradient(P_fsu)`` where P_fsu =
  :func:`through_grid` (P resampled linearly onto the model's FSU grid and back): 1 = as sharp as the truth can be on
  the model's grid. ``sharp_native`` divides by P's own gradient.
* :func:`protrusion_mm3` (herniations): contrast-weighted volume of disc-like tissue posterior to the posterior disc
  margin plane, within :data:`DH_RADIUS_MM` (15 mm) of the landmark: each voxel counts by the fraction of the
  CSF-to-disc contrast ``csf - disc`` by which it is darker than in a reference image (clipped to [0, 1]);
  ``disc`` = median of H within 3 mm of the disc centre (nucleus), ``csf`` = 95th percentile of H in the region.
  Reference: H for the truth P; for an output G the
  method's *null output* (what the same paste-back gives with no change: H itself in ``change`` paste mode, the
  autoencoder reconstruction of H pasted into H in ``blend`` mode), so the autoencoder's smoothing of thin dark
  structures (roots, ligament) is not counted as a protrusion. On exact phantoms it reads 0.6-1.05 of the label
  volume (small herniations 50-250 mm^3, moderate/large 440-1350 mm^3: part of a herniation replaces epidural fat,
  which is darker than CSF to begin with).
* :func:`canal_area_mm2` (stenoses): CSF-weighted thecal-sac area in the plane through the landmark perpendicular
  to the canal (spanned by the disc's anterior-posterior axis and left-right): every 0.5 mm pixel within
  :data:`CANAL_RADIUS_MM` (12 mm) of the landmark counts ``clip((x - dark) / (csf - dark), 0, 1)`` of its area,
  ``csf`` / ``dark`` = 95th / 5th percentile of H in that disc. Soft, so the autoencoder's blur barely moves it
  (< 5 % at 1 mm blur); on phantoms it reads a healthy sac ~25 % above its label area (epidural fat counts
  partly) and a stenosed one close to it (moderate 135-180 vs 107-136 mm^2, severe 53-77 vs 50-63 mm^2).

Every rule is computed the same way on G and on the truth: compare G's number with the truth's.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import SimpleITK as sitk

from spine_ldm import weighting
from spine_ldm.geometry import physical_to_index

COS_RADIUS_MM = 25.0
SHARP_RADIUS_MM = 12.0
DH_RADIUS_MM = 15.0
DISC_REF_RADIUS_MM = 3.0
CANAL_RADIUS_MM = 12.0
CANAL_PIXEL_MM = 0.5


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


class Neighbourhood:
    """The voxels of ``image``'s grid in the bounding box of a ball (``radius_mm`` + ``margin`` voxels) around a
    point: ``ref`` (a sub-grid with the same spacing and direction), squared distances ``d2`` (mm^2, numpy order) and
    :meth:`array` to read any image on that grid (sliced when it lies on ``image``'s grid, else resampled
    linearly)."""

    def __init__(self, image: sitk.Image, point_lps, radius_mm: float, margin: int = 2):
        p = np.asarray(point_lps, dtype=np.float64)
        cube = p[None, :] + np.array(list(itertools.product((-radius_mm, radius_mm), repeat=3)))
        idx = physical_to_index(image, cube)
        size = np.asarray(image.GetSize())
        lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - margin, 0, size - 1)
        hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + margin + 1, lo + 1, size)
        self.grid = image
        self.ref = sitk.RegionOfInterest(image, [int(v) for v in hi - lo], [int(v) for v in lo])
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
        self.point = p
        self.d2 = weighting.squared_distance_map(self.ref, p)
        self.spacing = tuple(float(v) for v in self.ref.GetSpacing()[::-1])  # numpy order
        self.voxel_mm3 = float(np.prod(self.spacing))

    def array(self, image: sitk.Image) -> np.ndarray:
        if _same_grid(image, self.grid):
            return np.array(sitk.GetArrayViewFromImage(image)[self.slices], dtype=np.float64, copy=True)
        return sitk.GetArrayFromImage(sitk.Resample(image, self.ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat64))

    def ball(self, radius_mm: float) -> np.ndarray:
        return self.d2 <= float(radius_mm) ** 2

    def plane_distance(self, point_lps, normal) -> np.ndarray:
        """Signed distance (mm) of every voxel centre to the plane through ``point_lps`` with unit ``normal``."""
        m, origin = weighting.index_to_physical_matrix(self.ref)
        n = np.asarray(normal, dtype=np.float64)
        n = n / np.linalg.norm(n)
        step = m.T @ n  # mm per index step along i, j, k
        ni, nj, nk = self.ref.GetSize()
        return ((origin - np.asarray(point_lps, dtype=np.float64)) @ n
                + np.arange(nk)[:, None, None] * step[2] + np.arange(nj)[None, :, None] * step[1]
                + np.arange(ni)[None, None, :] * step[0])


def cos_r2(g: np.ndarray, h: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(cosine similarity of ``g - h`` and ``p - h``, ``1 - |(g-h)-(p-h)|^2 / |p-h|^2``) over ``mask``.

    cos is NaN when either change is zero; R^2 is NaN when the true change is zero."""
    d = np.asarray(g, np.float64) - np.asarray(h, np.float64)
    t = np.asarray(p, np.float64) - np.asarray(h, np.float64)
    d, t = (d.ravel(), t.ravel()) if mask is None else (d[mask], t[mask])
    nd, nt = float(np.sqrt(d @ d)), float(np.sqrt(t @ t))
    cos = float(d @ t) / (nd * nt) if nd > 0 and nt > 0 else float("nan")
    r2 = 1.0 - float(((d - t) @ (d - t))) / (nt * nt) if nt > 0 else float("nan")
    return cos, r2


def change_amplitude(g: np.ndarray, h: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``g - h`` projected on the true change ``p - h`` over ``mask``, in units of it (1 = the full contrast,
    0.5 = half of it, whatever else ``g`` changed); NaN when the true change is zero."""
    d = np.asarray(g, np.float64) - np.asarray(h, np.float64)
    t = np.asarray(p, np.float64) - np.asarray(h, np.float64)
    d, t = (d.ravel(), t.ravel()) if mask is None else (d[mask], t[mask])
    tt = float(t @ t)
    return float(d @ t) / tt if tt > 0 else float("nan")


def mean_gradient(a: np.ndarray, spacing_np, mask: np.ndarray | None = None) -> float:
    """Mean gradient magnitude (intensity per mm; ``np.gradient`` with the numpy-order spacing) over ``mask``."""
    grads = np.gradient(np.asarray(a, dtype=np.float64), *[float(s) for s in spacing_np])
    mag = np.sqrt(sum(gr * gr for gr in grads))
    return float(mag[mask].mean() if mask is not None else mag.mean())


def through_grid(image: sitk.Image, frame: sitk.Image, nb: Neighbourhood) -> np.ndarray:
    """``image`` resampled linearly onto ``frame`` (e.g. the model's FSU grid) and back onto the neighbourhood;
    voxels outside the frame keep ``image``'s own values."""
    on_frame = sitk.Resample(image, frame, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    back = sitk.GetArrayFromImage(sitk.Resample(on_frame, nb.ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat64))
    ones = sitk.Image(frame.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(frame)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, nb.ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                                                  sitk.sitkFloat32)) > 0.5
    return np.where(inside, back, nb.array(image))


def disc_axes(disc_center_lps, posterior_margin_lps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u_ap, u_lr, u_si): unit anterior->posterior axis of the disc (centre -> posterior margin), the patient
    left-right axis made orthogonal to it, and their cross product (the canal direction at the disc)."""
    u_ap = np.asarray(posterior_margin_lps, np.float64) - np.asarray(disc_center_lps, np.float64)
    u_ap /= np.linalg.norm(u_ap)
    lr = np.array([1.0, 0.0, 0.0])
    u_lr = lr - (lr @ u_ap) * u_ap
    u_lr /= np.linalg.norm(u_lr)
    return u_ap, u_lr, np.cross(u_ap, u_lr)


def disc_reference(h_image: sitk.Image, disc_center_lps) -> float:
    """Median intensity of H within :data:`DISC_REF_RADIUS_MM` of the disc centre (the nucleus)."""
    nb = Neighbourhood(h_image, disc_center_lps, DISC_REF_RADIUS_MM, margin=0)
    return float(np.median(nb.array(h_image)[nb.ball(DISC_REF_RADIUS_MM)]))


def protrusion_mm3(x: np.ndarray, reference: np.ndarray, h: np.ndarray, nb: Neighbourhood, disc_ref: float,
                   posterior_margin_lps, u_ap) -> float:
    """Disc-like tissue posterior to the disc margin (mm^3): over the voxels within :data:`DH_RADIUS_MM` of the
    landmark (``nb.point``) and posterior of the plane through ``posterior_margin_lps`` (normal ``u_ap``), the sum of
    ``clip((reference - x) / (csf - disc_ref), 0, 1)`` times the voxel volume (each voxel counts by how much of the
    CSF-to-disc contrast it lost); ``csf`` = 95th percentile of ``h`` there."""
    region = nb.ball(DH_RADIUS_MM) & (nb.plane_distance(posterior_margin_lps, u_ap) > 0)
    if not region.any():
        return float("nan")
    csf = float(np.percentile(h[region], 95))
    if not csf > disc_ref:
        return float("nan")
    frac = np.clip((reference[region] - x[region]) / (csf - disc_ref), 0.0, 1.0)
    return float(frac.sum() * nb.voxel_mm3)


def plane_image(image: sitk.Image, point_lps, u1, u2, half_mm: float, pixel_mm: float) -> np.ndarray:
    """Linear resampling of ``image`` on the square plane centred exactly at ``point_lps``: array columns run along
    the unit vector ``u1``, rows along ``u2``, ``2 half_mm / pixel_mm + 1`` pixels a side."""
    n = int(round(2 * half_mm / pixel_mm)) + 1
    ref = sitk.Image([n, n, 1], sitk.sitkFloat32)
    u1, u2 = np.asarray(u1, np.float64), np.asarray(u2, np.float64)
    ref.SetDirection(tuple(np.stack([u1, u2, np.cross(u1, u2)], axis=1).reshape(-1)))
    ref.SetSpacing((pixel_mm, pixel_mm, 1.0))
    ref.SetOrigin(tuple(np.asarray(point_lps, np.float64) - (u1 + u2) * half_mm))
    return sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat64))[0]


def canal_area_mm2(x_image: sitk.Image, h_image: sitk.Image, landmark_lps, u_ap, u_lr,
                   radius_mm: float = CANAL_RADIUS_MM, pixel_mm: float = CANAL_PIXEL_MM) -> float:
    """CSF-weighted thecal-sac area (mm^2) of ``x_image`` in the plane through the landmark spanned by ``u_ap`` and
    ``u_lr`` (see the module docstring); the CSF / dark references come from ``h_image``."""
    xp = plane_image(x_image, landmark_lps, u_ap, u_lr, radius_mm, pixel_mm)
    hp = xp if x_image is h_image else plane_image(h_image, landmark_lps, u_ap, u_lr, radius_mm, pixel_mm)
    c = (xp.shape[0] - 1) / 2.0
    yy, xx = np.mgrid[:xp.shape[0], :xp.shape[1]]
    disc = np.hypot(yy - c, xx - c) * pixel_mm <= radius_mm
    csf, dark = np.percentile(hp[disc], [95, 5])
    if not csf > dark:
        return float("nan")
    return float(np.clip((xp[disc] - dark) / (csf - dark), 0.0, 1.0).sum() * pixel_mm * pixel_mm)


def finite_mean(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")
