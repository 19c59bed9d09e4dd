"""Wide records are built by name: reordering a field can never silently misread a stored run."""
import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import cifarbench
from cifarbench.config import TrainConfig
from cifarbench.runs.records import RunRecord

WIDE = 6  # init fields from which a record must be keyword-only


def _dataclasses() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(cifarbench.__path__, "cifarbench."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found += [obj for obj in vars(module).values()
                  if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == info.name]
    return found


def test_every_wide_record_is_keyword_only() -> None:
    classes = _dataclasses()
    assert RunRecord in classes and len(classes) > 20  # the walk really reached the records
    positional = {}
    for cls in classes:
        init = [f for f in dataclasses.fields(cls) if f.init]
        # At most one leading field by position (TrainConfig's model: `TrainConfig("cnn")`).
        loose = [f.name for f in init[1:] if not f.kw_only]
        if len(init) >= WIDE and loose:
            positional[cls.__qualname__] = loose
    assert not positional, f"wide records taking fields by position: {positional}"


def test_a_record_given_fields_by_position_is_refused() -> None:
    with pytest.raises(TypeError):
        RunRecord("r", "cnn", "seed", 0, 1)  # type: ignore[misc]
    assert TrainConfig("cnn", epochs=2).model == "cnn"
    with pytest.raises(TypeError):
        TrainConfig("cnn", None)  # type: ignore[misc]
