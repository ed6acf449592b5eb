"""Volume I/O: round trips with metadata, squeezing rules, and every InputError message."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm.errors import InputError
from spine_ldm.io import check_modality, image_metadata, read_volume, validate_volume, write_volume

_C, _S = np.cos(np.radians(15)), np.sin(np.radians(15))
OBLIQUE = np.array([[0.0, _C, -_S], [0.0, -_S, -_C], [-1.0, 0.0, 0.0]]).T  # sagittal, tilted 15 deg


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_roundtrip_dtype_geometry_metadata(tmp_path, make_volume, dtype):
    img = make_volume(spacing=(0.6, 0.6, 4.3), direction=OBLIQUE, size=(40, 36, 12), dtype=dtype, center=(5, -3, 2))
    meta = {"spine_ldm_seed": 7, "spine_ldm_landmark_lps": [1.5, -2.0, 3.25], "spine_ldm_method": "weighted",
            "spine_ldm_provenance": {"model_id": "demo", "steps": 50}}
    path = write_volume(img, tmp_path / "sub" / "out.nrrd", meta)
    assert path.exists()
    assert not img.HasMetaDataKey("spine_ldm_seed")  # the caller's image is not modified
    back = read_volume(path)
    assert back.GetPixelID() == img.GetPixelID()
    assert back.GetOrigin() == pytest.approx(img.GetOrigin(), abs=1e-6)
    assert back.GetSpacing() == pytest.approx(img.GetSpacing(), abs=1e-6)
    assert back.GetDirection() == pytest.approx(img.GetDirection(), abs=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    md = image_metadata(back)
    assert md["spine_ldm_seed"] == "7" and md["spine_ldm_method"] == "weighted"
    assert json.loads(md["spine_ldm_landmark_lps"]) == [1.5, -2.0, 3.25]
    assert json.loads(md["spine_ldm_provenance"]) == {"model_id": "demo", "steps": 50}


def test_validate_returns_valid_input_unchanged(make_volume):
    img = make_volume()
    assert validate_volume(img) is img


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"^file not found: '.*nope\.nrrd'$"):
        read_volume(tmp_path / "nope.nrrd")


def test_unreadable_file(tmp_path):
    p = tmp_path / "garbage.nrrd"
    p.write_bytes(b"this is not a volume\x00\x01")
    with pytest.raises(InputError) as e:
        read_volume(p)
    msg = str(e.value)
    assert msg == f"cannot read '{p}': not a recognised image format (expected NRRD, NIfTI, MHA, a DICOM folder, ...)"
    bad = tmp_path / "header_only.nrrd"
    bad.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n")
    with pytest.raises(InputError) as e:
        read_volume(bad)
    msg = str(e.value)
    assert msg.startswith(f"cannot read '{bad}': ") and "endian" in msg and "\n" not in msg


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no volume file or DICOM series"):
        read_volume(tmp_path)


def test_2d_image(tmp_path):
    p = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image([64, 48], sitk.sitkInt16), str(p))
    with pytest.raises(InputError, match=r"'slice\.nrrd' is 2D \(64x48\); a 3D volume is required"):
        read_volume(p)


def test_single_slice_3d_is_2d(make_volume):
    with pytest.raises(InputError, match=r"effectively 2D \(32x32x1, a single voxel along axis k\)"):
        validate_volume(make_volume(size=(32, 32, 1)))


def test_4d_multi_volume_rejected_single_volume_squeezed(tmp_path, make_volume):
    vol = make_volume(spacing=(0.7, 0.8, 3.0), size=(20, 18, 6), dtype=np.int16, center=(4, 5, 6))
    p = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.JoinSeries([vol, vol, vol]), str(p))
    with pytest.raises(InputError, match=r"is 4D \(20x18x6x3\) with 3 volumes; a single 3D volume is required"):
        read_volume(p)
    p1 = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.JoinSeries([vol]), str(p1))
    back = read_volume(p1)
    assert back.GetDimension() == 3 and back.GetSize() == vol.GetSize()
    assert back.GetSpacing() == pytest.approx(vol.GetSpacing())
    assert back.GetOrigin() == pytest.approx(vol.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(vol))


def test_vector_one_component_squeezed_rgb_rejected(tmp_path, make_volume):
    vol = make_volume(size=(10, 12, 8), dtype=np.uint8)
    one = sitk.Compose([vol])
    assert one.GetNumberOfComponentsPerPixel() == 1 and "vector" in one.GetPixelIDTypeAsString().lower()
    sq = validate_volume(one)
    assert sq.GetNumberOfComponentsPerPixel() == 1 and "vector" not in sq.GetPixelIDTypeAsString().lower()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sq), sitk.GetArrayViewFromImage(vol))
    p = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Compose([vol, vol, vol]), str(p))
    with pytest.raises(InputError, match=r"'rgb\.nrrd' has 3 components per voxel \(RGB/RGBA colour\); a scalar"):
        read_volume(p)


def test_nan_inf_counted(tmp_path, make_volume):
    vol = make_volume(size=(10, 12, 8))
    a = sitk.GetArrayFromImage(vol)
    a[0, 0, :3] = np.nan
    a[5, 5, 5] = np.inf
    a[6, 5, 5] = -np.inf
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(vol)
    p = tmp_path / "nan.nrrd"
    sitk.WriteImage(bad, str(p))
    with pytest.raises(InputError, match=r"'nan\.nrrd' contains 3 NaN and 2 Inf voxels \(of 960\)"):
        read_volume(p)


@pytest.mark.parametrize("spacing, axis, value", [((1.0, 0.05, 1.0), "j", "0.05"), ((1.0, 1.0, 25.0), "k", "25"),
                                                  ((0.001, 1.0, 1.0), "i", "0.001")])
def test_absurd_spacing(tmp_path, make_volume, spacing, axis, value):
    p = tmp_path / "sp.nrrd"
    sitk.WriteImage(make_volume(spacing=spacing, size=(8, 8, 8)), str(p))
    with pytest.raises(InputError, match=rf"spacing along axis {axis} is {value} mm, outside the plausible range 0\.1-20 mm"):
        read_volume(p)


def test_plausible_spacing_limits_pass(make_volume):
    validate_volume(make_volume(spacing=(0.1, 20.0, 4.3), size=(8, 8, 8)))


def test_degenerate_direction(make_volume):
    img = make_volume(size=(8, 8, 8))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0.5, 0.5))
    with pytest.raises(InputError, match="degenerate direction matrix"):
        validate_volume(img)


def test_modality(tmp_path, make_volume):
    check_modality(None)
    check_modality({})
    check_modality({"Modality": "MR"})
    check_modality({"0008|0060": "MR "})
    check_modality({"modality": "something-new"})  # unknown passes
    check_modality({"SeriesDescription": "CT-like"})  # not a modality key
    with pytest.raises(InputError, match=r"volume is CT \(metadata 0008\|0060 = CT\), but SpineInpaint needs a T2"):
        check_modality({"0008|0060": "CT"})
    with pytest.raises(InputError, match=r"is PET"):
        check_modality({"Modality": "pt"})
    img = make_volume(size=(8, 8, 8), dtype=np.int16)
    p = write_volume(img, tmp_path / "ct.nrrd", {"Modality": "CT"})
    with pytest.raises(InputError, match=r"'ct\.nrrd' is CT \(metadata Modality = CT\)"):
        read_volume(p)
    assert read_volume(p, modality_check=False).GetSize() == (8, 8, 8)


def test_dicom_series_folder(tmp_path, make_volume):
    vol = make_volume(spacing=(0.8, 0.8, 3.0), size=(16, 16, 5), dtype=np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.GetSize()[2]):
        sl = vol[:, :, k]
        for tag, value in [("0008|0060", "MR"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)), ("0028|0030", "0.8\\0.8")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_volume(tmp_path)
    assert back.GetSize() == (16, 16, 5)
    assert back.GetSpacing() == pytest.approx((0.8, 0.8, 3.0), abs=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(vol))
    assert back.GetMetaData("0008|0060").strip() == "MR"
    with pytest.raises(InputError, match=r"effectively 2D .*single DICOM file is one slice: pass the folder"):
        read_volume(tmp_path / "002.dcm")


def test_write_errors(tmp_path, make_volume):
    with pytest.raises(InputError, match="invalid metadata key"):
        write_volume(make_volume(size=(4, 4, 4)), tmp_path / "x.nrrd", {"bad:key": 1})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_volume(make_volume(size=(4, 4, 4)), blocker / "x.nrrd")


def test_real_lumbar_volumes_read(shared_data):
    t2 = read_volume(shared_data / "ivd_11_t2.nrrd")
    assert t2.GetSize() == (67, 221, 221) and t2.GetPixelID() == sitk.sitkInt16
    assert t2.GetDirection() == pytest.approx((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    vb = read_volume(shared_data / "vb2_02_t2.nrrd")
    assert vb.GetPixelID() == sitk.sitkUInt8
