"""Random, plausible lumbar anatomy in physical millimetres (sagittal plane + left-right extent).

Coordinates: LPS millimetres, ``x`` = patient left (+), ``y`` = posterior (+), ``z`` = superior (+).
The sagittal model lives in the (y, z) plane; left-right extent is described per structure.

The spine is a chain of rigid segments (T12, L1..L5, S1..S4) joined by discs (T12-L1 .. L5-S1) and fused sacral
remnants. Each segment has a centre, an axis angle ``theta`` (0 = vertical; positive = going down moves
posteriorly), height ``H`` (along its axis), depth ``D`` (anterior-posterior) and width ``W`` (left-right).
Posterior structures (canal, thecal sac, laminae, ligamentum flavum, spinous processes, facets) are described in
curvilinear coordinates ``(s, n)`` along the posterior wall of the vertebral bodies: ``s`` is arc length going
inferiorly, ``n`` the signed distance posterior to that wall.

All random numbers come from the generator passed in (the anatomy stream), never from pathology flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial import cKDTree

SEGMENTS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3", "S4")
GAPS = ("T11-T12", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1", "S1-S2", "S2-S3", "S3-S4")
N_DISCS = 7  # the first seven gaps are real discs; the others are fused sacral remnants
LUMBAR = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")  # segments with a free posterior arch

_H = np.array([22.0, 23.0, 25.0, 26.5, 27.5, 27.5, 26.5, 24.0, 19.0, 15.0, 11.0])
_D = np.array([28.0, 29.0, 31.0, 33.0, 34.5, 35.0, 35.0, 36.0, 28.0, 22.0, 16.0])
_W = np.array([36.0, 38.0, 42.0, 45.0, 48.0, 50.0, 52.0, 50.0, 38.0, 28.0, 20.0])
_THETA = np.array([-16.0, -14.0, -11.0, -6.0, 0.0, 7.0, 16.0, 36.0, 48.0, 60.0, 72.0])
_GAP = np.array([6.0, 6.5, 8.0, 9.0, 10.0, 10.5, 10.5, 1.6, 1.4, 1.2])
_CANAL_AP = np.array([17.5, 18.0, 19.0, 18.5, 18.0, 18.0, 18.5, 15.0, 10.0, 7.0, 5.0])
_CANAL_HW = np.array([9.5, 10.0, 11.0, 11.5, 12.0, 12.5, 13.5, 14.0, 11.0, 8.0, 6.0])
_SPINOUS_LEN = np.array([22.0, 24.0, 26.0, 28.0, 29.0, 28.0, 24.0])


def _dvec(theta):
    """Unit vector along a segment axis, going inferiorly, in (y, z)."""
    return np.array([np.sin(theta), -np.cos(theta)])


def _evec(theta):
    """Unit vector perpendicular to the axis, pointing posteriorly, in (y, z)."""
    return np.array([np.cos(theta), np.sin(theta)])


class _Frame2D:
    """Local sagittal frame of a centre ``c`` (y, z) and tilt ``theta``: d along the axis, e posterior."""

    @property
    def d(self):
        return _dvec(self.theta)

    @property
    def e(self):
        return _evec(self.theta)

    def local(self, y, z):
        """(u, v): u along the axis (inferior +), v posterior (+), from the centre."""
        dy, dz = y - self.c[0], z - self.c[1]
        d, e = self.d, self.e
        return dy * d[0] + dz * d[1], dy * e[0] + dz * e[1]

    def point(self, u, v):
        return self.c + u * self.d + v * self.e


@dataclass
class Segment(_Frame2D):
    name: str
    c: np.ndarray  # centre (y, z)
    theta: float
    H: float
    D: float
    W: float


@dataclass
class Gap(_Frame2D):
    name: str
    upper: int
    lower: int
    c: np.ndarray  # centre (y, z): midpoint between the two endplate centres
    theta: float
    h_mid: float  # height at the centre
    dtheta: float  # theta(lower) - theta(upper): the disc is h_mid - v * dtheta tall at depth v
    D: float
    W: float
    is_disc: bool
    degeneration: float = 0.0  # 0 healthy .. 1 severely desiccated
    cleft: bool = False  # intranuclear cleft

    def height(self, v):
        return np.maximum(self.h_mid - v * self.dtheta, 0.6)


class Curve:
    """Dense smooth curve along the posterior wall of the vertebral bodies, with arc length and normals."""

    def __init__(self, pts: np.ndarray, step: float = 0.25, smooth_mm: float = 3.0):
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        s0 = np.concatenate([[0.0], np.cumsum(seg)])
        s = np.arange(0.0, s0[-1], step)
        p = np.stack([np.interp(s, s0, pts[:, 0]), np.interp(s, s0, pts[:, 1])], axis=1)
        p = gaussian_filter1d(p, smooth_mm / step, axis=0, mode="nearest")
        seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
        self.s = np.concatenate([[0.0], np.cumsum(seg)])
        self.p = p
        t = np.gradient(p, axis=0)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        self.t = t  # tangent, pointing inferiorly
        self.nrm = np.stack([-t[:, 1], t[:, 0]], axis=1)  # normal, pointing posteriorly
        self._tree = cKDTree(p)

    def project(self, y, z):
        """Curvilinear (s, n) of points (y, z) (float64 in, float32 out)."""
        q = np.stack([np.ravel(y), np.ravel(z)], axis=1)
        _, idx = self._tree.query(q)
        dq = q - self.p[idx]
        s = self.s[idx] + np.einsum("ij,ij->i", dq, self.t[idx])
        n = np.einsum("ij,ij->i", dq, self.nrm[idx])
        shape = np.shape(y)
        return s.reshape(shape).astype(np.float32), n.reshape(shape).astype(np.float32)

    def point(self, s, n=0.0):
        """(y, z) of curvilinear coordinates (scalars or arrays)."""
        s = np.asarray(s, dtype=np.float64)
        py = np.interp(s, self.s, self.p[:, 0])
        pz = np.interp(s, self.s, self.p[:, 1])
        ny = np.interp(s, self.s, self.nrm[:, 0])
        nz = np.interp(s, self.s, self.nrm[:, 1])
        nn = np.hypot(ny, nz)
        return np.stack([py + n * ny / nn, pz + n * nz / nn], axis=-1)


@dataclass
class Profiles:
    """Canal / soft tissue quantities as functions of s (piecewise linear between knots)."""

    knots_s: np.ndarray
    values: dict = field(default_factory=dict)

    def __call__(self, name, s):
        return np.interp(s, self.knots_s, self.values[name]).astype(np.float32)


@dataclass
class Root:
    side: int
    eta: float  # left-right position in the sac, normalised by the sac half width (+ = patient left)
    xi: float  # anterior-posterior position, normalised by the sac half depth (+ = posterior)
    radius: float
    s_exit: float  # where it leaves the sac (it then runs laterally for ~18 mm)
    wobble: tuple  # (amplitude, wavelength, phase)


@dataclass
class Anatomy:
    segments: list
    gaps: list
    curve: Curve
    prof: Profiles
    xm0: float  # midline left-right position (LPS x) at L3
    scol: tuple  # (amplitude mm, wavelength mm, phase): lateral wander of the midline along s
    s_conus: float
    s_sac_end: float
    roots: list
    seg_s: dict  # segment -> (s_top, s_bottom) of its posterior wall
    gap_s: dict  # gap -> s at the posterior disc margin
    gap_margin_n: dict  # gap -> n of the posterior disc margin at its centre
    pedicle_w: float
    lamina_t: float
    spinous: list  # per lumbar segment: dict(s0, n0, length, h0, h1, tilt, half_width)
    facet_tilt: float
    y_front_skin: float
    t_front_fat: float
    marrow: dict  # label -> marrow intensity
    nucleus: dict  # nucleus label -> intensity
    basivertebral: float = 1.5  # half height of the basivertebral vein channel (mm)

    def xm(self, s):
        a, lam, ph = self.scol
        return (self.xm0 + a * np.sin(2 * np.pi * np.asarray(s, np.float32) / lam + ph)).astype(np.float32)

    def sac(self, s):
        """Healthy thecal sac (n_centre, half depth a_n, half width a_x) at s."""
        p = self.prof
        taper = np.sqrt(np.clip((self.s_sac_end - s) / 14.0, 0.0, 1.0)).astype(np.float32)
        a_n = p("sac_an", s) * taper
        a_x = p("sac_ax", s) * taper
        return p("sac_nc", s), a_n, a_x


def build(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    g = u(0.93, 1.07)
    H = _H * g * (1 + rng.normal(0, 0.025, _H.size))
    D = _D * g * (1 + rng.normal(0, 0.025, _D.size))
    W = _W * g * (1 + rng.normal(0, 0.025, _W.size))
    lord = u(0.75, 1.25)
    tilt = u(-5.0, 5.0)
    i3 = SEGMENTS.index("L3")
    theta = np.deg2rad(tilt + (_THETA - _THETA[i3]) * lord + _THETA[i3] + rng.normal(0, 1.0, _THETA.size))
    degen = np.array([u(0, 0.15), u(0, 0.15), u(0, 0.2), u(0, 0.2), u(0, 0.3), u(0, 0.45), u(0.05, 0.7), 0, 0, 0])
    gap_h = _GAP * g * u(0.85, 1.15, _GAP.size) * (1 - 0.35 * degen)

    # --- chain from T12 downwards
    segs = [Segment(SEGMENTS[0], np.zeros(2), float(theta[0]), float(H[0]), float(D[0]), float(W[0]))]
    gaps = []
    for k in range(1, len(SEGMENTS)):
        up = segs[-1]
        bottom = up.c + up.d * up.H / 2
        th_d = 0.5 * (up.theta + theta[k])
        dd = _dvec(th_d)
        gc = bottom + dd * gap_h[k - 1] / 2
        top = bottom + dd * gap_h[k - 1]
        seg = Segment(SEGMENTS[k], top + _dvec(theta[k]) * H[k] / 2, float(theta[k]), float(H[k]), float(D[k]),
                      float(W[k]))
        gaps.append(Gap(GAPS[k - 1], k - 1, k, gc, float(th_d), float(gap_h[k - 1]), float(theta[k] - up.theta),
                        float(min(up.D, seg.D)), float(min(up.W, seg.W)), k - 1 < N_DISCS, float(degen[k - 1])))
        segs.append(seg)
    # place L3 centre at a random position near (-20, +12) mm
    shift = np.array([u(-5.0, 8.0), u(4.0, 20.0)]) - segs[i3].c
    for o in segs + gaps:
        o.c = o.c + shift

    # --- posterior wall curve through the posterior corners (extended beyond T12 and S4)
    pts = []
    first = segs[0]
    pts.append(first.point(-first.H / 2 - 150.0, first.D / 2))
    for sg in segs:
        pts.append(sg.point(-sg.H / 2 + 1.0, sg.D / 2))
        pts.append(sg.point(sg.H / 2 - 1.0, sg.D / 2))
    last = segs[-1]
    tail = last.point(last.H / 2, last.D / 2)  # coccyx: curves back to ~vertical below S4
    for step, dth in ((15.0, 0.35), (15.0, 0.6), (60.0, 0.8)):
        th = last.theta - dth
        tail = tail + _dvec(th) * step
        pts.append(tail.copy())
    curve = Curve(np.array(pts))

    def sproj(p):
        s, n = curve.project(np.array([p[0]]), np.array([p[1]]))
        return float(s[0]), float(n[0])

    seg_s = {sg.name: (sproj(sg.point(-sg.H / 2, sg.D / 2))[0], sproj(sg.point(sg.H / 2, sg.D / 2))[0]) for sg in segs}
    gap_s, gap_margin_n = {}, {}
    for gp in gaps:
        s_, n_ = sproj(gp.point(0.0, gp.D / 2 + 0.8))
        gap_s[gp.name], gap_margin_n[gp.name] = s_, n_

    # --- canal and soft tissue profiles, knots at segment mid-s
    knots = np.array([0.5 * (seg_s[n][0] + seg_s[n][1]) for n in SEGMENTS])
    ext = np.concatenate([[knots[0] - 400.0], knots, [knots[-1] + 400.0]])

    def padv(v):
        v = np.asarray(v, dtype=np.float64)
        return np.concatenate([[v[0]], v, [v[-1]]])

    canal_ap = _CANAL_AP * u(0.9, 1.12) * (1 + rng.normal(0, 0.03, _CANAL_AP.size))
    canal_hw = _CANAL_HW * u(0.92, 1.1) * (1 + rng.normal(0, 0.03, _CANAL_HW.size))
    ant_fat = u(0.6, 1.2)
    post_fat = np.array([1.2, 1.2, 1.5, 2.0, 2.6, 3.0, 3.2, 3.0, 2.0, 1.0, 1.0]) * u(0.7, 1.3)
    n_ant = 0.9 + ant_fat
    n_post = canal_ap - post_fat
    sac_an = np.maximum((n_post - n_ant) / 2, 0.5)
    sac_nc = n_ant + sac_an
    # canal posterior boundary n = canal_ap - alpha x^2 reaches 0.55 canal_ap at x = canal_hw (trefoil-ish canal)
    alpha = 0.45 * canal_ap / canal_hw ** 2
    xcan = np.sqrt(np.maximum(canal_ap - sac_nc, 0) / alpha)
    sac_ax = np.minimum(canal_hw - 2.2, xcan - 1.8) * u(0.9, 1.0)
    lam_t = u(5.5, 7.5)
    sp_len = _SPINOUS_LEN * u(0.85, 1.15)
    nl = len(LUMBAR)
    tip_n = np.concatenate([canal_ap[:nl] + lam_t + sp_len + 2, canal_ap[nl:] + 9.0])
    muscle_n = tip_n + u(3.0, 10.0) + np.concatenate([np.zeros(nl), [4.0, 6.0, 8.0, 8.0]])
    fat_t = u(12.0, 32.0) * (1 + 0.15 * np.sin(np.linspace(0, 3, len(SEGMENTS)) + u(0, 6.28)))
    prof = Profiles(ext, {
        "canal_ap": padv(canal_ap), "canal_hw": padv(canal_hw), "alpha": padv(alpha),
        "sac_an": padv(sac_an), "sac_ax": padv(sac_ax), "sac_nc": padv(sac_nc),
        "muscle_n": padv(muscle_n), "fat_t": padv(fat_t), "D": padv(D), "W": padv(W),
    })

    s_l1_top, s_l1_bot = seg_s["L1"]
    s_conus = u(s_l1_top + 0.3 * (s_l1_bot - s_l1_top), gap_s["L1-L2"] + 2.0)
    s_sac_end = 0.5 * sum(seg_s["S2"]) + u(-5.0, 5.0)

    # --- cauda equina roots: pairs L2..S2 leave the sac one level above their foramen, S3-Co bundle stays central
    roots = []
    exits = [("L1-L2", 0), ("L2-L3", 1), ("L3-L4", 2), ("L4-L5", 3), ("L5-S1", 4)]
    for gname, q in exits:
        for side in (-1, 1):
            roots.append(Root(side, side * (0.72 - 0.1 * q + rng.normal(0, 0.05)), 0.05 + 0.1 * q + rng.normal(0, 0.06),
                              u(0.8, 1.2), gap_s[gname] + u(2.0, 6.0), (u(0.02, 0.06), u(40, 90), u(0, 6.28))))
    for side in (-1, 1):  # S2 roots
        roots.append(Root(side, side * u(0.1, 0.25), u(0.5, 0.65), u(0.8, 1.1), 0.5 * sum(seg_s["S1"]) + u(0, 5),
                          (u(0.02, 0.05), u(40, 90), u(0, 6.28))))
    for side in (-1, 1):  # S3 - coccygeal roots, dorsal and near the midline (dark strands on mid-sagittal T2)
        roots.append(Root(0, side * u(0.03, 0.12), u(0.62, 0.8), u(0.9, 1.2), s_sac_end + 30.0,
                          (0.03, u(50, 80), u(0, 6.28))))

    # --- spinous processes (canal coordinates), per lumbar segment
    spinous = []
    for k, name in enumerate(LUMBAR):
        st, sb = seg_s[name]
        spinous.append(dict(s0=st + 0.55 * (sb - st), n0=canal_ap[k] + lam_t - 2.0, length=sp_len[k],
                            h0=u(15.0, 18.0) * g, h1=u(18.0, 24.0) * g, tilt=np.deg2rad(u(5.0, 20.0)),
                            half_width=u(2.6, 3.4)))

    # --- marrow / nucleus intensities (appearance of this "patient")
    marrow_level = u(330.0, 430.0)
    from .labels import BODY_LABEL, DISC_LABELS

    marrow = {}
    for name in SEGMENTS:
        lab = BODY_LABEL[name]
        if lab not in marrow:
            marrow[lab] = float(marrow_level * u(0.92, 1.08))
    nucleus_level = u(620.0, 760.0)
    nucleus = {}
    for k, gname in enumerate(GAPS[:N_DISCS]):
        nucleus[DISC_LABELS[gname][1]] = float(nucleus_level * (1 - 0.6 * degen[k]) * u(0.95, 1.05))

    y_front = min(sg.point(0, -sg.D / 2)[0] for sg in segs[:6])
    age = u(0.0, 1.0)  # drawn last so that earlier draws keep their meaning
    for gp in gaps[:N_DISCS]:
        gp.cleft = bool(u() < 0.2 + 0.7 * age)  # intranuclear cleft (fibrous band) of adult discs
    bvv = u(1.0, 2.2)  # basivertebral vein half height (mm)
    return Anatomy(segments=segs, gaps=gaps, curve=curve, prof=prof, xm0=u(-1.5, 1.5),
                   scol=(u(0.0, 1.5), u(150.0, 300.0), u(0, 6.28)), s_conus=s_conus, s_sac_end=s_sac_end,
                   roots=roots, seg_s=seg_s, gap_s=gap_s, gap_margin_n=gap_margin_n, pedicle_w=u(7.0, 9.0),
                   lamina_t=lam_t, spinous=spinous, facet_tilt=np.deg2rad(u(25.0, 45.0)),
                   y_front_skin=float(y_front - u(95.0, 150.0)), t_front_fat=u(8.0, 25.0), marrow=marrow,
                   nucleus=nucleus, basivertebral=bvv)
