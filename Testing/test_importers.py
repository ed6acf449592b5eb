"""Importers and manifest: SPIDER / RSNA fakes in their native layouts, hand-written manifests, phantoms,
study-level splits and the support table. Everything is built in tmp_path; nothing is downloaded."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm.errors import InputError
from model_training.manifest import (
    COLUMNS, Row, assign_splits, format_support_table, read_manifest, support_table, write_manifest,
)
from model_training.importers.common import SkipLog


# --------------------------------------------------------------------------------------------------------- SPIDER
def _spider_disc_boxes():
    """Disc boxes in ITK index (i = LR, j = AP, k = SI for the identity/LPS series): label -> (i0,i1,j0,j1,k0,k1)."""
    return {201: (3, 7, 8, 19, 40, 45), 202: (3, 7, 9, 20, 25, 30), 203: (3, 7, 10, 21, 10, 15)}


def _write_spider(root: Path) -> dict:
    """Two patients: '1' stored as LPS identity (x = LR slices), '7' stored PIR (i = P, j = I, k = R), plus a t1
    series that must be ignored. Returns expected disc centre / landmark per (patient, label)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    expected = {}
    # ---- patient 1: identity direction, spacing (3.3 LR, 0.7 AP, 0.8 SI)
    size = (10, 30, 56)  # i, j, k
    m = np.zeros(size[::-1], np.int16)
    for lab, (i0, i1, j0, j1, k0, k1) in _spider_disc_boxes().items():
        m[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = lab
    # a posterior protrusion on a lateral slice (i = 3) must NOT move the mid-sagittal landmark of 201,
    # nor one far above the centre (k = 40, outside the +-3 mm SI band)
    m[42, 20:23, 3] = 201
    m[47, 20:24, 5] = 201
    m[5, 5, 5] = 1  # a vertebra label, ignored
    spacing, origin = (3.3, 0.7, 0.8), (-15.0, -60.0, 20.0)
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(500, 50, m.shape).astype(np.float32))
    msk = sitk.GetImageFromArray(m)
    for im in (img, msk):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
    sitk.WriteImage(img, str(root / "images" / "1_t2.mha"))
    sitk.WriteImage(msk, str(root / "masks" / "1_t2.mha"))
    sitk.WriteImage(img, str(root / "images" / "1_t1.mha"))
    sitk.WriteImage(msk, str(root / "masks" / "1_t1.mha"))
    for lab in (201, 202, 203):
        kji = np.argwhere(m == lab)
        ijk = kji[:, ::-1].mean(0)
        centre = np.asarray(origin) + np.asarray(spacing) * ijk
        i0, i1, j0, j1, k0, k1 = _spider_disc_boxes()[lab]
        ic = ijk[0]  # = 5 (protrusions are symmetric in count? no: compute the band explicitly)
        band = kji[(np.abs((kji[:, 2] - ic) * 3.3) <= 1.65 + 1e-6) & (np.abs((kji[:, 0] - ijk[2]) * 0.8) <= 3.0)]
        post = band[band[:, 1] == band[:, 1].max()]
        lm = np.asarray(origin) + np.asarray(spacing) * post[:, ::-1].mean(0)
        expected[("1", lab)] = (centre, lm)
    # hand-checked values for 202 (no protrusions: box centre, posterior face j = 20 at mid slice i = 5)
    np.testing.assert_allclose(expected[("1", 202)][0], np.asarray(origin) + np.asarray(spacing) * (5, 14.5, 27.5))
    np.testing.assert_allclose(expected[("1", 202)][1], np.asarray(origin) + np.asarray(spacing) * (5, 20, 27.5))
    # ---- patient 7: PIR storage. ITK axes: i -> posterior (0,1,0), j -> inferior (0,0,-1), k -> right (-1,0,0)
    d = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # columns = axis directions
    sp7 = (0.9, 0.9, 4.0)
    size7 = (30, 40, 9)
    m7 = np.zeros(size7[::-1], np.int16)  # (k=LR, j=SI, i=AP)
    m7[3:6, 10:16, 5:20] = 202  # LR k 3..5 (centre 4), SI j 10..15, AP i 5..19 (posterior = i 19)
    o7 = (30.0, -70.0, 50.0)
    img7 = sitk.GetImageFromArray(np.ones(m7.shape, np.float32))
    msk7 = sitk.GetImageFromArray(m7)
    for im in (img7, msk7):
        im.SetSpacing(sp7)
        im.SetOrigin(o7)
        im.SetDirection(tuple(d.reshape(-1)))
    sitk.WriteImage(img7, str(root / "images" / "7_t2_SPACE.mha"))
    sitk.WriteImage(msk7, str(root / "masks" / "7_t2_SPACE.mha"))
    M = d * np.asarray(sp7)[None, :]
    expected[("7", 202)] = (np.asarray(o7) + M @ (12.0, 12.5, 4.0), np.asarray(o7) + M @ (19.0, 12.5, 4.0))
    with open(root / "radiological_gradings.csv", "w", newline="") as fh:
        fh.write("Patient,IVD label,Modic,UP endplate,LOW endplate,Spondylolisthesis,Disc herniation,"
                 "Disc narrowing,Disc bulging,Pfirrman grade\n")
        fh.write("1,1,0,0,0,0,1,1,1,3\n1,2,0,0,0,0,0,0,1,2\n1,6,0,0,0,0,1,0,0,2\n")  # no row for IVD 3
        fh.write("7,2,0,0,0,0,1,0,0,4\n")
    return expected


def test_spider_importer_centres_landmarks_and_grades(tmp_path):
    from model_training.importers.spider import import_spider

    expected = _write_spider(tmp_path / "spider")
    skipped = SkipLog()
    rows = import_spider(tmp_path / "spider", skipped=skipped)
    assert {(r.study_id, r.level) for r in rows} == {("spider-1", "L5-S1"), ("spider-1", "L4-L5")}
    assert all(Path(r.image_path).name == "1_t2.mha" for r in rows)  # t1 ignored, t2_SPACE off by default
    by = {r.level: r for r in rows}
    assert by["L5-S1"].condition == "dh_moderate_large" and by["L4-L5"].condition == "none"
    for lab, lv in ((201, "L5-S1"), (202, "L4-L5")):
        c, lm = expected[("1", lab)]
        np.testing.assert_allclose(by[lv].disc_center_lps, c, atol=1e-4)
        np.testing.assert_allclose(by[lv].landmark_lps, lm, atol=1e-4)
    # the lateral / far-SI protrusions did not move the landmark: posterior face j = 19 of the box at i = 5
    assert by["L5-S1"].landmark_lps[1] == pytest.approx(-60.0 + 0.7 * 19, abs=1e-4)
    assert by["L5-S1"].spacing == (3.3, 0.7, 0.8) and by["L5-S1"].source == "spider" and by["L5-S1"].split == ""
    assert any("IVD label 3" in s for s in skipped.messages)  # L3-L4 disc without grading row: skipped, logged

    rows2 = import_spider(tmp_path / "spider", include_t2_space=True, herniation_condition="dh_small")
    r7 = [r for r in rows2 if r.study_id == "spider-7"]
    assert len(r7) == 1 and r7[0].level == "L4-L5" and r7[0].condition == "dh_small"
    c, lm = expected[("7", 202)]
    np.testing.assert_allclose(r7[0].disc_center_lps, c, atol=1e-4)
    np.testing.assert_allclose(r7[0].landmark_lps, lm, atol=1e-4)
    # posterior = larger LPS y: the landmark lies posterior of the centre by half the disc depth minus half a voxel
    assert r7[0].landmark_lps[1] - r7[0].disc_center_lps[1] == pytest.approx(0.9 * 7, abs=1e-4)


def test_spider_rejects_non_spider_folder(tmp_path):
    from model_training.importers.spider import import_spider

    (tmp_path / "radiological_gradings.csv").write_text("Patient,IVD label,Disc herniation\n")
    with pytest.raises(InputError, match="not a SPIDER folder"):
        import_spider(tmp_path)
