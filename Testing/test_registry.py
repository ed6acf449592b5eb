"""Model registry: verify ok/missing/corrupt, sha-checked loading, import/export zip round trip."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from helpers_models import corrupt, make_model_dir, make_model_zip, make_registry
from spine_ldm import registry as reg
from spine_ldm.errors import ModelError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("SPINE_LDM_CACHE", str(c))
    monkeypatch.delenv("SPINE_LDM_REGISTRY", raising=False)
    return c


@pytest.fixture()
def registry(tmp_path, cache):
    return make_registry(tmp_path / "reg")


def test_list_and_entry_fields(registry):
    entries = reg.list_models(registry)
    assert [e.id for e in entries] == ["demo-small-weighted", "demo-small-masked", "demo-small-full"]
    e = reg.get_entry("demo-small-masked", registry)
    assert e.method == "masked" and e.config == "small"
    # paths are resolved relative to the JSON file
    assert e.files["unet"].path == (registry.parent / "Models" / "rand-small-0-masked-unet.pt").resolve()
    assert e.files["autoencoder"].path.is_file()


def test_verify_ok_missing_corrupt(registry):
    st = reg.verify("demo-small-weighted", registry)
    assert {k: s.status for k, s in st.items()} == {"autoencoder": "ok", "unet": "ok"}
    e = reg.get_entry("demo-small-weighted", registry)
    corrupt(e.files["unet"].path)
    st = reg.verify("demo-small-weighted", registry)
    assert st["unet"].status == "corrupt" and st["autoencoder"].status == "ok"
    assert st["unet"].actual != st["unet"].expected == e.files["unet"].sha256
    assert "sha256 mismatch" in st["unet"].message()
    e.files["autoencoder"].path.unlink()
    st = reg.verify("demo-small-weighted", registry)
    assert st["autoencoder"].status == "missing"
    assert "missing" in st["autoencoder"].message()


def test_load_ok_gives_eval_models_with_the_saved_weights(registry):
    loaded = reg.load("demo-small-weighted", "cpu", registry)
    cfg, ae, unet, entry, shas = loaded
    assert cfg.name == "small" and entry.id == "demo-small-weighted"
    assert shas == {"autoencoder": entry.files["autoencoder"].sha256, "unet": entry.files["unet"].sha256}
    assert not ae.training and not unet.training
    sd = torch.load(entry.files["unet"].path, weights_only=True)
    k = next(iter(sd))
    assert torch.equal(unet.state_dict()[k], sd[k])


def test_load_refuses_corrupt_weights_with_clear_message(registry, monkeypatch):
    e = reg.get_entry("demo-small-weighted", registry)
    corrupt(e.files["unet"].path)
    called = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(1))  # must never be reached
    with pytest.raises(ModelError) as ei:
        reg.load("demo-small-weighted", "cpu", registry)
    msg = str(ei.value)
    assert f"weights file {e.files['unet'].path} sha256 mismatch: expected {e.files['unet'].sha256}, got " in msg
    assert not called


def test_load_missing_weights(registry):
    e = reg.get_entry("demo-small-full", registry)
    e.files["unet"].path.unlink()
    with pytest.raises(ModelError, match=r"^missing: weights file .*rand-small-0-full-unet.pt does not exist"):
        reg.load("demo-small-full", "cpu", registry)


def test_load_refuses_weights_of_another_architecture(tmp_path, cache):
    regp = make_registry(tmp_path / "r")
    data = json.loads(regp.read_text())
    data["models"][0]["config"] = "paper"  # small weights declared as paper config
    regp.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not fit config 'paper'"):
        reg.load("demo-small-weighted", "cpu", regp)


def test_unknown_id_and_bad_registry(registry, tmp_path):
    with pytest.raises(ModelError, match=r"unknown model 'nope' .*registered: demo-small-weighted"):
        reg.resolve("nope", registry)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        reg.list_models(bad)
    bad.write_text(json.dumps({"version": 2, "models": []}))
    with pytest.raises(ModelError, match="version 2"):
        reg.list_models(bad)
    bad.write_text(json.dumps({"version": 1, "models": [{"id": "x", "method": "weird", "files": {}}]}))
    with pytest.raises(ModelError, match="method 'weird'"):
        reg.list_models(bad)


def test_env_registry_and_ensure(tmp_path, monkeypatch, cache):
    p = tmp_path / "sub" / "Models.json"
    monkeypatch.setenv("SPINE_LDM_REGISTRY", str(p))
    assert reg.default_registry_path() == p
    assert reg.list_models() == []
    reg.ensure_registry()
    assert json.loads(p.read_text()) == {"version": 1, "models": []}


def test_package_registry_location():
    import spine_ldm

    assert reg.package_registry_path() == Path(spine_ldm.__file__).resolve().parents[1] / "Resources" / "Models.json"


def test_import_zip_round_trip(tmp_path, registry, cache):
    zp = make_model_zip(tmp_path / "m.zip", model_id="my-model", subfolder="my-model/")
    e = reg.import_zip(zp)
    assert e.id == "my-model"
    assert e.files["unet"].path.parent == cache / "models" / "my-model"
    # merged into list_models, after the main registry
    ids = [x.id for x in reg.list_models(registry)]
    assert ids[-1] == "my-model" and ids[:3] == ["demo-small-weighted", "demo-small-masked", "demo-small-full"]
    assert {k: s.status for k, s in reg.verify("my-model", registry).items()} == {"autoencoder": "ok", "unet": "ok"}
    loaded = reg.load("my-model", "cpu", registry)
    assert loaded.entry.id == "my-model"
    with pytest.raises(ModelError, match="already imported"):
        reg.import_zip(zp)
    reg.import_zip(zp, replace=True)
    # export -> import under the same bytes: identical sha256s
    out = reg.export_zip("my-model", tmp_path / "exported.zip", registry)
    with zipfile.ZipFile(out) as zf:
        mj = json.loads(zf.read("model.json"))
    assert mj["files"]["unet"]["sha256"] == e.files["unet"].sha256
    # resolve() reads a zip directly (unpacked to the cache, not registered)
    r = reg.resolve(str(out))
    assert r.id == "my-model" and r.files["unet"].path.is_file()


def test_import_zip_rejects_corrupt_and_unsafe(tmp_path, cache):
    src = make_model_dir(tmp_path / "src", model_id="bad-one")
    corrupt(src / "bad-one-weighted-unet.pt")
    zp = tmp_path / "bad.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f.name)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        reg.import_zip(zp)
    assert not (cache / "models" / "bad-one").exists()
    assert reg.read_registry(reg.user_registry_path()) == []
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("../escape.pt", b"x")
    with pytest.raises(ModelError, match="outside the target folder"):
        reg.import_zip(evil)
    nojson = tmp_path / "nojson.zip"
    with zipfile.ZipFile(nojson, "w") as zf:
        zf.writestr("weights.pt", b"x")
    with pytest.raises(ModelError, match="has no model.json"):
        reg.import_zip(nojson)


def test_resolve_model_directory(tmp_path, cache):
    d = make_model_dir(tmp_path / "mdir", model_id="dir-model", method="masked")
    e = reg.resolve(str(d))
    assert e.id == "dir-model" and e.method == "masked"
    with pytest.raises(ModelError, match="has no model.json"):
        reg.resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        reg.resolve(str(tmp_path / "nope" / "x.zip"))


def test_url_file_is_downloaded_into_cache_and_verified(tmp_path, cache):
    # file:// URL: exercises the download path without any network
    d = make_model_dir(tmp_path / "u", model_id="url-model")
    mj = json.loads((d / "model.json").read_text())
    for k, f in mj["files"].items():
        f["url"] = (d / f.pop("path")).resolve().as_uri()
    regp = tmp_path / "url.json"
    regp.write_text(json.dumps({"version": 1, "models": [mj]}))
    assert {s.status for s in reg.verify("url-model", regp).values()} == {"not downloaded"}
    loaded = reg.load("url-model", "cpu", regp)
    assert loaded.entry.files["unet"].local_path().parent == cache / "downloads"
    assert {s.status for s in reg.verify("url-model", regp).values()} == {"ok"}
