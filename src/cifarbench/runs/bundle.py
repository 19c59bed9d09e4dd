"""Runs that travel: one archive holds runs (checkpoint, config, metrics, history, model code, provenance), and
importing it brings them into another runs folder under their own ids, marked as imported.

The archive is a `.tar.gz` with a `manifest.json` (the runs' records and each file's sha256) and one folder per
run. Import reads it member by member (expected names and regular files only, sizes capped), checks every file
against the manifest, and never executes anything: model code that arrives this way runs only with consent
(`--trust-code`), like any code from elsewhere.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.fsutil import atomic_write, file_digest
from cifarbench.provenance import environment
from cifarbench.runs import folders
from cifarbench.runs.catalog import stored_runs
from cifarbench.runs.limits import BundleLimits
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore

FORMAT = "cifarbench-runs-v1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MEMBER_BYTES = 1 << 30
"""What export hashes of one run file (its own runs; what it reads from elsewhere is capped by BundleLimits)."""
BUNDLE_FILES = (folders.CONFIG, folders.CHECKPOINT, folders.METRICS, folders.MODEL_CODE, folders.EXPERIMENTS,
                folders.PREDICTIONS)


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
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):
                raise CifarbenchError(f"{source}: its manifest lists a run it does not describe") from None
            folders.check_run_id(record.run_id)
            if (not set(names) <= set(BUNDLE_FILES) or not {folders.CHECKPOINT, folders.CONFIG} <= set(names)
                    or record.run_id in files):
                raise CifarbenchError(f"{source}: run {record.run_id} lists unexpected or missing files")
            runs.append(record)
            files[record.run_id] = {str(k): str(v) for k, v in names.items()}
        student, created, environment = data.get("student"), data.get("created"), data.get("environment")
        # Provenance only: what is not of the expected type is dropped, never an error.
        created = float(created) if isinstance(created, int | float) and abs(created) < 1e12 else 0.0
        environment = {str(k): str(v)[:1000] for k, v in environment.items()} if isinstance(environment, dict) else {}
        return cls(runs, files, student if isinstance(student, str) else None, created, environment)


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


_MAX_HEADER_BYTES = 1 << 20
"""A pax or GNU long-name header is read into memory whole: anything larger is no header we wrote."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads extended headers whole before it yields the member they describe; refuse a huge one first."""

    def _proc_member(self, tarfile_):  # noqa: ANN001 - tarfile's own hook
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > _MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)


class _Inflated:
    """The decompressed stream, refused once it passes `cap` bytes: bounds the time and memory a gzip bomb can
    cost, whatever the tar headers say."""

    def __init__(self, raw, cap: int, source: str) -> None:
        self.raw, self.cap, self.count, self.source = raw, cap, 0, source

    def read(self, n: int = -1) -> bytes:
        room = self.cap - self.count + 1
        data = self.raw.read(room if n is None or n < 0 else min(n, room))
        self.count += len(data)
        if self.count > self.cap:
            raise CifarbenchError("{source}: inflates to more than {mib} MiB; refused ({option} raises the cap)",
                                  source=self.source, mib=self.cap >> 20, option=Keyword("bundle_limits.max_bytes"))
        return data


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


@contextmanager
def _members(archive: Path, limits: BundleLimits):
    """The archive's members, one streaming pass (tar inside gzip), with the inflated size capped."""
    from cifarbench.fsutil import open_regular_file

    with open_regular_file(archive, limits.max_bytes + MAX_MANIFEST_BYTES, "runs archive",
                           error=CifarbenchError) as raw:
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as inflated:
                cap = limits.max_bytes + MAX_MANIFEST_BYTES + 1024 * limits.max_members + (1 << 20)
                with tarfile.open(fileobj=_Inflated(inflated, cap, str(archive)), mode="r|",
                                  tarinfo=_BoundedTarInfo) as tar:
                    yield tar
        except CifarbenchError:
            raise
        except (*_READ_ERRORS, RecursionError) as exc:  # RecursionError: a chain of extended headers
            raise CifarbenchError(f"{archive}: not a readable runs archive ({type(exc).__name__}: "
                                  f"{_line(exc)})") from None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _manifest(tar: tarfile.TarFile, archive: Path, limits: BundleLimits) -> Bundle:
    """The first member, which export always writes first: the manifest, parsed and checked against the limits."""
    member = tar.next()
    if member is None or member.name != MANIFEST:
        raise CifarbenchError(f"{archive}: not a cifarbench runs archive (its first member is not {MANIFEST})")
    if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
        raise CifarbenchError(f"{archive}: its manifest is not a plain file of at most 16 MiB")
    try:
        data = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (ValueError, RecursionError):
        raise CifarbenchError(f"{archive}: its manifest is not JSON") from None
    if isinstance(data, dict) and isinstance(data.get("runs"), list) and len(data["runs"]) > limits.max_runs:
        raise CifarbenchError("{archive}: holds {n} runs, more than {most} ({option} raises the cap)", archive=archive,
                              n=len(data["runs"]), most=limits.max_runs, option=Keyword("bundle_limits.max_runs"))
    return Bundle.from_manifest(data, str(archive))


def read_bundle(archive: str | os.PathLike, limits: BundleLimits | None = None) -> Bundle:
    """The manifest of an archive, read without extracting anything (only the first member is inflated)."""
    archive = Path(archive)
    if not archive.is_file():
        raise CifarbenchError(f"{archive} does not exist or is not a file")
    with _members(archive, limits or BundleLimits()) as tar:
        return _manifest(tar, archive, limits or BundleLimits())


def extract_bundle(archive: str | os.PathLike, staging: Path, limits: BundleLimits | None = None
                   ) -> tuple[Bundle, dict[str, dict[str, str]]]:
    """Read an archive in one streaming pass: the manifest, then each run file it lists, written under
    `staging/RUN_ID/NAME` and hashed as it is written. Anything else in the archive (another name, a link, a
    device, a second copy of a member), or a cap of `limits` passed, refuses the whole archive before more is
    inflated. Returns the manifest and the sha256 of each file written (run id -> name -> sha256)."""
    archive, limits = Path(archive), limits or BundleLimits()
    if not archive.is_file():
        raise CifarbenchError(f"{archive} does not exist or is not a file")
    with _members(archive, limits) as tar:
        bundle = _manifest(tar, archive, limits)
        expected = {f"{run_id}/{name}" for run_id, names in bundle.files.items() for name in names}
        folders_ = set(bundle.files)
        written: dict[str, dict[str, str]] = {}
        members, total = 1, 0
        while (member := tar.next()) is not None:  # after the manifest (iterating would yield it again)
            members += 1
            if members > limits.max_members:
                raise CifarbenchError("{archive}: more than {most} members; refused ({option} raises the cap)",
                                      archive=archive, most=limits.max_members,
                                      option=Keyword("bundle_limits.max_members"))
            name = member.name[2:] if member.name.startswith("./") else member.name
            if member.isdir() and name.rstrip("/") in folders_:
                continue
            run_id, _, file_name = name.partition("/")
            if not member.isreg() or name not in expected or file_name in written.get(run_id, {}):
                kind = "a link" if member.issym() or member.islnk() else "not a regular file" if not member.isreg() \
                    else "a second copy" if file_name in written.get(run_id, {}) else "not listed in the manifest"
                raise CifarbenchError(f"{archive}: refusing to extract member {printable_name(member.name)}: {kind}")
            total += member.size
            if total > limits.max_bytes:
                raise CifarbenchError("{archive}: its files come to more than {mib} MiB uncompressed; refused "
                                      "({option} raises the cap)", archive=archive, mib=limits.max_bytes >> 20,
                                      option=Keyword("bundle_limits.max_bytes"))
            target = staging / run_id / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            written.setdefault(run_id, {})[file_name] = digest.hexdigest()
    return bundle, written


def printable_name(name: str) -> str:
    return repr(name[:100])


@dataclass
class Imported:
    imported: list[RunRecord]
    skipped: list[tuple[str, str]]
    """(run id, why) for runs not imported, e.g. already in this store."""
    student: str | None = None

    def to_dict(self) -> dict:
        return {"imported": [r.run_id for r in self.imported], "skipped": [list(s) for s in self.skipped],
                "student": self.student}

    @property
    def with_code(self) -> list[RunRecord]:
        """The imported runs that carry their own model code (it runs only with --trust-code)."""
        return [r for r in self.imported if r.config.get("model_sha256")]


def import_runs(archive: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                limits: BundleLimits | None = None) -> Imported:
    """Bring an archive's runs into the runs folder under their own ids, marked as imported (their model code
    then runs only with consent). Runs already in the store are skipped, never overwritten."""
    root = folders.resolve_runs_dir(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        bundle, written = extract_bundle(archive, staging, limits)
        result = Imported([], [], bundle.student)
        with RunStore(runs_dir) as store:
            for record in bundle.runs:
                why = _import_one(record, bundle.files[record.run_id], written.get(record.run_id, {}), staging,
                                  runs_dir, store)
                if why:
                    result.skipped.append((record.run_id, why))
                else:
                    result.imported.append(record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def import_launched_run(archive: str | os.PathLike, *, run_id: str, requested: dict,
                        runs_dir: str | os.PathLike | None = None, limits: BundleLimits | None = None) -> RunRecord:
    """Bring in the run that a task this process launched trained elsewhere (a Ray worker), as this runs folder's
    own run under the id it was given. The archive must hold exactly that run, trained from exactly the config
    sent (`requested`, as `TrainConfig.to_dict` gives it, model code's sha256 included): a bundle that claims to
    be some other run, or carries another config or code, is refused whole, so nothing a worker returns can pass
    for a run the user did not launch."""
    root = folders.resolve_runs_dir(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".launched-", dir=root))
    try:
        bundle, written = extract_bundle(archive, staging, limits)
        source = f"the bundle returned for run {run_id}"
        if [r.run_id for r in bundle.runs] != [run_id]:
            raise CifarbenchError(f"{source} holds runs {[r.run_id for r in bundle.runs]}, not that run alone")
        (record,) = bundle.runs
        try:
            config = json.loads((staging / run_id / folders.CONFIG).read_text())
        except (OSError, ValueError):
            config = None
        wanted = json.loads(json.dumps(requested))  # as config.json holds it (lists, not tuples)
        if (not isinstance(config, dict) or config.get("requested") != wanted or record.status != "completed"
                or record.model != wanted.get("model") or record.seed != wanted.get("seed")
                or not all(_same_choices(c, wanted) for c in (record.config, config.get("config"),
                                                               _checkpoint_config(staging / run_id)))):
            raise CifarbenchError(f"{source} does not hold the completed run of the config it was sent; refused")
        with RunStore(runs_dir) as store:
            why = _import_one(record, bundle.files[run_id], written.get(run_id, {}), staging, runs_dir, store,
                              origin=None)
        if why:
            raise CifarbenchError(f"{source} could not be stored: {why}")
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


LAUNCH_FIXED = ("model", "model_sha256", "seed")
"""What a launched run cannot change about itself: the code it runs and its seed (and, below, where its data is)."""
LAUNCH_FIXED_DATA = ("dataset", "data_dir", "verify", "download", "permute_pixels")


def _same_choices(config: object, wanted: dict) -> bool:
    """Whether a config the bundle carries keeps the driver's code, seed and data source. A run adapts its other
    settings as it trains (precision, shape, normalisation), but these decide what runs here and which local
    files are read, so the worker may not choose them."""
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        return False
    data, sent = config["data"], wanted.get("data") or {}
    return (all(config.get(k) == wanted.get(k) for k in LAUNCH_FIXED)
            and all(data.get(k) == sent.get(k) for k in LAUNCH_FIXED_DATA))


def _checkpoint_config(folder: Path) -> dict | None:
    """The config inside the bundle's checkpoint (read the safe way), with the model the checkpoint names; None
    when it cannot be read."""
    from cifarbench.training.checkpoint import load_checkpoint

    try:
        payload = load_checkpoint(folder / folders.CHECKPOINT)
    except CifarbenchError:
        return None
    config = payload.get("config")
    if not isinstance(config, dict) or payload.get("model") != config.get("model"):
        return None
    return config


def _import_one(record: RunRecord, files: dict[str, str], written: dict[str, str], staging: Path, runs_dir,
                store: RunStore, origin: str | None = "imported") -> str | None:
    """Move one extracted run into place and record it; the reason it was skipped, or None."""
    source = staging / record.run_id
    for name, sha in files.items():
        if written.get(name) != sha:
            return f"{name} does not match the manifest" if name in written else f"{name} is missing"
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
    record.origin, record.run_dir = origin, str(target)
    try:
        store.start_run(record, model_sha256=record.config.get("model_sha256"), finished=True)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return None
