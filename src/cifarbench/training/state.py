"""The checkpoint schema in one place: a run's training state to a checkpoint payload and back.

A checkpoint holds plain tensors and values only (it loads with `weights_only=True`): the run's identity
(id, model, classes, input shape, config, data fingerprint, provenance), the weights, and, for a run that can
be resumed, everything the loop needs to continue bit for bit: optimiser and lookahead state, the loop
position, the history so far and the random generators.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarbench.errors import CifarbenchError
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint


@dataclass
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


@dataclass
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


@dataclass
class TrainingState:
    """What the loop needs, beyond the weights, to continue a run exactly where it stopped."""

    optimizer: dict
    lookahead: dict[str, torch.Tensor] | None
    position: LoopPosition
    history: list[EpochMetrics]
    rng: dict


@dataclass
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
        """Read and check a loaded payload; a missing or mistyped entry is a one-line error naming it."""

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            value = payload.get(key)
            if not isinstance(value, kind):
                raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint ({key!r} is missing or "
                                      "of the wrong type)")
            return value

        classes, in_shape = need("classes", list), need("in_shape", (list, tuple))
        if not classes or not all(isinstance(c, str) for c in classes):
            raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint ('classes' must be names)")
        if len(in_shape) != 3 or not all(isinstance(s, int) and 0 < s <= 4096 for s in in_shape):
            raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint ('in_shape' must be C, H, W)")
        state_dict = need("state_dict", dict)
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
            raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint ('state_dict' must map names "
                                  "to tensors)")
        dataset = need("dataset", dict)
        if not isinstance(dataset.get("sha256"), str):
            raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint (no data fingerprint)")
        training = None
        if "position" in payload:
            try:
                position = LoopPosition(**need("position", dict))
                history = [EpochMetrics.from_dict(h) for h in need("history", list)]
            except TypeError:
                raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint (bad training state)") from None
            lookahead = payload.get("lookahead")
            if lookahead is not None and not isinstance(lookahead, dict):
                raise CifarbenchError(f"{source}: not a usable cifarbench checkpoint (bad lookahead state)")
            training = TrainingState(need("optimizer", dict), lookahead, position, history, need("rng", dict))
        environment = {k: payload[k] for k in ("code_version", "torch_version", "python", "platform", "cpu")
                       if isinstance(payload.get(k), str)}
        return cls(need("run_id", str), need("model", str), classes, tuple(in_shape), need("config", dict),
                   dataset, state_dict, environment, training)

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(self.to_payload(), path)

    @classmethod
    def load(cls, path: str | Path) -> RunCheckpoint:
        return cls.from_payload(load_checkpoint(path), path)
