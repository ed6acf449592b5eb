"""Shared training utilities: seeding, RNG capture, EMA, atomic checkpoints + resume,
DDP setup, resumable distributed batch order, AMP, TensorBoard/JSON logging, configs.

Nothing here imports slicer/qt/vtk. Everything works on CPU (gloo) and on CUDA (nccl).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml

from spine_ldm.conditions import CONDITIONS, parse_condition
from spine_ldm.errors import InputError, ModelError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- seeding / RNG
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU + CUDA). Each rank gets ``seed + rank`` so noise differs per rank."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env) -> list:
    """RNG state of every rank (rank order), for a checkpoint that resumes bit-identically under DDP."""
    import torch.distributed as dist

    rng = rng_state()
    if not env.distributed:
        return [rng]
    rngs = [None] * env.world_size
    dist.all_gather_object(rngs, rng)
    return rngs


def restore_rank_rng(checkpoint: dict, rank: int, world_size: int, seed: int) -> int:
    """Restore this rank's RNG state from a checkpoint and return its step.

    A checkpoint written with another world size has no state for this rank: the RNGs are then re-seeded
    from (seed, step, rank), which is reproducible but not bit-identical to an uninterrupted run."""
    start = int(checkpoint["step"])
    rngs = checkpoint.get("rng_per_rank") or []
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    else:
        seed_everything(seed + 7919 * start, rank)
    return start


# --------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` so early EMA weights are not dominated by the
    random initialisation (useful for short CPU runs such as the demo weights).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = copy.deepcopy(unwrap(model)).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        src = unwrap(model)
        for ps, pm in zip(self.shadow.parameters(), src.parameters()):
            if pm.requires_grad:
                ps.mul_(d).add_(pm.detach().to(ps.dtype), alpha=1.0 - d)
            else:  # e.g. an EMA-updated VQ codebook: already an average, copy it
                ps.copy_(pm.detach())
        for bs, bm in zip(self.shadow.buffers(), src.buffers()):
            bs.copy_(bm)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow.load_state_dict(state["model"])

    def to(self, device) -> "EMA":
        self.shadow.to(device)
        return self


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


# --------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace: a reader (or a resume after
    kill -9) sees either the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """The resume checkpoint of a run (always the newest complete one)."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def save_checkpoint(run_dir, state: dict, step: int, keep_every: int = 0) -> Path:
    """Write ``checkpoints/last.pt`` atomically; additionally keep ``step_XXXXXXX.pt`` when
    ``keep_every`` > 0 and step is a multiple of it."""
    state = dict(state)
    state["format"] = CHECKPOINT_FORMAT
    state["step"] = int(step)
    p = checkpoint_path(run_dir)
    atomic_torch_save(state, p)
    if keep_every and step % keep_every == 0:
        atomic_torch_save(state, p.with_name(f"step_{step:07d}.pt"))
    return p


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise ModelError(f"no checkpoint at {path}")
    try:
        # Full checkpoints hold optimizer/RNG state (numpy arrays, tuples): they are our own files.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"checkpoint {path} is unreadable: {e}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise ModelError(f"{path} is not a training checkpoint (no 'step')")
    return state


def optimizer_to(optimizer: torch.optim.Optimizer, device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)


def state_dict_sha256(sd: dict) -> str:
    """Hash of a state dict's tensor bytes in key order (to compare models across ranks / runs)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_init_weights(model: torch.nn.Module, path, what: str = "model") -> str | None:
    """``init_weights``: start ``model`` (and so its EMA) from a state dict instead of the random initialisation,
    e.g. to fine-tune an exported model (float16 tensors are cast to the model's dtype). A checkpoint of a resumed
    run replaces it. Returns the file's sha256 (recorded in run.json), None without ``init_weights``."""
    from spine_ldm.errors import InputError

    if not path:
        return None
    p = Path(str(path))
    if not p.is_file():
        raise InputError(f"init_weights {p} is not a file")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise InputError(f"init_weights {p} is not a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        why = missing[:1] and f"missing {missing[0]!r}" or extra[:1] and f"unexpected {extra[0]!r}" or \
            f"shape of {bad[0]!r} {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        raise InputError(f"init_weights {p} does not fit this {what} config ({why})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return file_sha256(p)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not (self.distributed and dist.is_initialized()):
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def cleanup(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from spine_ldm.errors import DeviceError
        raise DeviceError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistEnv:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables it returns a single-process env. Backend: nccl for CUDA, gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    env = DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        env.initialized_here = True
    return env


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices as a pure function of (seed, step): epoch e uses a
    ``DistributedSampler(shuffle=True, seed=seed)`` with ``set_epoch(e)``, so each rank sees its own shard,
    and resuming at ``start_step`` reproduces exactly the batches an uninterrupted run would have seen.
    Infinite (training is step based)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, shuffle: bool = True, drop_last: bool = True):
        if n <= 0:
            raise InputError("training set is empty: no FSUs match the selection (check the manifest / method)")
        self.n, self.bs, self.rank, self.world = int(n), int(batch_size), int(rank), int(world_size)
        self.seed, self.start_step, self.shuffle, self.drop_last = int(seed), int(start_step), shuffle, drop_last
        shard = math.ceil(self.n / self.world)
        self.per_epoch = shard // self.bs if drop_last else math.ceil(shard / self.bs)
        if self.per_epoch == 0:  # fewer samples per rank than a batch: cycle within the epoch list
            self.per_epoch = 1

    def _epoch_indices(self, epoch: int) -> list[int]:
        s = torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank,
                                                shuffle=self.shuffle, seed=self.seed, drop_last=False)
        s.set_epoch(epoch)
        idx = list(iter(s))
        while len(idx) < self.bs:  # tiny sets: repeat to fill one batch
            idx = idx + idx
        return idx

    def batch_for_step(self, step: int) -> list[int]:
        epoch, k = divmod(int(step), self.per_epoch)
        idx = self._epoch_indices(epoch)
        return idx[k * self.bs:(k + 1) * self.bs]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.per_epoch)
            idx = self._epoch_indices(epoch)
            for kk in range(k, self.per_epoch):
                yield idx[kk * self.bs:(kk + 1) * self.bs]
            step = (epoch + 1) * self.per_epoch

    def __len__(self):  # pragma: no cover - infinite sampler; DataLoader only needs it for len()
        return sys.maxsize


def collate(items: list[dict]) -> dict:
    out: dict = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        elif isinstance(vals[0], (int, float, bool, np.integer, np.floating)):
            out[k] = torch.tensor(np.asarray(vals))
        else:
            out[k] = vals
    return out


def make_loader(dataset, batch_size: int, env: DistEnv, seed: int, start_step: int, num_workers: int = 0):
    sampler = ResumableBatchSampler(len(dataset), batch_size, env.rank, env.world_size, seed, start_step)
    # own generator: creating the iterator must not draw from the global RNG (resume would diverge otherwise)
    g = torch.Generator().manual_seed(int(seed) * 1000 + env.rank)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, persistent_workers=num_workers > 0, generator=g)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Temporarily set torch's intra-op threads (``n`` <= 0 or None: leave as is). On a busy shared CPU one
    thread per process is often several times faster than oversubscribed OpenMP threads."""
    old = torch.get_num_threads()
    if n and int(n) > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- AMP
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so CPU autocast is a speed-up."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def amp_setup(device: torch.device, amp: str | bool | None):
    """Returns (autocast_context_factory, GradScaler or None, mode). ``amp``: 'off'|'bf16'|'fp16'|'auto'.
    'auto' = bf16 on CUDA with bf16 support, fp16 otherwise on CUDA, off on CPU. On CPU only an explicit 'bf16'
    autocasts (``torch.autocast("cpu", bfloat16)``, ~1.5x faster training of the small config on a CPU with
    native bf16, see :func:`cpu_has_native_bf16`); 'fp16' on CPU is off."""
    mode = "off" if amp in (None, False, "off", "none", "fp32") else str(amp).lower()
    if amp is True:
        mode = "auto"
    if mode not in ("off", "auto", "bf16", "fp16"):
        raise InputError(f"amp must be off | auto | bf16 | fp16, got {amp!r}")
    if device.type != "cuda":
        if mode == "bf16":
            return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None, "bf16"
        mode = "off"
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "off":
        return (lambda: contextlib.nullcontext()), None, "off"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, mode


# --------------------------------------------------------------------------- logging
class TrainLogger:
    """TensorBoard scalars/images + ``metrics.jsonl`` + one stdout line per log step. Only rank 0 writes."""

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True, quiet: bool = False):
        self.enabled = enabled
        self.quiet = quiet
        self.run_dir = Path(run_dir)
        self.tb = None
        self._t0 = time.time()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                print(f"[train] tensorboard disabled: {e}", file=sys.stderr)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time() - self._t0, 2)}
        for k, v in values.items():
            v = float(v)
            rec[f"{prefix}/{k}"] = v
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if not self.quiet:
            msg = " ".join(f"{k.split('/')[-1]}={float(v):.4g}" for k, v in rec.items() if "/" in k)
            print(f"[{prefix}] step {step} {msg} ({rec['time']:.0f}s)", flush=True)

    def image_grid(self, step: int, tag: str, volumes: torch.Tensor, nrow: int | None = None) -> None:
        """volumes: (B, 1, SI, AP, LR). Logs the mid-LR sagittal slice of each, min-max scaled per row."""
        if not self.enabled or self.tb is None:
            return
        with contextlib.suppress(Exception):
            v = volumes.detach().float().cpu()
            sl = v[:, :, :, :, v.shape[-1] // 2]  # (B,1,SI,AP)
            lo = sl.amin(dim=(1, 2, 3), keepdim=True)
            hi = sl.amax(dim=(1, 2, 3), keepdim=True)
            sl = (sl - lo) / (hi - lo).clamp_min(1e-6)
            from torchvision.utils import make_grid  # optional
            grid = make_grid(sl, nrow=nrow or sl.shape[0])
            self.tb.add_image(tag, grid, step)
            return
        with contextlib.suppress(Exception):  # torchvision absent: concatenate along AP
            v = volumes.detach().float().cpu()
            sl = v[:, 0, :, :, v.shape[-1] // 2]
            sl = (sl - sl.amin()) / (sl.amax() - sl.amin()).clamp_min(1e-6)
            grid = torch.cat(list(sl), dim=1)[None]
            self.tb.add_image(tag, grid, step)

    def text(self, msg: str) -> None:
        if self.enabled and not self.quiet:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        self.jsonl.close()


# --------------------------------------------------------------------------- configs
def load_train_config(path_or_name: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Load a training YAML by path or by name from model_training/configs (e.g. 'ae_small')."""
    p = Path(path_or_name)
    if not p.is_file():
        cand = CONFIG_DIR / f"{path_or_name}.yaml"
        if cand.is_file():
            p = cand
        else:
            names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
            raise InputError(f"training config {path_or_name!r} not found (file or one of {', '.join(names)})")
    with open(p) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise InputError(f"training config {p} is not a mapping")
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg[k] = v
    cfg["_path"] = str(p)
    return cfg


def parse_overrides(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs (values parsed as YAML: numbers, bools, lists)."""
    out = {}
    for s in pairs or []:
        if "=" not in s:
            raise InputError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def write_run_info(run_dir, info: dict) -> None:
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=2, default=str))


def read_run_info(run_dir) -> dict:
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise ModelError(f"{run_dir} is not a training run directory (no run.json)")
    return json.loads(p.read_text())


# --------------------------------------------------------------------------- data selection
# autoencoder and `full` LDM: every FSU of the split; `weighted` / `masked`: only FSUs whose condition is a
# pathology (optionally a given subset) AND that carry a landmark.


def fsu_spec_for(model_cfg):
    from spine_ldm.geometry import FSUSpec

    return FSUSpec(shape=tuple(model_cfg.fsu_shape), size_mm=tuple(model_cfg.fsu_size_mm))


def select_rows(rows, split: str | None = "train", conditions=None, require_landmark: bool = False):
    """Rows of ``split`` (rows without a split count as train when no row has one), filtered by condition."""
    rows = list(rows)
    if split is not None:
        any_split = any(r.split for r in rows)
        if any_split:
            rows = [r for r in rows if r.split == split]
        elif split != "train":
            rows = []
    if conditions is not None:
        conds = {parse_condition(c) for c in conditions}
        rows = [r for r in rows if r.condition in conds]
    if require_landmark:
        rows = [r for r in rows if r.landmark_lps is not None]
    return rows


def pathology_conditions(only=None) -> tuple[str, ...]:
    if only:
        conds = tuple(parse_condition(c) for c in only)
        if "none" in conds:
            raise InputError("weighted/masked models are trained on pathological FSUs; 'none' is not a target")
        return conds
    return tuple(c for c in CONDITIONS if c != "none")


def default_cache_dir(manifest) -> Path:
    return Path(manifest).resolve().parent / ".fsu_cache"


def build_dataset(manifest, model_cfg, split="train", conditions=None, require_landmark=False, augment=False,
                  cache_dir=None, sigma_mm: float = 16.0, seed: int = 0, pathology_repeat: int = 1,
                  condition_repeat: dict | None = None, healthy_fraction: float = 0.0):
    """FSUDataset over the selected manifest rows (raises InputError when the selection is empty).

    ``pathology_repeat`` > 1 lists every pathological row that many times (an epoch then sees it that often;
    each copy gets its own augmentation draw), e.g. so the autoencoder meets herniations often enough to encode
    them. ``condition_repeat`` ({condition: k}, see :func:`parse_condition_repeat`) multiplies the rows of one
    condition on top of that, e.g. ``{dh_small: 2}`` so a model of the herniation family meets the faint grade
    twice as often as the large one. ``healthy_fraction`` f in [0, 0.9] adds healthy rows of ``split`` (condition
    none, with a landmark when ``require_landmark``) so that they make up about f of the result: a seeded draw
    without replacement, capped by the healthy rows there are. A weighted / masked model trained so has the
    healthy null condition that classifier-free guidance (the registry's ``guidance_scale``) contrasts with."""
    from model_training.dataset import Augment, FSUDataset
    from model_training.manifest import read_manifest

    manifest_rows = read_manifest(manifest)
    rows = select_rows(manifest_rows, split, conditions, require_landmark)
    k = int(pathology_repeat or 1)
    if k < 1:
        raise InputError(f"pathology_repeat must be >= 1, got {pathology_repeat!r}")
    if k > 1:
        rows = rows + [r for r in rows if r.condition != "none"] * (k - 1)
    for cond, kc in parse_condition_repeat(condition_repeat).items():
        rows = rows + [r for r in rows if r.condition == cond] * (kc - 1)
    rows = rows + healthy_rows(manifest_rows, split, healthy_fraction, len(rows), require_landmark, seed, manifest)
    if not rows:
        what = f"split {split!r}" + (f", conditions {sorted(conditions)}" if conditions else "") + \
            (", with a landmark" if require_landmark else "")
        raise InputError(f"manifest {manifest}: no FSUs match ({what})")
    cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
    aug = augment if (augment is not None and not isinstance(augment, bool)) else (Augment() if augment else None)
    return FSUDataset(rows, fsu_spec_for(model_cfg), cache, augment=aug, sigma_mm=sigma_mm, seed=seed)


def healthy_rows(manifest_rows, split, fraction, n_other: int, require_landmark: bool, seed: int = 0,
                 source="the manifest") -> list:
    """``healthy_fraction``'s rows: healthy ones of ``manifest_rows`` in ``split`` so that they are about
    ``fraction`` of ``n_other`` + their number (see :func:`build_dataset`); [] for fraction 0. ``source`` names
    the manifest in the error."""
    import random

    try:
        f = float(fraction or 0.0)
    except (TypeError, ValueError):
        raise InputError(f"healthy_fraction must be a number in [0, 0.9], got {fraction!r}") from None
    if not 0.0 <= f <= 0.9:
        raise InputError(f"healthy_fraction must be in [0, 0.9], got {fraction!r}")
    if f == 0.0:
        return []
    pool = select_rows(manifest_rows, split, ("none",), require_landmark)
    if not pool:
        raise InputError(f"healthy_fraction {f}: manifest {source} has no healthy FSUs in split {split!r}"
                         + (" with a landmark" if require_landmark else ""))
    n = min(len(pool), int(round(f / (1.0 - f) * n_other)))
    return random.Random(int(seed)).sample(pool, n)


def parse_condition_repeat(value) -> dict[str, int]:
    """``condition_repeat`` of a training config: a mapping {condition: k} (k an integer >= 1; YAML
    ``{dh_small: 2}``, also ``--set 'condition_repeat={dh_small: 2}'``), or empty / None. Conditions are checked
    with :func:`spine_ldm.conditions.parse_condition`; a bad value is an InputError naming it."""
    if value in (None, "", {}):
        return {}
    if not isinstance(value, dict):
        raise InputError(f"condition_repeat must be a mapping condition -> k, e.g. {{dh_small: 2}}, got {value!r}")
    out = {}
    for c, k in value.items():
        cond = parse_condition(str(c))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"condition_repeat[{c}] must be an integer >= 1, got {k!r}")
        out[cond] = int(k)
    return out


def latent_weight(landmark_index: torch.Tensor, model_cfg, sigma_mm: float) -> torch.Tensor:
    """Gaussian W on the latent grid from continuous FSU landmark indices (B, 3) in numpy order (SI, AP, LR).

    Latent voxel m covers FSU voxels f*m .. f*m+f-1, its centre is FSU index f*m + (f-1)/2 (as
    ``geometry.latent_frame``); distances in mm with the FSU spacing. Rows with a NaN landmark get W = 0.
    Returns (B, 1, *latent_spatial) float32.
    """
    lm = landmark_index.detach().float().cpu()
    if lm.ndim == 1:
        lm = lm[None]
    f = model_cfg.latent_factors
    lat = model_cfg.latent_shape[1:]
    sp = model_cfg.fsu_spacing_mm
    axes = [(torch.arange(n, dtype=torch.float32) * fa + (fa - 1) / 2.0) for n, fa in zip(lat, f)]
    out = []
    for b in range(lm.shape[0]):
        if not torch.isfinite(lm[b]).all():
            out.append(torch.zeros(1, *lat))
            continue
        d2 = [((ax - lm[b, a]) * sp[a]) ** 2 for a, ax in enumerate(axes)]
        dd = d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]
        out.append(torch.exp(-dd / (2.0 * float(sigma_mm) ** 2))[None])
    return torch.stack(out)
