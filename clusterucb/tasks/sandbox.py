"""Run untrusted, model-generated Python programs (HumanEval completions), one per child process, contained.

Each program runs as ``python sandbox_bootstrap.py`` (source on stdin) in its own process group, with rlimits and a
scrubbed environment. Where the machine allows (:func:`probe_isolation`), the bootstrap runs under
``unshare --net --pid --ipc --mount``: no network, its own PID namespace (the whole tree dies with it), a fresh
tmpfs over every world-writable directory, and, when the evaluator is root, the program runs as nobody (65534).
Otherwise ("none") it only gets a fresh work dir. Exit code 0 of the bootstrap means passed; it forks the program
and reports 0 only if the program ran to its end, so ``sys.exit(0)`` or ``os._exit(0)`` before the tests is a
failure. This guards against accidents of generated code, not against a program written to attack the interpreter
it runs in (it could forge the bootstrap's report); the namespaces, nobody and rlimits are what contain such a one.

Nothing happens at import: the probe runs on first use and is cached.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BOOTSTRAP = Path(__file__).with_name("sandbox_bootstrap.py")
NOBODY = 65534
SETUP_FAILED = 125  # the bootstrap's exit code when it could not build the sandbox (see sandbox_bootstrap.py)
NAMESPACE_WORKDIR = "/tmp/program"  # inside the sandbox's own /tmp
# Directories every user may write to on common Linux systems; each one that exists gets a fresh tmpfs.
SHARED_WRITABLE_CANDIDATES = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run/lock", "/var/lock", "/dev/mqueue", "/var/crash")
# -I would also ignore our PYTHONHASHSEED (-I = -E -s -P); the environment is entirely ours, so -E protects nothing.
PYTHON_FLAGS = ("-s", "-P", "-B")
DETAIL_CHARS = 2000
OUTPUT_TAIL_BYTES = 8192  # what we keep of the program's output: it may print forever
POLL_S = 0.02  # exit polling interval where pidfd_open is unavailable


class SandboxError(RuntimeError):
    """The sandbox could not be set up in a mode that promised it: a problem of the machine, not of the program."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0  # wall clock per program (human-eval's default)
    cpu_s: int | None = None  # RLIMIT_CPU; None -> ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_processes: int = 32  # processes the program may add (RLIMIT_NPROC = current count of the uid it runs as + this)

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class Isolation:
    """What the machine allowed, recorded in evaluation metrics."""

    mode: str  # "namespaces" | "user-namespaces" | "none"
    network: bool  # a new network namespace (no interface up: 127.0.0.1 unreachable)
    pid: bool  # a new PID namespace (the evaluator's processes invisible, whole tree killed at once)
    private_tmp: bool  # fresh tmpfs over every world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock ...)
    unprivileged: bool  # runs as uid/gid 65534 (nobody) after dropping root

    def describe(self) -> str:
        """One human line: what is and is not isolated."""
        isolated = ["rlimits (CPU, memory, file size, processes)", "a scrubbed environment", "its own process group"]
        exposed = []
        (isolated if self.network else exposed).append("network" + (" (new namespace, no interface up)" if self.network else ""))
        if self.pid:
            isolated.append("processes (new PID and IPC namespaces: the evaluator is invisible, the whole tree is killed at once)")
        else:
            exposed.append("processes of the same uid (it can see and signal them)")
        if self.private_tmp:
            isolated.append("shared temp dirs (fresh tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock ...)")
        else:
            exposed.append("the filesystem outside its work dir (it can write wherever its uid may, /tmp included)")
        if self.unprivileged:
            isolated.append("privileges (runs as nobody, 65534; directories nobody cannot enter are hidden)")
        elif self.mode != "none":
            exposed.append("the invoking user's files outside the temp dirs (it runs as that user)")
        else:
            exposed.append("privileges (it runs as the evaluator's own user)")
        exposed.append("reads of world-readable files")
        return f"sandbox {self.mode}: isolated: {'; '.join(isolated)}. NOT isolated: {'; '.join(exposed)}."

    def as_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}


@dataclass(frozen=True)
class ProgramResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None  # None on timeout
    seconds: float
    detail: str  # last ~2000 chars of the program's stderr (+stdout), for debugging


NO_ISOLATION = Isolation(mode="none", network=False, pid=False, private_tmp=False, unprivileged=False)

# A trusted program run in each candidate mode before we rely on it: it passes only if the promises hold.
PROBE_PROGRAM = """
import errno, fractions, os, socket  # fractions: not loaded by the bootstrap, so the interpreter's files are reachable
probe = socket.socket()
try:
    probe.connect(("127.0.0.1", 9))
    raise AssertionError("127.0.0.1 is reachable")
except OSError as error:
    assert error.errno == errno.ENETUNREACH, f"127.0.0.1 is reachable ({{error}})"
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
assert pids == [1, os.getpid()], f"other processes are visible: {{pids[:10]}}"
assert os.getuid() == {uid}, f"runs as uid {{os.getuid()}}"
"""


def probe_isolation(mode: str = "auto") -> Isolation:
    """What isolation this machine gives: "auto" (the best available, with a warning when it falls back),
    "namespaces" (the best namespace variant, else RuntimeError) or "none". Cached per mode."""
    if mode not in ("auto", "namespaces", "none"):
        raise ValueError(f"sandbox mode must be 'auto', 'namespaces' or 'none', not {mode!r}")
    with _probe_lock:
        return _probe(mode)


_probe_lock = threading.Lock()


@functools.cache
def _probe(mode: str) -> Isolation:
    if mode == "none":
        return NO_ISOLATION
    problems = []
    for candidate in _namespace_candidates(problems):
        try:
            result = run_program(PROBE_PROGRAM.format(uid=NOBODY if candidate.unprivileged else 0), SandboxLimits(timeout_s=30), candidate)
        except (OSError, subprocess.SubprocessError, SandboxError) as error:
            problems.append(f"{candidate.mode}: {error}")
            continue
        if result.passed:
            return candidate
        problems.append(f"{candidate.mode} ({' '.join(_unshare_command(candidate))}): {result.status}: {result.detail.strip()[-500:]}")
    if mode == "namespaces":
        raise RuntimeError(f"sandbox: namespace isolation is not available on this machine: {'; '.join(problems)}")
    log.warning("sandbox: falling back to NO isolation (%s). %s", "; ".join(problems), NO_ISOLATION.describe())
    return NO_ISOLATION


def _namespace_candidates(problems: list[str]) -> list[Isolation]:
    if sys.platform != "linux":
        problems.append(f"namespaces need Linux, this is {sys.platform}")
        return []
    if _unshare() is None:
        problems.append("unshare (util-linux) not found")
        return []
    if os.geteuid() == 0:  # root: real namespaces, then drop to nobody
        return [Isolation(mode="namespaces", network=True, pid=True, private_tmp=True, unprivileged=True)]
    # not root: a user namespace where we are root, mapped back to ourselves (no uid to drop to)
    return [Isolation(mode="user-namespaces", network=True, pid=True, private_tmp=True, unprivileged=False)]


def _unshare() -> str | None:
    return shutil.which("unshare") or next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)


def _unshare_command(isolation: Isolation) -> list[str]:
    user = ["--user", "--map-root-user"] if isolation.mode == "user-namespaces" else []
    return [_unshare() or "unshare", *user, "--net", "--pid", "--ipc", "--fork", "--mount", "--kill-child"]


@functools.cache
def _interpreter_dirs() -> tuple[str, ...]:
    """The directories the sandboxed interpreter reads (prefixes and sys.path), as it sees them itself."""
    query = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]))"
    command = [sys.executable, *PYTHON_FLAGS, "-c", query]
    answer = subprocess.run(command, env=_environment("/"), capture_output=True, text=True, check=True, timeout=60).stdout
    dirs = {os.path.realpath(p) for p in json.loads(answer) if p and os.path.isdir(p)} - {"/"}
    return tuple(sorted(d for d in dirs if not any(d.startswith(outer + "/") for outer in dirs)))


def _shared_writable_dirs() -> list[str]:
    dirs = {"/tmp"}  # always: the work dir lives there
    for candidate in (*SHARED_WRITABLE_CANDIDATES, tempfile.gettempdir()):  # gettempdir: $TMPDIR, where it points elsewhere
        path = os.path.realpath(candidate)
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode) and mode & stat.S_IWOTH:
                dirs.add(path)
    return sorted(dirs)


def _unenterable_ancestors(directory: str) -> list[str]:
    """Ancestors of ``directory`` that nobody cannot search (e.g. a 0700 /root above a pyenv)."""
    blocked = []
    parts = Path(directory).parts
    for depth in range(2, len(parts)):
        ancestor = str(Path(*parts[:depth]))
        with contextlib.suppress(OSError):
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.append(ancestor)
    return blocked


def _bootstrap_command(isolation: Isolation, limits: SandboxLimits) -> list[str]:
    rlimits = _rlimits(limits, NOBODY if isolation.unprivileged else os.getuid())
    command = [sys.executable, *PYTHON_FLAGS, str(BOOTSTRAP), "--rlimits", json.dumps(rlimits)]
    if isolation.mode == "none":
        return command
    command += ["--workdir", NAMESPACE_WORKDIR, "--tmpfs-mb", str(4 * limits.file_size_mb)]
    if isolation.pid:
        command.append("--proc")
    for directory in _shared_writable_dirs():
        command += ["--shared-tmpfs", directory]
    keep = [d for d in _interpreter_dirs() if not os.stat(d).st_mode & stat.S_IWOTH]  # never bring a shared dir back
    for directory in keep:
        command += ["--keep", directory]
    if isolation.unprivileged:
        for directory in sorted({a for d in keep for a in _unenterable_ancestors(d)}):
            command += ["--hide", directory]
        command += ["--run-as", str(NOBODY)]
    return _unshare_command(isolation) + command


def _environment(home: str) -> dict[str, str]:
    """The program's whole environment: nothing of the evaluator's (tokens, paths) gets through."""
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    # One thread per numerical library: a program that imports numpy must not start a thread per core under RLIMIT_NPROC.
    return environment | {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _threads_of(uid: int) -> int:
    """Tasks whose real uid is ``uid``: what RLIMIT_NPROC counts (threads included)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(entry.path, "status").read_text().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # it exited while we looked
    return count


def _rlimits(limits: SandboxLimits, runs_as: int) -> dict[str, int]:
    """The limits the bootstrap sets on the program's child (computed here, where /proc shows the real counts)."""
    mb = 1024 * 1024
    wanted = {
        "RLIMIT_CPU": limits.cpu_seconds,
        "RLIMIT_AS": limits.memory_mb * mb,
        "RLIMIT_FSIZE": limits.file_size_mb * mb,
        "RLIMIT_CORE": 0,
        # not enforced for root: one reason the program runs as nobody
        "RLIMIT_NPROC": _threads_of(runs_as) + limits.max_processes,
    }
    out = {}
    for name, value in wanted.items():
        hard = resource.getrlimit(getattr(resource, name))[1]
        out[name] = value if hard == resource.RLIM_INFINITY else min(value, hard)  # a non-root evaluator cannot raise its hard limits
    return out


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), isolation: Isolation | None = None) -> ProgramResult:
    """Run one program in its own sandboxed child; passed means it ran to its end within the limits."""
    isolation = isolation or probe_isolation("auto")
    with contextlib.ExitStack() as stack:
        if isolation.mode == "none":
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="clusterucb-sandbox-", ignore_cleanup_errors=True))
        else:
            workdir = NAMESPACE_WORKDIR  # made by the bootstrap, in the sandbox's own /tmp
        proc = subprocess.Popen(
            _bootstrap_command(isolation, limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: the traceback lands after what the program printed
            cwd=workdir if isolation.mode == "none" else "/",
            env=_environment(workdir),
            # No preexec_fn: the evaluator has threads (torch, the pool of run_programs), where a Python callback
            # between fork and exec can deadlock; the bootstrap sets the rlimits on the program's child itself.
            start_new_session=True,
        )
        started = time.monotonic()
        try:
            exited, output = _supervise(proc, source.encode(), limits.timeout_s)
        finally:
            namespace_init = _namespace_init(proc.pid) if isolation.pid else None
            # Kill the group before reaping its leader: the unreaped leader keeps its pid, so the group id cannot have
            # been reused by an unrelated process. Stray processes of a finished program die here too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            if namespace_init is not None:  # its exit completes once the kernel has killed every process of its namespace
                waiter = select.poll()
                waiter.register(namespace_init, select.POLLIN)
                waiter.poll(5000)
                os.close(namespace_init)
        seconds = time.monotonic() - started
    detail = output.decode("utf-8", errors="replace")[-DETAIL_CHARS:]
    if not exited:
        note = f"timed out after {limits.timeout_s:g} s\n"
        return ProgramResult(False, "timeout", None, seconds, note + detail[max(0, len(note) + len(detail) - DETAIL_CHARS) :])
    if proc.returncode == SETUP_FAILED:
        raise SandboxError(f"the {isolation.mode} sandbox could not be set up: {detail.strip()}")
    passed = proc.returncode == 0
    return ProgramResult(passed, "passed" if passed else "failed", proc.returncode, seconds, detail)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2, isolation: Isolation | None = None
) -> list[ProgramResult]:
    """Run many programs, ``workers`` at a time (each a thread waiting on its own child); results in input order."""
    isolation = isolation or probe_isolation("auto")  # once, before the threads
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, limits, isolation), sources))


def _supervise(proc: subprocess.Popen, source: bytes, timeout_s: float) -> tuple[bool, bytes]:
    """Feed the source, keep the tail of the output, return (exited in time, output tail). Never reaps the child."""
    deadline = time.monotonic() + timeout_s
    output = bytearray()
    pending = memoryview(source)
    exited = False
    exit_fd = _pidfd(proc.pid)
    stdin_fd, stdout_fd = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(stdin_fd, False)
    os.set_blocking(stdout_fd, False)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(stdout_fd, selectors.EVENT_READ, "output")
            selector.register(stdin_fd, selectors.EVENT_WRITE, "input")
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ, "exit")
            while not exited and (remaining := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(remaining if exit_fd is not None else min(remaining, POLL_S)):
                    if key.data == "input":
                        try:
                            pending = pending[os.write(stdin_fd, pending[:65536]) :]
                        except BrokenPipeError:
                            pending = pending[:0]  # it stopped reading: it will fail on its own
                        if not pending:
                            selector.unregister(stdin_fd)
                            proc.stdin.close()  # EOF: the bootstrap starts; the program's stdin is empty
                    elif key.data == "output":
                        if _read_tail(stdout_fd, output) is False:
                            selector.unregister(stdout_fd)
                    else:
                        exited = True
                if exit_fd is None:
                    exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        # What it wrote before it exited is in the pipe; a stray process still holding the pipe must not keep us waiting.
        for _ in range(64):
            if not _read_tail(stdout_fd, output):
                break
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
        if not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    return exited, bytes(output)


def _read_tail(fd: int, output: bytearray) -> bool | None:
    """Append what is readable now to ``output``, keeping only its tail. True: read some; False: EOF; None: nothing yet."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return None
    output += chunk
    if len(output) > 2 * OUTPUT_TAIL_BYTES:
        del output[:-OUTPUT_TAIL_BYTES]
    return bool(chunk)


def _namespace_init(unshare_pid: int) -> int | None:
    """A pidfd on the process unshare forked (init of the new PID namespace) while it still runs, else None."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return _pidfd(int(children[0])) if children else None


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else None (we poll)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
