"""Run untrusted Python programs (model-written code) in a constrained subprocess.

Each program runs as `python -I -B sandbox.py --child ...` in a fresh temporary directory, in its
own session (process group), with:

* resource limits: CPU time, address space, file size, open files, no core dumps, and
  RLIMIT_NPROC (enforced by the kernel only for non-root users, per real user id);
* a wall-clock timeout after which the whole process group is killed;
* a prelude, executed in the child before the program, that makes `socket` unusable, disables
  process creation (fork, exec*, spawn*, subprocess) and refuses writes outside the working
  directory (builtins.open/io.open in a writing mode, os.open with write flags, and the os/shutil
  functions that create, remove, rename or modify files).

The prelude is best effort, NOT a security boundary: code can undo it (ctypes, `_io`, `_socket`,
`posix`, re-importing modules, ...). It stops the accidents that model-written code commits
(tests that write files, infinite loops, memory blow-ups, stray network calls); for adversarial
code use a container or VM with no network and a read-only file system.

This file is also the child's entry point, so it must import nothing but the standard library.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Exit codes the child uses to report how the program ended.
_EXIT_FAILED = 10  # an AssertionError: the program's own tests failed
_EXIT_ERROR = 11  # any other exception, SystemExit included

_OUTPUT_LIMIT = 16 * 1024  # characters of stdout/stderr kept in the result


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, whole process group killed after it
    cpu_time_s: int = 10  # RLIMIT_CPU: SIGXCPU after it
    memory_bytes: int = 1 << 30  # RLIMIT_AS (virtual address space)
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 1  # RLIMIT_NPROC (per user; ignored by the kernel for root)


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "passed", "failed", "timeout" or "error"
    reason: str  # "" when passed, else a one-line explanation
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Execute `source` as a Python program in the sandbox and classify the outcome.

    passed: ran to completion. failed: raised AssertionError. error: raised anything else (the
    reason names the exception) or died from a signal. timeout: wall-clock or CPU limit hit.
    """
    with tempfile.TemporaryDirectory(prefix="mtp_sandbox_", ignore_cleanup_errors=True) as root:
        work_dir = Path(root) / "work"
        work_dir.mkdir()
        program = Path(root) / "program.py"  # outside work_dir, so the program cannot edit it
        program.write_text(source, encoding="utf-8")
        stdout_path, stderr_path = Path(root) / "stdout", Path(root) / "stderr"
        cmd = [sys.executable, "-I", "-B", os.path.abspath(__file__), "--child", str(program),
               str(limits.cpu_time_s), str(limits.memory_bytes), str(limits.file_size_bytes),
               str(limits.open_files), str(limits.processes)]
        # A minimal environment: nothing from the parent leaks in, temp files land in work_dir,
        # and numeric libraries do not start thread pools (threads count against RLIMIT_NPROC).
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work_dir), "TMPDIR": str(work_dir),
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        start = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole group: also any process the program managed to start.
                _kill_group(proc.pid)
                proc.wait()
        duration = time.monotonic() - start
        stdout = _read_tail(stdout_path)
        stderr = _read_tail(stderr_path)

    status, reason = _classify(proc.returncode, timed_out, stderr, limits)
    return ExecutionResult(status, reason, stdout, stderr, duration)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _read_tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _OUTPUT_LIMIT))
        return f.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(returncode: int, timed_out: bool, stderr: str,
              limits: SandboxLimits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s}s exceeded"
    if returncode == 0:
        return "passed", ""
    if returncode == _EXIT_FAILED:
        return "failed", _last_line(stderr) or "AssertionError"
    if returncode == _EXIT_ERROR:
        return "error", _last_line(stderr)
    if returncode == -signal.SIGXCPU:
        return "timeout", f"CPU time limit of {limits.cpu_time_s}s exceeded"
    if returncode < 0:
        return "error", f"killed by {signal.Signals(-returncode).name}"
    return "error", f"exit code {returncode}: {_last_line(stderr)}"


# ---------------------------------------------------------------------------------------------
# Child side: runs in the sandboxed interpreter.


def _set_limits(cpu_s: int, memory: int, file_size: int, open_files: int, processes: int) -> None:
    # Soft and hard limits are equal so that an unprivileged program cannot raise them.
    # CPU gets one spare second of hard limit so the soft limit's SIGXCPU arrives first.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is disabled")
    return refused


def _disable_network() -> None:
    import socket

    class NoSocket(socket.socket):
        # A class, not a function, so that library classes deriving from socket.socket
        # still define; creating any instance fails.
        def __new__(cls, *args, **kwargs):
            raise PermissionError("sandbox: sockets are disabled")

    socket.socket = socket.SocketType = NoSocket
    for name in ("socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, _refuse(f"socket.{name}"))


def _disable_processes() -> None:
    import posix  # os re-exports these from posix: patch both names
    import subprocess as child_subprocess

    for name in ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
                 "spawnvpe", "kill", "killpg"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    child_subprocess.Popen = _refuse("subprocess.Popen")


def _confine_writes(root: str) -> None:
    """Reject file writes, creations, removals and renames whose path is outside `root`."""
    import builtins
    import io
    import shutil

    def check(path, dir_fd=None) -> None:
        if isinstance(path, int):  # an already open file descriptor
            return
        path = os.fspath(path)
        if dir_fd is not None and not os.path.isabs(path):
            # Relative to a directory descriptor (shutil.rmtree works this way): resolve it
            # through /proc; where that is missing the path resolves to nothing and is refused.
            try:
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                path = "/"
        full = os.path.realpath(path)
        if os.path.commonpath([full, root]) != root:
            raise PermissionError(f"sandbox: writing outside the working directory: {full}")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def guarded_os_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    os.open = guarded_os_open

    def guard(module, name: str, path_args: tuple[int, ...]) -> None:
        """Wrap module.name so that its positional arguments at `path_args` are checked."""
        real = getattr(module, name)

        def guarded(*args, **kwargs):
            for i in path_args:
                if i < len(args):
                    check(args[i], kwargs.get("dir_fd"))
            return real(*args, **kwargs)

        setattr(module, name, guarded)

    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "mkfifo",
                 "mknod", "truncate", "chmod", "chown", "lchown", "utime"):
        if hasattr(os, name):
            guard(os, name, (0,))
    for name in ("rename", "renames", "replace"):
        guard(os, name, (0, 1))
    for name in ("link", "symlink"):  # only the new name is created
        guard(os, name, (1,))
    guard(shutil, "rmtree", (0,))
    guard(shutil, "move", (0, 1))
    for name in ("copy", "copy2", "copyfile", "copytree"):
        guard(shutil, name, (1,))


def _report_exception(namespace: dict) -> None:
    """Print the traceback; its last line is the reason the parent reports."""
    import traceback

    exc = sys.exc_info()[1]
    namespace.clear()  # free what the program allocated (a memory bomb) before formatting
    try:
        traceback.print_exc()
    except MemoryError:
        os.write(2, f"\n{type(exc).__name__}\n".encode())


def _child_main(program: str, cpu_s: str, memory: str, file_size: str, open_files: str,
                processes: str) -> None:
    source = Path(program).read_text(encoding="utf-8")
    _set_limits(int(cpu_s), int(memory), int(file_size), int(open_files), int(processes))
    _disable_network()
    _disable_processes()
    _confine_writes(os.path.realpath(os.getcwd()))
    sys.argv = [program]
    namespace = {"__name__": "__main__", "__file__": program}
    exit_code = 0
    try:
        exec(compile(source, program, "exec"), namespace)
    except AssertionError:
        exit_code = _EXIT_FAILED
        _report_exception(namespace)
    except BaseException:  # SystemExit too: a completion must not end the program early
        exit_code = _EXIT_ERROR
        _report_exception(namespace)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(*sys.argv[2:])
