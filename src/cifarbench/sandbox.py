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

from cifarbench.errors import CifarbenchError, Keyword

ISOLATIONS = ("auto", "bubblewrap", "process")
MAX_OUTPUT_BYTES = 16 << 20
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
            raise CifarbenchError("{option} {value}: must be a number of seconds in (0, 604800]",
                                  option=Keyword("limits.timeout"), value=self.timeout)
        if not (isinstance(self.memory_mib, int) and 256 <= self.memory_mib <= 1 << 22):
            raise CifarbenchError("{option} {value}: must be a number of MiB in [256, 4194304]",
                                  option=Keyword("limits.memory_mib"), value=self.memory_mib)


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
        raise CifarbenchError("{option} {wanted!r}: choose one of {choices}", option=Keyword("isolation"),
                              wanted=wanted, choices=", ".join(ISOLATIONS))
    bwrap = shutil.which("bwrap")
    works = bwrap is not None and _bubblewrap_works(bwrap)
    if wanted == "bubblewrap" and not works:
        raise CifarbenchError("{option}: bwrap is not installed or cannot create namespaces here "
                              "(apt-get install bubblewrap; or {other})", option=Keyword("isolation", "bubblewrap"),
                              other=Keyword("isolation", "process"))
    return Isolation("bubblewrap" if works and wanted != "process" else "process")


@dataclass(frozen=True)
class Outcome:
    """How a boxed command ended, and what it wrote on stdout."""

    returncode: int | None
    """The exit status; negative: killed by that signal; None: timed out."""
    stdout: bytes
    stderr_tail: str
    seconds: float
    exceeded: str | None = None
    """Why the watchdog killed it (memory or processes of the whole box), if it did."""

    @property
    def exception(self) -> str | None:
        """The built-in exception its stderr ends with, by name only: the text around it is the boxed code's and
        could carry what it read (a reason ends up on a published leaderboard)."""
        import builtins

        for line in reversed(self.stderr_tail.strip().splitlines()[-5:]):
            name = line.split(":", 1)[0].strip()
            if isinstance(getattr(builtins, name, None), type) and issubclass(getattr(builtins, name),
                                                                              BaseException):
                return name
        return None

    def failure(self, limits: Limits) -> CifarbenchError | None:
        """Why it failed, in a few words (an error whose options each front door spells); None when it exited 0."""
        memory, timeout = Keyword("limits.memory_mib"), Keyword("limits.timeout")
        if self.exceeded:
            return CifarbenchError("was stopped: it {exceeded}, over the limits ({mib} MiB, {memory})",
                                   exceeded=self.exceeded, mib=limits.memory_mib, memory=memory)
        if self.returncode is None:
            return CifarbenchError("timed out after {seconds:g} s per submission ({timeout})", seconds=limits.timeout,
                                   timeout=timeout)
        if self.returncode == 0:
            return None
        last = f": {self.exception}" if self.exception else ""
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            hint = " (likely out of memory: the limit is {mib} MiB, {memory})" \
                if name in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS") else ""
            return CifarbenchError("killed by {name}" + hint + "{last}", name=name, mib=limits.memory_mib,
                                   memory=memory, last=last)
        if self.exception == "MemoryError":
            return CifarbenchError("ran out of memory (the limit is {mib} MiB, {memory}){last}", mib=limits.memory_mib,
                                   memory=memory, last=last)
        return CifarbenchError("exited with status {status}{last}", status=self.returncode, last=last)


def _set_limits(memory_bytes: int) -> None:
    """In the child, before it runs anything: bounded memory, file size, no core dumps."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/sys")
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf", "hosts",
        "alternatives")
"""What the boxed Python needs of the machine: system libraries, the dynamic loader's files, CPU topology."""


def runtime_paths() -> list[Path]:
    """The folders this Python and cifarbench run from: the interpreter, its standard library, every entry of
    the import path and the package itself (an editable install lives in a source tree)."""
    import cifarbench

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.executable).parent,
             Path(os.path.realpath(sys.executable)).parent.parent, Path(cifarbench.__file__).resolve().parent.parent}
    paths |= {Path(p) for p in sys.path if p and Path(p).is_absolute()}
    return [p for p in paths if p.exists()]


def _bwrap_argv(command: Sequence[str], *, readable: Sequence[Path], hidden: Sequence[Path]) -> list[str]:
    """Only what the command needs is there: system libraries, the Python it runs, its `readable` inputs (all
    read-only), a small scratch /tmp; no home folder, no /run (no host sockets), no network, no other process."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", "--size", str(1 << 20), "--tmpfs", "/dev/shm",
            "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp"]
    for path in [*_SYSTEM, *(f"/etc/{name}" for name in _ETC)]:
        if os.path.lexists(path):
            argv += ["--ro-bind-try", path, path] if not os.path.islink(path) else ["--symlink",
                                                                                      os.readlink(path), path]
    for path in sorted({*runtime_paths(), *readable}, key=lambda p: len(p.parts)):
        argv += ["--ro-bind", str(path), str(path)]
    for path in hidden:  # private folders that sit inside a bound one (a data set inside the source tree, say)
        if not any(folder in path.parents for folder in hidden):
            argv += ["--size", "4096", "--tmpfs", str(path)] if path.is_dir() else \
                ["--ro-bind", "/dev/null", str(path)] if path.exists() else []
    for path in readable:  # the command's own inputs win over a hidden folder around them
        argv += ["--ro-bind", str(path), str(path)]
    return argv + ["--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp", "--", *command]


def run_boxed(command: Sequence[str], *, isolation: Isolation, limits: Limits, readable: Sequence[Path] = (),
              hidden: Sequence[Path] = (), env: dict[str, str] | None = None, seconds: float | None = None) -> Outcome:
    """Run `command` boxed: `readable` paths visible read-only, `hidden` ones replaced by empty folders
    (bubblewrap). Killed after `seconds` (default `limits.timeout`), or once all its processes together use more
    than `limits.memory_mib` or number more than MAX_PROCESSES. Its stdout comes back (at most MAX_OUTPUT_BYTES);
    its stdin is empty. A Ctrl-C here kills it and propagates."""
    readable = [Path(p).resolve() for p in readable]
    hidden = [Path(p).resolve() for p in hidden]
    scratch = None
    if isolation.kind == "bubblewrap":
        argv, cwd = _bwrap_argv(command, readable=readable, hidden=hidden), None
    else:
        scratch = tempfile.mkdtemp(prefix="cifarbench-box-")
        argv, cwd = list(command), scratch
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**(env or {}), "HOME": cwd or "/tmp", "TMPDIR": cwd or "/tmp", _TOKEN: token}
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=env, start_new_session=True,  # the terminal's Ctrl-C reaches us, not the child
                            preexec_fn=functools.partial(_set_limits, limits.memory_mib << 20))
    out, err = bytearray(), bytearray()
    exceeded: list[str] = []

    def drain(stream, buffer: bytearray, cap: int) -> None:
        while chunk := stream.read(1 << 16):
            if len(buffer) < cap:
                buffer += chunk[:cap - len(buffer)]

    def watch() -> None:  # RLIMIT_AS bounds one process; this bounds them all together
        while proc.poll() is None and not exceeded:
            pids = _box_processes(token)
            rss = sum(_rss(pid) for pid in pids)
            if rss > limits.memory_mib << 20 or len(pids) > MAX_PROCESSES:
                exceeded.append(f"used {rss >> 20} MiB in {len(pids)} processes" if len(pids) <= MAX_PROCESSES
                                else f"started more than {MAX_PROCESSES} processes")
                _kill_group(proc, wait=False)
                _kill_stragglers(token)
            time.sleep(0.25)

    threads = [threading.Thread(target=drain, args=(proc.stdout, out, MAX_OUTPUT_BYTES + 1), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err, 1 << 20), daemon=True),
               threading.Thread(target=watch, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        try:
            returncode: int | None = proc.wait(timeout=max(0.0, limits.timeout if seconds is None else seconds))
        except subprocess.TimeoutExpired:
            returncode = None
    finally:  # timed out, interrupted, or done: nothing of it outlives this call
        _kill_group(proc)
        _kill_stragglers(token)
        for thread in threads:
            thread.join(timeout=10)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if isolation.kind == "bubblewrap" and returncode is not None and returncode > 128:
        try:  # bubblewrap's init reports a child killed by signal N as status 128 + N
            returncode = -signal.Signals(returncode - 128).value
        except ValueError:
            pass
    if returncode == 0 and len(out) > MAX_OUTPUT_BYTES:
        returncode, err = 1, err + b"\nits output is larger than the limit"
    return Outcome(returncode, bytes(out), err[-4000:].decode("utf-8", "replace"), time.monotonic() - started,
                   exceeded[0] if exceeded else None)


def _kill_group(proc: subprocess.Popen, *, wait: bool = True) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if wait:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


_TOKEN = "CIFARBENCH_BOX"


MAX_PROCESSES = 64
"""Processes one boxed command may have at once (RLIMIT_NPROC cannot say it: it counts all of a user's, and
never binds root)."""


def _box_processes(token: str) -> list[int]:
    """The boxed command's processes: those carrying its token in their environment, and every process in the
    pid namespace of one that does (one that cleared its environment stays in the box's namespace)."""
    needle, mine = f"{_TOKEN}={token}".encode(), os.getpid()
    found, namespaces, others = [], set(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            namespace = os.readlink(entry / "ns" / "pid")
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
                namespaces.add(namespace)
            else:
                others.append((int(entry.name), namespace))
        except (OSError, ValueError):
            continue
    own = os.readlink("/proc/self/ns/pid")
    return found + [pid for pid, namespace in others if namespace in namespaces and namespace != own]


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _kill_stragglers(token: str) -> None:
    """Kill what the boxed command left behind outside its process group (a daemon that called setsid)."""
    for pid in _box_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def python_command(module: str, *args: str) -> list[str]:
    """This interpreter running `module` (`python -I` would drop the path that finds cifarbench itself)."""
    return [sys.executable, "-m", module, *args]


def child_environment() -> dict[str, str]:
    """The few variables a boxed Python needs to find cifarbench and run torch: nothing of the caller's data
    folders, caches or credentials."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE", "VIRTUAL_ENV")
    return {k: os.environ[k] for k in keep if k in os.environ}
