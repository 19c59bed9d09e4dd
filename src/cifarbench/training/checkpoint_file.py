"""Checkpoint files: plain tensors and values only, written atomically, read with weights_only=True.

A save writes `.NAME.PID.RANDOM.tmp` beside the checkpoint, fsyncs it and renames it over NAME, so NAME is
always a whole checkpoint (the previous one or the new one). A writer killed mid-save leaves its temp file;
the next save of the same checkpoint removes the temps of writers that no longer exist. Loading never
deletes anything: a reader (`cifarbench eval` of a run still training) may run beside a live writer.

Reading is bounded before anything is inflated: the file must be a regular file under MAX_BYTES, a zip
archive whose members declare at most MAX_INFLATED bytes in all at a sane compression ratio. What it holds is
checked against the schema by its owner, `training.state` (`training.checkpoint.load_checkpoint` does both).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

from cifarbench.errors import CifarbenchError, Keyword
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
        todo = "free space on the disk holding {folder}, or point {runs_dir} / $CIFARBENCH_HOME at another disk, " \
               "then train again"
    else:
        why = exc.strerror or str(exc) or type(exc).__name__
        todo = "check that {folder} is writable"
    return CifarbenchError("cannot write checkpoint {path}: {why} ({code}); " + todo + "; the previous checkpoint, if "
                           "any, is unchanged", path=path, why=why, code=errno.errorcode.get(exc.errno or 0, "OSError"),
                           folder=path.parent, runs_dir=Keyword("runs_dir", ...))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file without executing anything from it (weights_only=True, no extra allow-list),
    refusing before inflating anything a file that is not a bounded zip archive; its content is not yet checked."""
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
    return payload
