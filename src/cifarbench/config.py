"""Typed configuration: every knob of a run, with its unit and why it has its default.

A `TrainConfig` is written next to every run's results, so it must hold plain values only. Each field declares
what it accepts (`setting(default, gt=0, le=1e4)`, `choices=`, `pattern=`); `check_fields`, called from every
config's `__post_init__`, reads the type hints and those declarations, so a config is valid (finite, bounded,
of its type) before anything is written, and a new field is checked by declaring it.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import operator
import re
import types
import typing
from dataclasses import KW_ONLY, MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar

from cifarbench.errors import CifarbenchError

PRECISIONS = ("fp32", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda", "mps")
DATASETS = ("cifar10", "mnist", "fashion-mnist")
OPTIMIZERS = ("sgd", "muon", "adam", "adamw")
SCHEDULES = ("constant", "triangle")

MAX_SEED = 2**31 - 1
"""Seeds go to torch.manual_seed, into run ids and into SQLite's 64-bit integer column."""
MAX_BUDGET_SECONDS = 30 * 24 * 3600.0
NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"
MODEL_REF = NAME + r"|[^\x00-\x1f]{1,1000}:[A-Za-z_][A-Za-z0-9_.]{0,199}"
"""A registered model's name, or `file.py:Name` / `package.module:Name` (models/reference.py)."""
"""A model or recipe name: it becomes part of a run id and so of a folder name (no separators, no '..')."""
MAX_JSON_DEPTH = 4
"""model_kwargs: levels of nesting, the dict itself included ({"widths": [64, 256, 256]} has 2)."""
MAX_JSON_ITEMS = 1000
MAX_JSON_INT = 2**53
"""Larger integers do not survive a JSON reader that parses numbers as doubles."""


@dataclass(frozen=True, kw_only=True)
class Check:
    """What one config field accepts besides its type: bounds for numbers (and tuple items), a fixed set or a
    full-match pattern for strings, a length range for strings and tuples."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    shown: str | None = None
    """What a pattern accepts, in words, for the error message."""
    length: tuple[int, int] | None = None


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **check: Any) -> Any:
    """A dataclass field with its `Check`, e.g. `lr: float = setting(0.01, gt=0, le=1e4)`."""
    return field(default=default, default_factory=default_factory, metadata={"check": Check(**check)})


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else repr(float(x))


def shown_value(value: Any) -> str:
    """repr for an error message, kept to one short line (and safe for ints too long to print)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-to-str digit limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def _range(check: Check) -> str:
    lo = f"({_number(check.gt)}" if check.gt is not None else f"[{_number(check.ge)}" if check.ge is not None else None
    hi = f"{_number(check.lt)})" if check.lt is not None else f"{_number(check.le)}]" if check.le is not None else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1:]}"
    if hi:
        return f" {'<' if hi[-1] == ')' else '<='} {hi[:-1]}"
    return ""


def _in_range(x: float, check: Check) -> bool:
    return ((check.gt is None or x > check.gt) and (check.ge is None or x >= check.ge)
            and (check.lt is None or x < check.lt) and (check.le is None or x <= check.le))


class _Refused(Exception):
    """Internal: a value failed its check; `check_value` turns it into one CifarbenchError line."""

    def __init__(self, expected: str):
        self.expected = expected


def _as_int(value: Any, check: Check) -> int:
    # bool is an int to Python but never a count here; floats are refused too, even 3.0: an epoch count or
    # a seed written as 1.5 is a mistake, and 3.0 gains nothing over 3.
    expected = f"an integer{_range(check)}"
    if isinstance(value, bool):
        raise _Refused(expected)
    try:
        value = operator.index(value)  # numpy integers become plain ints (config.json holds plain values)
    except TypeError:
        raise _Refused(expected) from None
    if not _in_range(value, check):
        raise _Refused(expected)
    return value


def _as_float(value: Any, check: Check) -> float:
    expected = f"a finite number{_range(check)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Refused(expected)
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise _Refused(expected) from None
    if not math.isfinite(value) or not _in_range(value, check):
        raise _Refused(expected)
    return value


def _as_str(value: Any, check: Check) -> str:
    lo, hi = check.length or (0, 4096)
    if check.choices is not None:
        expected = f"one of: {', '.join(check.choices)}"
    else:
        expected = check.shown or f"a string of {lo} to {hi} characters without NUL"
    if not isinstance(value, str) or not lo <= len(value) <= hi or "\0" in value:
        raise _Refused(expected)
    if check.pattern is not None:
        ok = re.fullmatch(check.pattern, value) is not None
    else:
        ok = check.choices is None or value in check.choices
    if not ok:
        raise _Refused(expected)
    return value


JSON_PLAIN = (f"JSON-plain (string keys; finite numbers, integers within +-2**53, strings, lists, objects; at most "
              f"{MAX_JSON_DEPTH} levels deep and {MAX_JSON_ITEMS} items each)")


def _as_json(value: Any, depth: int = 0) -> Any:
    """A JSON-plain copy of `value` (tuples become lists); _Refused when it is not JSON-plain or too big."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > 4096:
            raise _Refused(JSON_PLAIN)
        return value
    if isinstance(value, numbers.Integral):
        if abs(int(value)) > MAX_JSON_INT:
            raise _Refused(JSON_PLAIN)
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise _Refused(JSON_PLAIN)
        return float(value)
    if depth >= MAX_JSON_DEPTH or not isinstance(value, (list, tuple, dict)) or len(value) > MAX_JSON_ITEMS:
        raise _Refused(JSON_PLAIN)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise _Refused(JSON_PLAIN)
        return {k: _as_json(v, depth + 1) for k, v in value.items()}
    return [_as_json(v, depth + 1) for v in value]


def _as_model_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Refused(f"an object, {JSON_PLAIN}")
    try:
        return _as_json(value)
    except _Refused:
        raise _Refused(f"an object, {JSON_PLAIN}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(hint: Any, value: Any, check: Check, name: str) -> Any:
    """`value` checked against the type `hint` and `check`, normalised (ints, floats, tuples of floats, JSON
    copies); a CifarbenchError naming the field by `name` (its dotted name) otherwise."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        return _as_type(hint, value, check)
    except _Refused as refused:
        expected = f"null or {refused.expected}" if optional else refused.expected
        if check.choices is not None:
            choices = ", ".join(check.choices)
            raise CifarbenchError(f"unknown {name} {shown_value(value)}; choose one of: {choices}") from None
        raise CifarbenchError(f"{name} must be {expected} (got {shown_value(value)})") from None


def _as_type(hint: Any, value: Any, check: Check) -> Any:
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        if not isinstance(value, bool):
            raise _Refused("true or false")
        return value
    if hint is int:
        return _as_int(value, check)
    if hint is float:
        return _as_float(value, check)
    if hint is str:
        return _as_str(value, check)
    if origin is dict:
        return _as_model_kwargs(value)
    if origin is tuple:  # tuple[float, ...]: every item checked like a float field
        lo, hi = check.length or (0, MAX_JSON_ITEMS)
        expected = f"a list of {lo} to {hi} finite numbers{_range(check)}"
        if not isinstance(value, (list, tuple)) or not lo <= len(value) <= hi:
            raise _Refused(expected)
        try:
            return tuple(_as_float(v, check) for v in value)
        except _Refused:
            raise _Refused(expected) from None
    if is_dataclass(hint):
        if not isinstance(value, hint):
            raise _Refused(f"a {hint.__name__}")
        return value
    raise TypeError(f"no check for fields of type {hint!r}")  # a programming error: declare a check for it


def check_field(cls: type, name: str, value: Any) -> Any:
    """`value` checked and normalised as field `name` of the config dataclass `cls` (e.g. a recipe override
    before the recipe computes with it); errors name it as `check_fields` does."""
    prefix = f"{cls.section}." if getattr(cls, "section", "") else ""
    spec = {f.name: f for f in fields(cls)}.get(name)
    if spec is None:
        raise CifarbenchError(f"unknown config field {prefix + name!r}")
    return check_value(_hints(cls)[name], value, spec.metadata.get("check", Check()), prefix + name)


def check_fields(config: Any) -> None:
    """Check and normalise every field of a config dataclass, in place, from its type hints and `Check`s.

    Errors name a field as `<section>.<field>`, the section being the class's `section` (e.g. optimizer.lr)."""
    for f in fields(config):
        object.__setattr__(config, f.name, check_field(type(config), f.name, getattr(config, f.name)))


@dataclass(kw_only=True)
class DataConfig:
    section: ClassVar[str] = "data"
    dataset: str = setting("cifar10", choices=DATASETS)
    """Registered data set name."""
    data_dir: str | None = setting(None, length=(0, 4096))
    """Folder holding the data; None means $CIFARBENCH_DATA, then ./data."""
    verify: bool = True
    """Refuse files whose md5 is not the official one. False accepts other copies (and is recorded)."""
    download: bool = True
    """Fetch the official archive when no local copy is found."""
    mean: tuple[float, ...] = setting((0.5, 0.5, 0.5), length=(1, 4))
    """Per-channel mean subtracted after scaling pixels to [0, 1] (the notebook's Normalize(0.5, 0.5))."""
    std: tuple[float, ...] = setting((0.5, 0.5, 0.5), gt=0, length=(1, 4))
    """Per-channel std divided by; with mean 0.5 this maps pixels to [-1, 1]."""
    permute_pixels: int | None = setting(None, ge=0, le=MAX_SEED)
    """Seed of one fixed random permutation of the pixel positions applied to every train and test image (the
    permuted-pixels experiment); None leaves the images as they are."""

    def for_loading(self, *, foreign: bool, data_dir: str | None = None, verify: bool | None = None,
                    download: bool | None = None) -> DataConfig:
        """This config with where its data is read from now: the caller's `data_dir`, `verify` and `download`
        where given, else the config's own; for a config from elsewhere (an imported or copied run), the local
        defaults instead, since its settings are provenance and never choose a local folder, a download or an
        unverified copy."""
        base = DataConfig() if foreign else self
        return replace(self, data_dir=data_dir or base.data_dir, verify=base.verify if verify is None else verify,
                       download=base.download if download is None else download)

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.mean) != len(self.std):
            raise CifarbenchError(f"data.mean {self.mean} and data.std {self.std} must have one entry per channel each")


@dataclass(kw_only=True)
class OptimizerConfig:
    section: ClassVar[str] = "optimizer"
    name: str = setting("sgd", choices=OPTIMIZERS)
    """sgd (plain or Nesterov, as the notebook and airbench94); muon: convolution filters take Muon steps
    (orthogonalised momentum, `muon_lr`, `muon_momentum`) and all other parameters the SGD settings below; adam
    or adamw (torch's, with `beta1`, `beta2`; adamw's weight decay is decoupled from the gradient)."""
    lr: float = setting(0.01, gt=0, le=1e4)
    """Learning rate per step (the notebook's 1e-2)."""
    momentum: float = setting(0.0, ge=0, lt=1)
    weight_decay: float = setting(0.0, ge=0, le=1)
    nesterov: bool = False
    bias_lr_scale: float = setting(1.0, gt=0, le=1e4)
    """BatchNorm biases train with lr x this (and weight decay / this, so their decay stays the same)."""
    muon_lr: float = setting(0.24, gt=0, le=1e4)
    """With muon: step size of the filters, whose norm is held fixed, so this sets the angle they turn per step
    (airbench94_muon's 0.24 at batch 2000)."""
    muon_momentum: float = setting(0.6, ge=0, lt=1)
    beta1: float = setting(0.9, ge=0, lt=1)
    """adam/adamw: decay of the gradient's running mean."""
    beta2: float = setting(0.999, ge=0, lt=1)
    """adam/adamw: decay of the squared gradient's running mean."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.nesterov and self.momentum == 0 and self.name in ("sgd", "muon"):
            raise CifarbenchError("optimizer.nesterov needs optimizer.momentum > 0")


@dataclass
class AugmentConfig:
    section: ClassVar[str] = "augment"
    flip: bool = False
    """Random horizontal flips."""
    alternate_flip: bool = True
    """With flip: each image is flipped at random once, then every other epoch all are mirrored, so each image is
    seen both ways in consecutive epochs (more diverse than an independent coin per epoch)."""
    translate: int = setting(0, ge=0, le=8)
    """Random translation of up to this many pixels (reflect padding), drawn per image and epoch; at most 8,
    a quarter of a 32-pixel image."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ScheduleConfig:
    section: ClassVar[str] = "schedule"
    kind: str = setting("constant", choices=SCHEDULES)
    """constant, or triangle: linear from `start` up to 1 at `peak`, then linear down to `end` (x the base lr)."""
    start: float = setting(0.2, ge=0, le=10)
    peak: float = setting(0.23, ge=0, le=1)
    """Fraction of training at which the learning rate peaks."""
    end: float = setting(0.07, ge=0, le=10)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LookaheadConfig:
    section: ClassVar[str] = "lookahead"
    enabled: bool = False
    """Keep an exponential moving average of the weights and copy it back into the model (lookahead)."""
    start: float = setting(0.3, ge=0, le=1)
    """Fraction of training after which averaging starts."""
    every: int = setting(5, ge=1, le=10_000)
    """Steps between averaging updates."""
    decay_base: float = setting(0.95, ge=0, le=1)
    """Per-step decay; warmed up as decay_base**every * progress**decay_pow, so it averages strongly at the end."""
    decay_pow: float = setting(3.0, ge=0)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainConfig:
    model: str = setting(pattern=MODEL_REF, shown="a registered model's name, or file.py:Name / module:Name")
    """A registered model's name (`cifarbench models` lists them), or a reference to your own: `path/to/file.py:Name`
    or `package.module:Name`, Name an nn.Module subclass or a function that returns one."""
    _: KW_ONLY  # the model may be given by position; every other field by name
    model_sha256: str | None = setting(None, pattern=r"[0-9a-f]{64}", shown="a sha256 in hex")
    """For your own model: the sha256 of its source, whose copy is the run folder's model.py (None for registered
    models, whose code is the cifarbench version's)."""
    recipe: str = setting("seed", pattern=NAME, shown="a name of letters, digits and _.+- (up to 64 characters)")
    """The named recipe these settings came from."""
    epochs: int = setting(10, ge=1, le=10_000)
    """Passes over the training set."""
    batch_size: int = setting(100, ge=1, le=1_000_000)
    """Examples per optimiser step."""
    seed: int = setting(0, ge=0, le=MAX_SEED)
    """Seeds the weight init and the data order; the same seed on the same device reproduces a run."""
    device: str = setting("auto", pattern=r"auto|cpu|mps|cuda(:[0-9]{1,4})?", choices=(*DEVICES, "cuda:N"))
    """auto picks cuda, then mps, then cpu."""
    precision: str = setting("fp32", choices=PRECISIONS)
    """fp32, bf16 autocast (much faster for conv nets on CPUs with native bf16, many times slower on AVX2 alone;
    slightly different numbers; see docs/cpu-performance.md#bf16-and-channels-last), or auto: bf16 on CUDA (no loss
    scaling needed, unlike fp16); on a CPU what measures fastest at a budgeted run's start (written back here), or
    without that probe bf16 only where the CPU has it natively; fp32 elsewhere."""
    channels_last: bool = True
    """NHWC memory layout: same arithmetic, faster convolutions on CPU and GPU."""
    eval_batch_size: int = setting(1000, ge=1, le=1_000_000)
    """Examples per evaluation forward pass; does not change results, only speed (the fast recipe uses 2000 on a
    GPU and 256 on a CPU, where small batches stay in cache)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the model factory, e.g. {"widths": [64, 256, 256]} for speedrun."""
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    drop_last: bool = False
    """Skip the last partial batch of an epoch (keeps BatchNorm statistics and step sizes uniform)."""
    whiten: bool = False
    """Initialise a model's patch-whitening layer from training-set patch covariance (models that have one)."""
    whiten_bias_fraction: float = setting(0.3, ge=0, le=1)
    """The whitening layer's bias trains for this fraction of training, then freezes."""
    low_res: int = setting(0, ge=0, le=4096)
    """Progressive resizing: the first `low_res_fraction` of the steps train on images scaled down to this
    side (cheaper steps, so a budget holds more of them); 0 = off. Evaluation is always at full size.
    Off in the recipes: the extra epochs bought no validation accuracy (docs/cpu-performance.md#what-did-not-help)."""
    low_res_fraction: float = setting(0.5, ge=0, le=1)
    tta: int = setting(0, ge=0, le=2)
    """Test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-pixel translations."""
    tta_threshold: float = setting(0.0, ge=0, le=1)
    """Selective TTA: when > 0, an image whose plain view gives its top class at least this probability keeps
    the plain prediction, and only the others get the extra views (0 = every image gets them)."""
    budget_seconds: float | None = setting(None, gt=0, le=MAX_BUDGET_SECONDS)
    """Wall-clock budget for training plus the final evaluation; the schedule length is fitted to it."""
    budget_shape: str = setting("fixed", choices=("fixed", "compute"))
    """With a budget: "compute" re-picks speedrun's CPU shape (widths, batch, activation) at the run's start from
    the compute the budget buys on this machine (training.shape, recipes.shape_by_compute); "fixed" keeps it."""
    eval_every_epoch: bool = True
    """Evaluate after every epoch (learning curves). Budgeted runs turn it off to spend the time on training."""
    val_split: int = setting(0, ge=0, le=1_000_000)
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
        check_fields(self)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON- and weights_only-safe)."""
        return asdict(self)

    def field_names(self) -> list[str]:
        """Every name `with_changes` takes, dotted: `epochs`, `optimizer.lr`, `model_kwargs.NAME` for each argument."""
        names = []
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                names += [f"{f.name}.{g.name}" for g in fields(value)]
            else:
                names.append(f.name)
        return names + [f"model_kwargs.{k}" for k in self.model_kwargs]

    def with_changes(self, changes: dict) -> TrainConfig:
        """A copy with fields set by dotted name, e.g. {"optimizer.lr": 0.5, "tta": 0} (what `--set` passes);
        "model_kwargs.act" sets one key of the model's arguments. Each change is validated like the field's own
        default, and a refusal names the field; an unknown name is an error, since a typo that changed nothing
        would otherwise pass for an experiment (a model argument's meaning is checked when the model is built)."""
        config = self
        sections: dict[str, dict[str, Any]] = {}  # one section's changes go in together: data.mean with data.std
        for key, value in changes.items():
            if not isinstance(key, str):
                raise CifarbenchError(f"config field names are strings, not {shown_value(key)}")
            part, _, name = key.rpartition(".")
            if part == "model_kwargs":
                try:
                    value = _as_json(value, depth=1)
                except _Refused as refused:
                    raise CifarbenchError(f"{key} must be {refused.expected} (got {shown_value(value)})") from None
                top = sections.setdefault("", {})
                kwargs = top.get("model_kwargs", config.model_kwargs)
                if not isinstance(kwargs, dict):
                    raise CifarbenchError(f"model_kwargs must be an object to set {key} in it "
                                          f"(got {shown_value(kwargs)})")
                top["model_kwargs"] = {**kwargs, name: value}
                continue
            target = getattr(config, part, None) if part else config
            if not is_dataclass(target) or name not in {f.name for f in fields(target)}:
                close = difflib.get_close_matches(key, config.field_names(), n=1, cutoff=0.6)
                raise CifarbenchError(f"unknown config field {key!r}"
                                      + (f"; did you mean {close[0]}?" if close else
                                         " (the fields are in src/cifarbench/config.py)"))
            sections.setdefault(part, {})[name] = value
        for part, values in sections.items():  # each section's __post_init__ refuses a bad value, naming it
            if part:
                config = replace(config, **{part: replace(getattr(config, part), **values)})
            else:
                config = replace(config, **values)
        return config

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are ignored so older runs still load. The values are checked like
        any config's, so a tampered file is refused with the field's name."""
        nested = {"data": DataConfig, "optimizer": OptimizerConfig, "augment": AugmentConfig,
                  "schedule": ScheduleConfig, "lookahead": LookaheadConfig}
        if not isinstance(d, dict):
            raise CifarbenchError(f"a stored config must be an object, not {shown_value(d)}")
        kwargs = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)} and k not in nested}
        if "model" not in kwargs:
            raise CifarbenchError("a stored config names no model")
        for name, kind in nested.items():
            section = d.get(name, {})
            if not isinstance(section, dict):
                raise CifarbenchError(f"{name} must be an object in a stored config, not {shown_value(section)}")
            known = {f.name for f in fields(kind)}
            kwargs[name] = kind(**{k: v for k, v in section.items() if k in known})
        return cls(**kwargs)


def parse_changes(items: list[str]) -> dict:
    """`--set` arguments, FIELD=VALUE, as a dict for `TrainConfig.with_changes`. VALUE is read as JSON (0.5, true,
    [64,256,256]); anything that is not JSON is taken as a string (muon). JSON's NaN and Infinity, which Python's
    reader accepts, are refused: no config value may be one."""
    changes = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise CifarbenchError(f"--set {shown_value(item)}: expected FIELD=VALUE, e.g. optimizer.lr=0.5")

        def refuse(constant: str, key: str = key, text: str = text) -> None:
            raise CifarbenchError(f"--set {key}={text[:40]}: {constant} is not a finite number")

        try:
            changes[key] = json.loads(text, parse_constant=refuse)
        except RecursionError:
            raise CifarbenchError(f"--set {key}: the value is nested too deeply") from None
        except ValueError:
            changes[key] = text
    return changes
