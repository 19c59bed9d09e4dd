"""Checkpoints: plain tensors and values only, written atomically, read with weights_only=True.

A save writes `.NAME.PID.RANDOM.tmp` beside the checkpoint, fsyncs it and renames it over NAME, so NAME is
always a whole checkpoint (the previous one or the new one). A writer killed mid-save leaves its temp file;
the next save of the same checkpoint removes the temps of writers that no longer exist. Loading never
deletes anything: a reader (`cifarbench eval` of a run still training) may run beside a live writer.

Loading is bounded before anything is inflated: the file must be a regular file under MAX_BYTES, a zip
archive whose members declare at most MAX_INFLATED bytes in all at a sane compression ratio, and what it
holds must have every key the consumers read, of the right type (`validate_checkpoint`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import MiB, atomic_write, check_zip_archive, open_regular_file, pid_alive

FORMAT = "cifarbench-checkpoint-v1"
MAX_BYTES = 2048 * MiB
"""The largest checkpoint file read (the models here save a few MiB; a ResNet-50 with its optimiser ~300 MiB)."""
MAX_INFLATED = 4096 * MiB
"""The most its members may declare once inflated (torch.save stores tensors uncompressed, so ~ the file size)."""
MAX_MEMBERS = 100_000


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _writer_pid(temp: Path, path: Path) -> int | None:
    match = re.fullmatch(re.escape(_temp_prefix(path)) + r"(\d+)\..+\.tmp", temp.name)
    return int(match.group(1)) if match else None


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed writers of `path` left behind; return them.

    Only temps named with a pid that is no longer running (on this host) are removed, never a live
    writer's; a temp of the old unnamed-pid form is left alone.
    """
    path = Path(path)
    removed = []
    for temp in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        pid = _writer_pid(temp, path)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            temp.unlink()
            removed.append(temp)
        except OSError:
            pass  # gone already, or not ours to remove: the save itself does not depend on it
    return removed


def _os_error(exc: BaseException) -> OSError | None:
    # torch.save reports a failed write of the file object as a RuntimeError whose context is the OSError.
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename over."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        # The pid in the temp's name is what lets `remove_stale_temps` tell a dead writer's temp from a live one's.
        atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f),
                     prefix=f"{_temp_prefix(path)}{os.getpid()}.")
    except BaseException as exc:
        cause = _os_error(exc)
        if cause is not None:
            raise _write_error(path, cause) from None
        raise
    return path


def _write_error(path: Path, exc: OSError) -> CifarbenchError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is exceeded"
        todo = (f"free space on the disk holding {path.parent}, or point --runs-dir / $CIFARBENCH_HOME at "
                "another disk, then train again")
    else:
        why = exc.strerror or str(exc) or type(exc).__name__
        todo = f"check that {path.parent} is writable"
    return CifarbenchError(f"cannot write checkpoint {path}: {why} ({errno.errorcode.get(exc.errno or 0, 'OSError')}); "
                           f"{todo}; the previous checkpoint, if any, is unchanged")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint without executing anything from it (weights_only=True, no extra
    allow-list), refusing before inflating anything a file that is not a bounded zip archive."""
    path = Path(path)
    with open_regular_file(path, MAX_BYTES, "checkpoint", error=CifarbenchError) as f:
        check_zip_archive(f, path, max_inflated=MAX_INFLATED, max_members=MAX_MEMBERS, what="cifarbench checkpoint",
                          error=CifarbenchError)
        try:
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # pickle refusals, truncation and zip errors all land here
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            # torch's refusal is a long essay; the line naming the refused global is the one that matters.
            reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
            raise CifarbenchError(f"{path}: not a loadable cifarbench checkpoint ({reason[:200]})") from None
    return validate_checkpoint(payload, path)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v)


def _in_shape(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(n) and n > 0 for n in v)


def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _plain_record(v: Any, cls: type, required: set[str]) -> bool:
    """A dict of a dataclass's plain fields (numbers, bools, None), as LoopPosition and EpochMetrics save."""
    names = {f.name for f in fields(cls)}
    required = required | {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    return (isinstance(v, dict) and set(v) <= names and required <= set(v)
            and all(x is None or isinstance(x, (int, float)) for x in v.values()))


def _resume_checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
    from cifarbench.training.loop import EpochMetrics, LoopPosition  # the loop owns these schemas

    return {
        "position": (lambda v: _plain_record(v, LoopPosition, {"step", "total_steps", "in_epoch"})
                     and _is_int(v["step"]) and _is_int(v["total_steps"]), "the loop's position record"),
        "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                      and isinstance(v.get("param_groups"), list), "an optimizer state dict"),
        "history": (lambda v: isinstance(v, list) and all(_plain_record(h, EpochMetrics, set()) for h in v),
                    "a list of epoch metrics"),
        "lookahead": (lambda v: v is None or _tensor_dict(v), "None or a dict of tensors"),
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
    "classes": (_str_list, "a non-empty list of strings"),
    "in_shape": (_in_shape, "a list of 3 positive integers"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
    "dataset": (lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str), "a dict with a string sha256"),
    "state_dict": (_tensor_dict, "a dict of tensors"),
}


def validate_checkpoint(payload: Any, path: str | os.PathLike) -> dict[str, Any]:
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
