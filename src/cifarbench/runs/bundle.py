"""Runs that travel: one archive holds runs (checkpoint, config, metrics, history, model code, provenance), and
importing it brings them into another runs folder under their own ids, marked as imported.

The archive is a `.tar.gz` with a `manifest.json` (the runs' records and each file's sha256) and one folder per
run. Import reads it member by member (expected names and regular files only, sizes capped), checks every file
against the manifest, and never executes anything: model code that arrives this way runs only with consent
(`--trust-code`), like any code from elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import atomic_write, file_digest
from cifarbench.provenance import environment
from cifarbench.runs import folders
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore

FORMAT = "cifarbench-runs-v1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MEMBER_BYTES = 1 << 30
BUNDLE_FILES = (folders.CONFIG, folders.CHECKPOINT, folders.METRICS, folders.MODEL_CODE, folders.EXPERIMENTS)


@dataclass
class Bundle:
    """What an archive holds: its runs' records, who made it, and (for a classroom submission) the student."""

    runs: list[RunRecord]
    files: dict[str, dict[str, str]]
    """run id -> file name -> sha256."""
    student: str | None = None
    created: float = 0.0
    environment: dict[str, str] = field(default_factory=dict)

    def to_manifest(self) -> dict:
        return {"format": FORMAT, "created": self.created, "student": self.student, "environment": self.environment,
                "runs": [{"record": r.to_dict(), "files": self.files[r.run_id]} for r in self.runs]}

    @classmethod
    def from_manifest(cls, data: object, source: str) -> Bundle:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("runs"), list):
            raise CifarbenchError(f"{source}: not a cifarbench runs archive (no {FORMAT} manifest)")
        runs, files = [], {}
        for entry in data["runs"]:
            try:
                record = RunRecord.from_dict(entry["record"])
                names = dict(entry["files"])
                if not all(isinstance(getattr(record, k), dict) for k in ("config", "dataset")) or not isinstance(
                        record.run_id, str):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise CifarbenchError(f"{source}: its manifest lists a run it does not describe") from None
            folders.check_run_id(record.run_id)
            if (not set(names) <= set(BUNDLE_FILES) or not {folders.CHECKPOINT, folders.CONFIG} <= set(names)
                    or record.run_id in files):
                raise CifarbenchError(f"{source}: run {record.run_id} lists unexpected or missing files")
            runs.append(record)
            files[record.run_id] = {str(k): str(v) for k, v in names.items()}
        student = data.get("student")
        return cls(runs, files, student if isinstance(student, str) else None, float(data.get("created") or 0),
                   {k: str(v) for k, v in (data.get("environment") or {}).items()})


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256", max_bytes=MAX_MEMBER_BYTES, what="run file", error=CifarbenchError)


def export_runs(refs: Sequence[str], out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                student: str | None = None) -> Path:
    """Write the runs named by `refs` (ids or unique prefixes) into one archive at `out`."""
    records = stored_runs(refs, runs_dir=runs_dir)
    files: dict[str, dict[str, str]] = {}
    for record in records:
        folder = Path(record.run_dir)
        if record.status != "completed":
            raise CifarbenchError(f"run {record.run_id} is {record.status}; only completed runs can be exported")
        present = [n for n in BUNDLE_FILES if (folder / n).is_file() and not (folder / n).is_symlink()]
        if folders.CHECKPOINT not in present:
            raise CifarbenchError(f"run {record.run_id} has no checkpoint in {folder}")
        files[record.run_id] = {n: _sha256(folder / n) for n in present}
        metrics = folder / folders.METRICS
        if metrics.is_file():  # the full record: per-class results and compute too
            try:
                full = RunRecord.from_dict(json.loads(metrics.read_text()))
                full.status, full.origin = record.status, record.origin
                records[records.index(record)] = full
            except (ValueError, TypeError, OSError):
                pass
    bundle = Bundle(records, files, student, time.time(), environment())
    manifest = json.dumps(bundle.to_manifest(), indent=2).encode()

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(manifest))
            for record in records:
                for name in files[record.run_id]:
                    path = folders.run_folder(runs_dir, record.run_id) / name
                    info = tarfile.TarInfo(f"{record.run_id}/{name}")
                    info.size, info.mtime, info.mode = path.stat().st_size, int(path.stat().st_mtime), 0o644
                    with open(path, "rb") as src:
                        tar.addfile(info, src)

    return atomic_write(out, write)


def read_bundle(archive: str | os.PathLike) -> Bundle:
    """The manifest of an archive, read without extracting anything."""
    archive = Path(archive)
    if not archive.is_file():
        raise CifarbenchError(f"{archive} does not exist or is not a file")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
                raise CifarbenchError(f"{archive}: its manifest is not a plain file of at most 16 MiB")
            data = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    except KeyError:
        raise CifarbenchError(f"{archive}: not a cifarbench runs archive (no {MANIFEST})") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise CifarbenchError(f"{archive}: not a readable runs archive ({type(exc).__name__})") from None
    return Bundle.from_manifest(data, str(archive))


@dataclass
class Imported:
    imported: list[RunRecord]
    skipped: list[tuple[str, str]]
    """(run id, why) for runs not imported, e.g. already in this store."""
    student: str | None = None

    def to_dict(self) -> dict:
        return {"imported": [r.run_id for r in self.imported], "skipped": [list(s) for s in self.skipped],
                "student": self.student}


def import_runs(archive: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None) -> Imported:
    """Bring an archive's runs into the runs folder under their own ids, marked as imported (their model code
    then runs only with consent). Runs already in the store are skipped, never overwritten."""
    from cifarbench.data.download import safe_extract_tar

    bundle = read_bundle(archive)
    root = folders.resolve_runs_dir(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    allowed = [MANIFEST, *(f"{r.run_id}/{n}" for r in bundle.runs for n in bundle.files[r.run_id])]
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    result = Imported([], [], bundle.student)
    try:
        safe_extract_tar(Path(archive), staging, allowed, max_member_bytes=MAX_MEMBER_BYTES)
        with RunStore(runs_dir) as store:
            for record in bundle.runs:
                why = _import_one(record, bundle.files[record.run_id], staging, runs_dir, store)
                if why:
                    result.skipped.append((record.run_id, why))
                else:
                    result.imported.append(record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _import_one(record: RunRecord, files: dict[str, str], staging: Path, runs_dir, store: RunStore) -> str | None:
    """Move one extracted run into place and record it; the reason it was skipped, or None."""
    source = staging / record.run_id
    for name, sha in files.items():
        if not (source / name).is_file() or _sha256(source / name) != sha:
            return f"{name} does not match the manifest"
    target = folders.run_folder(runs_dir, record.run_id)
    try:
        store.get_run(record.run_id)
        return "already in this store"
    except CifarbenchError:
        pass
    if target.exists() or target.is_symlink():
        return f"{target} already exists"
    try:
        named = json.loads((source / folders.CONFIG).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        named = None
    if named != record.run_id:
        return f"its {folders.CONFIG} does not name the run"
    os.replace(source, target)
    record.origin, record.run_dir = "imported", str(target)
    try:
        store.start_run(record, model_sha256=record.config.get("model_sha256"))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return None
