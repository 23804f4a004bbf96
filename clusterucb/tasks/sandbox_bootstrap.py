"""Trusted bootstrap of :mod:`clusterucb.tasks.sandbox`: run as a script (never imported by the program it runs).

    python -s -P -B sandbox_bootstrap.py --rlimits JSON [--shared-tmpfs DIR]... [--hide DIR]... [--keep DIR]... [--proc] [--workdir DIR] [--run-as UID]

It reads the program's source from stdin, builds the program's view of the machine (inside the namespaces that
``unshare`` made: fresh tmpfs over the shared writable directories, a fresh /proc, a work dir), then runs the
program in a forked child and exits 0 only if the program ran to its end. Exit codes: 0 passed; 1 failed;
125 the sandbox itself could not be set up (the program never ran).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import sys
import traceback

SETUP_FAILED = 125
READY = b"R"  # the child wrote it after dropping privileges, before the program ran
FINISHED = b"ok"  # the child wrote it after the program returned normally

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18

# Bound before the program runs, so a program that rebinds os._exit or os.write cannot change how the child reports.
_exit, _write, _getpid = os._exit, os.write, os.getpid


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    encoded = [None if s is None else os.fsencode(s) for s in (source, target, fstype)]
    if libc.mount(*encoded, flags, None if data is None else data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, {fstype!r}) failed: {os.strerror(err)}")


def inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def build_view(args: argparse.Namespace) -> None:
    """Mounts in the new mount namespace: nothing here propagates back to the host."""
    covers = [(d, "mode=1777") for d in args.shared_tmpfs] + [(d, "mode=0755") for d in args.hide]
    covers.sort(key=lambda c: c[0].count("/"))
    covers = [(d, mode) for d, mode in covers if not any(inside(d, outer) for outer, _ in covers)]  # gone once its parent is covered
    if covers or args.proc:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    # The interpreter's own directories that a cover would hide (a venv under /tmp, a pyenv under a 0700 /root):
    # hold them by file descriptor, then bind them back at the same path on top of the cover.
    kept = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in args.keep if any(inside(d, c) for c, _ in covers)}
    for directory, mode in covers:
        mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, f"{mode},size={args.tmpfs_mb}m,nr_inodes=16384")
    for directory, fd in kept.items():
        os.makedirs(directory, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", directory, None, MS_BIND | MS_REC)
        os.close(fd)
    if args.proc:  # the new PID namespace's own /proc: the evaluator's processes are not listed
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if args.workdir:
        os.makedirs(args.workdir, mode=0o700, exist_ok=True)
        if args.run_as is not None:
            os.chown(args.workdir, args.run_as, args.run_as)
        os.chdir(args.workdir)


def run_child(source: bytes, report_fd: int, run_as: int | None, rlimits: dict[str, int]) -> None:
    """The forked child: set its limits, drop privileges, run the program, report. Never returns, whatever the program does."""
    try:
        try:
            # Before dropping root: RLIMIT_NPROC then counts nobody's processes, and the bootstrap itself stays unlimited.
            for name, value in rlimits.items():
                resource.setrlimit(getattr(resource, name), (value, value))
            if run_as is not None:
                os.setgroups([])
                os.setgid(run_as)
                os.setuid(run_as)
            _write(report_fd, READY)
        except BaseException:
            traceback.print_exc()
            _exit(SETUP_FAILED)
        me = _getpid()
        sys.argv = ["program.py"]
        try:
            exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as error:  # SystemExit included: sys.exit(0) before the tests is not a pass
            with contextlib.suppress(BaseException):
                sys.stdout.flush()  # what it printed, then why it failed
            traceback.print_exception(error, error, error.__traceback__.tb_next)  # from the program's frames on, not ours
            _exit(1)
        if _getpid() == me:  # a fork of the program that fell off the end does not speak for it
            _write(report_fd, FINISHED)
        _exit(0)
    finally:
        _exit(1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared-tmpfs", action="append", default=[], help="a shared writable directory to cover with a fresh tmpfs")
    parser.add_argument("--hide", action="append", default=[], help="a directory the program cannot enter: cover it, keeping --keep dirs")
    parser.add_argument("--keep", action="append", default=[], help="an interpreter directory to keep visible under the covers")
    parser.add_argument("--tmpfs-mb", type=int, default=64)
    parser.add_argument("--proc", action="store_true", help="mount a fresh /proc (in a new PID namespace)")
    parser.add_argument("--workdir", help="create this directory and run there")
    parser.add_argument("--run-as", type=int, help="uid and gid to drop to before the program runs")
    parser.add_argument("--rlimits", type=json.loads, default={}, help='JSON {"RLIMIT_AS": bytes, ...} set on the program\'s child')
    args = parser.parse_args()
    source = sys.stdin.buffer.read()
    try:
        os.umask(0o022)
        build_view(args)
        report_read, report_write = os.pipe()
        pid = os.fork()
    except BaseException:
        print("sandbox setup failed:", file=sys.stderr)
        traceback.print_exc()
        return SETUP_FAILED
    if pid == 0:
        os.close(report_read)
        run_child(source, report_write, args.run_as, args.rlimits)
    os.close(report_write)
    report = b""
    while chunk := os.read(report_read, 4096):
        report = (report + chunk)[:16]  # read to EOF, but a program writing here forever must not fill memory
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if report == READY + FINISHED and code == 0:
        return 0
    if not report.startswith(READY) and code == SETUP_FAILED:
        return SETUP_FAILED
    return 1


if __name__ == "__main__":
    sys.exit(main())
