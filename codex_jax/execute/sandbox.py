"""The executor: runs untrusted (model-written) Python programs in warm sandboxed workers.

* Isolation.  Each worker (``worker.py`` beside this file) is a bubblewrap sandbox:
  read-only root, private /tmp, empty network namespace, own PID namespace, host homes
  hidden, environment cleared.  Run as root, bubblewrap's own user namespace maps only
  uid 0 and leaves every capability to the sandbox -- enough to remount / read-write
  and write host files.  So as root we make the user namespace ourselves
  (``UserNamespace``): the worker keeps five capabilities (set a child's uid, signal
  it, delete its files) and each program runs as its own unprivileged uid with none,
  which also makes RLIMIT_NPROC bind (the kernel exempts uid 0).  As an ordinary user
  bubblewrap's user namespace is unprivileged already.
* Fallback.  Without a working bubblewrap (not Linux, no user namespaces) programs run
  under rlimits and process isolation only: loud (one warning per process), recorded
  as ``isolation == "rlimits-only"``, and an error with ``require_sandbox``.
* Speed and robustness.  Workers start once per executor, one per core, pre-importing
  common modules; a program costs one ``fork``.  A program that kills its worker gets
  "crashed" and the worker is restarted; no other outcome changes, order is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import secrets
import select
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Sequence

from codex_jax.errors import CodexError, ConfigError
from codex_jax.execute.worker import read_exact, write_frame

ISOLATIONS = ("auto", "bubblewrap", "rlimits")
HIDDEN = ("/root", "/home", "/run", "/mnt", "/media", "/srv", "/tmp")  # tmpfs over these in the sandbox
WORKDIR = "/tmp/work"          # a program's cwd in the sandbox, on the private /tmp
TMP_BYTES = 256 << 20          # size of the private /tmp: bounds what programs can keep in RAM
# what the worker keeps in our user namespace; no CAP_SYS_ADMIN, which could remount /
WORKER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_DAC_OVERRIDE", "CAP_FOWNER")
WORKER_SCRIPT = str(pathlib.Path(__file__).resolve().with_name("worker.py"))
# host uids for programs are drawn from here: far above login accounts, subordinate-id
# ranges (from 100000) and systemd's container range (up to 0x6fffffff)
UID_RANGE = (0x90000000, 0xF0000000)
_UNSHARE = ("import ctypes, sys; r = ctypes.CDLL(None, use_errno=True).unshare(0x10000000); "
            "print(r, flush=True); sys.stdin.read()")
_WARNED: set[str] = set()


class SandboxUnavailable(CodexError):
    """The bubblewrap sandbox was required but cannot run here, or a worker failed."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One program's outcome.  ``result``: "passed", "failed: <ExceptionType>", "timed out",
    "out of memory" or "crashed" (killed by a signal, or exited before reporting).
    ``asserts_passed``/``asserts_failed`` count instrumented assert statements (see
    ``rewards``).  Timings are informative only and excluded from equality."""

    result: str
    asserts_passed: int = 0
    asserts_failed: int = 0
    cpu_s: float = dataclasses.field(default=0.0, compare=False)
    wall_s: float = dataclasses.field(default=0.0, compare=False)

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    @property
    def status(self) -> str:
        """The result without the exception type ("failed", "timed out", ...)."""
        return self.result.split(":", 1)[0]


class UserNamespace:
    """A user namespace (root only) mapping uid/gid 0 to host root and 1..count to fresh
    unprivileged host ids, random so that concurrent executors never share a uid (and
    so never share an RLIMIT_NPROC count or may signal each other's programs)."""

    def __init__(self, count: int):
        helper = subprocess.Popen([sys.executable, "-I", "-c", _UNSHARE], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        try:
            if helper.stdout.readline().strip() != b"0":
                raise OSError("unshare(CLONE_NEWUSER) failed")
            self.base = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{helper.pid}/{name}", "w") as f:
                    f.write(f"0 0 1\n1 {self.base} {count}\n")
            self.fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY)  # keeps it alive
        finally:
            helper.stdin.close()
            helper.stdout.close()
            helper.wait()

    def close(self) -> None:
        os.close(self.fd)


def _needed_paths() -> list[str]:
    """What the worker's interpreter needs to see (it may live under a hidden directory,
    e.g. pyenv in /root or a virtualenv in /tmp): outermost paths only."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(WORKER_SCRIPT), *site.getsitepackages()}
    paths |= {os.path.realpath(p) for p in paths} | {os.path.dirname(os.path.realpath(sys.executable))}
    out: list[str] = []
    for path in sorted(p for p in paths if os.path.isdir(p)):
        if not any(path == q or path.startswith(q.rstrip("/") + "/") for q in out):
            out.append(path)
    return out


def _env(home: str, tmp: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": tmp,
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def bwrap_command(exe: str, userns_fd: int | None) -> tuple[list[str], list[str]]:
    """The bubblewrap argv prefix, and the paths under /tmp the worker must not delete."""
    if userns_fd is None:
        cmd = [exe, "--unshare-all", "--cap-drop", "ALL"]
    else:
        cmd = [exe, "--userns", str(userns_fd), "--unshare-ipc", "--unshare-pid", "--unshare-net",
               "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
        for cap in WORKER_CAPS:
            cmd += ["--cap-add", cap]
    cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--die-with-parent", "--new-session",
            "--clearenv"]
    hidden = [h for h in HIDDEN if os.path.isdir(h) and not os.path.islink(h)]
    for top in hidden:  # --size: bubblewrap >= 0.7; the worker makes /tmp world-writable
        cmd += (["--size", str(TMP_BYTES)] if top == "/tmp" and "--size" in _bwrap_help(exe) else []) + ["--tmpfs", top]
    keep = []
    for path in _needed_paths():
        top = next((h for h in hidden if path == h or path.startswith(h + "/")), None)
        if top is not None:  # --dir makes the parents 0755 (bind mounts alone would make them 0700)
            cmd += ["--dir", os.path.dirname(path), "--ro-bind", path, path]
            keep += ["/tmp/" + path.split("/")[2]] if top == "/tmp" and path != top else []
    cmd += ["--dir", WORKDIR, "--chdir", WORKDIR]
    for key, value in _env(WORKDIR, "/tmp").items():
        cmd += ["--setenv", key, value]
    return cmd, keep


@functools.lru_cache(maxsize=None)
def _bwrap_help(exe: str) -> str:
    try:
        return subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=None)
def probe_bubblewrap(bwrap: str = "bwrap") -> tuple[str, str]:
    """How bubblewrap runs here, probed once per process: ("mapped", "") as root with our
    own user namespace, ("plain", "") with bubblewrap's, or ("", reason) if it cannot."""
    exe = shutil.which(bwrap)
    if not sys.platform.startswith("linux") or exe is None:
        return "", f"{bwrap!r} not found" if sys.platform.startswith("linux") else "bubblewrap needs Linux"
    reasons = []
    for mode in (("mapped",) if os.geteuid() == 0 else ()) + ("plain",):
        ns = None
        try:
            ns = UserNamespace(1) if mode == "mapped" else None
            code = "import os; os.setgroups([]); os.setgid(1); os.setuid(1); " if ns else ""
            cmd = bwrap_command(exe, ns.fd if ns else None)[0] + [sys.executable, "-s", "-B", "-c",
                                                                   code + "print('ok')"]
            proc = subprocess.run(cmd, capture_output=True, timeout=30, env={}, pass_fds=(ns.fd,) if ns else ())
            if proc.returncode == 0 and proc.stdout.strip() == b"ok":
                return mode, ""
            reasons.append(f"{mode}: exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"{mode}: {exc}")
        finally:
            if ns is not None:
                ns.close()
    return "", "; ".join(reasons)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"codex-jax: WARNING: {message}", file=sys.stderr, flush=True)


class _Worker:
    """Host-side handle of one worker process and its pipes."""

    def __init__(self, argv: list[str], env: dict, cwd: str, pass_fds=(), workdir: str | None = None):
        self.err = tempfile.TemporaryFile()  # unlinked: its messages survive, no file does
        self.workdir = workdir
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=env, cwd=cwd, pass_fds=pass_fds, start_new_session=True)
        self.fd_in, self.fd_out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.buf = bytearray()
        self.deadline = 0.0

    def feed(self) -> list[dict] | None:
        """Reads what is available; the complete replies, or None if the worker died."""
        data = os.read(self.fd_out, 1 << 16)
        if not data:
            return None
        self.buf += data
        replies = []
        while len(self.buf) >= 4 and len(self.buf) >= 4 + (n := int.from_bytes(self.buf[:4], "big")):
            replies.append(json.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return replies

    def wait_ready(self, timeout: float = 60.0) -> None:
        ready = select.select([self.fd_out], [], [], timeout)[0]
        head = read_exact(self.fd_out, 4) if ready else None
        reply = json.loads(read_exact(self.fd_out, int.from_bytes(head, "big")) or b"{}") if head else {}
        if not reply.get("ready"):
            self.stop()
            self.err.seek(0)
            message = self.err.read().decode(errors="replace")[-500:]
            raise SandboxUnavailable(f"a sandbox worker failed to start: {message}")

    def stop(self, wait: float = 2.0) -> None:
        """Ends the worker (end of input, then SIGKILL to its group) and its scratch space."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            self.proc.wait()
        self.err.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Executor:
    """Runs programs in warm sandboxed workers; ``run(programs)`` returns one ``Outcome``
    per program, in input order.  Use as a context manager (closing stops the workers
    and removes their scratch space).

    workers: worker processes (default: the usable cores).  timeout: CPU seconds per
    program.  wall_timeout: wall-clock backstop (default 2 * timeout + 1).  memory_mb:
    address space a program may map beyond the warm worker's.  nproc: processes and
    threads a program may have (binds where programs get their own uid).  isolation:
    "auto" (bubblewrap if it works here, else rlimits-only with a warning), "bubblewrap"
    (required) or "rlimits" (forced fallback).  require_sandbox: make the fallback an error.
    bwrap: the bubblewrap executable.
    """

    def __init__(self, workers: int | None = None, timeout: float = 3.0, memory_mb: int = 1024,
                 isolation: str = "auto", require_sandbox: bool = False, wall_timeout: float | None = None,
                 nproc: int = 16, bwrap: str = "bwrap"):
        self._procs: list[_Worker] = []
        self._ns: UserNamespace | None = None
        self._closed = False
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = cores if workers is None else workers
        for name, value, low, kind in (("workers", self.workers, 1, int), ("timeout", timeout, 1e-3, (int, float)),
                                       ("memory_mb", memory_mb, 16, int), ("nproc", nproc, 1, int)):
            if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
                raise ConfigError(f"executor option {name} must be a number >= {low}, got {value!r}")
        if isolation not in ISOLATIONS:
            raise ConfigError(f"executor option isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.timeout, self.memory_mb, self.nproc = float(timeout), int(memory_mb), int(nproc)
        self.wall_timeout = 2 * self.timeout + 1 if wall_timeout is None else float(wall_timeout)
        if not self.wall_timeout >= self.timeout:
            raise ConfigError(f"executor option wall_timeout must be >= timeout, got {wall_timeout!r}")
        self._bwrap = shutil.which(bwrap) or bwrap
        self._mode = self._choose(isolation, require_sandbox, bwrap)
        self.isolation = "bubblewrap" if self._mode else "rlimits-only"
        try:
            self._ns = UserNamespace(self.workers) if self._mode == "mapped" else None
            self._procs = [self._spawn(i) for i in range(self.workers)]
            for proc in self._procs:
                proc.wait_ready()
        except BaseException:
            self.close()
            raise

    def _choose(self, isolation: str, require_sandbox: bool, bwrap: str) -> str:
        if isolation == "rlimits":
            if require_sandbox:
                raise ConfigError("require_sandbox=True contradicts isolation='rlimits'")
            return ""
        mode, reason = probe_bubblewrap(bwrap)
        if mode:
            if mode == "plain" and os.geteuid() == 0:
                _warn_once("bubblewrap runs programs as uid 0 of its namespace here: RLIMIT_NPROC does "
                           "not bind, so a fork bomb is bounded only by the per-program time limits")
            return mode
        if isolation == "bubblewrap" or require_sandbox:
            raise SandboxUnavailable(f"the bubblewrap sandbox is required but unavailable: {reason} "
                                     "(Debian/Ubuntu: apt-get install bubblewrap)")
        _warn_once(f"bubblewrap sandbox unavailable ({reason}); running model-written code with resource "
                   "limits only -- it can read and write your files and use the network. "
                   "Use --require-sandbox (require_sandbox=True) to make this an error.")
        return ""

    def _spawn(self, index: int) -> _Worker:
        cfg = {"timeout": self.timeout, "wall": self.wall_timeout, "memory": self.memory_mb << 20,
               "nproc": None, "uid": None, "pdeathsig": not self._mode}
        python = [sys.executable, "-s", "-B", WORKER_SCRIPT]
        if not self._mode:
            workdir = tempfile.mkdtemp(prefix="codex-jax-exec-")
            cfg.update(workdir=workdir, scratch=[workdir], keep=[], chmod=[])
            return _Worker(python + [json.dumps(cfg)], _env(workdir, workdir), workdir, workdir=workdir)
        cmd, keep = bwrap_command(self._bwrap, self._ns.fd if self._ns else None)
        cfg.update(workdir=WORKDIR, scratch=["/tmp", WORKDIR, "/dev/shm"], keep=[WORKDIR, *keep],
                   chmod=["/tmp", WORKDIR, "/dev/shm"])
        if self._ns is not None:
            cfg.update(uid=index + 1, nproc=self.nproc)
        elif os.geteuid() != 0:  # bubblewrap's init and the worker count against the same limit
            cfg.update(nproc=self.nproc + 2)
        return _Worker(cmd + python + [json.dumps(cfg)], {}, "/", pass_fds=(self._ns.fd,) if self._ns else ())

    def _restart(self, slot: int) -> None:
        self._procs[slot].stop(wait=0.0)
        self._procs[slot] = self._spawn(slot)
        self._procs[slot].wait_ready()

    def _send(self, slot: int, program: str) -> None:
        for attempt in (0, 1):  # a worker found dead before the program started is just restarted
            try:
                write_frame(self._procs[slot].fd_in, {"program": program})
                break
            except (BrokenPipeError, ConnectionResetError):
                if attempt:
                    raise SandboxUnavailable("a sandbox worker died twice on start-up") from None
                self._restart(slot)
        self._procs[slot].deadline = time.monotonic() + self.wall_timeout + 15.0

    def run(self, programs: Sequence[str]) -> list[Outcome]:
        """Runs each program (source text) once; outcomes in input order."""
        if self._closed:
            raise CodexError("the executor is closed")
        if isinstance(programs, str) or not all(isinstance(p, str) for p in programs):
            raise TypeError("Executor.run takes a sequence of program source strings")
        results: list[Outcome | None] = [None] * len(programs)
        queue, idle, busy = deque(range(len(programs))), list(range(self.workers))[::-1], {}
        try:
            self._loop(programs, results, queue, idle, busy)
        except BaseException:  # workers may hold programs in flight: never reuse them
            self.close()
            raise
        return results  # type: ignore[return-value]

    def _loop(self, programs, results, queue, idle, busy) -> None:
        while queue or busy:
            while idle and queue:
                slot, index = idle.pop(), queue.popleft()
                self._send(slot, programs[index])
                busy[slot] = index
            fds = {self._procs[s].fd_out: s for s in busy}
            wait = max(0.0, min(self._procs[s].deadline for s in busy) - time.monotonic())
            for fd in select.select(list(fds), [], [], wait)[0]:
                slot = fds[fd]
                replies = self._procs[slot].feed()
                if replies is None:  # the program killed its worker
                    results[busy.pop(slot)] = Outcome("crashed")
                    self._restart(slot)
                    idle.append(slot)
                for reply in replies or ():
                    if "error" in reply:
                        raise SandboxUnavailable(f"the sandbox cannot run programs: {reply['error']}")
                    results[busy.pop(slot)] = Outcome(reply["result"], reply["asserts_passed"],
                                                      reply["asserts_failed"], reply["cpu"], reply["wall"])
                    if not reply["clean"]:  # something survived or could not be deleted
                        self._restart(slot)
                    idle.append(slot)
            for slot in [s for s in busy if self._procs[s].deadline < time.monotonic()]:
                results[busy.pop(slot)] = Outcome("timed out")  # a hung worker: harness backstop
                self._restart(slot)
                idle.append(slot)

    def close(self) -> None:
        """Stops the workers (no processes or files are left behind); idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            proc.stop()
        if self._ns is not None:
            self._ns.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
