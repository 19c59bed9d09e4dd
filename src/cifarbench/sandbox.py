"""Run a command that executes code from elsewhere in a box with limits: its own process, a wall-clock timeout,
a memory limit, and, where bubblewrap can make one, no network and a read-only view of the machine with the
folders that must stay private hidden.

bubblewrap (`bwrap`, Debian's `bubblewrap`) is used when it is installed and can create namespaces here;
otherwise the command runs as a separate process under rlimits alone, and `Isolation.describe` says so. Whatever
the command does (exits, hangs, crashes, prints, runs out of memory), the caller gets an `Outcome`; only the
caller's own Ctrl-C stops the caller.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cifarbench.errors import CifarbenchError

ISOLATIONS = ("auto", "bubblewrap", "process")
MAX_OUTPUT_BYTES = 64 << 20
"""What the boxed command may send back on stdout; more is cut and the result refused."""
MAX_FILE_BYTES = 256 << 20
"""RLIMIT_FSIZE: the largest file the command may write (its scratch space is a size-capped tmpfs under
bubblewrap)."""
SCRATCH_BYTES = 256 << 20


@dataclass(frozen=True)
class Limits:
    """What one boxed command may use."""

    timeout: float = 600.0
    """Wall-clock seconds before it is killed."""
    memory_mib: int = 4096
    """Address space (RLIMIT_AS), in MiB: torch's CPU runtime alone reserves about 1.3 GiB of it."""

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, int | float) and 0 < self.timeout <= 7 * 24 * 3600):
            raise CifarbenchError(f"--timeout {self.timeout}: must be a number of seconds in (0, 604800]")
        if not (isinstance(self.memory_mib, int) and 256 <= self.memory_mib <= 1 << 22):
            raise CifarbenchError(f"--memory {self.memory_mib}: must be a number of MiB in [256, 4194304]")


@dataclass(frozen=True)
class Isolation:
    """How boxed commands run here: 'bubblewrap' (namespaces: no network, read-only root, private folders
    hidden) or 'process' (a separate process under rlimits only: it can read what this user can)."""

    kind: str

    def describe(self) -> str:
        if self.kind == "bubblewrap":
            return ("bubblewrap: each submission in its own process, no network, a read-only view of the machine "
                    "with the inbox, the grading folder and the hidden set hidden, and time and memory limits")
        return ("process: each submission in its own process with time and memory limits only (bubblewrap is not "
                "available here: student code can read what you can and use the network)")


@functools.cache
def _bubblewrap_works(bwrap: str) -> bool:
    try:
        done = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                               "--die-with-parent", "--", "true"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def choose_isolation(wanted: str = "auto") -> Isolation:
    """`auto`: bubblewrap where it is installed and can create namespaces, else a plain process; `bubblewrap`
    refuses to go on without it."""
    if wanted not in ISOLATIONS:
        raise CifarbenchError(f"--isolation {wanted!r}: choose one of {', '.join(ISOLATIONS)}")
    bwrap = shutil.which("bwrap")
    works = bwrap is not None and _bubblewrap_works(bwrap)
    if wanted == "bubblewrap" and not works:
        raise CifarbenchError("--isolation bubblewrap: bwrap is not installed or cannot create namespaces here "
                              "(apt-get install bubblewrap; or --isolation process)")
    return Isolation("bubblewrap" if works and wanted != "process" else "process")


@dataclass(frozen=True)
class Outcome:
    """How a boxed command ended, and what it wrote on stdout."""

    returncode: int | None
    """The exit status; negative: killed by that signal; None: timed out."""
    stdout: bytes
    stderr_tail: str
    seconds: float

    def failure(self, limits: Limits) -> str | None:
        """Why it failed, in a few words; None when it exited 0."""
        if self.returncode is None:
            return f"timed out after {limits.timeout:g} s (--timeout)"
        if self.returncode == 0:
            return None
        tail = self.stderr_tail.strip().splitlines()
        last = f": {tail[-1][:200]}" if tail else ""
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            hint = f" (likely out of memory: the limit is {limits.memory_mib} MiB, --memory)" \
                if name in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS") else ""
            return f"killed by {name}{hint}{last}"
        if "MemoryError" in self.stderr_tail:
            return f"ran out of memory (the limit is {limits.memory_mib} MiB, --memory){last}"
        return f"exited with status {self.returncode}{last}"


def _set_limits(memory_bytes: int) -> None:
    """In the child, before it runs anything: bounded memory, file size, no core dumps."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _bwrap_argv(command: Sequence[str], *, readable: Sequence[Path], hidden: Sequence[Path]) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
    for path in hidden:  # an empty folder over each private one; the command's own inputs are bound back below
        if any(folder in path.parents for folder in hidden):
            continue
        if path.is_dir():
            argv += ["--tmpfs", str(path)]
        elif path.exists():
            argv += ["--ro-bind", "/dev/null", str(path)]
    for path in readable:
        argv += ["--ro-bind", str(path), str(path)]
    return argv + ["--", *command]


def run_boxed(command: Sequence[str], *, isolation: Isolation, limits: Limits, readable: Sequence[Path] = (),
              hidden: Sequence[Path] = (), env: dict[str, str] | None = None) -> Outcome:
    """Run `command` boxed: `readable` paths stay visible (read-only), `hidden` ones are replaced by empty
    folders (bubblewrap only). Its stdout comes back (at most MAX_OUTPUT_BYTES); its stdin is empty. A Ctrl-C
    here kills it and propagates."""
    readable = [Path(p).resolve() for p in readable]
    hidden = [Path(p).resolve() for p in hidden]
    scratch = None
    if isolation.kind == "bubblewrap":
        argv, cwd = _bwrap_argv(command, readable=readable, hidden=hidden), None
    else:
        scratch = tempfile.mkdtemp(prefix="cifarbench-box-")
        argv, cwd = list(command), scratch
    env = {**(env or {}), "HOME": cwd or "/tmp", "TMPDIR": cwd or "/tmp"}
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=env, start_new_session=True,  # the terminal's Ctrl-C reaches us, not the child
                            preexec_fn=functools.partial(_set_limits, limits.memory_mib << 20))
    out, err = bytearray(), bytearray()

    def drain(stream, buffer: bytearray, cap: int) -> None:
        while chunk := stream.read(1 << 16):
            if len(buffer) < cap:
                buffer += chunk[:cap - len(buffer)]

    readers = [threading.Thread(target=drain, args=(proc.stdout, out, MAX_OUTPUT_BYTES + 1), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err, 1 << 20), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        try:
            returncode: int | None = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            returncode = None
    finally:  # timed out, interrupted, or done: nothing of it outlives this call
        _kill_group(proc)
        for reader in readers:
            reader.join(timeout=10)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if isolation.kind == "bubblewrap" and returncode is not None and returncode > 128:
        try:  # bubblewrap's init reports a child killed by signal N as status 128 + N
            returncode = -signal.Signals(returncode - 128).value
        except ValueError:
            pass
    if returncode == 0 and len(out) > MAX_OUTPUT_BYTES:
        returncode, err = 1, err + b"\nits output is larger than the limit"
    return Outcome(returncode, bytes(out), err[-4000:].decode("utf-8", "replace"), time.monotonic() - started)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def python_command(module: str, *args: str) -> list[str]:
    """This interpreter running `module` (`python -I` would drop the path that finds cifarbench itself)."""
    return [sys.executable, "-m", module, *args]


def child_environment() -> dict[str, str]:
    """The few variables a boxed Python needs to find cifarbench and run torch: nothing of the caller's data
    folders, caches or credentials."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE", "VIRTUAL_ENV")
    return {k: os.environ[k] for k in keep if k in os.environ}
