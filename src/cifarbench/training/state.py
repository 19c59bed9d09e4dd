"""The checkpoint schema in one place: a run's training state to a checkpoint payload and back.

A checkpoint holds plain tensors and values only (it loads with `weights_only=True`): the run's identity
(id, model, classes, input shape, config, data fingerprint, provenance), the weights, and, for a run that can
be resumed, everything the loop needs to continue bit for bit: optimiser and lookahead state, the loop
position, the history so far and the random generators.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarbench.errors import CifarbenchError
from cifarbench.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint


@dataclass(kw_only=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    """Mean training loss over the epoch's examples."""
    test_loss: float | None
    test_accuracy: float | None
    """None for epochs that were not evaluated (budgeted runs evaluate only at the end)."""
    seconds: float
    """Cumulative training seconds at the end of this epoch (evaluation excluded), for time-to-accuracy."""
    eval_seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    """On the held-out validation split (`val_split`), when there is one."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EpochMetrics:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(kw_only=True)
class LoopPosition:
    """Where the loop is, in plain values: enough, with the weights, optimiser and RNG states, to resume a run
    bitwise (the data order and augmentation of an epoch depend only on the seed and the epoch)."""

    epoch: int = 0
    batch: int = 0
    """Batches of `epoch` done; the epoch is finished when `in_epoch` is False."""
    in_epoch: bool = False
    step: int = 0
    total_steps: int = 0
    elapsed: float = 0.0
    loss_sum: float = 0.0
    seen: int = 0
    images: int = 0
    """Training images over the whole run, all ranks together (what the run's compute is counted from)."""
    low_images: int = 0
    """Of those, the ones trained at the reduced resolution (`low_res`)."""

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps and not self.in_epoch


def rng_states() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"python": [py_version, list(py_internal), py_gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- the schema: what every consumer of a checkpoint reads, checked once when it is loaded ------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_CLASSES, MAX_CLASS_NAME = 1000, 100
MAX_CHANNELS, MAX_SIDE = 4, 256
"""Bounds on what a checkpoint may claim, checked before any model is built: a model's input and output sizes
set its allocations, and the data sets here have 10 classes of 1 or 3 channels at 28 or 32 pixels."""


def _str_list(v: Any) -> bool:
    return (isinstance(v, list) and 1 <= len(v) <= MAX_CLASSES
            and all(isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in v))


def _in_shape(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(n) and n > 0 for n in v)
            and v[0] <= MAX_CHANNELS and v[1] <= MAX_SIDE and v[2] <= MAX_SIDE)


def _tensor_dict(v: Any) -> bool:
    """Tensors whose bytes are all in the file: an expanded or overlapping view (one stored byte seen as gigabytes)
    would cost what its shape says the first time it is copied or hashed."""
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) and t.layout == torch.strided
        and t.numel() * t.element_size() <= t.untyped_storage().nbytes() and _dense(t) for k, t in v.items())


def _dense(t: torch.Tensor) -> bool:
    """No two elements share memory (so numel elements need numel of storage): dims sorted by stride, each stride
    at least the span of the smaller ones."""
    span = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1),
                               key=lambda x: x[1]):
        if stride < span:
            return False
        span = stride * size
    return True


def _plain_record(v: Any, cls: type, required: set[str]) -> bool:
    """A dict of a dataclass's plain fields (numbers, bools, None), as LoopPosition and EpochMetrics save."""
    names = {f.name for f in fields(cls)}
    required = required | {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    return (isinstance(v, dict) and set(v) <= names and required <= set(v)
            and all(x is None or isinstance(x, (int, float)) for x in v.values()))


def _resume_checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
    return {
        "position": (lambda v: _plain_record(v, LoopPosition, {"step", "total_steps", "in_epoch"})
                     and _is_int(v["step"]) and _is_int(v["total_steps"]), "the loop's position record"),
        "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                      and isinstance(v.get("param_groups"), list), "an optimizer state dict"),
        "history": (lambda v: isinstance(v, list) and all(_plain_record(h, EpochMetrics, set()) for h in v),
                    "a list of epoch metrics"),
        "lookahead": (lambda v: v is None or _tensor_dict(v), "None or a dict of tensors, each stored whole"),
        "rng": (_rng_states, "python, numpy, torch and cuda generator states"),
    }


def _rng_states(v: Any) -> bool:
    """The shapes `set_rng_states` restores: Mersenne Twister states of 625 and 624 words, torch byte tensors."""
    def words(x: Any, n: int) -> bool:
        return isinstance(x, (list, tuple)) and len(x) == n and all(_is_int(w) for w in x)

    if not isinstance(v, dict):
        return False
    python, numpy, cpu, cuda = v.get("python"), v.get("numpy"), v.get("torch"), v.get("cuda")
    return (isinstance(python, (list, tuple)) and len(python) == 3 and words(python[1], 625)
            and isinstance(numpy, (list, tuple)) and len(numpy) == 5 and numpy[0] == "MT19937" and words(numpy[1], 624)
            and isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8
            and isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                        for t in cuda))


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "classes": (_str_list, f"a list of 1 to {MAX_CLASSES} names of at most {MAX_CLASS_NAME} characters"),
    "in_shape": (_in_shape, f"[channels, height, width] with at most {MAX_CHANNELS} channels and sides of at most "
                            f"{MAX_SIDE}"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
    "dataset": (lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str), "a dict with a string sha256"),
    "state_dict": (_tensor_dict, "a dict of tensors, each stored whole (no expanded or overlapping views)"),
}


def validate_payload(payload: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`payload` if it has every key the consumers read, of the right type (and the training state when it
    claims to be resumable, i.e. holds `position`); else one CifarbenchError naming the first problems."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CifarbenchError(f"{path}: not a cifarbench checkpoint")
    checks = dict(_CHECKS)
    if "position" in payload:
        checks.update(_resume_checks())
    missing = [key for key in checks if key not in payload]
    wrong = [f"{key} is not {expected}" for key, (ok, expected) in checks.items()
             if key in payload and not ok(payload[key])]
    if missing or wrong:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + wrong[:3]
        raise CifarbenchError(f"{path}: damaged or foreign cifarbench checkpoint ({'; '.join(problems)})")
    return payload


@dataclass
class TrainingState:
    """What the loop needs, beyond the weights, to continue a run exactly where it stopped."""

    optimizer: dict
    lookahead: dict[str, torch.Tensor] | None
    position: LoopPosition
    history: list[EpochMetrics]
    rng: dict


@dataclass(kw_only=True)
class RunCheckpoint:
    """A run's checkpoint: identity, weights and (for resuming) its training state."""

    run_id: str
    model: str
    """The model reference the config names (a registered name, `file.py:Name` or `module:Name`)."""
    classes: list[str]
    in_shape: tuple[int, int, int]
    config: dict
    dataset: dict
    state_dict: dict[str, torch.Tensor]
    environment: dict[str, str] = field(default_factory=dict)
    training: TrainingState | None = None

    def to_payload(self) -> dict[str, Any]:
        """The on-disk dict (format v1: flat keys, so older cifarbench versions read it too)."""
        payload = {"run_id": self.run_id, "model": self.model, "classes": list(self.classes),
                   "in_shape": list(self.in_shape), "config": self.config, "dataset": self.dataset,
                   "state_dict": self.state_dict, **self.environment}
        if self.training is not None:
            t = self.training
            payload.update(epoch=len(t.history), optimizer=t.optimizer, lookahead=t.lookahead,
                           position=asdict(t.position), history=[h.to_dict() for h in t.history], rng=t.rng)
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str | Path = "checkpoint") -> RunCheckpoint:
        """The typed checkpoint of a payload; a missing or mistyped entry is a one-line error naming it."""
        p = validate_payload(payload, source)
        training = None
        if "position" in p:
            training = TrainingState(p["optimizer"], p["lookahead"], LoopPosition(**p["position"]),
                                     [EpochMetrics.from_dict(h) for h in p["history"]], p["rng"])
        environment = {k: p[k] for k in ("code_version", "torch_version", "python", "platform", "cpu")
                       if isinstance(p.get(k), str)}
        return cls(run_id=p["run_id"], model=p["model"], classes=list(p["classes"]), in_shape=tuple(p["in_shape"]),
                   config=p["config"], dataset=p["dataset"], state_dict=p["state_dict"], environment=environment,
                   training=training)

    def weight_count(self) -> int:
        """Numbers in the weights, BatchNorm statistics aside: the parameters, counted without building the model."""
        return sum(t.numel() for name, t in self.state_dict.items()
                   if not name.endswith(("running_mean", "running_var", "num_batches_tracked")))

    def weights_sha256(self) -> str:
        """A hash of the weights' content (names, shapes, values; floats as float32, as they load into a float32
        model), whatever else the file holds: the same weights re-saved under another run id or dtype hash the
        same."""
        digest = hashlib.sha256()
        for name in sorted(self.state_dict):
            t = self.state_dict[name].detach().cpu()
            t = (t.float() if t.is_floating_point() else t).contiguous()
            digest.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(self.to_payload(), path)

    @classmethod
    def load(cls, path: str | Path) -> RunCheckpoint:
        return cls.from_payload(load_checkpoint(path), path)
