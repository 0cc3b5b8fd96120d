"""The sandboxed executor: correct/wrong programs, adversarial programs (each fails, leaves
no trace on the host, and does not change its neighbours' outcomes), determinism, the
rlimits-only fallback and its refusal under ``require_sandbox``.

No program ever runs in the pytest process: everything goes through an ``Executor``.
The adversarial batches run once per module (module-scoped fixtures) to keep the file fast.
"""

from __future__ import annotations

import os
import pathlib
import random
import socket
import uuid

import pytest

from codex_jax.errors import ConfigError
from codex_jax.execute.problems import Problem, build_program
from codex_jax.execute.sandbox import WORKER_SCRIPT, Executor, SandboxUnavailable, probe_bubblewrap

ADD = Problem("test/add", "def add(a, b):\n", "    return a + b\n",
              "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "add")
CORRECT = "    return a + b\n"
TAG = uuid.uuid4().hex[:12]
TMP_FILE = f"/tmp/codex_jax_probe_tmp_{TAG}"
CWD_FILE = f"codex_jax_probe_cwd_{TAG}"
SH_FILE = f"/tmp/codex_jax_probe_sh_{TAG}"
SYSTEM_FILE = f"codex_jax_probe_system_{TAG}"


def prog(body: str) -> str:
    return build_program(ADD, body)


def stray_programs() -> list[tuple[int, int, str]]:
    """Processes running the worker's code that are not workers (a worker is a child of
    this process, rlimits-only, or of bubblewrap): what a program left running."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, [a.decode(errors="replace") for a in argv])
    def owner(pid: int) -> int:
        """The first ancestor that is neither bubblewrap nor a worker: this test process,
        pid 1 for an orphan (what an escaped program becomes), or another process's tree
        (another executor on a shared machine: not this test's business)."""
        while pid in table and (WORKER_SCRIPT in table[pid][1] or os.path.basename(table[pid][1][0]) == "bwrap"):
            pid = table[pid][0]
        return pid

    strays = []
    for pid, (ppid, argv) in table.items():
        if WORKER_SCRIPT in argv and owner(pid) in (os.getpid(), 1, 0):
            parent = table.get(ppid, (0, [""]))[1]
            if ppid != os.getpid() and os.path.basename(parent[0]) != "bwrap":
                strays.append((pid, ppid, " ".join(argv)[:80]))
    return strays


def host_traces() -> list[str]:
    """Files the adversarial programs wrote, if any reached the host."""
    candidates = [TMP_FILE, SH_FILE, os.path.join(os.getcwd(), CWD_FILE), os.path.join(os.getcwd(), SYSTEM_FILE),
                  f"/tmp/work/{CWD_FILE}", f"/tmp/work/{SYSTEM_FILE}"]
    return [path for path in candidates if os.path.exists(path)]


# Each adversarial completion does its damage, then fails or returns a wrong answer; the
# value is the exact expected result, or a set of acceptable ones (mode-dependent).
COMMON_ADVERSARIAL = {
    "infinite loop": ("    while True:\n        pass\n", "timed out"),
    "long sleep": ("    import time\n    time.sleep(100)\n    return a + b\n", "timed out"),
    "sys.exit": ("    import sys\n    sys.exit(0)\n", "crashed"),
    "os._exit": ("    import os\n    os._exit(0)\n", "crashed"),
    "allocate 8 GB": ("    x = bytearray(8 * 1024 ** 3)\n    return a + b + len(x)\n", "out of memory"),
    "kill parent": ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a + b\n",
                    {"failed: PermissionError", "crashed"}),
    "kill own group": ("    import os, signal\n    os.killpg(0, signal.SIGKILL)\n    return a + b\n", "crashed"),
    "deep recursion": ("    def f(n):\n        return f(n + 1)\n    return f(0)\n", "failed: RecursionError"),
    "unbounded recursion": ("    import sys\n    sys.setrecursionlimit(10 ** 8)\n    def f(n):\n"
                            "        return f(n + 1)\n    return f(0)\n", {"timed out", "crashed", "out of memory"}),
    "50 MB of output": ("    print('x' * 50_000_000)\n    import sys\n    sys.stderr.write('y' * 10_000_000)\n"
                        "    return a - b\n", "failed: AssertionError"),
    "write in cwd": (f"    import os\n    open({CWD_FILE!r}, 'w').write('x')\n    assert os.path.exists({CWD_FILE!r})\n"
                     f"    raise FileExistsError\n", "failed: FileExistsError"),
}
# Only contained by bubblewrap: the rlimits-only fallback shares the host's /tmp,
# network and process table (documented), so these run in sandbox mode only.
SANDBOX_ONLY = {
    "write in /tmp": (f"    import os\n    open({TMP_FILE!r}, 'w').write('x')\n"
                      f"    assert os.path.exists({TMP_FILE!r})\n    raise FileExistsError\n",
                      "failed: FileExistsError"),
    "subprocess writes": ("    import os, subprocess\n"
                          f"    subprocess.run(['sh', '-c', 'echo x > {SH_FILE}'], check=True)\n"
                          f"    assert os.path.exists({SH_FILE!r})\n    raise FileExistsError\n",
                          "failed: FileExistsError"),
    "os.system writes": (f"    import os\n    assert os.system('touch {SYSTEM_FILE}') == 0\n"
                         f"    assert os.path.exists({SYSTEM_FILE!r})\n    raise FileExistsError\n",
                         "failed: FileExistsError"),
    "fork bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                  "            pass\n", "timed out"),
    # kill(-1) signals every process the program may signal except itself: with its own
    # uid, nothing, and it goes on to its wrong answer; with the worker's uid (bubblewrap
    # run by an ordinary user), its worker -- never anything outside the sandbox
    "kill everything": ("    import os, signal\n    os.kill(-1, signal.SIGKILL)\n    return a - b\n",
                        {"failed: AssertionError", "crashed"}),
}


def mixed_batch(cases: dict) -> tuple[list[str], list[str], list]:
    """[correct, case, correct, case, ..., correct]: names, programs, expectations."""
    names, programs, expected = ["correct"], [prog(CORRECT)], ["passed"]
    for name, (body, want) in cases.items():
        names += [name, "correct"]
        programs += [prog(body), prog(CORRECT)]
        expected += [want, "passed"]
    return names, programs, expected


def check_batch(names, outcomes, expected) -> None:
    for name, outcome, want in zip(names, outcomes, expected):
        ok = outcome.result in want if isinstance(want, set) else outcome.result == want
        assert ok, f"{name}: got {outcome.result!r}, expected {want!r}"
        assert name == "correct" or not outcome.passed, name


@pytest.fixture(scope="module")
def sandbox():
    mode, reason = probe_bubblewrap()
    if not mode:
        pytest.skip(f"bubblewrap unavailable here: {reason}")
    with Executor(timeout=1.0, isolation="bubblewrap") as ex:
        yield ex


@pytest.fixture(scope="module")
def fallback():
    with Executor(timeout=1.0, isolation="rlimits") as ex:
        yield ex


@pytest.fixture(scope="module")
def secrets_on_host(tmp_path_factory):
    """Secret files on the host: in the test's tmp dir (under /tmp) and in the home directory."""
    paths = [tmp_path_factory.mktemp("secret") / f"secret_{TAG}"]
    home = pathlib.Path.home()
    if str(home).startswith(("/root", "/home")) and os.access(home, os.W_OK):
        paths.append(home / f".codex_jax_secret_{TAG}")
    for path in paths:
        path.write_text(f"secret {TAG}")
    yield paths
    for path in paths:
        path.unlink()


@pytest.fixture(scope="module")
def sandbox_batch(sandbox, secrets_on_host):
    """The full adversarial batch, mixed with correct programs, run once in the sandbox."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    cases = {**COMMON_ADVERSARIAL, **SANDBOX_ONLY,
             "network": (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         f"    return a + b\n", {"failed: ConnectionRefusedError", "failed: OSError",
                                               "failed: TimeoutError"})}
    for i, path in enumerate(secrets_on_host):
        cases[f"read host secret {i}"] = (f"    assert open({str(path)!r}).read() == {f'secret {TAG}'!r}\n"
                                          f"    return a + b\n", "failed: FileNotFoundError")
    names, programs, expected = mixed_batch(cases)
    outcomes = sandbox.run(programs)
    left = stray_programs()
    try:
        listener.accept()
        connected = True
    except (TimeoutError, socket.timeout):
        connected = False
    listener.close()
    return names, outcomes, expected, left, connected


def test_correct_passes_wrong_fails(sandbox):
    bodies = [CORRECT, "    return a - b\n", "    return a / 0\n", "    raise KeyError(a)\n", "    return a +\n",
              "    return undefined_name\n", "    raise type('Odd\\nName: passed', (Exception,), {})()\n"]
    results = [o.result for o in sandbox.run([prog(b) for b in bodies])]
    assert results == ["passed", "failed: AssertionError", "failed: ZeroDivisionError", "failed: KeyError",
                       "failed: SyntaxError", "failed: NameError", "failed: Odd?Name??passed"]
    assert sandbox.isolation == "bubblewrap"


def test_adversarial_batch_in_sandbox(sandbox_batch):
    names, outcomes, expected, left, connected = sandbox_batch
    check_batch(names, outcomes, expected)
    assert not connected, "a sandboxed program reached a host socket"
    assert left == [], f"processes left running: {left}"
    assert host_traces() == []


def test_outcomes_do_not_depend_on_order(sandbox):
    cases = ["infinite loop", "sys.exit", "allocate 8 GB", "deep recursion", "kill own group"]
    programs = [prog(CORRECT), prog("    return a - b\n")] + [prog(COMMON_ADVERSARIAL[c][0]) for c in cases]
    forward = sandbox.run(programs)
    backward = sandbox.run(programs[::-1])
    assert forward == backward[::-1]
    assert [o.result for o in sandbox.run(programs[:2] * 20)] == ["passed", "failed: AssertionError"] * 20


def test_random_and_hash_are_fixed(sandbox):
    """random is seeded with 0 and the hash seed fixed in every child, so a program that
    uses them behaves the same on every worker (two programs in one run go to the two
    workers: both slots are idle when the run starts)."""
    first = random.Random(0).random()
    body = ("    global FIRST\n    if 'FIRST' not in globals():  # check calls add twice\n        import random\n"
            f"        FIRST = random.random()\n    assert FIRST == {first!r}\n    return a + b\n")
    outs = sandbox.run([prog(body)] * 2)
    assert [o.result for o in outs] == ["passed", "passed"]
    for bit in range(12):
        one, two = sandbox.run([prog(f"    assert hash('codex') >> {bit} & 1\n    return a + b\n")] * 2)
        assert one.result == two.result


def test_fallback_rlimits_only(fallback):
    assert fallback.isolation == "rlimits-only"
    results = [o.result for o in fallback.run([prog(CORRECT), prog("    return a - b\n"), prog("    return a / 0\n")])]
    assert results == ["passed", "failed: AssertionError", "failed: ZeroDivisionError"]


def test_fallback_adversarial(fallback):
    names, programs, expected = mixed_batch(COMMON_ADVERSARIAL)
    check_batch(names, fallback.run(programs), expected)
    assert stray_programs() == []
    assert host_traces() == []


def test_require_sandbox_when_unavailable(capfd):
    missing = f"/nonexistent/bwrap-{uuid.uuid4().hex}"
    with pytest.raises(SandboxUnavailable, match="bubblewrap sandbox is required but unavailable"):
        Executor(workers=1, bwrap=missing, require_sandbox=True)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Executor(workers=1, bwrap=missing, isolation="bubblewrap")
    with pytest.raises(ConfigError, match="contradicts"):
        Executor(workers=1, isolation="rlimits", require_sandbox=True)
    capfd.readouterr()
    with Executor(workers=1, bwrap=missing) as ex:  # auto: falls back, loudly, once
        assert ex.isolation == "rlimits-only"
        assert ex.run([prog(CORRECT)])[0].passed
    with Executor(workers=1, bwrap=missing) as ex:
        assert ex.isolation == "rlimits-only"
    err = capfd.readouterr().err
    assert err.count("WARNING: bubblewrap sandbox unavailable") == 1


@pytest.mark.parametrize("options", [{"timeout": 0}, {"workers": 0}, {"workers": 1.5}, {"isolation": "docker"},
                                     {"memory_mb": "1G"}, {"timeout": 2.0, "wall_timeout": 1.0}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        Executor(**options)


def test_close_leaves_nothing():
    def workers() -> set[int]:
        me = os.getpid()
        with open(f"/proc/{me}/task/{me}/children") as f:
            return {int(p) for p in f.read().split()}

    before = workers()
    scratch_before = {p for p in os.listdir("/tmp") if p.startswith("codex-jax-exec-")}
    with Executor(workers=2, timeout=1.0, isolation="rlimits") as ex:
        assert len(workers() - before) == 2
        programs = [prog(f"    open('f{i}', 'w').write('x')\n    return a + b\n") for i in range(4)]
        assert all(o.passed for o in ex.run(programs))
    assert workers() == before  # no worker and no zombie left
    assert stray_programs() == []
    assert {p for p in os.listdir("/tmp") if p.startswith("codex-jax-exec-")} == scratch_before
    ex.close()  # idempotent
