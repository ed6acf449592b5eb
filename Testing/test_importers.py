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
    # a posterior protrusion on a lateral slice (i = 3) must NOT move the mid-sagittal landmark of 201
    m[42, 20:23, 3] = 201
    m[5, 5, 5] = 1  # a vertebra label, ignored
    m[20:51, 23:27, 4:7] = 100  # spinal canal: a column behind the discs, SI k 20..50 (covers 201, 202, not 203)
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
        centre = np.asarray(origin) + np.asarray(spacing) * kji[:, ::-1].mean(0)  # datasets.md formula
        i0, i1, j0, j1, k0, k1 = _spider_disc_boxes()[lab]
        # posterior face of the box (j1) on the mid slice (i = 5), at the box's mid height
        lm = np.asarray(origin) + np.asarray(spacing) * (5, j1, (k0 + k1) / 2)
        expected[("1", lab)] = (centre, lm)
    # canal centre: the canal voxels within the disc's SI extent (k0..k1): i 4..6, j 23..26 -> (5, 24.5, mid k)
    for lab in (201, 202):
        k0, k1 = _spider_disc_boxes()[lab][4:]
        expected[("1", lab, "canal")] = np.asarray(origin) + np.asarray(spacing) * (5, 24.5, (k0 + k1) / 2)
    np.testing.assert_allclose(expected[("1", 202)][0], np.asarray(origin) + np.asarray(spacing) * (5, 14.5, 27.5))
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
        np.testing.assert_allclose(by[lv].canal_lps, expected[("1", lab, "canal")], atol=1e-4)
    # the canal centre lies posterior (+y) of the posterior disc margin, at the disc's height
    assert by["L4-L5"].canal_lps[1] > by["L4-L5"].landmark_lps[1] + 2.0
    # the lateral protrusion (posterior to the box, on slice i = 3) shifted the centroid but not the landmark
    assert by["L5-S1"].disc_center_lps[1] > -60.0 + 0.7 * 13.5 + 1e-3
    assert by["L5-S1"].landmark_lps[1] == pytest.approx(-60.0 + 0.7 * 19, abs=1e-4)
    assert by["L5-S1"].spacing == (3.3, 0.7, 0.8) and by["L5-S1"].source == "spider" and by["L5-S1"].split == ""
    assert any("IVD label 3" in s for s in skipped.messages)  # L3-L4 disc without grading row: skipped, logged

    rows2 = import_spider(tmp_path / "spider", include_t2_space=True, herniation_condition="dh_small")
    r7 = [r for r in rows2 if r.study_id == "spider-7"]
    assert len(r7) == 1 and r7[0].level == "L4-L5" and r7[0].condition == "dh_small"
    c, lm = expected[("7", 202)]
    np.testing.assert_allclose(r7[0].disc_center_lps, c, atol=1e-4)
    np.testing.assert_allclose(r7[0].landmark_lps, lm, atol=1e-4)
    assert r7[0].canal_lps is None  # no canal label (100) in that mask -> empty
    # posterior = larger LPS y: the landmark lies posterior of the centre by half the disc depth minus half a voxel
    assert r7[0].landmark_lps[1] - r7[0].disc_center_lps[1] == pytest.approx(0.9 * 7, abs=1e-4)


def test_spider_landmark_follows_a_tilted_disc():
    """A 30-degree tilted slab (like L5-S1): the landmark is the posterior end of the slab along its own plane,
    not where a horizontal line through the centre leaves the slab (which would be only ~6 mm posterior)."""
    from model_training.importers.spider import disc_geometry

    sp = 0.5
    size = (9, 120, 120)  # i = LR (x), j = AP (y), k = SI (z); identity direction
    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing((2.0, sp, sp))
    c = np.array([8.0, 30.0, 30.0])
    t = np.radians(30.0)
    u = np.array([0.0, np.cos(t), -np.sin(t)])  # disc AP axis: posterior and inferior
    v = np.array([0.0, np.sin(t), np.cos(t)])   # disc normal
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    p = np.stack([ii * 2.0, jj * sp, kk * sp], -1) - c
    m = (np.abs(p @ u) <= 15.0) & (np.abs(p @ v) <= 3.0) & (np.abs(p[..., 0]) <= 4.0)
    arr = (m * 201).astype(np.int16)
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(img)
    centre, lm = disc_geometry(mask, 201)
    np.testing.assert_allclose(centre, c, atol=0.3)
    np.testing.assert_allclose(lm, c + 15.0 * u, atol=0.6)


def test_spider_landmark_on_real_discs(shared_data):
    """Real expert disc masks (lumbar_t2/ivd_11): centres equal the published centroids; the landmark lies at the
    posterior margin, 8-25 mm behind the centre, in the disc's slice."""
    import json

    from model_training.importers.spider import disc_geometry

    lab = sitk.ReadImage(str(shared_data / "ivd_11_labels.nrrd"))
    discs = json.loads((shared_data / "ivd_11_discs.json").read_text())["discs"]
    for lv, info in discs.items():
        centre, lm = disc_geometry(lab, info["label"])
        np.testing.assert_allclose(centre, info["center_LPS_mm"], atol=2e-3)
        d = np.subtract(lm, centre)
        assert 8.0 < d[1] < 25.0, (lv, d)  # posterior (+y)
        assert abs(d[0]) < 1.0 and abs(d[2]) < 8.0, (lv, d)


def test_spider_rejects_non_spider_folder(tmp_path):
    from model_training.importers.spider import import_spider

    (tmp_path / "radiological_gradings.csv").write_text("Patient,IVD label,Disc herniation\n")
    with pytest.raises(InputError, match="not a SPIDER folder"):
        import_spider(tmp_path)


# --------------------------------------------------------------------------------------------------------- RSNA
ROW_SP, COL_SP, STEP = 0.8, 0.7, 4.0  # non-square pixels: PixelSpacing = [row spacing, column spacing]
R_DIR, C_DIR = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # +column -> posterior, +row -> inferior
NROWS, NCOLS = 40, 32


def _write_dcm(path: Path, ipp, iop, pixels: np.ndarray, instance: int, series_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [ROW_SP, COL_SP]
    ds.SliceThickness = STEP
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def _slice_pixels(slot: int) -> np.ndarray:
    """Unique value per (slice position slot, row, column)."""
    rr, cc = np.meshgrid(np.arange(NROWS), np.arange(NCOLS), indexing="ij")
    return slot * NROWS * NCOLS + rr * NCOLS + cc


def _write_rsna(root: Path) -> dict:
    """Study 100 with a sagittal T2 series (6 slices, instance numbers NOT in position order, plus a 2-slice
    axial localizer stack in the same series), a T1 series; study 200 without a sagittal T2 series."""
    n = np.cross(R_DIR, C_DIR)  # slice normal (-1, 0, 0)
    base = np.array([20.0, -40.0, 60.0])
    sdir = root / "train_images" / "100" / "555"
    slot_of_instance = {}
    for slot in range(6):
        inst = 6 - slot if slot % 2 else 10 + slot  # scrambled instance numbers
        slot_of_instance[inst] = slot
        _write_dcm(sdir / f"{inst}.dcm", base + slot * STEP * n, np.concatenate([R_DIR, C_DIR]),
                   _slice_pixels(slot), inst, "1.2.3.555")
    for j, inst in enumerate((40, 41)):  # axial localizer in the same series: another IOP, other size
        _write_dcm(sdir / f"{inst}.dcm", (0.0, 0.0, 10.0 * j), (1, 0, 0, 0, 1, 0), np.zeros((16, 16)), inst, "1.2.3.555")
    (root / "train_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n100,555,Sagittal T2/STIR\n100,556,Sagittal T1\n"
        "200,700,Axial T2\n")
    levels = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    head = ["study_id"] + [f"{c}_{lv}" for c in ("spinal_canal_stenosis", "left_neural_foraminal_narrowing")
                           for lv in levels]
    canal = ["", "Normal/Mild", "Moderate", "Severe", "Normal/Mild"]
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        w.writerow(["100"] + canal + ["Severe"] * 5)
        w.writerow(["200"] + ["Severe"] * 10)
    # canal points: (instance, x, y) per level; L4/L5 sits on instance 3 (slot 3), L3/L4 on instance 12 (slot 2)
    pts = {"L1/L2": (10, 5.0, 3.0), "L2/L3": (12, 10.0, 12.0), "L3/L4": (12, 12.5, 20.0),
           "L4/L5": (3, 10.0, 26.0), "L5/S1": (5, 8.0, 33.0)}
    with open(root / "train_label_coordinates.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        for lv, (inst, x, y) in pts.items():
            w.writerow([100, 555, inst, "Spinal Canal Stenosis", lv, x, y])
            w.writerow([100, 556, 1, "Left Neural Foraminal Narrowing", lv, 1.0, 2.0])
        w.writerow([200, 700, 1, "Spinal Canal Stenosis", "L4/L5", 1.0, 1.0])
    expected = {}
    for lv, (inst, x, y) in pts.items():
        slot = slot_of_instance[inst]
        ipp = base + slot * STEP * n
        expected[lv.replace("/", "-")] = (ipp + x * COL_SP * R_DIR + y * ROW_SP * C_DIR,
                                          int(_slice_pixels(slot)[int(y), int(x)]) if float(x).is_integer() and
                                          float(y).is_integer() else None)
    return expected


def test_rsna_importer_volume_geometry_landmarks_and_grades(tmp_path):
    pytest.importorskip("pydicom")
    from spine_ldm.geometry import DISC_OFFSET_MM, DISC_TILT_DEG
    from model_training.importers.rsna import import_rsna

    expected = _write_rsna(tmp_path / "rsna")
    skipped = SkipLog()
    rows = import_rsna(tmp_path / "rsna", tmp_path / "cache", skipped=skipped)
    by = {r.level: r for r in rows}
    assert set(by) == {"L2-L3", "L3-L4", "L4-L5", "L5-S1"}  # L1-L2 has no grade
    assert [by[lv].condition for lv in ("L2-L3", "L3-L4", "L4-L5", "L5-S1")] == \
        ["none", "ccs_moderate", "ccs_severe", "none"]
    assert all(r.study_id == "rsna-100" and r.source == "rsna" for r in rows)
    assert any("study 200" in m and "Sagittal T2/STIR" in m for m in skipped.messages)
    assert any("L1-L2" in m and "grade" in m for m in skipped.messages)

    img = sitk.ReadImage(by["L4-L5"].image_path)
    assert img.GetSize() == (NCOLS, NROWS, 6)  # the localizer stack was left out
    np.testing.assert_allclose(img.GetSpacing(), (COL_SP, ROW_SP, STEP))
    assert by["L4-L5"].spacing == pytest.approx((COL_SP, ROW_SP, STEP))
    for lv, r in by.items():
        p, value = expected[lv]
        np.testing.assert_allclose(r.landmark_lps, p, atol=1e-4)
        assert r.canal_lps == r.landmark_lps  # the RSNA canal point is the canal centre, healthy levels too
        if value is not None:  # the voxel at the landmark holds the pixel the annotator clicked on
            idx = img.TransformPhysicalPointToIndex(tuple(p))
            assert int(img[idx]) == value, lv
        # disc centre: 28 mm anterior (LPS -y) of the canal point, turned inferior (-z) by the level's disc tilt
        t = np.deg2rad(DISC_TILT_DEG[lv])
        np.testing.assert_allclose(np.subtract(r.disc_center_lps, r.landmark_lps),
                                   DISC_OFFSET_MM["ccs"] * np.array([0.0, -np.cos(t), -np.sin(t)]), atol=1e-6)
    assert by["L5-S1"].disc_center_lps[2] < by["L5-S1"].landmark_lps[2] - 12.0  # 28 sin(27 deg) = 12.7 mm

    # second run reuses the NRRD (no rewrite) and gives the same rows; a custom offset moves the centre
    mtime = os.stat(by["L4-L5"].image_path).st_mtime_ns
    rows2 = import_rsna(tmp_path / "rsna", tmp_path / "cache", disc_offset_mm=20.0)
    assert os.stat(by["L4-L5"].image_path).st_mtime_ns == mtime
    r2 = {r.level: r for r in rows2}["L4-L5"]
    assert r2.landmark_lps == by["L4-L5"].landmark_lps
    t = np.deg2rad(DISC_TILT_DEG["L4-L5"])  # the same direction, only the distance changes
    np.testing.assert_allclose(np.subtract(r2.disc_center_lps, r2.landmark_lps),
                               20.0 * np.array([0.0, -np.cos(t), -np.sin(t)]), atol=1e-6)


def test_rsna_irregular_series_is_skipped_with_reason(tmp_path):
    pytest.importorskip("pydicom")
    from model_training.importers.rsna import import_rsna

    _write_rsna(tmp_path / "rsna")
    os.remove(tmp_path / "rsna" / "train_images" / "100" / "555" / "12.dcm")  # slot 2: a gap in the stack
    skipped = SkipLog()
    assert import_rsna(tmp_path / "rsna", tmp_path / "cache", skipped=skipped) == []
    assert any("irregular slice spacing" in m for m in skipped.messages)


# --------------------------------------------------------------------------------------------------------- manual
def _small_volume(path: Path, origin=(0.0, 0.0, 0.0), size=(20, 30, 40), spacing=(2.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def test_manual_manifest_is_validated_and_completed(tmp_path):
    from model_training.importers.generic import import_manifest

    _small_volume(tmp_path / "scans" / "a.nrrd")
    m = tmp_path / "my.csv"
    m.write_text('study_id,image_path,level,disc_center_lps,condition,landmark_lps\n'
                 'p1,scans/a.nrrd,L4/L5,"10,15,20",DH-small,"10 ,20, 20"\n'
                 '\n'
                 'p1,scans/a.nrrd,l5-s1,"10, 15, 30",healthy,\n')
    rows = import_manifest(m)
    assert [r.level for r in rows] == ["L4-L5", "L5-S1"]
    assert [r.condition for r in rows] == ["dh_small", "none"]
    assert rows[0].landmark_lps == (10.0, 20.0, 20.0) and rows[1].landmark_lps is None
    assert rows[0].image_path == str((tmp_path / "scans" / "a.nrrd").resolve())
    assert rows[0].spacing == (2.0, 1.0, 1.0) and rows[0].source == "manual" and rows[0].split == ""
    assert rows[1].line == 4  # blank line skipped, line numbers kept for messages


@pytest.mark.parametrize("line, column, fragment", [
    ('p2,scans/a.nrrd,L6-L7,"10,15,20",none,', "level", "unknown level 'L6-L7'"),
    ('p2,scans/a.nrrd,L4-L5,"10,15",none,', "disc_center_lps", "3 numbers"),
    ('p2,scans/a.nrrd,L4-L5,"10,15,20",stenosis,', "condition", "unknown condition 'stenosis'"),
    ('p2,scans/a.nrrd,L4-L5,"10,15,20",none,"1,2,x"', "landmark_lps", "3 numbers"),
    (',scans/a.nrrd,L4-L5,"10,15,20",none,', "study_id", "empty"),
    ('p2,scans/a.nrrd,L4-L5,"10,15,20",none,"-10,-15,20"', "landmark_lps", "mm outside 'a.nrrd'"),
    ('p2,scans/missing.nrrd,L4-L5,"10,15,20",none,', "image_path", "does not exist"),
])
def test_manual_manifest_bad_row_names_line_and_column(tmp_path, line, column, fragment):
    from model_training.importers.generic import import_manifest

    _small_volume(tmp_path / "scans" / "a.nrrd")
    m = tmp_path / "bad.csv"
    m.write_text('study_id,image_path,level,disc_center_lps,condition,landmark_lps\n'
                 'p1,scans/a.nrrd,L4-L5,"10,15,20",none,\n' + line + "\n")
    with pytest.raises(InputError) as ei:
        import_manifest(m)
    msg = str(ei.value)
    assert msg.startswith("bad.csv line 3"), msg
    assert f"column {column!r}" in msg and fragment in msg, msg
    assert "\n" not in msg


def test_canal_lps_column_is_optional_validated_and_checked_against_the_image(tmp_path):
    from model_training.importers.generic import import_manifest

    _small_volume(tmp_path / "scans" / "a.nrrd")  # extent x 0..38, y 0..29, z 0..39 mm
    m = tmp_path / "m.csv"
    # an older manifest without the column reads, canal_lps = None
    m.write_text('study_id,image_path,level,disc_center_lps,condition,landmark_lps,split,source\n'
                 'p1,scans/a.nrrd,L4-L5,"10,15,20",none,"10,20,20",,manual\n')
    assert read_manifest(m)[0].canal_lps is None
    head = 'study_id,image_path,level,disc_center_lps,condition,landmark_lps,canal_lps\n'
    m.write_text(head + 'p1,scans/a.nrrd,L4-L5,"10,15,20",none,"10,20,20","10, 25, 20"\n'
                 'p1,scans/a.nrrd,L5-S1,"10,15,30",none,,\n')
    rows = import_manifest(m)
    assert [r.canal_lps for r in rows] == [(10.0, 25.0, 20.0), None]
    m.write_text(head + 'p1,scans/a.nrrd,L4-L5,"10,15,20",none,,"1,2"\n')
    with pytest.raises(InputError, match=r"^m.csv line 2 \(study 'p1'\), column 'canal_lps': .*3 numbers"):
        read_manifest(m, default_source="manual")
    m.write_text(head + 'p1,scans/a.nrrd,L4-L5,"10,15,20",none,,"10,-25,20"\n')  # RAS y given: 24.5 mm outside
    with pytest.raises(InputError, match=r"line 2 .*column 'canal_lps': point \(10,-25,20\) LPS is 24.5 mm outside"):
        import_manifest(m)
    with pytest.raises(InputError, match="canal_lps must be 3 numbers"):
        Row(study_id="p", image_path="a", level="L4-L5", disc_center_lps=(0, 0, 0), canal_lps=(1, 2))


def test_manifest_structural_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("study_id,image_path,level,disc_center,condition,source\n")
    with pytest.raises(InputError, match="missing column\\(s\\) disc_center_lps"):
        read_manifest(m)
    m.write_text("study_id,image_path,level,disc_center_lps,condition,source,notes\n")
    with pytest.raises(InputError, match="unknown column\\(s\\) notes"):
        read_manifest(m)
    m.write_text("study_id,image_path,level,disc_center_lps,condition,source\n"
                 "p1,a.nrrd,L4-L5,1,2,3,none,manual\n")
    with pytest.raises(InputError, match="line 2: 8 fields, header has 6.*quotes"):
        read_manifest(m)
    m.write_text('study_id,image_path,level,disc_center_lps,condition,split,source\n'
                 'p1,a.nrrd,L4-L5,"1,2,3",none,train,manual\np1,a.nrrd,L5-S1,"1,2,3",none,test,manual\n')
    with pytest.raises(InputError, match="line 3 .*'split'.*split is per study"):
        read_manifest(m)
    m.write_text('study_id,image_path,level,disc_center_lps,condition,source\n'
                 'p1,a.nrrd,L4-L5,"1,2,3",none,manual\np1,a.nrrd,L4/L5,"1,2,4",none,manual\n')
    with pytest.raises(InputError, match="line 3 .*duplicate L4-L5.*first at line 2"):
        read_manifest(m)
    # herniation and stenosis are graded independently: one dh_* and one ccs_* row per level, each with a landmark
    head = 'study_id,image_path,level,disc_center_lps,condition,landmark_lps,source\n'
    both = 'p1,a.nrrd,L4-L5,"1,2,3",dh_small,"1,9,3",manual\np1,a.nrrd,L4-L5,"1,2,3",ccs_severe,"1,20,3",manual\n'
    m.write_text(head + both)
    rows = read_manifest(m)
    assert [(r.condition, r.landmark_lps) for r in rows] == [("dh_small", (1.0, 9.0, 3.0)),
                                                             ("ccs_severe", (1.0, 20.0, 3.0))]
    for extra, line in (('p1,a.nrrd,L4/L5,"1,2,3",dh_moderate_large,"1,9,3",manual\n', 2),
                        ('p1,a.nrrd,L4-L5,"1,2,3",none,"1,9,3",manual\n', 2)):
        m.write_text(head + both + extra)
        with pytest.raises(InputError, match=f"line 4 .*duplicate L4-L5.*first at line {line}"):
            read_manifest(m)
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def _rows(n_studies=20, levels=("L3-L4", "L4-L5", "L5-S1")):
    rows = []
    for s in range(n_studies):
        for lv in levels:
            cond = "dh_small" if (s % 4 == 0 and lv == "L4-L5") else ("ccs_severe" if s % 5 == 1 and lv == "L3-L4"
                                                                     else "none")
            rows.append(Row(study_id=f"s{s:02d}", image_path=f"/data/s{s}.nrrd", level=lv,
                            disc_center_lps=(0.5 * s, -1.25, 3.0), condition=cond,
                            landmark_lps=(1.0, 2.0, 3.0) if cond != "none" else None, spacing=(0.6, 0.6, 4.3),
                            source="manual", canal_lps=(0.25, 9.5, -3.125) if s % 2 else None))
    return rows


def test_write_read_roundtrip_and_relative_paths(tmp_path):
    rows = assign_splits(_rows(5), seed=3)
    p = write_manifest(tmp_path / "out" / "m.csv", rows)
    header = p.read_text().splitlines()[0]
    assert header == ",".join(COLUMNS) and header.endswith(",source,canal_lps")
    assert read_manifest(p) == rows
    assert {r.canal_lps for r in read_manifest(p)} == {None, (0.25, 9.5, -3.125)}
    img = _small_volume(tmp_path / "out" / "imgs" / "x.nrrd")
    del img
    r = [rows[0].replace(image_path=str(tmp_path / "out" / "imgs" / "x.nrrd"))]
    p2 = write_manifest(tmp_path / "out" / "rel.csv", r, relative_paths=True)
    assert "imgs/x.nrrd" in p2.read_text() and str(tmp_path) not in p2.read_text()
    assert read_manifest(p2)[0].image_path == str((tmp_path / "out" / "imgs" / "x.nrrd").resolve())


def test_assign_splits_is_per_study_reproducible_and_order_independent():
    rows = _rows(40)
    a = assign_splits(rows, (0.8, 0.1, 0.1), seed=7)
    b = assign_splits(list(reversed(rows)), (0.8, 0.1, 0.1), seed=7)
    c = assign_splits(rows, (0.8, 0.1, 0.1), seed=8)
    split_of = {}
    for r in a:  # every FSU of a study is in the same split
        assert split_of.setdefault(r.study_id, r.split) == r.split
    assert {r.study_id: r.split for r in b} == split_of  # same seed, any row order -> same split
    assert {r.study_id: r.split for r in c} != split_of  # another seed -> another split
    counts = Counter(split_of.values())
    assert counts == {"train": 32, "val": 4, "test": 4}
    # stratified: pathological studies (s % 4 == 0 or s % 5 == 1: 18 of 40) are spread over the splits
    patho = {s for s in split_of if int(s[1:]) % 4 == 0 or int(s[1:]) % 5 == 1}
    assert Counter(split_of[s] for s in patho)["train"] == round(0.8 * len(patho))
    assert all(counts[k] > 0 for k in ("val", "test"))
    # keep existing assignments when asked
    fixed = [r.replace(split="test") if r.study_id == "s00" else r.replace(split="") for r in a]
    d = assign_splits(fixed, seed=1, overwrite=False)
    assert {r.split for r in d if r.study_id == "s00"} == {"test"}
    with pytest.raises(InputError, match="fractions"):
        assign_splits(rows, (0.8, 0.2))


def test_support_table_counts():
    rows = assign_splits(_rows(20), seed=0)
    t = support_table(rows)
    assert t["L4-L5"]["dh_small"] == 5 and t["L4-L5"]["none"] == 15
    assert t["L3-L4"]["ccs_severe"] == 4 and t["L3-L4"]["none"] == 16
    assert t["L1-L2"] == {"none": 0, "dh_small": 0, "dh_moderate_large": 0, "ccs_moderate": 0, "ccs_severe": 0}
    assert sum(sum(v.values()) for v in t.values()) == len(rows)
    tr = support_table(rows, split="train")
    assert sum(sum(v.values()) for v in tr.values()) == sum(r.split == "train" for r in rows)
    assert support_table(rows, require_landmark=True)["L4-L5"]["none"] == 0
    text = format_support_table(t, title="support")
    lines = text.splitlines()
    assert lines[0] == "support" and "DH-small" in lines[1] and "CCS-severe" in lines[1]
    l45 = next(ln for ln in lines if ln.startswith("L4-L5")).split()
    assert l45 == ["L4-L5", "15", "5", "0", "0", "0", "20"]
    assert lines[-1].split() == ["total", "51", "5", "0", "0", "4", "60"]


# --------------------------------------------------------------------------------------------------------- CLI
def test_data_cli_import_phantom_two_pathologies_per_study(tmp_path, capsys):
    from model_training.data import main

    out = tmp_path / "ph.csv"
    assert main(["import-phantom", "--out-dir", str(tmp_path / "ph"), "--n-studies", "1", "--mix",
                 "dh_small=0.5,ccs_severe=0.5", "--pathologies-per-study", "2", "--level-weights",
                 "L2-L3=1,L4-L5=1", "--spacing", "2,2,4.3", "--out", str(out), "--no-split"]) == 0
    capsys.readouterr()
    rows = read_manifest(out)
    sick = {r.level: r.condition for r in rows if r.condition != "none"}
    assert sick == {"L2-L3": sick["L2-L3"], "L4-L5": sick["L4-L5"]}
    assert set(sick.values()) == {"dh_small", "ccs_severe"}
    assert all(r.canal_lps is not None for r in rows) and len(rows) == 5


def test_data_cli_import_support_and_errors(tmp_path, capsys):
    from model_training.data import main

    _write_spider(tmp_path / "spider")
    out = tmp_path / "m.csv"
    assert main(["import-spider", str(tmp_path / "spider"), "--out", str(out), "--t2-space", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "3 FSUs from 2 studies" in text and "skipped" in text and "DH-mod/large" in text
    rows = read_manifest(out)
    assert {r.study_id for r in rows} == {"spider-1", "spider-7"} and all(r.split for r in rows)
    assert main(["support", str(out), "--require-landmark"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "support (all splits, with landmark)"
    assert next(ln for ln in lines if ln.startswith("L4-L5")).split() == ["L4-L5", "1", "0", "1", "0", "0", "2"]
    # --append keeps existing splits and replaces re-imported rows
    before = {r.study_id: r.split for r in rows}
    assert main(["import-spider", str(tmp_path / "spider"), "--out", str(out), "--append", "--seed", "99"]) == 0
    capsys.readouterr()
    rows2 = read_manifest(out)
    assert len(rows2) == 3 and {r.study_id: r.split for r in rows2} == before
    # a bad hand-written manifest: exit code 2 and a one-line message
    bad = tmp_path / "bad.csv"
    bad.write_text('study_id,image_path,level,disc_center_lps,condition\np1,x.nrrd,L9-L9,"1,2,3",none\n')
    assert main(["import-manifest", str(bad), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.csv line 2 (study 'p1'), column 'level'") and "\n" not in err
    assert not (tmp_path / "o.csv").exists()


# --------------------------------------------------------------------------------------------------------- phantom
def test_phantom_plan_counts_and_determinism():
    from model_training.importers.phantom import plan_studies

    p = plan_studies(10, seed=4, mix={"dh_small": 0.2, "ccs_severe": 0.3})
    assert Counter(c for c, _ in p) == {"none": 5, "ccs_severe": 3, "dh_small": 2}
    assert all((lv is None) == (c == "none") for c, lv in p)
    assert plan_studies(10, seed=4, mix={"dh_small": 0.2, "ccs_severe": 0.3}) == p
    assert plan_studies(10, seed=5, mix={"dh_small": 0.2, "ccs_severe": 0.3}) != p
    # largest remainder, ties broken in CONDITIONS order: the counts always add up to n
    assert Counter(c for c, _ in plan_studies(7, 0, {"dh_small": 0.5, "ccs_moderate": 0.5})) == \
        {"dh_small": 4, "ccs_moderate": 3}
    assert {lv for _, lv in plan_studies(20, 0, {"dh_small": 1.0}, levels=["L4/L5"])} == {"L4-L5"}
    with pytest.raises(InputError, match="sum"):
        plan_studies(4, 0, {"dh_small": 0.7, "ccs_severe": 0.7})


def test_phantom_importer_two_tiny_studies_with_twins(tmp_path):
    import json

    from model_training.importers.phantom import import_phantoms

    out = tmp_path / "ph"
    rows = import_phantoms(out, 2, seed=3, mix={"dh_moderate_large": 0.5}, spacing=(2.0, 2.0, 4.3),
                           healthy_twins=True)
    # the pathological study has a twin, the healthy one does not (it would be the same image again)
    assert len(rows) == 3 * 5 and {r.source for r in rows} == {"phantom"}
    assert len({r.study_id for r in rows}) == 2  # twins share their sibling's study id
    patho = [r for r in rows if r.condition != "none"]
    assert len(patho) == 1 and patho[0].condition == "dh_moderate_large"
    p = patho[0]
    lm = json.loads((Path(p.image_path).parent / "landmarks.json").read_text())
    assert lm["pathologies"][0]["level"] == p.level
    np.testing.assert_allclose(p.landmark_lps, lm["pathologies"][0]["landmark_LPS_mm"])
    np.testing.assert_allclose(p.disc_center_lps, lm["discs"][p.level]["center_LPS_mm"])
    assert p.spacing == (2.0, 2.0, 4.3)
    twin = [r for r in rows if r.study_id == p.study_id and r.level == p.level and r is not p]
    assert len(twin) == 1 and twin[0].condition == "none" and twin[0].landmark_lps == p.landmark_lps
    assert Path(twin[0].image_path).parent.name == "twin"
    # the pair differs only around the landmark: the largest difference lies within 15 mm of it
    a = sitk.ReadImage(p.image_path)
    b = sitk.ReadImage(twin[0].image_path)
    diff = np.abs(sitk.GetArrayFromImage(a) - sitk.GetArrayFromImage(b))
    assert diff.max() > 50
    k, j, i = np.unravel_index(int(diff.argmax()), diff.shape)
    peak = np.asarray(a.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
    assert np.linalg.norm(peak - np.asarray(p.landmark_lps)) < 15.0
    # healthy levels carry the posterior-margin candidate point, posterior (+y) of the disc centre
    h = next(r for r in rows if r.condition == "none" and r.level != p.level)
    assert h.landmark_lps[1] > h.disc_center_lps[1] + 10.0
    # a second import reuses the generated files
    mt = os.stat(p.image_path).st_mtime_ns
    rows2 = import_phantoms(out, 2, seed=3, mix={"dh_moderate_large": 0.5}, spacing=(2.0, 2.0, 4.3),
                            healthy_twins=True)
    assert rows2 == rows and os.stat(p.image_path).st_mtime_ns == mt


def test_phantom_plan_several_pathologies_and_level_weights():
    from model_training.importers.phantom import plan_pathologies, plan_studies

    mix = {"dh_small": 0.3, "ccs_severe": 0.3, "ccs_moderate": 0.2}
    p = plan_pathologies(40, seed=2, mix=mix, pathologies_per_study=2)
    assert Counter(len(d) for d in p) == {2: 32, 0: 8}
    # the slot's own condition comes first; the counts of first conditions follow the mix
    assert Counter(next(iter(d.values())) for d in p if d) == {"dh_small": 12, "ccs_severe": 12, "ccs_moderate": 8}
    assert all(len(set(d.values())) == len(d) for d in p)  # different pathologies, at distinct levels (dict keys)
    assert {c for d in p for c in d.values()} == set(mix)
    assert plan_pathologies(40, seed=2, mix=mix, pathologies_per_study=2) == p
    # only one pathology in the mix: the second one cannot differ, so studies carry one
    assert {len(d) for d in plan_pathologies(5, 0, {"dh_small": 1.0}, pathologies_per_study=2)} == {1}
    # level weights: zero-weight levels are never drawn, heavy ones most often
    w = {"L1-L2": 0.0, "L2-L3": 0.0, "L3-L4": 0.1, "L4-L5": 0.6, "L5-S1": 0.3}
    lv = Counter(lv for d in plan_pathologies(200, 1, {"dh_small": 1.0}, level_weights=w) for lv in d)
    assert set(lv) <= {"L3-L4", "L4-L5", "L5-S1"} and lv["L4-L5"] > lv["L5-S1"] > lv["L3-L4"]
    lv2 = Counter(lv for d in plan_pathologies(100, 1, {"dh_small": 0.5, "ccs_severe": 0.5},
                                              pathologies_per_study=2, level_weights=w) for lv in d)
    assert set(lv2) <= {"L3-L4", "L4-L5", "L5-S1"} and sum(lv2.values()) == 200
    # the default (1 per study, uniform) plan is what plan_studies always returned
    assert plan_studies(10, 4, {"dh_small": 0.2, "ccs_severe": 0.3}) == \
        [(next(iter(d.values()), "none"), next(iter(d), None))
         for d in plan_pathologies(10, 4, {"dh_small": 0.2, "ccs_severe": 0.3})]
    with pytest.raises(InputError, match="pathologies_per_study=6 needs 6 distinct levels"):
        plan_pathologies(3, 0, pathologies_per_study=6)
    with pytest.raises(InputError, match="level_weights give 1 of the levels"):
        plan_pathologies(3, 0, pathologies_per_study=2, level_weights={"L4-L5": 1.0})


def test_phantom_importer_two_pathologies_per_study_twin_and_canal(tmp_path):
    import json

    from model_training.importers.phantom import import_phantoms

    rows = import_phantoms(tmp_path / "ph", 1, seed=5, mix={"dh_moderate_large": 0.5, "ccs_severe": 0.5},
                           spacing=(2.0, 2.0, 4.3), healthy_twins=True, pathologies_per_study=2,
                           level_weights={"L3-L4": 1.0, "L4-L5": 1.0, "L5-S1": 1.0})
    assert len(rows) == 2 * 5 and len({r.study_id for r in rows}) == 1
    patho = [r for r in rows if r.condition != "none"]
    assert sorted(r.condition for r in patho) == ["ccs_severe", "dh_moderate_large"]
    assert len({r.level for r in patho}) == 2 and {r.level for r in patho} <= {"L3-L4", "L4-L5", "L5-S1"}
    img = patho[0].image_path
    assert all(r.image_path == img for r in patho)  # both in the same image
    lm = json.loads((Path(img).parent / "landmarks.json").read_text())
    assert {p["level"]: p["condition"] for p in lm["pathologies"]} == {r.level: r.condition for r in patho}
    twins = {r.level: r for r in rows if r.image_path != img}
    assert Path(next(iter(twins.values())).image_path).parent.name == "twin"
    assert all(r.condition == "none" for r in twins.values())
    for p in patho:  # the twin carries both "missing pathology" landmarks
        assert twins[p.level].landmark_lps == p.landmark_lps
    # canal_lps on every row = the generator's thecal-sac centre at that level (twin: same anatomy)
    lm_t = json.loads((tmp_path / "ph" / rows[0].study_id / "twin" / "landmarks.json").read_text())
    for r in rows:
        src = lm if r.image_path == img else lm_t
        np.testing.assert_allclose(r.canal_lps, src["canal"][r.level]["center_LPS_mm"])
        # the canal centre lies behind (+y, posterior) the posterior disc margin
        assert r.canal_lps[1] > src["discs"][r.level]["posterior_margin_LPS_mm"][1]
    # the stenosis landmark is the canal point of its level (what evaluation uses for healthy rows)
    ccs = next(r for r in patho if r.condition == "ccs_severe")
    assert np.linalg.norm(np.subtract(ccs.landmark_lps, twins[ccs.level].canal_lps)) < 1.0


def test_demo_make_phantoms_writes_twins_and_splits(tmp_path):
    from model_training.demo_weights import LEVEL_WEIGHTS, make_phantoms

    logs = []
    m = make_phantoms(tmp_path, 3, seed=1, mix={"dh_moderate_large": 0.7, "ccs_severe": 0.3}, log=logs.append,
                      shape=(40, 64, 6), healthy_twins=True, fractions=(0.8, 0.1, 0.1))
    assert m == tmp_path / "phantoms.csv" and any("3 studies" in s for s in logs)
    rows = read_manifest(m)
    assert all(r.split in ("train", "val", "test") and r.source == "phantom" for r in rows)
    for s in {r.study_id for r in rows}:
        assert len({r.split for r in rows if r.study_id == s}) == 1  # twins share their study's split
    assert len(rows) == 3 * 2 * 5 and all(r.canal_lps is not None for r in rows)
    patho = [r for r in rows if r.condition != "none"]
    assert len(patho) == 3 * 2 and sorted({r.condition for r in patho}) == ["ccs_severe", "dh_moderate_large"]
    for r in patho:  # what render_check looks up: the healthy twin (same study and level, other image)
        twin = [h for h in rows if h.study_id == r.study_id and h.level == r.level and h.condition == "none"
                and h.image_path != r.image_path]
        assert len(twin) == 1 and twin[0].landmark_lps == r.landmark_lps
        assert LEVEL_WEIGHTS[r.level] > 0
    # second call reuses the manifest
    assert make_phantoms(tmp_path, 3, seed=1, log=logs.append) == m and "reusing" in logs[-1]
    # healthy studies: one image each (their "twin" would be the same image again)
    rows_h = read_manifest(make_phantoms(tmp_path / "h", 3, seed=1, mix={"dh_small": 0.34}, log=logs.append,
                                         shape=(40, 64, 6), healthy_twins=True))
    images = Counter(r.study_id for r in rows_h)
    assert sorted(images.values()) == [5, 5, 10] and not any("twin" in r.image_path for r in rows_h
                                                             if images[r.study_id] == 5)


def test_demo_make_phantoms_default_recipe_is_all_pathological(tmp_path):
    """The bundled recipe's phantoms: every study carries two different pathologies at two levels, no healthy
    twins (the LDMs train on pathological FSUs only), splits 95/5 per study."""
    from model_training.demo_weights import make_phantoms

    rows = read_manifest(make_phantoms(tmp_path, 4, seed=2, log=lambda s: None, shape=(40, 64, 6)))
    assert len(rows) == 4 * 5 and not any("twin" in r.image_path for r in rows)
    for s in {r.study_id for r in rows}:
        mine = [r for r in rows if r.study_id == s]
        patho = [r for r in mine if r.condition != "none"]
        assert len(patho) == 2 and len({r.condition for r in patho}) == 2 and len({r.level for r in patho}) == 2
        assert all(r.landmark_lps is not None for r in patho) and len({r.split for r in mine}) == 1
    assert {r.split for r in rows} <= {"train", "val"}
