"""The sandbox for HumanEval programs: hostile programs are contained and scored as failed, and the evaluation goes on.

Each hostile program would pass only if it escaped, so "failed" proves containment; each one is also checked out of
band (files on the host, a listener, /proc, this process still alive). Hostile programs run only where namespaces
are available: without them (mode "none") they could really escape. The basic cases run in both modes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterucb.tasks import sandbox
from clusterucb.tasks.sandbox import Isolation, ProgramResult, SandboxLimits, probe_isolation, run_program, run_programs

SECRET_NAME = "CLUSTERUCB_SANDBOX_TEST_SECRET"
# A good HumanEval-like program; it imports modules the bootstrap has not loaded, so nobody must reach the interpreter's files.
GOOD = textwrap.dedent(
    """
    import collections, fractions, math
    from typing import List

    def mean(values: List[float]) -> float:
        return math.fsum(values) / len(values)

    def check(candidate):
        assert candidate([1.0, 2.0, 3.0]) == 2.0
        assert fractions.Fraction(1, 2) + fractions.Fraction(1, 2) == 1
        assert collections.Counter("aab")["a"] == 2

    check(mean)
    """
)


def namespace_isolation() -> Isolation:
    try:
        return probe_isolation("namespaces")
    except RuntimeError as error:
        pytest.skip(f"needs namespace isolation, since hostile programs would really escape without it: {error}")


@dataclass
class Batch:
    results: dict[str, ProgramResult]
    seconds: float
    limits: SandboxLimits


def run_batch(programs: dict[str, str], limits: SandboxLimits, isolation: Isolation) -> Batch:
    started = time.monotonic()
    results = run_programs(list(programs.values()), limits, workers=2, isolation=isolation)
    return Batch(dict(zip(programs, results)), time.monotonic() - started, limits)


# --- the same basic cases, with and without namespaces -------------------------------------------------------------


@pytest.fixture(scope="module", params=["namespaces", "none"])
def basic(request: pytest.FixtureRequest) -> Batch:
    isolation = namespace_isolation() if request.param == "namespaces" else probe_isolation("none")
    secret = uuid.uuid4().hex
    expected_hash = subprocess.run(
        [sys.executable, "-c", "print(hash('clusterucb'))"], env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True, check=True
    ).stdout.strip()
    programs = {
        "good": GOOD,
        "print": "print('hello from the program')",
        "assert_false": "assert False, 'wrong answer'",
        "syntax_error": "def broken(:\n    pass",
        "infinite_loop": "while True:\n    pass",
        "print_forever": "while True:\n    print('x' * 1000)",
        "sys_exit_0": "import sys\nsys.exit(0)\nassert False, 'the tests after sys.exit(0)'",
        "os_exit_0": "import os\nos._exit(0)\nassert False, 'the tests after os._exit(0)'",
        "raise_system_exit_0": "raise SystemExit(0)\nassert False, 'the tests after SystemExit(0)'",
        "read_secret": f"import os\nassert os.environ.get({SECRET_NAME!r}) == {secret!r}, 'the secret is not visible'",
        "hash_seed": f"assert hash('clusterucb') == {expected_hash}, 'PYTHONHASHSEED=0 is not in effect'",
        "good_last": GOOD,
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, secret)
        return run_batch(programs, SandboxLimits(timeout_s=2.0), isolation)


@pytest.mark.parametrize(
    "name, status",
    [
        ("good", "passed"),
        ("print", "passed"),
        ("hash_seed", "passed"),
        ("good_last", "passed"),
        ("assert_false", "failed"),
        ("syntax_error", "failed"),
        ("sys_exit_0", "failed"),
        ("os_exit_0", "failed"),
        ("raise_system_exit_0", "failed"),
        ("read_secret", "failed"),
        ("infinite_loop", "timeout"),
        ("print_forever", "timeout"),
    ],
)
def test_basic_programs(basic: Batch, name: str, status: str):
    result = basic.results[name]
    assert result.status == status, result.detail
    assert result.passed == (status == "passed")
    assert (result.returncode == 0) == (status == "passed") and (result.returncode is None) == (status == "timeout")
    assert result.seconds < basic.limits.timeout_s + 3


def test_basic_details(basic: Batch):
    assert "hello from the program" in basic.results["print"].detail
    assert "AssertionError: wrong answer" in basic.results["assert_false"].detail
    assert "SyntaxError" in basic.results["syntax_error"].detail
    assert "SystemExit: 0" in basic.results["sys_exit_0"].detail
    assert "the secret is not visible" in basic.results["read_secret"].detail
    flood = basic.results["print_forever"].detail
    assert flood.startswith("timed out") and len(flood) <= 2000 and "x" * 1000 in flood


# --- hostile programs, all in one evaluation, with good ones among them ---------------------------------------------


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.server.close()


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line or environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def write_outside(target: Path, sentinel: Path) -> str:
    # Inside the sandbox the write may well succeed, into its own tmpfs; it escaped only if it sees the host's sentinel.
    return textwrap.dedent(
        f"""
        import os
        os.makedirs({str(target.parent)!r}, exist_ok=True)
        with open({str(target)!r}, "w") as handle:
            handle.write("escaped")
        assert os.path.exists({str(sentinel)!r}), "this is not the host's directory"
        """
    )


@dataclass
class Hostile:
    batch: Batch
    token: str
    written: dict[str, Path]
    connections_before: int
    connections_after: int
    leftover_bomb_processes: list[int]
    pytest_pid: int


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    isolation = namespace_isolation()
    token = uuid.uuid4().hex
    marker = f"clusterucb-sandbox-bomb-{token}"
    secret = uuid.uuid4().hex
    places = {"tmp_path": tmp_path_factory.mktemp("sandbox"), "tmp": Path("/tmp"), "var_tmp": Path("/var/tmp"), "dev_shm": Path("/dev/shm")}
    places = {name: path for name, path in places.items() if path.is_dir()}
    sentinels = {name: path / f"clusterucb-sandbox-{token}-sentinel" for name, path in places.items()}
    written = {name: path / f"clusterucb-sandbox-{token}-written" for name, path in places.items()}
    for sentinel in sentinels.values():
        sentinel.write_text("the host's")
    listener = Listener()
    socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()  # the listener does accept: a control
    time.sleep(0.2)
    connections_before = listener.connections
    host_pid_namespace = os.readlink("/proc/self/ns/pid")
    bomb = "import os\nprint('bomb started', flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    programs = {
        # the fork bomb re-executes itself with the marker in its command line, so its processes can be found in /proc
        "fork_bomb": textwrap.dedent(
            f"""
            import os, sys
            if os.readlink("/proc/self/ns/pid") == {host_pid_namespace!r}:
                raise SystemExit("not in a new PID namespace: refusing to fork-bomb the host")
            os.execv(sys.executable, [sys.executable, "-c", {bomb!r}, {marker!r}])
            """
        ),
        "good_during_bomb": GOOD,
        "infinite_loop": "while True:\n    pass",
        **{f"write_{name}": write_outside(written[name], sentinels[name]) for name in places},
        "connect": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), timeout=2).sendall(b'escaped')",
        "allocate_10_gib": "data = bytearray(10 * 2**30)\nassert len(data) == 10 * 2**30",
        "good_middle": GOOD,
        "kill_evaluator": textwrap.dedent(
            f"""
            import os
            killed = []
            for pid in (os.getppid(), {os.getpid()}):  # its own bootstrap, then the evaluator (this pytest)
                try:
                    os.kill(pid, 9)
                    killed.append(pid)
                except OSError as error:
                    print("could not kill", pid, error)
            assert len(killed) == 2, killed
            """
        ),
        "read_secret_env": f"import os\nassert os.environ.get({SECRET_NAME!r}) == {secret!r}, 'the secret is not visible'",
        "read_secret_proc": f"assert {secret!r}.encode() in open('/proc/{os.getpid()}/environ', 'rb').read()",
        "good_last": GOOD,
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(SECRET_NAME, secret)
            batch = run_batch(programs, SandboxLimits(timeout_s=3.0), isolation)
        deadline = time.monotonic() + 5  # the kernel tears the PID namespace down right after the bootstrap dies
        while (leftover := processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        yield Hostile(batch, token, written, connections_before, listener.connections, leftover, os.getpid())
    finally:
        listener.close()
        for path in [*sentinels.values(), *written.values()]:
            path.unlink(missing_ok=True)


def test_hostile_programs_fail_and_good_ones_still_pass(hostile: Hostile):
    results = hostile.batch.results
    for name in ("good_during_bomb", "good_middle", "good_last"):
        assert results[name].passed, results[name].detail
    for name, result in results.items():
        if not name.startswith("good"):
            assert not result.passed and result.status in ("failed", "timeout"), (name, result)
    assert hostile.batch.seconds < 30


def test_writes_outside_the_work_dir_stay_inside(hostile: Hostile):
    assert set(hostile.written) >= {"tmp_path", "tmp", "var_tmp"}
    for name, path in hostile.written.items():
        assert hostile.batch.results[f"write_{name}"].status == "failed"
        assert "this is not the host's directory" in hostile.batch.results[f"write_{name}"].detail
        assert not path.exists(), f"the program wrote {path} on the host"


def test_no_network(hostile: Hostile):
    assert hostile.batch.results["connect"].status == "failed"
    assert hostile.connections_after == hostile.connections_before, "the program reached the host's 127.0.0.1"


def test_fork_bomb_is_bounded_and_leaves_nothing(hostile: Hostile):
    result = hostile.batch.results["fork_bomb"]
    assert "bomb started" in result.detail  # it did run, in a new PID namespace
    assert result.status in ("failed", "timeout")
    assert result.seconds < hostile.batch.limits.timeout_s + 3
    assert hostile.leftover_bomb_processes == []


def test_infinite_loop_times_out(hostile: Hostile):
    result = hostile.batch.results["infinite_loop"]
    assert result.status == "timeout" and result.seconds < hostile.batch.limits.timeout_s + 3


def test_huge_allocation_fails_fast(hostile: Hostile):
    result = hostile.batch.results["allocate_10_gib"]
    assert result.status == "failed" and "MemoryError" in result.detail
    assert result.seconds < 2


def test_cannot_kill_the_evaluator(hostile: Hostile):
    result = hostile.batch.results["kill_evaluator"]
    assert result.status == "failed" and "could not kill" in result.detail
    assert os.getpid() == hostile.pytest_pid  # still this process, alive
    assert run_program("pass", isolation=namespace_isolation()).passed  # and the sandbox still works


def test_secrets_of_the_evaluator_are_not_visible(hostile: Hostile):
    assert hostile.batch.results["read_secret_env"].status == "failed"
    assert hostile.batch.results["read_secret_proc"].status == "failed"


# --- many programs, the probe, the API -------------------------------------------------------------------------------


def test_many_programs_come_back_in_order():
    programs = [f"print('program {i}')\nassert {i} * 2 == {2 * i}" for i in range(50)]
    results = run_programs(programs, SandboxLimits(timeout_s=10.0), workers=2)
    assert all(r.passed for r in results), [r.detail for r in results if not r.passed]
    assert [r.detail.strip() for r in results] == [f"program {i}" for i in range(50)]


def test_probe_falls_back_or_raises_when_unshare_is_missing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(sandbox, "_unshare", lambda: None)
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="unshare .* not found"):
            probe_isolation("namespaces")
        with caplog.at_level("WARNING", logger="clusterucb.tasks.sandbox"):
            assert probe_isolation("auto") == sandbox.NO_ISOLATION
        assert "unshare (util-linux) not found" in caplog.text and "NOT isolated" in caplog.text
    finally:
        sandbox._probe.cache_clear()  # the real probe again for the other tests
    with pytest.raises(ValueError):
        probe_isolation("docker")


def test_isolation_describes_what_is_not_isolated():
    none = probe_isolation("none")
    assert none.as_dict()["mode"] == "none" and not any(v for k, v in none.as_dict().items() if k not in ("mode", "description"))
    text = none.describe()
    assert "NOT isolated: network" in text and "the filesystem outside its work dir" in text and "processes of the same uid" in text
    full = Isolation(mode="namespaces", network=True, pid=True, private_tmp=True, unprivileged=True)
    assert "runs as nobody" in full.describe() and "NOT isolated: network" not in full.describe()


def test_import_does_nothing():
    check = "import clusterucb.tasks.sandbox as s; assert s._probe.cache_info().currsize == 0 and s._interpreter_dirs.cache_info().currsize == 0"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
