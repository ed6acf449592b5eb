"""Automatic readers (the paper's Table 2, without a radiologist).

**Pathology-present reader** (:class:`PresentReader`): a small 3D CNN (:class:`PresentNet`, ~21k parameters) on
the 2.5 x 2.5 x 5 cm crop (SI x AP x LR, :data:`CROP_SPEC`: 20 x 20 x 16 voxels of 1.25 x 1.25 x 3.125 mm) around a
landmark, intensities normalised by the healthy input's FSU (:func:`crop_normalization`) and mapped to [0, 1]. It
classifies the crop as one of :data:`CLASSES` (none, DH small, DH moderate/large, CCS moderate, CCS severe);
``present_prob(crops, condition)`` is the probability of the target's pathology type (DH or CCS, either severity),
and a crop is judged *present* when it exceeds 0.5. Trained by ``python -m model_training train-reader`` on real
phantom pathology vs the healthy twin at the same landmark (seeds disjoint from the models' training seeds and
from the benchmark), with landmark jitter (+-2 mm), left-right flips, Gaussian blur (up to 1.5 voxels: generated
pathology is smoother than the phantom's) and intensity jitter, so blur alone does not read as "absent".
The bundled weights are the ``readers`` section of ``SpineInpaint/Resources/Models.json`` (sha256-checked).

**Realism reader** (:func:`c2st`): a classifier two-sample test between true pathology crops P and generated crops
G of the same cases: L2 logistic regression (scipy L-BFGS) on the standardised crop voxels, grouped k-fold
cross-validation (all crops of a case in one fold), AUC of the out-of-fold scores with a case-bootstrap 95 %
interval. 0.5 = the classifier cannot tell generated from real; 1 = always can.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from spine_ldm.conditions import parse_condition
from spine_ldm.errors import InputError, ModelError
from spine_ldm.geometry import FSUSpec, Normalization, extract_fsu

from .stats import auc, bootstrap_ci

CLASSES = ("none", "dh_small", "dh_moderate_large", "ccs_moderate", "ccs_severe")
CROP_SPEC = FSUSpec(shape=(20, 20, 16), size_mm=(25.0, 25.0, 50.0))  # numpy (SI, AP, LR)
NORM_SPEC = FSUSpec(shape=(64, 32, 16), size_mm=(80.0, 80.0, 50.0))  # the FSU the crop normalisation is fitted on
READER_KIND = "present"
DEFAULT_READER_ID = "phantom-present-reader"


# --------------------------------------------------------------------------- crops
def crop_normalization(healthy: sitk.Image, disc_center_lps) -> Normalization:
    """Percentile normalisation fitted on the healthy input's FSU (80 x 80 x 50 mm around the disc centre); every
    crop of a case (healthy, truth, outputs) uses the same one."""
    return Normalization.fit(sitk.GetArrayFromImage(extract_fsu(healthy, disc_center_lps, NORM_SPEC)))


def crop(image: sitk.Image, landmark_lps, norm: Normalization) -> np.ndarray:
    """The :data:`CROP_SPEC` crop around the landmark in [0, 1] (numpy (SI, AP, LR), float32)."""
    from ..evaluate import crop_around

    return crop_around(image, landmark_lps, CROP_SPEC, norm)


def target_type(condition: str) -> str:
    c = parse_condition(condition)
    if c == "none":
        raise InputError("the present reader scores a pathology condition, not 'none'")
    return c.split("_", 1)[0]


# --------------------------------------------------------------------------- network
class PresentNet(torch.nn.Module):
    """(B, 1, 20, 20, 16) -> logits over :data:`CLASSES`: three 3x3x3 conv blocks (8, 16, 32 channels, ReLU,
    max-pool 2 after the first two; 5 x 5 x 4 map), then global average pooling *and* the central 3 x 3 x 2 of the
    map (where the landmark is: the reader must judge the landmark, not dark tissue anywhere), linear."""

    def __init__(self, channels=(8, 16, 32), n_classes: int = len(CLASSES)):
        super().__init__()
        c1, c2, c3 = channels
        self.c1 = torch.nn.Conv3d(1, c1, 3, padding=1)
        self.c2 = torch.nn.Conv3d(c1, c2, 3, padding=1)
        self.c3 = torch.nn.Conv3d(c2, c3, 3, padding=1)
        self.head = torch.nn.Linear(c3 * (1 + 3 * 3 * 2), n_classes)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.c1(x)), 2)
        x = F.max_pool3d(F.relu(self.c2(x)), 2)
        x = F.relu(self.c3(x))
        d, h, w = x.shape[2:]
        centre = x[:, :, (d - 3) // 2:(d - 3) // 2 + 3, (h - 3) // 2:(h - 3) // 2 + 3, (w - 2) // 2:(w - 2) // 2 + 2]
        return self.head(torch.cat([x.mean(dim=(2, 3, 4)), centre.flatten(1)], dim=1))


class PresentReader:
    """A trained :class:`PresentNet` with the reader's record (``entry``: id, sha256, training)."""

    def __init__(self, net: PresentNet, entry: dict | None = None):
        self.net = net.eval()
        self.entry = entry or {}

    @property
    def id(self) -> str:
        return str(self.entry.get("id", "unregistered"))

    @torch.no_grad()
    def probs(self, crops) -> np.ndarray:
        """Class probabilities (N, len(CLASSES)) of crops (N, 20, 20, 16) in [0, 1]."""
        x = torch.as_tensor(np.asarray(crops, dtype=np.float32))
        if x.ndim == 3:
            x = x[None]
        if x.numel() == 0:
            return np.zeros((0, len(CLASSES)), np.float32)
        return torch.softmax(self.net(x[:, None]), dim=1).numpy()

    def present_prob(self, crops, condition: str) -> np.ndarray:
        """Probability that each crop shows the target's pathology type (DH or CCS, any severity)."""
        kind = target_type(condition)
        p = self.probs(crops)
        cols = [i for i, c in enumerate(CLASSES) if c.startswith(kind + "_")]
        return p[:, cols].sum(axis=1)

    def predicted(self, crops) -> list[str]:
        return [CLASSES[i] for i in self.probs(crops).argmax(axis=1)]


def load_reader(reader: str | None = None, registry=None) -> PresentReader:
    """A reader by registry id (``readers`` section of Models.json; default :data:`DEFAULT_READER_ID`) or a
    ``.pt`` file (unregistered, no sha256 check). The weights' sha256 is checked before loading."""
    import io

    from spine_ldm import registry as reg

    if reader and str(reader).endswith(".pt") and Path(reader).is_file():
        data, entry = Path(reader).read_bytes(), {"id": Path(reader).stem, "sha256": reg.sha256_file(reader)}
    else:
        entry, fref = reader_entry(reader or DEFAULT_READER_ID, registry)
        data = reg.read_verified(fref)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"reader weights {entry.get('id')!r} are not a loadable state dict: {e}") from None
    net = PresentNet(tuple(entry.get("channels", (8, 16, 32))))
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ModelError(f"reader weights {entry.get('id')!r} do not fit PresentNet: {str(e)[:200]}") from None
    return PresentReader(net, entry)


def _registry_path(registry=None) -> Path:
    from spine_ldm import registry as reg

    return Path(registry).expanduser() if registry is not None else reg.default_registry_path()


def read_readers(registry=None) -> list[dict]:
    """The ``readers`` list of a registry file (``[]`` when it has none)."""
    path = _registry_path(registry)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"model registry {path} is not valid JSON: {e}") from None
    readers = data.get("readers", [])
    if not isinstance(readers, list):
        raise ModelError(f"model registry {path}: 'readers' must be a list")
    return readers


def reader_entry(reader_id: str, registry=None):
    """(entry dict, ``spine_ldm.registry.FileRef`` of its weights) for a reader id."""
    from spine_ldm import registry as reg

    path = _registry_path(registry)
    for e in read_readers(path):
        if isinstance(e, dict) and e.get("id") == reader_id:
            f = e.get("file") or {}
            sha = str(f.get("sha256", "")).lower()
            if len(sha) != 64 or "path" not in f:
                raise ModelError(f"{path}: reader {reader_id!r} needs file.path and file.sha256")
            p = Path(f["path"])
            p = p if p.is_absolute() else path.parent.resolve() / p
            return e, reg.FileRef(name="reader", sha256=sha, path=p)
    known = ", ".join(str(e.get("id")) for e in read_readers(path) if isinstance(e, dict)) or "none"
    raise ModelError(f"unknown reader {reader_id!r} in registry {path} (readers: {known})")


def register_reader(registry, entry: dict, weights: Path, weights_dir: Path | None = None) -> dict:
    """Copy ``weights`` next to the registry (``<registry folder>/Models/<id>.pt`` by default) and add or replace
    the ``readers`` entry (``file.path`` relative to the registry, ``file.sha256``); other sections are kept."""
    import shutil

    from spine_ldm import registry as reg

    path = _registry_path(registry)
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"version": 1, "models": []}
    wdir = Path(weights_dir) if weights_dir else path.parent / "Models"
    wdir.mkdir(parents=True, exist_ok=True)
    dest = wdir / f"{entry['id']}.pt"
    if Path(weights).resolve() != dest.resolve():
        shutil.copyfile(weights, dest)
    try:
        rel = dest.resolve().relative_to(path.parent.resolve()).as_posix()
    except ValueError:
        rel = str(dest.resolve())
    entry = {**entry, "kind": READER_KIND, "file": {"path": rel, "sha256": reg.sha256_file(dest)}}
    readers = [e for e in data.get("readers", []) if e.get("id") != entry["id"]] + [entry]
    data["readers"] = readers
    from ..common import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return entry


# --------------------------------------------------------------------------- training data
def _pathology_plan(seed: int) -> dict:
    """{level: condition} of a reader-training phantom: one herniation and one stenosis at two non-adjacent
    levels, severities and levels drawn from the seed."""
    from spine_ldm.conditions import LEVELS

    rng = np.random.default_rng([int(seed), 4242])
    pairs = [(a, b) for a in range(len(LEVELS)) for b in range(len(LEVELS)) if abs(a - b) >= 2]
    a, b = pairs[int(rng.integers(len(pairs)))]
    return {LEVELS[a]: ("dh_small", "dh_moderate_large")[int(rng.integers(2))],
            LEVELS[b]: ("ccs_moderate", "ccs_severe")[int(rng.integers(2))]}


def reader_crops(seed: int, spacing=None, jitter: int = 0, jitter_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Crops and class indices of one reader seed: the pathological twin at each pathology landmark (its class)
    and the healthy twin at the same landmarks (``none``); ``jitter`` extra crops per landmark shifted uniformly
    by up to ``jitter_mm`` per axis."""
    from .cases import PHANTOM_SPACING, phantom

    spacing = PHANTOM_SPACING if spacing is None else spacing
    plan = _pathology_plan(seed)
    h = phantom(seed, spacing=spacing)
    p = phantom(seed, plan, spacing=spacing)
    rng = np.random.default_rng([int(seed), 777])
    xs, ys = [], []
    for lv, cond in plan.items():
        lm = np.asarray(p.pathology(lv)["landmark_LPS_mm"], np.float64)
        norm = crop_normalization(h.image, h.disc(lv)["center_LPS_mm"])
        points = [lm] + [lm + rng.uniform(-jitter_mm, jitter_mm, 3) for _ in range(int(jitter))]
        for pt in points:
            xs += [crop(p.image, pt, norm), crop(h.image, pt, norm)]
            ys += [CLASSES.index(cond), 0]
    return np.stack(xs), np.asarray(ys, np.int64)


def build_dataset(seeds, spacing=None, jitter: int = 0, log=print) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crops, labels, seed of each crop) for a list of seeds."""
    xs, ys, ss = [], [], []
    t = time.time()
    for i, s in enumerate(seeds):
        x, y = reader_crops(int(s), spacing, jitter)
        xs.append(x)
        ys.append(y)
        ss.append(np.full(len(y), int(s)))
        if log and ((i + 1) % 20 == 0 or i + 1 == len(seeds)):
            log(f"[reader] crops: {i + 1}/{len(seeds)} seeds ({time.time() - t:.0f} s)")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


# --------------------------------------------------------------------------- training
def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, 1, D, H, W) with sigma (B,) in voxels (0 = none)."""
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = torch.where(sigma[:, None] > 1e-3, k, (t[None, :] == 0).to(x.dtype))
    k = k / k.sum(dim=1, keepdim=True)
    b = x.shape[0]
    out = x.transpose(0, 1)  # (1, B, D, H, W): grouped conv, one kernel per sample
    for dim in range(3):
        shape = [b, 1, 1, 1, 1]
        shape[2 + dim] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape), groups=b)
    return out.transpose(0, 1)


def augment(x: torch.Tensor, g: torch.Generator, max_blur: float = 1.5) -> torch.Tensor:
    """Left-right flip, Gaussian blur (sigma uniform in [0, max_blur] voxels for half of the crops), intensity scale
    (0.9-1.1), offset (+-0.05) and Gaussian noise (sd up to 0.02) of a batch (B, 1, SI, AP, LR)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
    sigma = torch.rand(b, generator=g) * max_blur * (torch.rand(b, generator=g) < 0.5)
    x = _blur(x, sigma)
    scale = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, 1, generator=g)
    offset = 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=g) - 0.5)
    noise = torch.randn(x.shape, generator=g) * 0.02 * torch.rand(b, 1, 1, 1, 1, generator=g)
    return x * scale + offset + noise


def train_net(x: np.ndarray, y: np.ndarray, epochs: int = 15, batch: int = 64, lr: float = 2e-3, seed: int = 0,
              log=print) -> PresentNet:
    """Train a :class:`PresentNet` (Adam, class-balanced cross-entropy, :func:`augment`, cosine LR)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = PresentNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt = torch.as_tensor(x, dtype=torch.float32)[:, None]
    yt = torch.as_tensor(y, dtype=torch.long)
    # healthy crops carry half of the loss, the pathology classes share the other half equally: "present" is judged
    # against "none", so a 5-class balance (none = 1/5 of the weight) would bias the reader towards "present"
    counts = torch.bincount(yt, minlength=len(CLASSES)).float()
    share = torch.tensor([0.5] + [0.5 / (len(CLASSES) - 1)] * (len(CLASSES) - 1))
    weight = torch.where(counts > 0, share * counts.sum() / counts.clamp_min(1), torch.zeros(()))
    n_steps = epochs * math.ceil(len(yt) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, n_steps), pct_start=0.1)
    t = time.time()
    for ep in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        tot, n = 0.0, 0
        net.train()
        for s in range(0, len(yt), batch):
            idx = perm[s:s + batch]
            loss = F.cross_entropy(net(augment(xt[idx], g)), yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        if log and ((ep + 1) % 5 == 0 or ep + 1 == epochs):
            log(f"[reader] epoch {ep + 1}/{epochs}: loss {tot / n:.4f} ({time.time() - t:.0f} s)")
    return net.eval()


def evaluate_reader(reader: PresentReader, x: np.ndarray, y: np.ndarray) -> dict:
    """Held-out scores: ``present_accuracy`` (pathology-type present vs absent, threshold 0.5, each crop scored for
    its own type; healthy crops for both types), ``class_accuracy`` (5 classes) and per-class counts."""
    probs = reader.probs(x)
    names = np.asarray(CLASSES)[y]
    correct, total = 0, 0
    per = {c: [0, 0] for c in CLASSES}
    for i, c in enumerate(names):
        kinds = ("dh", "ccs") if c == "none" else (c.split("_", 1)[0],)
        for kind in kinds:
            pp = probs[i, [j for j, cc in enumerate(CLASSES) if cc.startswith(kind + "_")]].sum()
            ok = (pp > 0.5) == (c != "none")
            correct += int(ok)
            total += 1
            per[c][0] += int(ok)
            per[c][1] += 1
    pred = probs.argmax(axis=1)
    return {"present_accuracy": correct / max(total, 1), "n_decisions": total,
            "class_accuracy": float((pred == y).mean()) if len(y) else float("nan"), "n_crops": int(len(y)),
            "present_accuracy_per_class": {c: (k / n if n else None) for c, (k, n) in per.items()}}


def blurred(x: np.ndarray, sigma_vox: float) -> np.ndarray:
    xt = torch.as_tensor(x, dtype=torch.float32)[:, None]
    return _blur(xt, torch.full((len(xt),), float(sigma_vox)))[:, 0].numpy()


def train_reader(seeds, heldout_seeds, out, epochs: int = 15, spacing=None, jitter: int = 3, seed: int = 0,
                 registry=None, exclude_seeds=None, log=print) -> dict:
    """Build crops, train, evaluate on held-out seeds; writes ``<out>/reader.pt`` and ``<out>/reader.json``.

    Refuses seeds that overlap the phantom seeds any registered model records (``training.phantom_seeds``) or
    ``exclude_seeds`` (e.g. the benchmark's). Crops are cached in ``<out>/crops_*.npz``."""
    from spine_ldm import registry as reg

    from .cases import PHANTOM_SPACING
    from .seeds import check_disjoint, format_seeds, recorded_seeds

    log = log or (lambda s: None)
    spacing = tuple(PHANTOM_SPACING if spacing is None else spacing)
    seeds, heldout_seeds = sorted(set(seeds)), sorted(set(heldout_seeds))
    if set(seeds) & set(heldout_seeds):
        raise InputError("reader training and held-out seeds overlap")
    used = {e.id: recorded_seeds(e) for e in reg.list_models(registry)}
    if exclude_seeds:
        used["--exclude-seeds"] = set(exclude_seeds)
    unknown = check_disjoint(set(seeds) | set(heldout_seeds), used, "reader")
    if unknown:
        log(f"[reader] warning: model(s) {', '.join(unknown)} record no training phantom seeds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def cached(name, ss, jit):
        f = out / f"crops_{name}.npz"
        key = f"{format_seeds(ss)}|{spacing}|{jit}"
        if f.is_file():
            d = np.load(f)
            if str(d["key"]) == key:
                return d["x"], d["y"], d["s"]
        x, y, s = build_dataset(ss, spacing, jit, log)
        np.savez_compressed(f, x=x, y=y, s=s, key=key)
        return x, y, s

    x, y, _ = cached("train", seeds, jitter)
    xh, yh, _ = cached("heldout", heldout_seeds, 0)
    t_data = time.time() - t0
    net = train_net(x, y, epochs=epochs, seed=seed, log=log)
    reader = PresentReader(net)
    res = evaluate_reader(reader, xh, yh)
    res_blur = evaluate_reader(reader, blurred(xh, 1.0), yh)
    torch.save(net.state_dict(), out / "reader.pt")
    report = {
        "id": DEFAULT_READER_ID, "kind": READER_KIND, "classes": list(CLASSES), "channels": [8, 16, 32],
        "crop_mm": list(CROP_SPEC.size_mm), "crop_shape": list(CROP_SPEC.shape),
        "description": "Pathology-present reader (3D CNN on the 2.5 x 2.5 x 5 cm crop around the landmark), "
                       "trained on synthetic phantom pathology vs healthy twins. For the phantom benchmark only.",
        "training": {"phantom_seeds": format_seeds(seeds), "heldout_seeds": format_seeds(heldout_seeds),
                     "spacing": list(spacing), "epochs": epochs, "jitter": jitter, "seed": seed,
                     "n_train_crops": int(len(y)), "heldout": res, "heldout_blur_1vox": res_blur,
                     "seconds": round(time.time() - t0, 1), "data_seconds": round(t_data, 1)},
        "license": "Apache-2.0 (trained only on synthetic phantoms)",
    }
    (out / "reader.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"[reader] held-out present accuracy {res['present_accuracy']:.3f} ({res['n_decisions']} decisions), "
        f"5-class {res['class_accuracy']:.3f}; blurred 1 voxel: {res_blur['present_accuracy']:.3f}")
    return report


# --------------------------------------------------------------------------- realism reader (C2ST)
def _logreg_scores(xtr, ytr, xte, l2: float = 1.0, iters: int = 200) -> np.ndarray:
    """Class-balanced L2 logistic regression (scipy L-BFGS) on standardised features; decision scores of ``xte``."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    mu, sd = xtr.mean(axis=0), xtr.std(axis=0) + 1e-6
    a = (xtr - mu) / sd
    b = np.asarray(ytr, np.float64)
    sw = np.where(b > 0.5, 0.5 / max(b.mean(), 1e-9), 0.5 / max(1.0 - b.mean(), 1e-9)) / len(b)

    def f(wc):
        w, c = wc[:-1], wc[-1]
        z = a @ w + c
        loss = -(sw * (b * log_expit(z) + (1 - b) * log_expit(-z))).sum() + 0.5 * l2 * (w @ w) / len(b)
        r = sw * (expit(z) - b)
        return loss, np.r_[a.T @ r + l2 * w / len(b), r.sum()]

    wc = minimize(f, np.zeros(a.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": iters}).x
    return ((xte - mu) / sd) @ wc[:-1] + wc[-1]


def c2st(real, fake, real_groups, fake_groups, folds: int = 5, seed: int = 0, n_boot: int = 1000,
         l2: float = 1.0) -> dict:
    """Classifier two-sample test of real vs generated crops (flattened): grouped k-fold (a case's crops share a
    fold), out-of-fold AUC, case-bootstrap 95 % interval. ``{"auc", "lo", "hi", "n_real", "n_fake", "folds"}``;
    NaN with fewer than 2 groups."""
    real = np.asarray(real, np.float64).reshape(len(real), -1)
    fake = np.asarray(fake, np.float64).reshape(len(fake), -1)
    x = np.concatenate([real, fake])
    y = np.concatenate([np.ones(len(real)), np.zeros(len(fake))])
    groups = np.concatenate([np.asarray(real_groups), np.asarray(fake_groups)])
    uniq = sorted(set(groups.tolist()), key=str)
    res = {"auc": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_real": int(len(real)),
           "n_fake": int(len(fake)), "folds": 0}
    if len(uniq) < 2 or len(real) == 0 or len(fake) == 0:
        return res
    k = min(int(folds), len(uniq))
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[i]: n % k for n, i in enumerate(order)}
    fold = np.asarray([fold_of[g] for g in groups.tolist()])
    scores = np.full(len(y), np.nan)
    for f in range(k):
        te, tr = fold == f, fold != f
        if len(set(y[tr].tolist())) < 2:
            continue
        scores[te] = _logreg_scores(x[tr], y[tr], x[te], l2=l2)
    ok = np.isfinite(scores)
    res["folds"] = k
    res["auc"] = auc(scores[ok & (y == 1)], scores[ok & (y == 0)])
    gidx = {g: np.flatnonzero((groups == g) & ok) for g in uniq}

    def stat(sel):
        rows = np.concatenate([gidx[uniq[i]] for i in sel])
        return auc(scores[rows][y[rows] == 1], scores[rows][y[rows] == 0])

    res["lo"], res["hi"] = bootstrap_ci(stat, len(uniq), n_boot=n_boot, seed=seed)
    return res


# --------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--seeds", default="900000-900239", help="training phantom seeds (default %(default)s)")
    p.add_argument("--heldout-seeds", default="900240-900299", help="held-out seeds (default %(default)s)")
    p.add_argument("--exclude-seeds", help="seeds that must not be used (e.g. the benchmark's), refused on overlap")
    p.add_argument("--out", required=True, help="run folder (crop cache, reader.pt, reader.json)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--jitter", type=int, default=3, help="extra jittered crops per landmark (+-2 mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    p.add_argument("--registry", help="Models.json whose models' training seeds are excluded (default: the package "
                                      "registry)")
    p.add_argument("--export", action="store_true",
                   help="register the trained reader in --registry (weights copied to <registry folder>/Models/)")
    p.add_argument("--quiet", action="store_true")


def main_train_reader(args) -> int:
    from ..common import cpu_threads

    with cpu_threads(args.threads):  # restored: tests call this in their own process
        return _main_train_reader(args)


def _main_train_reader(args) -> int:
    from .seeds import parse_seeds

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    exclude = parse_seeds(args.exclude_seeds) if args.exclude_seeds else None
    report = train_reader(parse_seeds(args.seeds), parse_seeds(args.heldout_seeds), args.out, epochs=args.epochs,
                          jitter=args.jitter, seed=args.seed, registry=args.registry, exclude_seeds=exclude, log=log)
    acc = report["training"]["heldout"]["present_accuracy"]
    if args.export:
        entry = register_reader(args.registry, report, Path(args.out) / "reader.pt")
        log(f"[reader] registered {entry['id']} ({entry['file']['path']}, sha256 {entry['file']['sha256'][:12]}...)")
    if acc <= 0.9:
        log(f"[reader] warning: held-out accuracy {acc:.3f} is not above 0.9")
    return 0
