"""Typed configuration: every knob of a run, with its unit and why it has its default.

A `TrainConfig` is written next to every run's results, so it must hold plain values only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from cifarbench.errors import CifarbenchError

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    """Registered data set name."""
    data_dir: str | None = None
    """Folder holding the data; None means $CIFARBENCH_DATA, then ./data."""
    verify: bool = True
    """Refuse files whose md5 is not the official one. False accepts other copies (and is recorded)."""
    download: bool = True
    """Fetch the official archive when no local copy is found."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (the notebook's Normalize(0.5, 0.5))."""
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel std divided by; with mean 0.5 this maps pixels to [-1, 1]."""

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise CifarbenchError(f"data: mean {self.mean} and std {self.std} must have one positive std per channel")


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    """Only plain/Nesterov SGD for now: what the notebook and the speedrun recipes use."""
    lr: float = 0.01
    """Learning rate per step (the notebook's 1e-2)."""
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.name != "sgd":
            raise CifarbenchError(f"optimizer {self.name!r} is not supported (choose: sgd)")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise CifarbenchError("optimizer: lr must be > 0, momentum and weight decay >= 0")


@dataclass
class TrainConfig:
    model: str
    """Registered model name (`cifarbench models` lists them)."""
    recipe: str = "seed"
    """The named recipe these settings came from."""
    epochs: int = 10
    """Passes over the training set."""
    batch_size: int = 100
    """Examples per optimiser step."""
    seed: int = 0
    """Seeds the weight init and the data order; the same seed on the same device reproduces a run."""
    device: str = "auto"
    """auto picks cuda, then mps, then cpu."""
    precision: str = "fp32"
    """fp32, or bf16 autocast (about 3x faster for conv nets on CPUs with AVX-512 bf16, slightly different numbers)."""
    channels_last: bool = True
    """NHWC memory layout: same arithmetic, faster convolutions on CPU and GPU."""
    eval_batch_size: int = 1000
    """Examples per evaluation forward pass; does not change results."""
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise CifarbenchError("epochs, batch size and eval batch size must be at least 1")
        if self.precision not in PRECISIONS:
            raise CifarbenchError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.device.split(":")[0] not in DEVICES:
            raise CifarbenchError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")

    def to_dict(self) -> dict:
        """Plain nested dict (JSON- and weights_only-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys are ignored so older runs still load."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k not in ("data", "optimizer")}
        data = {k: v for k, v in d.get("data", {}).items() if k in {f.name for f in fields(DataConfig)}}
        opt = {k: v for k, v in d.get("optimizer", {}).items() if k in {f.name for f in fields(OptimizerConfig)}}
        return cls(**kwargs, data=DataConfig(**data), optimizer=OptimizerConfig(**opt))
