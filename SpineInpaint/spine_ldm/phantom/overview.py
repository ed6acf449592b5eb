"""Overview figure of the phantom next to real scans (what ``Resources/phantom_overview.png`` shows).

``python -m spine_ldm.phantom.overview out.png [--seed 0] [--real-dir ../shared/data/lumbar_t2]``

Row 1: healthy mid-sagittal slice, the same seed with DH L4-L5 moderate_large + CCS L3-L4 severe, their difference
(non-zero only around the pathology), the label map. Row 2: close-ups of the L3-S1 region (healthy, pathological,
a parasagittal slice through the facets) and, when the real cases are available, mid-sagittal slices of real
sagittal T2 scans (those are GPL-3.0 data: compare locally, do not commit such a figure). Without them the
second row shows a parasagittal slice and a labelled close-up. Every panel: superior up, anterior left.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import generate


def _mid_sagittal_real(path):
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")  # i: R->L, j: A->P, k: I->S
    a = sitk.GetArrayFromImage(img).astype(np.float32)  # [k(IS), j(AP), i(LR)]
    sl = a[:, :, a.shape[2] // 2][::-1]  # superior up, anterior left
    sp = img.GetSpacing()
    return sl, (0, sl.shape[1] * sp[1], sl.shape[0] * sp[2], 0)


def render_overview(out_png, seed: int = 0, real_dir=None, dpi: int = 72):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = generate(seed=seed)
    p = generate(seed=seed, dh={"L4-L5": "moderate_large"}, ccs={"L3-L4": "severe"})
    a, b = sitk.GetArrayFromImage(h.image), sitk.GetArrayFromImage(p.image)
    lab = sitk.GetArrayFromImage(p.labels)
    si, sj, sk = h.image.GetSpacing()
    k = a.shape[0] // 2
    ext = (0, a.shape[2] * si, a.shape[1] * sj, 0)
    vmax = float(np.percentile(a[k], 99.7))
    reals = []
    if real_dir is not None and Path(real_dir).is_dir():
        for name in ("ivd_11_t2.nrrd", "vb2_02_t2.nrrd"):
            f = Path(real_dir) / name
            if f.exists():
                reals.append((name.replace("_t2.nrrd", ""), *_mid_sagittal_real(f)))
    fig, ax = plt.subplots(2, 4, figsize=(16, 8.6))
    kw = dict(cmap="gray", vmin=0, vmax=vmax, extent=ext)
    ax[0, 0].imshow(a[k], **kw)
    ax[0, 0].set_title(f"phantom seed {seed}: healthy (mid-sagittal)", fontsize=9)
    ax[0, 1].imshow(b[k], **kw)
    ax[0, 1].set_title("same seed: DH L4-L5 mod/large + CCS L3-L4 severe", fontsize=9)
    d = b[k] - a[k]
    m = float(np.abs(d).max()) or 1.0
    ax[0, 2].imshow(d, cmap="RdBu_r", vmin=-m, vmax=m, extent=ext)
    ax[0, 2].set_title("difference (pathological - healthy)", fontsize=9)
    ax[0, 3].imshow(a[k], **kw)
    ml = np.ma.masked_where(lab[k] == 0, lab[k])
    ax[0, 3].imshow(ml, cmap="tab20", alpha=0.45, extent=ext, interpolation="nearest")
    ax[0, 3].set_title("labels (pathological case)", fontsize=9)
    for pth in p.landmarks["pathologies"]:
        x, y, z = pth["landmark_LPS_mm"]
        col, row, _ = p.image.TransformPhysicalPointToContinuousIndex((x, y, z))
        for axx in (ax[0, 1], ax[0, 2]):
            axx.plot(col * si, row * sj, "o", mfc="none", mec="yellow", ms=14, mew=1.2)
            axx.annotate(pth["condition"], (col * si, row * sj), xytext=(8, -12), textcoords="offset points",
                         color="yellow", fontsize=7)
    # close-ups around L3-S1
    zc = np.mean([h.landmarks["discs"][lv]["center_LPS_mm"][2] for lv in ("L3-L4", "L4-L5")])
    yc = h.landmarks["discs"]["L4-L5"]["center_LPS_mm"][1] + 25.0
    _, rc, _ = h.image.TransformPhysicalPointToContinuousIndex((0.0, yc, zc))
    cc, _, _ = h.image.TransformPhysicalPointToContinuousIndex((0.0, yc, zc))
    half = int(round(60.0 / si))
    r0, c0 = max(0, int(rc) - half), max(0, int(cc) - half)
    crop = (slice(r0, r0 + 2 * half), slice(c0, c0 + 2 * half))
    cext = (c0 * si, (c0 + 2 * half) * si, (r0 + 2 * half) * sj, r0 * sj)
    kw2 = dict(cmap="gray", vmin=0, vmax=vmax, extent=cext)
    ax[1, 0].imshow(a[k][crop], **kw2)
    ax[1, 0].set_title("close-up L3-S1, healthy", fontsize=9)
    ax[1, 1].imshow(b[k][crop], **kw2)
    ax[1, 1].set_title("close-up, pathological", fontsize=9)
    kf = max(0, k - 4)
    xk = h.image.TransformIndexToPhysicalPoint((0, 0, kf))[0]
    if reals:
        name, sl, rext = reals[0]
        ax[1, 2].imshow(sl, cmap="gray", vmin=0, vmax=float(np.percentile(sl, 99.7)), extent=rext)
        ax[1, 2].set_title(f"real: {name} (mid-sagittal)", fontsize=9)
    else:
        ax[1, 2].imshow(a[kf], **kw)
        ax[1, 2].set_title(f"healthy, parasagittal x = {xk:.1f} mm LPS (pedicles, foramina, facets)", fontsize=9)
    if len(reals) > 1:
        name, sl, rext = reals[1]
        ax[1, 3].imshow(sl, cmap="gray", vmin=0, vmax=float(np.percentile(sl, 99.7)), extent=rext)
        ax[1, 3].set_title(f"real: {name} (mid-sagittal)", fontsize=9)
    else:
        ax[1, 3].imshow(b[k][crop], **kw2)
        lc = lab[k][crop]
        ax[1, 3].imshow(np.ma.masked_where(lc == 0, lc), cmap="tab20", alpha=0.4, extent=cext,
                        interpolation="nearest")
        ax[1, 3].set_title("close-up, pathological + labels", fontsize=9)
    for axx in ax.ravel():
        axx.set_xticks([])
        axx.set_yticks([])
    fig.suptitle("spine_ldm.phantom: synthetic sagittal T2 (0.625 x 0.625 x 4.3 mm), superior up, anterior left",
                 fontsize=10)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return str(out_png)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-dir", default=None)
    ap.add_argument("--dpi", type=int, default=72)
    a = ap.parse_args(argv)
    print(render_overview(a.out, a.seed, a.real_dir, a.dpi))


if __name__ == "__main__":
    main()
