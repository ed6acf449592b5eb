"""Label painting on a slice-supersampled grid and T2 image formation.

Every structure is described, at each in-plane pixel (y, z), by an interval of the left-right coordinate x that it
occupies (analytic shapes: superellipses, ellipsoids, parabolic shells along the spine). Labels are painted in a
fixed order onto ``S`` sub-slices per output slice (box slice profile); the image is the sub-slice average of the
tissue intensities (slice-thickness partial volume), the label map is the tissue at the slice centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d, zoom

from . import labels as L
from .anatomy import GAPS, LUMBAR, N_DISCS, SEGMENTS, Anatomy

F32 = np.float32

# direction columns (ITK axes i, j, k) in LPS: i anterior->posterior, j superior->inferior, k left->right
DIRECTION = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]).T


@dataclass
class Grid:
    spacing: tuple  # (si, sj, sk) mm
    size: tuple  # (ni, nj, nk)
    origin: np.ndarray  # LPS of voxel (0, 0, 0)

    @classmethod
    def centred(cls, spacing, size, centre=(0.0, 0.0, 0.0)):
        sp = np.asarray(spacing, float)
        half = (np.asarray(size, float) - 1) / 2 * sp
        origin = np.asarray(centre, float) - DIRECTION @ half
        return cls(tuple(float(v) for v in sp), tuple(int(v) for v in size), origin)

    @property
    def ys(self):
        return self.origin[1] + self.spacing[0] * np.arange(self.size[0])

    @property
    def zs(self):
        return self.origin[2] - self.spacing[1] * np.arange(self.size[1])

    @property
    def xs(self):
        return self.origin[0] - self.spacing[2] * np.arange(self.size[2])

    def direction_tuple(self):
        return tuple(float(v) for v in DIRECTION.reshape(-1))

    def index_of(self, p_lps):
        """Continuous (i, j, k) of an LPS point."""
        return np.linalg.solve(DIRECTION, np.asarray(p_lps, float) - self.origin) / np.asarray(self.spacing)


def subslices_per_slice(sk: float) -> int:
    s = max(1, int(round(sk / 0.9)))
    return s if s % 2 == 1 else s + 1


def _allowed(*labs):
    a = np.zeros(256, bool)
    for v in labs:
        a[v] = True
    return a


def _taper(t):
    """1 for t <= 0, cosine to 0 at t = 1, exact 0 beyond."""
    t = np.asarray(t, F32)
    return np.where(t <= 0, F32(1), np.where(t >= 1, F32(0), F32(0.5) * (1 + np.cos(np.pi * np.clip(t, 0, 1))))).astype(F32)


def _sqrt_pos(a):
    return np.sqrt(np.maximum(a, 0)).astype(F32)


class Painter:
    def __init__(self, x_sub: np.ndarray, npix: int):
        self.x = x_sub.astype(F32)[:, None]
        self.xmin, self.xmax = float(x_sub.min()), float(x_sub.max())
        self.lv = np.zeros((x_sub.size, npix), np.uint8)

    def paint(self, idx, lo, hi, label, allowed=None):
        lo = np.asarray(lo, F32)
        hi = np.asarray(hi, F32)
        ok = (hi >= lo) & (hi >= self.xmin) & (lo <= self.xmax)
        lab = np.asarray(label)
        if not ok.all():
            idx, lo, hi = idx[ok], lo[ok], hi[ok]
            if lab.ndim:
                lab = lab[ok]
        if idx.size == 0:
            return
        m = (self.x >= lo[None]) & (self.x <= hi[None])
        sub = self.lv[:, idx]
        if allowed is not None:
            m &= allowed[sub]
        np.copyto(sub, lab.astype(np.uint8)[None] if lab.ndim else np.uint8(lab), where=m)
        self.lv[:, idx] = sub

    def paint_sym(self, idx, xc, rlo, rhi, label, allowed=None):
        """Two intervals xc +- [rlo, rhi] (left and right)."""
        self.paint(idx, xc + rlo, xc + rhi, label, allowed)
        self.paint(idx, xc - rhi, xc - rlo, label, allowed)


def _superellipse_hw(v, half_d, half_w, p_ant=2.2, p_post=5.0):
    """Left-right half width of a body/disc at AP position v (ant rounder, posterior flatter)."""
    r = np.clip(np.abs(v) / half_d, 0, 1)
    p = np.where(v < 0, F32(p_ant), F32(p_post))
    return (half_w * (1 - r ** p) ** (1 / p)).astype(F32)


def _project_grid(anat: Anatomy, ys, zs, step: float = 2.0):
    """Curvilinear (s, n) of every in-plane pixel: exact projection on a ~2 mm grid, bilinear in between
    (the fields are smooth near the spine; the error is ~ step^2 / (8 R) for curve radius R, i.e. < 0.02 mm)."""
    ny = max(2, int(np.ceil((ys[-1] - ys[0]) / step)) + 1)
    nz = max(2, int(np.ceil(abs(zs[-1] - zs[0]) / step)) + 1)
    cy = np.linspace(ys[0], ys[-1], ny) if ys.size > 1 else np.array([ys[0], ys[0] + 1.0])
    cz = np.linspace(zs[0], zs[-1], nz) if zs.size > 1 else np.array([zs[0], zs[0] - 1.0])
    CZ, CY = np.meshgrid(cz, cy, indexing="ij")
    cs, cn = anat.curve.project(CY, CZ)
    fy = (ys - cy[0]) / (cy[-1] - cy[0]) * (cy.size - 1)
    fz = (zs - cz[0]) / (cz[-1] - cz[0]) * (cz.size - 1)
    iy = np.clip(np.floor(fy).astype(int), 0, cy.size - 2)
    iz = np.clip(np.floor(fz).astype(int), 0, cz.size - 2)
    wy = (fy - iy).astype(F32)[None, :]
    wz = (fz - iz).astype(F32)[:, None]
    out = []
    for f in (cs.astype(np.float64), cn.astype(np.float64)):
        a = f[iz][:, iy]
        b = f[iz][:, iy + 1]
        c = f[iz + 1][:, iy]
        d = f[iz + 1][:, iy + 1]
        v = (1 - wz) * ((1 - wy) * a + wy * b) + wz * ((1 - wy) * c + wy * d)
        out.append(v.astype(F32).ravel())
    return out[0], out[1]


def render_labels(anat: Anatomy, dhs, ccss, grid: Grid, S: int):
    """Paint all structures. Returns (painter.lv [nk*S, nj*ni], info dict)."""
    ni, nj, nk = grid.size
    ys, zs = grid.ys, grid.zs
    Y = np.broadcast_to(ys[None, :], (nj, ni)).ravel()
    Z = np.broadcast_to(zs[:, None], (nj, ni)).ravel()
    sk = grid.spacing[2]
    off = (np.arange(S) - (S - 1) / 2) * sk / S
    x_sub = (grid.xs[:, None] + off[None, :]).ravel()
    P = Painter(x_sub, nj * ni)
    s2, n2 = _project_grid(anat, ys, zs)
    Y32 = Y.astype(F32)
    prof = anat.prof
    xm2 = anat.xm(s2)
    gap = {gp.name: gp for gp in anat.gaps}
    st = {k: v[0] for k, v in anat.seg_s.items()}
    sb = {k: v[1] for k, v in anat.seg_s.items()}
    info = {}

    # ------------------------------------------------------------------ background (x independent)
    # posterior contour (muscle / fat / skin) as smooth functions of z, from the spine's posterior envelope
    cs_ = anat.curve.s
    pm = anat.curve.point(cs_, prof("muscle_n", cs_.astype(F32)))
    order = np.argsort(pm[:, 1])
    zq = np.arange(zs.min() - 60.0, zs.max() + 60.0, 1.0)
    ym = np.interp(zq, pm[order, 1], pm[order, 0])
    ym = gaussian_filter1d(ym, 12.0, mode="nearest")
    ftz = np.interp(zq, pm[order, 1], prof("fat_t", cs_[order].astype(F32)))
    y_m = np.interp(Z, zq, ym).astype(F32)
    y_f = y_m + np.interp(Z, zq, ftz).astype(F32)
    bg = np.full(nj * ni, L.ABDOMEN, np.uint8)
    post = n2 > 0
    bg[post] = L.MUSCLE
    bg[post & (Y32 > y_m)] = L.SUBCUT_FAT
    bg[post & (Y32 > y_f - 2.0)] = L.SKIN
    bg[post & (Y32 > y_f)] = L.AIR
    zc = 0.5 * (anat.segments[0].c[1] + anat.segments[-1].c[1])
    yf = (anat.y_front_skin + 30.0 * ((Z - zc) / 160.0) ** 2).astype(F32)
    ant = ~post
    bg[ant & (Y32 < yf + anat.t_front_fat + 11.0)] = L.MUSCLE
    bg[ant & (Y32 < yf + anat.t_front_fat + 2.0)] = L.SUBCUT_FAT
    bg[ant & (Y32 < yf + 2.0)] = L.SKIN
    bg[ant & (Y32 < yf)] = L.AIR
    P.lv[:] = bg[None, :]

    # --------------------------------------------------------------- canal-coordinate quantities
    s_top, s_bot_sac = st[SEGMENTS[0]] - 200.0, sb["S4"] + 25.0
    band = np.flatnonzero((n2 > -80) & (n2 < 90) & (s2 > s_top) & (s2 < s_bot_sac))
    s = s2[band]
    n = n2[band]
    xm = xm2[band]
    cap = prof("canal_ap", s)
    chw = prof("canal_hw", s)
    alpha = prof("alpha", s)
    Dp = prof("D", s)
    Wp = prof("W", s)

    # stenosis profiles (exact zeros away from the levels)
    red = np.zeros_like(s)
    fn = np.ones_like(s)
    fx = np.ones_like(s)
    for c in ccss:
        r = c.profile(s - F32(anat.gap_s[c.level]))
        red = np.maximum(red, r)
        fn = fn * (1 - r) ** F32(c.gamma)
        fx = fx * (1 - r) ** F32(1 - c.gamma)
    nc, an0, ax0 = anat.sac(s)
    an = an0 * fn
    ax = ax0 * fx

    # ------------------------------------------------------------------ psoas, vessels (anterior)
    s_l1, s_l5 = st["L1"], sb["L5"]
    ramp = np.clip((s - s_l1) / (s_l5 - s_l1), 0, 1)
    m = (s > s_l1) & (s < s_l5 + 12) & (n < -1) & (n > -(Dp + 2 + 14 * ramp))
    i = np.flatnonzero(m)
    P.paint_sym(band[i], xm[i], Wp[i] / 2 - 4, np.full(i.size, 80.0, F32), L.PSOAS)
    # aorta (left of midline) down to L4, IVC (right) down to L5
    for xoff, rx, rn, nd, s_end in ((15.0, 9.5, 9.5, 12.0, 0.5 * (st["L4"] + sb["L4"])),
                                    (-18.0, 11.0, 7.0, 9.0, 0.5 * (st["L5"] + sb["L5"]))):
        ncv = -(Dp + nd)
        m = (s < s_end) & (np.abs(n - ncv) < rn)
        i = np.flatnonzero(m)
        hw = rx * _sqrt_pos(1 - ((n[i] - ncv[i]) / rn) ** 2)
        P.paint(band[i], xm[i] + xoff - hw, xm[i] + xoff + hw, L.VESSEL)

    # ------------------------------------------------------------------ foramina and canal fat
    s_s1 = sb["S1"]
    m = (s > s_top) & (s < s_s1) & (n > -1.5) & (n < 0.55 * cap + 2)
    i = np.flatnonzero(m)
    P.paint_sym(band[i], xm[i], chw[i] - 1, chw[i] + 14, L.EPIDURAL_FAT)
    m = (s < sb["S4"] + 20) & (n > -1.5) & (n < cap)
    i = np.flatnonzero(m)
    hw = np.minimum(chw[i], _sqrt_pos((cap[i] - n[i]) / alpha[i]))
    P.paint(band[i], xm[i] - hw, xm[i] + hw, L.EPIDURAL_FAT)

    # ------------------------------------------------------------------ stenosis: broad-based disc bulge
    for c in ccss:
        gp = gap[c.level]
        s_l = anat.gap_s[c.level]
        n_m = anat.gap_margin_n[c.level]
        g_post = float(gp.height(gp.D / 2))
        nc_l, an_l, _ = anat.sac(np.array([s_l], F32))
        front = float(nc_l[0] - an_l[0] * (1 - c.reduction) ** c.gamma)
        depth = max(0.0, front - 0.4 - n_m)
        bb = _taper((np.abs(s - s_l) - (g_post / 2 - 0.5)) / 2.5)
        m = (bb > 0) & (n > -1.5) & (n < n_m + depth * bb)
        i = np.flatnonzero(m)
        xb = chw[i] + 1.0
        frac = np.where(n[i] <= n_m, F32(1), 1 - (n[i] - n_m) / np.maximum(depth * bb[i], 1e-3))
        hw = xb * _sqrt_pos(frac)
        P.paint(band[i], xm[i] - hw, xm[i] + hw, L.DISC_LABELS[c.level][0], _allowed(L.EPIDURAL_FAT))

    # ------------------------------------------------------------------ ligamentum flavum (+ thickening)
    lam_ranges = []
    names = list(SEGMENTS)
    for name in LUMBAR:
        nxt = names[names.index(name) + 1]
        lam_ranges.append((st[name] + 0.3 * (sb[name] - st[name]), sb[name] + 0.55 * (st[nxt] - sb[name])))
    in_gap = np.zeros(s.size, bool)
    for k in range(len(lam_ranges)):
        a = lam_ranges[k][1] - 2.0
        b = lam_ranges[k + 1][0] + 2.0 if k + 1 < len(lam_ranges) else st["S1"] + 6.0
        in_gap |= (s > a) & (s < b)
    thick = np.zeros_like(s)
    for c in ccss:
        s_l = anat.gap_s[c.level]
        nc_l, an_l, _ = anat.sac(np.array([s_l], F32))
        back = float(nc_l[0] + an_l[0] * (1 - c.reduction) ** c.gamma)
        cap_l = float(prof("canal_ap", np.array([s_l], F32))[0])
        fd = max(0.0, cap_l - 1.0 - back - 0.4)
        thick = np.maximum(thick, fd * c.profile(s - F32(s_l)) / F32(c.reduction))
    lo_off = np.where(in_gap, -1.0 - thick, -thick).astype(F32)
    hi_off = np.where(in_gap, F32(3.5), F32(0)).astype(F32)
    m = (in_gap | (thick > 0.2)) & (n > cap - 8 - thick) & (n < cap + 4)
    i = np.flatnonzero(m)
    rlo = _sqrt_pos((lo_off[i] + cap[i] - n[i]) / alpha[i])
    rhi = np.minimum(_sqrt_pos((hi_off[i] + cap[i] - n[i]) / alpha[i]), chw[i] + 3)
    rhi = np.where(hi_off[i] + cap[i] - n[i] >= 0, rhi, F32(-1))
    P.paint_sym(band[i], xm[i], rlo, rhi, L.FLAVUM)

    # ------------------------------------------------------------------ thecal sac, cord, roots
    m = (s < anat.s_sac_end) & (an > 0.05) & (np.abs(n - nc) < an)
    i = np.flatnonzero(m)
    hw = ax[i] * _sqrt_pos(1 - ((n[i] - nc[i]) / an[i]) ** 2)
    P.paint(band[i], xm[i] - hw, xm[i] + hw, L.CSF)
    crowd = i[red[i] > 0.55]
    if crowd.size:
        hwc = ax[crowd] * _sqrt_pos(1 - ((n[crowd] - nc[crowd]) / an[crowd]) ** 2)
        P.paint(band[crowd], xm[crowd] - hwc, xm[crowd] + hwc, L.NEURAL, _allowed(L.CSF))
    # cord and conus
    tc = np.clip((anat.s_conus - s) / 28.0, 0, 1) ** 0.6
    rn_c, rx_c = 3.8 * tc, 4.8 * tc
    ncc = nc + 0.1 * an
    m = (s < anat.s_conus) & (np.abs(n - ncc) < rn_c)
    i = np.flatnonzero(m)
    hw = rx_c[i] * _sqrt_pos(1 - ((n[i] - ncc[i]) / np.maximum(rn_c[i], 1e-3)) ** 2)
    P.paint(band[i], xm[i] - hw, xm[i] + hw, L.NEURAL, _allowed(L.CSF, L.EPIDURAL_FAT))
    soft_canal = _allowed(L.CSF, L.EPIDURAL_FAT)
    s0r = anat.s_conus - 20.0
    for rt in anat.roots:
        m0 = (s > s0r) & (s < rt.s_exit + 18.0) & (n > -2) & (n < cap)
        i = np.flatnonzero(m0)
        if i.size == 0:
            continue
        si_ = s[i]
        w = np.clip((si_ - s0r) / 40.0, 0, 1)
        amp, lam, ph = rt.wobble
        wob = amp * np.sin(2 * np.pi * si_ / lam + ph)
        xi = (1 - w) * 0.1 + w * (rt.xi + wob)
        eta = (1 - w) * 0.5 * rt.eta + w * (rt.eta + wob)
        e = np.clip((si_ - rt.s_exit) / 18.0, 0, 1)
        if rt.side:
            eta = eta + e * (rt.side * (chw[i] / np.maximum(ax0[i], 1.0) + 0.2) - eta)
            xi = xi + e * (-0.4 - xi)
        a_n = np.where(an[i] > 0.5, an[i], an0[i])
        a_x = np.where(ax[i] > 0.5, ax[i], np.maximum(ax0[i], 1.0))
        a_x = a_x + e * (np.maximum(ax0[i], 1.0) - a_x)  # a root leaving the sac heads for its (fixed) foramen
        nr = nc[i] + a_n * xi
        xr = xm[i] + a_x * eta
        hw = _sqrt_pos(rt.radius ** 2 - (n[i] - nr) ** 2)
        keep = hw > 0
        P.paint(band[i[keep]], xr[keep] - hw[keep], xr[keep] + hw[keep], L.NEURAL, soft_canal)

    # ------------------------------------------------------------------ discs
    Yb, Zb = Y[band], Z[band]
    for gp in anat.gaps:
        m = ((Yb - gp.c[0]) ** 2 + (Zb - gp.c[1]) ** 2) < (gp.D / 2 + 14) ** 2
        i = np.flatnonzero(m)
        u, v = gp.local(Yb[i], Zb[i])
        u, v = u.astype(F32), v.astype(F32)
        h = gp.height(v).astype(F32)
        xc = xm[i]
        if gp.is_disc:
            ann, nuc = L.DISC_LABELS[gp.name]
            b = 0.8
            vlim = gp.D / 2 + b * np.clip(1 - (2 * u / h) ** 2, 0, 1)
            mm = (np.abs(v) <= vlim) & (np.abs(u) <= h / 2 + 2.5)
            hw = np.where(mm, _superellipse_hw(v, gp.D / 2 + b, gp.W / 2 + 0.5), F32(-1))
            P.paint(band[i], xc - hw, xc + hw, ann)
            dg = gp.degeneration
            a_u = 0.41 * h * (1 - 0.25 * dg)
            a_v = 0.35 * gp.D * (1 - 0.2 * dg)
            a_x = 0.33 * gp.W * (1 - 0.15 * dg)
            hw = a_x * _sqrt_pos(1 - (u / a_u) ** 2 - ((v - 0.06 * gp.D) / a_v) ** 2)
            hw = np.where(hw > 0, hw, F32(-1))
            P.paint(band[i], xc - hw, xc + hw, nuc)
            if gp.cleft:  # thin fibrous band through the nucleus (dark line on sagittal T2)
                hwc = np.where(np.abs(u) < 0.45, 0.85 * hw, F32(-1))
                P.paint(band[i], xc - hwc, xc + hwc, ann, _allowed(nuc))
        else:
            mm = (np.abs(v) <= gp.D / 2 - 0.3) & (np.abs(u) <= h / 2 + 1.5)
            hw = np.where(mm, _superellipse_hw(v, gp.D / 2, gp.W / 2), F32(-1))
            P.paint(band[i], xc - hw, xc + hw, L.BODY_LABEL["S1"])

    # ------------------------------------------------------------------ vertebral bodies
    for sg in anat.segments:
        lab = L.BODY_LABEL[sg.name]
        m = ((Yb - sg.c[0]) ** 2 + (Zb - sg.c[1]) ** 2) < (0.5 * np.hypot(sg.H, sg.D) + 3) ** 2
        i = np.flatnonzero(m)
        u, v = sg.local(Yb[i], Zb[i])
        u, v = u.astype(F32), v.astype(F32)
        sacral = sg.name in ("S2", "S3", "S4")
        ec = 0.4 if sacral or sg.name == "S1" else 1.2
        hu = sg.H / 2 - ec * np.clip(1 - (2 * v / sg.D) ** 2, 0, 1)
        hv = np.where(v < 0, sg.D / 2 - 1.5 * np.clip(1 - (2 * u / sg.H) ** 2, 0, 1), F32(sg.D / 2)).astype(F32)
        xc = xm[i]
        for shrink_u, shrink_v, label in ((0.0, 0.0, L.CORTEX), (0.45 if sacral else 1.0, 1.3, lab)):
            q = (np.abs(u) / (hu - shrink_u)) ** 8 + (np.abs(v) / (hv - shrink_v)) ** 8
            hw = _superellipse_hw(v, sg.D / 2, sg.W / 2) - shrink_v
            hw = np.where(q <= 1, hw, F32(-1))
            P.paint(band[i], xc - hw, xc + hw, label)
        if sg.name in LUMBAR + ("S1",):  # basivertebral vein entering the posterior wall at mid-height
            bh = anat.basivertebral
            ok = (np.abs(u) < bh * np.clip((v - (sg.D / 2 - 9.0)) / 3.0, 0, 1)) & (v < sg.D / 2 + 0.2)
            P.paint(band[i], xc - np.where(ok, F32(2.0), F32(-9)), xc + np.where(ok, F32(2.0), F32(-9)),
                    L.BASIVERTEBRAL, _allowed(lab, L.CORTEX))

    # ------------------------------------------------------------------ disc herniation
    # A dome on the posterior disc margin: from 2.5 mm inside the disc (annular tear, nucleus signal) out to
    # ``protrusion`` mm beyond the margin; its cranio-caudal centre drifts by ``shift`` towards the tip (migration).
    for hn in dhs:
        ann, nuc = L.DISC_LABELS[hn.level]
        s_b = anat.gap_s[hn.level]
        n_m = anat.gap_margin_n[hn.level]
        x_h = float(anat.xm(np.array([s_b], F32))[0]) + hn.lateral
        pr = hn.protrusion
        m = (np.abs(s - s_b) < hn.half_height + abs(hn.shift) + 1) & (n > n_m - 2.5) & (n < n_m + pr)
        i = np.flatnonzero(m)
        for shrink, label, allowed in (
                (1.0, nuc, _allowed(ann)),
                (0.0, L.HERNIATION_RIM, _allowed(L.CSF, L.NEURAL, L.EPIDURAL_FAT, L.FLAVUM, L.LIGAMENT)),
                (1.0, L.HERNIATION, _allowed(L.HERNIATION_RIM))):
            tt = np.clip((n[i] - n_m) / (pr - shrink), 0, None)
            rho2 = np.where(n[i] < n_m - 2.5 + shrink, F32(-1), 1 - tt ** 2)
            sc = s_b + hn.shift * np.clip(tt, 0, 1)
            q = rho2 - ((s[i] - sc) / (hn.half_height - shrink)) ** 2
            hw = (hn.half_width - shrink) * _sqrt_pos(q)
            hw = np.where(q > 0, hw, F32(-1))
            P.paint(band[i], x_h - hw, x_h + hw, label, allowed)
        info.setdefault("herniation", {})[hn.level] = dict(s=s_b + hn.shift * 0.5, n=n_m + pr / 2, x=x_h)

    # ------------------------------------------------------------------ posterior elements
    lt = anat.lamina_t
    s_arch_end = st["S1"] + 10.0
    # interspinous / supraspinous ligament band in the midline
    m = (s > s_top) & (s < s_arch_end) & (n > cap + lt - 3) & (n < prof("muscle_n", s))
    i = np.flatnonzero(m)
    P.paint(band[i], xm[i] - 1.5, xm[i] + 1.5, L.LIGAMENT, _allowed(L.MUSCLE))

    # pedicles
    pw = anat.pedicle_w
    for name in LUMBAR + ("S1",):
        sp_ = st[name] + 0.35 * (sb[name] - st[name])
        a_s = 0.3 * (sb[name] - st[name])
        m = (np.abs(s - sp_) < a_s) & (n > -3) & (n < 0.6 * cap + 2)
        i = np.flatnonzero(m)
        for shrink, label in ((0.0, L.CORTEX), (1.1, L.POSTERIOR_MARROW)):
            q = 1 - ((s[i] - sp_) / (a_s - shrink)) ** 2
            hw = (pw / 2 - shrink) * _sqrt_pos(q)
            ok = q > 0
            xc = chw[i] - 0.5 + pw / 2
            P.paint_sym(band[i], xm[i], np.where(ok, xc - hw, F32(1)), np.where(ok, xc + hw, F32(-1)), label)
        # dorsal root ganglion in the foramen below the pedicle
        if name in ("L1", "L2", "L3", "L4", "L5"):
            sg_ = sp_ + a_s + 4.0
            ng = 0.3 * cap
            m = (np.abs(s - sg_) < 3.0) & (np.abs(n - ng) < 2.6)
            i = np.flatnonzero(m)
            q = 1 - ((s[i] - sg_) / 3.0) ** 2 - ((n[i] - ng[i]) / 2.6) ** 2
            hw = 4.0 * _sqrt_pos(q)
            xc = chw[i] + 5.0
            P.paint_sym(band[i], xm[i], np.where(q > 0, xc - hw, F32(1)), np.where(q > 0, xc + hw, F32(-1)),
                        L.NEURAL, _allowed(L.EPIDURAL_FAT))

    # articular pillars (facets) with joint lines; facet hypertrophy at stenotic levels
    fh = np.zeros_like(s)
    for c in ccss:
        fh = np.maximum(fh, 4.0 * c.profile(s - F32(anat.gap_s[c.level])))
    fh = np.where(n < cap + 4.0, fh, F32(0))  # hypertrophy of the superior articular process (lateral recess)
    m = (s > s_top) & (s < st["S1"] + 14.0) & (n > 0.55 * cap) & (n < cap + lt + 3)
    i = np.flatnonzero(m)
    for shrink, label in ((0.0, L.CORTEX), (1.1, L.POSTERIOR_MARROW)):
        lo = chw[i] + 1.0 - fh[i] + shrink
        ok = (n[i] > 0.55 * cap[i] + shrink) & (n[i] < cap[i] + lt + 3 - shrink)
        P.paint_sym(band[i], xm[i], np.where(ok, lo, F32(1)), np.where(ok, chw[i] + 12.0 - shrink, F32(-1)), label)
    tanf = np.tan(anat.facet_tilt)
    for gname in GAPS[:N_DISCS]:
        s_j = anat.gap_s[gname] - 3.0
        n_j = 0.5 * (0.55 * cap[i] + cap[i] + lt + 3)
        d = s[i] - (s_j + (n[i] - n_j) * tanf)
        for width, label in ((1.8, L.CORTEX), (0.7, L.FACET_JOINT)):
            ok = np.abs(d) < width
            P.paint_sym(band[i], xm[i], np.where(ok, chw[i] + 1.0 - fh[i], F32(1)),
                        np.where(ok, chw[i] + 12.0, F32(-1)), label, _allowed(L.CORTEX, L.POSTERIOR_MARROW))

    # laminae (lumbar) and the dorsal sacral plate
    plates = list(lam_ranges) + [(st["S1"] + 4.0, sb["S4"])]
    for k, (a, b) in enumerate(plates):
        sacral = k == len(plates) - 1
        t = 7.0 if sacral else lt
        lat = 10.0 if sacral else 6.0
        m = (s > a) & (s < b) & (n > cap - 30) & (n < cap + t + 1)
        i = np.flatnonzero(m)
        for shrink, label in ((0.0, L.CORTEX), (1.1, L.POSTERIOR_MARROW)):
            ok = (s[i] > a + shrink) & (s[i] < b - shrink)
            rlo = _sqrt_pos((shrink + cap[i] - n[i]) / alpha[i])
            arg = t - shrink + cap[i] - n[i]
            rhi = np.where(ok & (arg >= 0), np.minimum(_sqrt_pos(arg / alpha[i]), chw[i] + lat - shrink), F32(-1))
            P.paint_sym(band[i], xm[i], rlo, rhi, label)

    # spinous processes
    for sp in anat.spinous:
        n0, ln = sp["n0"], sp["length"]
        m = (n > n0 - 4) & (n < n0 + ln + 1) & (np.abs(s - sp["s0"]) < 25)
        i = np.flatnonzero(m)
        tt = np.clip((n[i] - n0) / ln, 0, 1)
        sc = sp["s0"] + np.tan(sp["tilt"]) * (n[i] - n0)
        hh = 0.5 * (sp["h0"] + (sp["h1"] - sp["h0"]) * tt)
        tip = np.clip((n[i] - (n0 + 0.8 * ln)) / (0.2 * ln), 0, 1)
        hh = hh * _sqrt_pos(1 - tip ** 2)
        for shrink, label in ((0.0, L.CORTEX), (1.1, L.POSTERIOR_MARROW)):
            ok = (np.abs(s[i] - sc) <= hh - shrink) & (n[i] < n0 + ln - shrink)
            hw = np.where(ok, sp["half_width"] * (1 + 0.25 * tt) - shrink, F32(-1))
            P.paint(band[i], xm[i] - hw, xm[i] + hw, label)

    info["band"] = band
    info["s2"], info["n2"] = s2, n2
    return P.lv, info


def smooth_noise(rng: np.random.Generator, shape, sigma_vox):
    a = rng.standard_normal(shape, dtype=F32)
    a = gaussian_filter(a, sigma_vox, mode="wrap", truncate=3.0)
    sd = float(a.std())
    return a / (sd if sd > 0 else 1.0)


def coarse_noise(rng: np.random.Generator, shape, spacing, sigma_mm):
    """Unit-variance smooth noise with correlation length sigma_mm, made on a grid ~sigma/2 and upsampled."""
    f = [max(1, int(sigma_mm / 2 / s)) for s in spacing]
    small = tuple(int(np.ceil(n / q)) + 1 for n, q in zip(shape, f))
    a = rng.standard_normal(small, dtype=F32)
    a = gaussian_filter(a, [sigma_mm / (s * q) for s, q in zip(spacing, f)], mode="wrap", truncate=3.0)
    a = zoom(a, [q for q in f], order=1, grid_mode=False)[: shape[0], : shape[1], : shape[2]]
    if a.shape != tuple(shape):
        a = np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)], mode="edge")
    sd = float(a.std())
    return np.ascontiguousarray(a / (sd if sd > 0 else 1.0), dtype=F32)


def form_image(lv, grid: Grid, S: int, tables, tex_rng, bias_rng, noise_rng, noise: bool, anat: Anatomy):
    ni, nj, nk = grid.size
    lv = lv.reshape(nk, S, nj * ni)
    tab = np.stack(tables, axis=1).astype(F32)  # (256, 4): base, fine, coarse, striated
    acc = np.empty((nk, nj * ni, tab.shape[1]), F32)
    for k in range(nk):
        sub = lv[k]
        acc[k] = tab[sub[S // 2]]
        if S > 1:
            mixed = np.flatnonzero((sub != sub[S // 2][None]).any(axis=0))
            if mixed.size:
                acc[k, mixed] = tab[sub[:, mixed]].mean(axis=0)
    labels = lv[:, S // 2, :].reshape(nk, nj, ni).copy()
    si, sj, sk = grid.spacing
    shp = (nk, nj, ni)
    t1 = smooth_noise(tex_rng, shp, tuple(0.7 / v if 0.7 / v > 0.3 else 0.0 for v in (sk, sj, si)))
    t2 = np.tanh(F32(1.8) * coarse_noise(tex_rng, shp, (sk, sj, si), 7.0))  # patchy (lobules / bowel loops)
    t3 = smooth_noise(tex_rng, shp, tuple(v if v > 0.3 else 0.0 for v in (1.0 / sk, 8.0 / sj, 0.8 / si)))
    img = (acc[..., 0].reshape(shp) + acc[..., 1].reshape(shp) * t1 + acc[..., 2].reshape(shp) * t2
           + acc[..., 3].reshape(shp) * t3)
    img = gaussian_filter(img, (0, 0.35 / sj, 0.35 / si), truncate=3.0)
    # smooth bias field: brighter posteriorly (spine coil), gentle SI / LR fall-off
    c = bias_rng.uniform(size=6)
    yn = ((grid.ys - 40.0) / 140.0).astype(F32)
    zn = (grid.zs / 140.0).astype(F32)
    xn = ((grid.xs - anat.xm0) / 60.0).astype(F32)
    logb = ((0.25 + 0.3 * c[0]) * yn[None, None, :] - (0.15 + 0.25 * c[1]) * yn[None, None, :] ** 2
            + (c[2] - 0.5) * 0.3 * zn[None, :, None] - (0.1 + 0.2 * c[3]) * zn[None, :, None] ** 2
            + (c[4] - 0.5) * 0.2 * yn[None, None, :] * zn[None, :, None] - 0.1 * c[5] * xn[:, None, None] ** 2)
    img *= np.exp(logb).astype(F32)
    if noise:
        sigma = F32(noise_rng.uniform(9.0, 18.0))
        n1 = noise_rng.standard_normal(shp, dtype=F32)
        n2 = noise_rng.standard_normal(shp, dtype=F32)
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.ascontiguousarray(img, dtype=F32), labels
