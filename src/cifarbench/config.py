"""Typed configuration: every knob of a run, with its unit and why it has its default.

A `TrainConfig` is written next to every run's results, so it must hold plain values only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

from cifarbench.errors import CifarbenchError

PRECISIONS = ("fp32", "bf16", "auto")
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
    """sgd (plain or Nesterov, as the notebook and airbench94), or muon: convolution filters take Muon steps
    (orthogonalised momentum, `muon_lr`, `muon_momentum`) and all other parameters the SGD settings below."""
    lr: float = 0.01
    """Learning rate per step (the notebook's 1e-2)."""
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    bias_lr_scale: float = 1.0
    """BatchNorm biases train with lr x this (and weight decay / this, so their decay stays the same)."""
    muon_lr: float = 0.24
    """With muon: step size of the filters, whose norm is held fixed, so this sets the angle they turn per step
    (airbench94_muon's 0.24 at batch 2000)."""
    muon_momentum: float = 0.6

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "muon"):
            raise CifarbenchError(f"optimizer {self.name!r} is not supported (choose: sgd, muon)")
        if self.lr <= 0 or self.muon_lr <= 0 or min(self.momentum, self.muon_momentum, self.weight_decay) < 0:
            raise CifarbenchError("optimizer: learning rates must be > 0, momenta and weight decay >= 0")


@dataclass
class AugmentConfig:
    flip: bool = False
    """Random horizontal flips."""
    alternate_flip: bool = True
    """With flip: each image is flipped at random once, then every other epoch all are mirrored, so each image is
    seen both ways in consecutive epochs (more diverse than an independent coin per epoch)."""
    translate: int = 0
    """Random translation of up to this many pixels (reflect padding), drawn per image and epoch."""

    def __post_init__(self) -> None:
        if self.translate < 0:
            raise CifarbenchError("augment: translate must be >= 0 pixels")


@dataclass
class ScheduleConfig:
    kind: str = "constant"
    """constant, or triangle: linear from `start` up to 1 at `peak`, then linear down to `end` (x the base lr)."""
    start: float = 0.2
    peak: float = 0.23
    """Fraction of training at which the learning rate peaks."""
    end: float = 0.07

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "triangle"):
            raise CifarbenchError(f"schedule {self.kind!r} is not supported (choose: constant, triangle)")
        if not 0 <= self.peak <= 1:
            raise CifarbenchError("schedule: peak must be a fraction of training in [0, 1]")


@dataclass
class LookaheadConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights and copy it back into the model (lookahead)."""
    start: float = 0.3
    """Fraction of training after which averaging starts."""
    every: int = 5
    """Steps between averaging updates."""
    decay_base: float = 0.95
    """Per-step decay; warmed up as decay_base**every * progress**decay_pow, so it averages strongly at the end."""
    decay_pow: float = 3.0


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
    """fp32, bf16 autocast (much faster for conv nets on CPUs with bf16 units, slightly different numbers; see
    docs/cpu-performance.md#bf16-and-channels-last), or auto: bf16 on CPU and CUDA (no loss scaling needed, unlike
    fp16), fp32 elsewhere."""
    channels_last: bool = True
    """NHWC memory layout: same arithmetic, faster convolutions on CPU and GPU."""
    eval_batch_size: int = 1000
    """Examples per evaluation forward pass; does not change results, only speed (the fast recipe uses 2000 on a
    GPU and 256 on a CPU, where small batches stay in cache)."""
    model_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the model factory, e.g. {"widths": [64, 256, 256]} for speedrun."""
    label_smoothing: float = 0.0
    drop_last: bool = False
    """Skip the last partial batch of an epoch (keeps BatchNorm statistics and step sizes uniform)."""
    whiten: bool = False
    """Initialise a model's patch-whitening layer from training-set patch covariance (models that have one)."""
    whiten_bias_fraction: float = 0.3
    """The whitening layer's bias trains for this fraction of training, then freezes."""
    low_res: int = 0
    """Progressive resizing: the first `low_res_fraction` of the steps train on images scaled down to this
    side (cheaper steps, so a budget holds more of them); 0 = off. Evaluation is always at full size.
    Off in the recipes: the extra epochs bought no validation accuracy (docs/cpu-performance.md#what-did-not-help)."""
    low_res_fraction: float = 0.5
    tta: int = 0
    """Test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-pixel translations."""
    tta_threshold: float = 0.0
    """Selective TTA: when > 0, an image whose plain view gives its top class at least this probability keeps
    the plain prediction, and only the others get the extra views (0 = every image gets them)."""
    budget_seconds: float | None = None
    """Wall-clock budget for training plus the final evaluation; the schedule length is fitted to it."""
    eval_every_epoch: bool = True
    """Evaluate after every epoch (learning curves). Budgeted runs turn it off to spend the time on training."""
    val_split: int = 0
    """Hold out this many training examples (the last ones of a fixed shuffle) for validation; per-epoch
    metrics are then measured on them. Anything tuned should look at these, never at the test set."""
    compile: bool = False
    """torch.compile the model (faster steady state on GPU, a compile cost up front)."""
    sync_bn: bool = False
    """Under torchrun on GPUs: BatchNorm statistics over the global batch instead of each rank's slice."""
    deterministic: bool = False
    """Kernels whose results do not depend on the thread count: on a CPU convolutions skip oneDNN (whose weight
    gradients are summed in a thread-count-dependent order) for ATen's im2col + MKL path, so a seed gives the
    same bits with 1 thread as with 2, e.g. in `compare --jobs` workers, at a cost in speed. fp32 only on a CPU
    (bf16 convolutions have no thread-independent kernel). On CUDA: cuDNN's deterministic algorithms, no
    autotuning. Costs and evidence: docs/distributed.md#--deterministic."""
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise CifarbenchError("epochs, batch size and eval batch size must be at least 1")
        if self.precision not in PRECISIONS:
            raise CifarbenchError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.device.split(":")[0] not in DEVICES:
            raise CifarbenchError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.tta not in (0, 1, 2):
            raise CifarbenchError("tta must be 0 (none), 1 (mirror) or 2 (mirror + translate)")
        if not 0 <= self.tta_threshold <= 1:
            raise CifarbenchError("tta_threshold must be a probability in [0, 1] (0 = TTA on every image)")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise CifarbenchError("the budget must be a positive number of seconds")
        if self.low_res < 0 or not 0 <= self.low_res_fraction <= 1:
            raise CifarbenchError("low_res must be >= 0 (0 = off) and low_res_fraction in [0, 1]")
        if not 0 <= self.label_smoothing < 1 or self.val_split < 0:
            raise CifarbenchError("label smoothing must be in [0, 1) and the validation split >= 0")

    def to_dict(self) -> dict:
        """Plain nested dict (JSON- and weights_only-safe)."""
        return asdict(self)

    def with_changes(self, changes: dict) -> TrainConfig:
        """A copy with fields set by dotted name, e.g. {"optimizer.lr": 0.5, "tta": 0} (what `--set` passes);
        "model_kwargs.act" sets one key of the model's arguments. Each change is validated like the field's own
        default; an unknown name is an error, since a typo that changed nothing would otherwise pass for an
        experiment (a model argument is checked when the model is built)."""
        config = self
        for key, value in changes.items():
            part, _, name = key.rpartition(".")
            if part == "model_kwargs":
                config = replace(config, model_kwargs={**config.model_kwargs, name: value})
                continue
            target = getattr(config, part, None) if part else config
            if not is_dataclass(target) or name not in {f.name for f in fields(target)}:
                raise CifarbenchError(f"unknown config field {key!r}")
            try:
                changed = replace(target, **{name: value})
            except TypeError as e:  # a value of the wrong type, caught by a comparison in __post_init__
                raise CifarbenchError(f"{key}={value!r}: {e}") from None
            config = replace(config, **{part: changed}) if part else changed
        return config

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are ignored so older runs still load."""
        nested = {"data": DataConfig, "optimizer": OptimizerConfig, "augment": AugmentConfig,
                  "schedule": ScheduleConfig, "lookahead": LookaheadConfig}
        kwargs = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)} and k not in nested}
        for name, kind in nested.items():
            known = {f.name for f in fields(kind)}
            kwargs[name] = kind(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**kwargs)


def parse_changes(items: list[str]) -> dict:
    """`--set` arguments, FIELD=VALUE, as a dict for `TrainConfig.with_changes`. VALUE is read as JSON (0.5, true,
    [64,256,256]); anything that is not JSON is taken as a string (muon)."""
    changes = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise CifarbenchError(f"--set {item!r}: expected FIELD=VALUE, e.g. optimizer.lr=0.5")
        try:
            changes[key] = json.loads(text)
        except ValueError:
            changes[key] = text
    return changes
