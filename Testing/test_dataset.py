"""FSUDataset: item shapes, landmark/weight geometry, disk cache, augmentation consistency, filters."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spine_ldm.errors import InputError
from spine_ldm.geometry import FSUSpec, Normalization
from spine_ldm.weighting import squared_distance_map
from model_training.dataset import Augment, FSUDataset, resolve_conditions, spine_up_vectors
from model_training.manifest import Row

SPEC = FSUSpec.small()  # (64, 32, 16) over 80 x 80 x 50 mm
CENTRE = (2.0, -10.0, 5.0)
LANDMARK = (6.0, 8.0, 25.0)  # 4 mm left, 18 mm posterior, 20 mm superior of the disc centre
NO_AUG = dict(rotate_deg=0.0, scale=0.0, flip_lr=0.0, gamma=(1.0, 1.0), intensity_scale=0.0)


def _volume_with_blob(path, landmark=LANDMARK, sigma=4.0):
    """Sagittal-like volume (i: L->R 4 mm slices, j: A->P, k: S->I) with a bright Gaussian blob at ``landmark``."""
    size = (21, 140, 140)
    sp = (4.0, 0.7, 0.7)
    d = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, -1]], float)
    half = (np.asarray(size) - 1) / 2.0
    origin = np.asarray(CENTRE) - (d * np.asarray(sp)[None, :]) @ half
    # put the landmark exactly on a slice centre along LR (x): shift the origin's x
    i_lm = (origin[0] - landmark[0]) / sp[0]
    origin[0] -= (round(i_lm) - i_lm) * sp[0]
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(sp)
    img.SetDirection(tuple(d.reshape(-1)))
    img.SetOrigin(tuple(origin))
    d2 = squared_distance_map(img, landmark)
    k = np.arange(size[2])[:, None, None]
    arr = 100.0 + 0.2 * k + 1000.0 * np.exp(-d2 / (2 * sigma ** 2))  # weak SI ramp: not symmetric
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))
    return out


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    p = tmp_path_factory.mktemp("ds") / "study1_t2.nrrd"
    _volume_with_blob(p)
    return p


def _rows(path, n=1, **kw):
    base = dict(study_id="s1", image_path=str(path), level="L4-L5", disc_center_lps=CENTRE, condition="dh_small",
                landmark_lps=LANDMARK, source="manual")
    base.update(kw)
    return [Row(**base)]


def _argmax(t: torch.Tensor) -> np.ndarray:
    return np.asarray(np.unravel_index(int(t[0].argmax()), tuple(t.shape[1:])))


def test_item_shapes_types_normalisation_and_landmark(vol, tmp_path):
    ds = FSUDataset(_rows(vol), SPEC, tmp_path / "cache")
    it = ds[0]
    assert it["image"].shape == (1, 64, 32, 16) and it["image"].dtype == torch.float32
    assert it["weight"].shape == (1, 64, 32, 16) and it["weight"].dtype == torch.float32
    assert it["level"].dtype == torch.long and int(it["level"]) == 3
    assert it["condition"].dtype == torch.long and int(it["condition"]) == 1
    assert it["landmark_index"].shape == (3,) and bool(it["has_landmark"]) and it["study_id"] == "s1"
    # landmark index: numpy order (SI, AP, LR); FSU centre (31.5, 15.5, 7.5) + offsets / spacing (1.25, 2.5, 3.125)
    lm = it["landmark_index"].numpy()
    np.testing.assert_allclose(lm, [31.5 - 20 / 1.25, 15.5 + 18 / 2.5, 7.5 - 4 / 3.125], atol=1e-4)
    # the blob in the image and the peak of W both sit at the landmark
    assert np.all(np.abs(_argmax(it["image"]) - lm) <= 1.0)
    assert np.all(np.abs(_argmax(it["weight"]) - lm) <= 0.5 + 1e-6)
    assert float(it["weight"].max()) > 0.9
    # W is the Gaussian with sigma 16 mm: 16 mm along SI from the landmark -> exp(-0.5)
    k = int(round(lm[0])) + 13  # 13 voxels * 1.25 = 16.25 mm
    j, i = int(round(lm[1])), int(round(lm[2]))
    d_mm = np.linalg.norm((np.array([k, j, i]) - lm) * np.array([1.25, 2.5, 3.125]))
    assert float(it["weight"][0, k, j, i]) == pytest.approx(np.exp(-d_mm ** 2 / (2 * 16.0 ** 2)), rel=1e-4)
    # normalised with geometry.Normalization fitted on the crop
    raw = sitk.GetArrayFromImage(ds.fsu_image(0))
    np.testing.assert_allclose(it["image"][0].numpy(), Normalization.fit(raw).forward(raw), atol=1e-5)


def test_no_landmark_gives_nan_index_and_zero_weight(vol, tmp_path):
    ds = FSUDataset(_rows(vol, condition="none", landmark_lps=None), SPEC, None)
    it = ds[0]
    assert torch.isnan(it["landmark_index"]).all() and not bool(it["has_landmark"])
    assert float(it["weight"].abs().max()) == 0.0 and int(it["condition"]) == 0


def test_cache_hit_on_second_epoch_and_invalidation(vol, tmp_path, monkeypatch):
    rows = _rows(vol) + _rows(vol, level="L5-S1", disc_center_lps=(2.0, -10.0, -5.0))
    ds = FSUDataset(rows, SPEC, tmp_path / "cache")
    first = [ds[i]["image"] for i in range(len(ds))]
    assert ds.stats == {"extracted": 2, "cache_hits": 0}
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)
    ds.set_epoch(1)
    second = [ds[i]["image"] for i in range(len(ds))]
    assert ds.stats == {"extracted": 2, "cache_hits": 2}
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # a new dataset (e.g. a new run or a DataLoader worker) uses the same files without resampling
    import spine_ldm.geometry as geo

    def boom(*a, **k):
        raise AssertionError("extract_fsu called despite a cached crop")

    monkeypatch.setattr(geo, "extract_fsu", boom)
    ds2 = FSUDataset(rows, SPEC, tmp_path / "cache")
    assert torch.equal(ds2[1]["image"], first[1]) and ds2.stats == {"extracted": 0, "cache_hits": 1}
    monkeypatch.undo()
    # a changed image file (mtime/size) or another spec gets a new key
    k0 = ds.cache_key(0)
    st = os.stat(vol)
    os.utime(vol, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert ds.cache_key(0) != k0
    finally:
        os.utime(vol, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ds.cache_key(0) == k0
    assert FSUDataset(rows, FSUSpec(shape=(32, 16, 8)), tmp_path / "cache").cache_key(0) != k0


def test_precompute_fills_cache_and_reports_failures(vol, tmp_path):
    rows = _rows(vol) + _rows(vol, level="L1-L2", disc_center_lps=(2.0, -10.0, 200.0))  # far outside
    ds = FSUDataset(rows, SPEC, tmp_path / "cache")
    failed = ds.precompute(skip_errors=True)
    assert [i for i, _ in failed] == [1] and "study 's1' L1-L2" in failed[0][1] and "outside" in failed[0][1]
    assert ds.stats["extracted"] == 1
    with pytest.raises(InputError, match="study 's1' L1-L2 .*inside the volume"):
        ds[1]


def test_augmentation_moves_landmark_with_the_anatomy(vol, tmp_path):
    # exaggerated ranges make any mismatch between image warp and landmark mapping visible
    aug = Augment(rotate_deg=25.0, scale=0.15, flip_lr=0.5, gamma=(0.7, 1.4), intensity_scale=0.2)
    ds = FSUDataset(_rows(vol), SPEC, tmp_path / "cache", augment=aug, seed=3)
    plain = FSUDataset(_rows(vol), SPEC, tmp_path / "cache")[0]["landmark_index"].numpy()
    moved = 0
    for s in range(8):
        it = ds[(0, s)]
        lm = it["landmark_index"].numpy()
        assert np.all(np.abs(_argmax(it["image"]) - lm) <= 1.0), (s, _argmax(it["image"]), lm)
        assert np.all(np.abs(_argmax(it["weight"]) - lm) <= 1.0)
        assert float(it["weight"].max()) > 0.9
        moved += bool(np.max(np.abs(lm - plain)) > 2.0)
    assert moved >= 4  # the augmentation did move the landmark, and the image followed


def test_lr_flip_mirrors_image_and_landmark(vol, tmp_path):
    ds0 = FSUDataset(_rows(vol), SPEC, tmp_path / "cache")
    ds1 = FSUDataset(_rows(vol), SPEC, tmp_path / "cache", augment=Augment(**{**NO_AUG, "flip_lr": 1.0}))
    a, b = ds0[0], ds1[0]
    assert torch.equal(b["image"], torch.flip(a["image"], dims=[-1]))
    la, lb = a["landmark_index"].numpy(), b["landmark_index"].numpy()
    np.testing.assert_allclose(lb[:2], la[:2])
    assert lb[2] == pytest.approx(15 - la[2])
    assert np.all(np.abs(_argmax(b["weight"]) - lb) <= 0.5 + 1e-6)


def test_rotation_direction_matches_sagittal_plane(vol, tmp_path):
    ds = FSUDataset(_rows(vol), SPEC, tmp_path / "cache", augment=Augment(**{**NO_AUG, "rotate_deg": 10.0}))
    ds0 = FSUDataset(_rows(vol), SPEC, tmp_path / "cache")[0]
    it = ds[(0, 0)]
    p = ds.augment.sample(ds._aug_rng(0, 0))
    assert p["angle_deg"] != 0.0 and p["scale"] == 1.0
    l0, l1 = ds0["landmark_index"].numpy(), it["landmark_index"].numpy()
    assert l1[2] == pytest.approx(l0[2])  # LR untouched by a sagittal-plane rotation
    sp = np.array([1.25, 2.5])
    ctr = np.array([31.5, 15.5])
    r0, r1 = (l0[:2] - ctr) * sp, (l1[:2] - ctr) * sp
    assert np.linalg.norm(r1) == pytest.approx(np.linalg.norm(r0), rel=1e-5)  # rigid in mm
    ang = np.degrees(np.arctan2(r1[1], r1[0]) - np.arctan2(r0[1], r0[0]))
    assert ang == pytest.approx(p["angle_deg"], abs=1e-3)  # landmark_index is float32


def test_augmentation_is_deterministic(vol, tmp_path):
    mk = lambda seed: FSUDataset(_rows(vol), SPEC, tmp_path / "cache", augment=Augment(), seed=seed)
    a, b, c = mk(0), mk(0), mk(1)
    seq_a = [a[0]["image"] for _ in range(3)]
    seq_b = [b[0]["image"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))  # same seed -> same stream
    assert not torch.equal(seq_a[0], seq_a[1])  # successive draws differ
    assert not torch.equal(c[0]["image"], seq_a[0])  # other seed -> other augmentation
    assert torch.equal(a[(0, 42)]["image"], b[(0, 42)]["image"])  # pinned seed
    a.set_epoch(5)
    b.set_epoch(5)
    assert torch.equal(a[0]["image"], b[0]["image"])


def test_condition_and_landmark_filters(vol, tmp_path):
    rows = [
        Row(study_id="a", image_path=str(vol), level="L4-L5", disc_center_lps=CENTRE, condition="dh_small",
            landmark_lps=LANDMARK),
        Row(study_id="a", image_path=str(vol), level="L5-S1", disc_center_lps=CENTRE, condition="none"),
        Row(study_id="b", image_path=str(vol), level="L3-L4", disc_center_lps=CENTRE, condition="ccs_severe"),
        Row(study_id="b", image_path=str(vol), level="L2-L3", disc_center_lps=CENTRE, condition="ccs_moderate",
            landmark_lps=LANDMARK, split="train"),
    ]
    names = lambda ds: [r.level for r in ds.rows]
    assert len(FSUDataset(rows, SPEC, None)) == 4
    assert names(FSUDataset(rows, SPEC, None, conditions="pathological")) == ["L4-L5", "L3-L4", "L2-L3"]
    assert names(FSUDataset(rows, SPEC, None, conditions="pathological", require_landmark=True)) == ["L4-L5", "L2-L3"]
    assert names(FSUDataset(rows, SPEC, None, conditions=["ccs_severe", "CCS-moderate"])) == ["L3-L4", "L2-L3"]
    assert names(FSUDataset(rows, SPEC, None, split="train")) == ["L2-L3"]
    assert resolve_conditions("dh_small,none") == ("dh_small", "none")
    with pytest.raises(InputError, match="unknown condition"):
        FSUDataset(rows, SPEC, None, conditions=["herniation"])


def test_collate_and_dataloader(vol, tmp_path):
    from model_training.common import collate

    rows = _rows(vol) + _rows(vol, level="L5-S1", condition="none", landmark_lps=None)
    ds = FSUDataset(rows, SPEC, tmp_path / "cache", augment=Augment())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 1, 64, 32, 16) and batch["weight"].shape == (2, 1, 64, 32, 16)
    assert batch["level"].tolist() == [3, 4] and batch["condition"].tolist() == [1, 0]
    assert batch["study_id"] == ["s1", "s1"] and torch.isnan(batch["landmark_index"][1]).all()
    # picklable (DataLoader workers under 'spawn'), and the copy serves the same items
    import pickle

    ds.set_epoch(0)
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[(1, 5)]["image"], ds[(1, 5)]["image"])


def test_spine_up_vectors():
    mk = lambda lv, z: Row(study_id="s", image_path="/x.nrrd", level=lv, disc_center_lps=(0.0, 0.0, z))
    rows = [mk("L3-L4", 0.0), mk("L4-L5", -30.0), mk("L5-S1", -55.0), Row(study_id="t", image_path="/y.nrrd",
                                                                          level="L4-L5", disc_center_lps=(0, 0, 0))]
    ups = spine_up_vectors(rows)
    assert ups[0] == pytest.approx((0, 0, 1)) and ups[1] == pytest.approx((0, 0, 1)) and ups[2] == pytest.approx((0, 0, 1))
    assert ups[3] is None
