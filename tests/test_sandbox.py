"""The sandboxed executor: normal step programs, and hostile ones that must be contained.

Every hostile program must end with a clear result within its timeout plus a small margin, and the pool must
serve the next program afterwards. Hostile cases run against a sandbox with every layer the platform allows
and against one without namespaces (privilege drop, rlimits, Landlock, seccomp and the audit hook remain).
Assertions about a layer apply where the sandbox reports that layer in force (``Sandbox.isolation``).

Develop changes here inside a private PID namespace: ``unshare -p -f --mount-proc python -m pytest ...``.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from rstar_jax.verify.sandbox import (
    DEFAULT_PRELOAD, MAX_PROGRAM_CHARS, ExecResult, Sandbox, SandboxError, SandboxLimits, missing_layers)

TIMEOUT_S = 2.0
MARGIN_S = 1.5  # scheduling slack on a loaded 2-core machine, on top of the program's timeout
UID_BASE = 60000
SECRET_NAME, SECRET = "RSTAR_SANDBOX_TEST_SECRET", f"secret-{uuid.uuid4().hex}"
LIMITS = SandboxLimits(memory_bytes=1 << 30, max_processes=32)


@pytest.fixture(scope="module")
def secret_in_environment():
    """A secret in the caller's environment while the workers start and run."""
    os.environ[SECRET_NAME] = SECRET
    yield
    del os.environ[SECRET_NAME]


@pytest.fixture(scope="module")
def full(secret_in_environment):
    with Sandbox(num_workers=2, timeout_s=TIMEOUT_S, limits=LIMITS, uid_base=UID_BASE) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def bare(secret_in_environment):
    # Without a mount namespace an interpreter in a directory closed to others (pyenv under /root) cannot be
    # exposed to the sandbox uid, so preload what the hostile programs import.
    preload = DEFAULT_PRELOAD + ("ctypes", "fcntl", "glob", "signal", "socket", "termios", "threading", "time")
    with Sandbox(num_workers=1, timeout_s=TIMEOUT_S, limits=LIMITS, namespaces=False, preload=preload,
                 uid_base=UID_BASE + 10) as sandbox:
        yield sandbox


@pytest.fixture(params=["full", "bare"])
def sandbox(request):
    """Each hostile case runs with all layers, then without namespaces."""
    return request.getfixturevalue(request.param)


def run_one(sandbox: Sandbox, program: str, timeout_s: float = TIMEOUT_S) -> ExecResult:
    """Run one program; it must come back within its timeout plus the margin."""
    started = time.monotonic()
    result = sandbox.run([program], timeout_s=timeout_s)[0]
    elapsed = time.monotonic() - started
    assert elapsed < timeout_s + MARGIN_S, f"took {elapsed:.1f} s: {result}"
    return result


def assert_serving(sandbox: Sandbox) -> None:
    results = sandbox.run(["print(6 * 7)"] * sandbox.num_workers)
    assert [(r.stdout, r.failed) for r in results] == [("42", False)] * sandbox.num_workers


def sandbox_processes(uids) -> list[int]:
    """Host pids of live (non-zombie) processes running as one of ``uids``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if int(fields["Uid"].split()[0]) in uids and not fields["State"].strip().startswith("Z"):
                found.append(int(entry))
    return found


def sandbox_uids(sandbox: Sandbox) -> set[int]:
    base = sandbox.isolation["uid"]
    return set(range(base, base + sandbox.num_workers))


# ------------------------------------------------------------------------------------------ normal programs
def test_arithmetic(full):
    result = full.run(["a = 12 * 7\nprint(a + 1)"])[0]
    assert isinstance(result, ExecResult)
    assert (result.stdout, result.failed, result.error_type, result.timed_out) == ("85", False, None, False)
    assert 0 < result.wall_s < TIMEOUT_S


def test_sympy_solve(full):
    program = ("from sympy import symbols, Eq, solve\nx, y = symbols('x y')\n"
               "sol = solve((Eq(2*x + 3*y, 13), Eq(x - y, 1)), (x, y))\nprint(sol[x] + sol[y])")
    result = full.run([program])[0]
    assert (result.stdout, result.failed) == ("27/5", False)


def test_numpy(full):
    result = full.run(["import numpy as np\nprint(np.linalg.det(np.array([[2.0, 1.0], [1.0, 3.0]])))"])[0]
    assert (result.stdout, result.failed) == ("5.0", False)


def test_output_in_reference_display_form(full):
    short, long_ = full.run(["print(1/3)\nprint(2.50)\nprint(10)", "print('a' * 600 + 'b' * 600)"])
    assert short.stdout == "0.3333\n2.5\n10"
    assert long_.stdout == "a" * 512 + "..." + "b" * 511  # the last 512 ended with the newline, then stripped


def test_exception_fails_with_type_and_message(full):
    result = full.run(["print('partial')\nraise ValueError('bad value')"])[0]
    assert result.failed and not result.timed_out
    assert (result.error_type, result.error_message, result.stdout) == ("ValueError", "bad value", "partial")
    assert result.observation == "ValueError: bad value"


def test_printing_the_word_error_is_not_a_failure(full):
    result = full.run(["print('error: none; Traceback (most recent call last): ZeroDivisionError')"])[0]
    assert not result.failed and result.error_type is None
    assert result.observation == result.stdout


def test_syntax_error_and_exit_status(full):
    syntax, clean_exit, bad_exit, eof = full.run(
        ["x = (", "import sys\nprint(1)\nsys.exit(0)", "import sys\nsys.exit(3)", "input()"])
    assert syntax.failed and syntax.error_type == "SyntaxError"
    assert (clean_exit.stdout, clean_exit.failed) == ("1", False)
    assert bad_exit.failed and (bad_exit.error_type, bad_exit.error_message) == ("SystemExit", "3")
    assert eof.failed and eof.error_type == "EOFError"  # stdin is closed


def test_every_run_starts_from_scratch(full):
    full.run(["import math\nmath.tau = 0\nopen('state.txt', 'w').write('1')\nimport os\nos.environ['X'] = '1'"])
    results = full.run(["import math, os\nprint(os.path.exists('state.txt'), math.tau == 2 * math.pi, "
                        "'X' in os.environ)"] * 4)
    assert {r.stdout for r in results} == {"False True False"}


def test_batch_keeps_order_and_threads_can_submit(full):
    programs = [f"print({i} * {i})" for i in range(12)]
    assert [r.stdout for r in full.run(programs)] == [str(i * i) for i in range(12)]
    outputs = {}

    def client(k):
        outputs[k] = [r.stdout for r in full.run([f"print({k} + {j})" for j in range(3)])]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outputs == {k: [str(k + j) for j in range(3)] for k in range(4)}


def test_unicode_and_invalid_text_output(full):
    result = full.run(["print('π ≈ 3.14 ✓')\nprint('\\ud800')"])[0]
    assert not result.failed and result.stdout.startswith("π ≈ 3.14 ✓\n") and len(result.stdout) == 12


def test_program_size(full):
    long_program = "x = 1\n" * 200_000 + "print(x + 1)"
    assert full.run([long_program])[0].stdout == "2"
    with pytest.raises(ValueError, match="exceeds"):
        full.submit("#" * (MAX_PROGRAM_CHARS + 1))


def test_per_call_timeout(full):
    result = run_one(full, "import time\ntime.sleep(30)", timeout_s=0.5)
    assert result.timed_out and result.failed and result.error_type == "TimeoutError"
    assert result.error_message == "Execution of the code snippet has timed out for exceeding 0.5 seconds."


def test_privileges_are_dropped(full):
    if os.geteuid() != 0:
        pytest.skip("not started as root: there is no privilege to drop")
    isolation = full.isolation
    assert isolation["drops_privileges"] and isolation["uid"] == UID_BASE and isolation["no_new_privs"]
    result = full.run(["import os\nprint(os.getuid(), os.geteuid(), os.getgid())\nos.setuid(0)"])[0]
    assert result.stdout in {f"{u} {u} {u}" for u in (UID_BASE, UID_BASE + 1)}
    assert result.error_type == "PermissionError"


def test_isolation_report_lists_the_layers(full, bare):
    for key in ("pid_namespace", "network_namespace", "mount_namespace", "seccomp", "landlock_abi",
                "drops_privileges", "no_new_privs", "private_tmp", "preloaded"):
        assert key in full.isolation
    assert {"numpy", "sympy"} <= set(full.isolation["preloaded"])
    assert not bare.isolation["pid_namespace"] and not bare.isolation["network_namespace"]
    assert "a PID namespace (programs see the host's processes)" in missing_layers(bare.isolation)  # and logged
    if os.geteuid() == 0 and full.isolation["pid_namespace"] and full.isolation["landlock_abi"]:
        assert missing_layers(full.isolation) == []


# ------------------------------------------------------------------------------------------ hostile programs
def test_infinite_loop(sandbox):
    result = run_one(sandbox, "while True:\n    pass")
    assert result.timed_out and result.failed and result.error_type == "TimeoutError"
    assert_serving(sandbox)


def test_ignoring_sigterm(sandbox):
    result = run_one(sandbox, "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                              "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass")
    assert result.timed_out
    assert_serving(sandbox)


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
], ids=["fork_bomb", "fork_bomb_ignoring_errors"])
def test_fork_bomb(sandbox, program):
    result = run_one(sandbox, program)
    assert result.failed
    assert_serving(sandbox)
    if os.geteuid() == 0:  # every process of the sandbox uids is gone shortly after the result
        deadline = time.monotonic() + 5
        while sandbox_processes(sandbox_uids(sandbox)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes(sandbox_uids(sandbox)) == []


@pytest.mark.parametrize("program", [
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\nwhile True:\n    pass",
    "import os, time\nfor _ in range(3):\n    if os.fork():\n        os._exit(0)\n    os.setsid()\ntime.sleep(600)",
], ids=["daemon_then_timeout", "fork_and_exit_chain"])
def test_processes_in_sessions_of_their_own_die_with_the_run(sandbox, program):
    """Out of the program's process group, they come back to the fork server only as their parents die."""
    result = run_one(sandbox, program, timeout_s=2.0)  # back in time: timed out, or exited early
    assert result.failed
    assert_serving(sandbox)  # the next programs run at once: no wait on a survivor
    if os.geteuid() == 0:
        deadline = time.monotonic() + 5
        while sandbox_processes(sandbox_uids(sandbox)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes(sandbox_uids(sandbox)) == []


@pytest.mark.parametrize("program", [
    "x = bytearray(50 * 10**9)",
    "import numpy as np\nx = np.ones(50 * 10**9 // 8)",
    "import numpy as np\nchunks = []\nwhile True:\n    chunks.append(np.empty(10**8 // 8))",
], ids=["bytearray_50GB", "numpy_50GB", "gradual"])
def test_allocating_50_gb(sandbox, program):
    result = run_one(sandbox, program)
    assert result.failed and not result.timed_out
    assert result.error_type in {"MemoryError", "_ArrayMemoryError"}
    assert_serving(sandbox)


def test_printing_1_gb(sandbox):
    result = run_one(sandbox, "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                              "    sys.stdout.write(chunk)\nprint('end')")
    assert not result.failed
    assert result.stdout == "x" * 512 + "..." + "x" * 508 + "end"
    assert_serving(sandbox)


def test_writes_outside_the_working_directory(sandbox):
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as open_dir:
        os.chmod(open_dir, 0o777)  # even a world-writable host directory must stay untouched
        targets = [f"{open_dir}/escape-{token}", f"/tmp/escape-{token}", f"/dev/shm/escape-{token}",
                   f"/var/tmp/escape-{token}", f"/etc/escape-{token}", f"{os.getcwd()}/escape-{token}"]
        program = (f"import json\nwritten = []\nfor path in {targets!r}:\n    try:\n"
                   "        open(path, 'w').write('x')\n        written.append(path)\n    except OSError:\n"
                   "        pass\nopen('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())")
        result = run_one(sandbox, program)
        leaked = [path for path in targets if os.path.exists(path)]
        for path in leaked:
            os.unlink(path)
    assert (result.stdout, result.failed) == ("ok", False)
    if sandbox.isolation.get("readonly_root") or sandbox.isolation["landlock_abi"]:
        assert leaked == []
    elif sandbox.isolation["drops_privileges"]:  # only world-writable places are left open
        assert [path for path in leaked if path.startswith(("/etc/", os.getcwd()))] == []
    assert_serving(sandbox)


def test_files_beyond_the_libraries_cannot_be_read(sandbox):
    """Problem files hold the answers the search grades against; checkpoints, homes and the repository are no
    program's business either. The interpreter's and the system's libraries stay readable (imports work)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = ["/etc/passwd", os.path.join(repo, "README.md"), os.path.join(repo, "tests", "data", "grader_cases.jsonl"),
             os.path.expanduser("~")]
    program = ("import os\nfor p in %r:\n    try:\n        open(p).read() if os.path.isfile(p) else os.listdir(p)\n"
               "        print('read')\n    except OSError as e:\n        print(type(e).__name__)\n"
               "import fractions, sympy, numpy\nprint(sympy.Rational(1, 3) + fractions.Fraction(1, 6))") % paths
    result = run_one(sandbox, program)
    assert not result.failed, result
    *refused, last = result.stdout.split("\n")
    if sandbox.isolation["landlock_abi"]:  # (a path under /tmp is not even there: the program's tmpfs hides it)
        assert set(refused) <= {"PermissionError", "FileNotFoundError"} and len(refused) == len(paths), refused
    assert last == "1/2"
    assert_serving(sandbox)


def test_a_read_root_the_program_cannot_see_gets_no_rule(tmp_path):
    """A venv under /tmp is hidden by the per-run tmpfs: its rule is left out, not the whole of Landlock."""
    from rstar_jax.verify import sandbox_linux as linux
    abi = linux.landlock_abi()
    if not abi:
        pytest.skip("no Landlock on this kernel")
    os.close(linux.landlock_ruleset(str(tmp_path), abi, (str(tmp_path / "hidden" / "site-packages"), "/usr/lib")))


def test_environment_secrets_are_not_visible(sandbox):
    program = (f"import os, glob\nsecret = {SECRET!r}\nfound = [k for k, v in os.environ.items() if secret in v]\n"
               "readable = 0\nfor path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
               "    try:\n        data = open(path, 'rb').read()\n    except OSError:\n        continue\n"
               "    readable += 1\n    if secret.encode() in data:\n        found.append(path)\n"
               "print(found, readable > 0)")
    result = run_one(sandbox, program)
    assert not result.failed
    isolation = sandbox.isolation
    if isolation["pid_namespace"] or isolation["drops_privileges"]:
        assert result.stdout == "[] True"
    else:  # same uid, same PID namespace: only the program's own environment can be kept clean
        assert result.stdout.startswith("[") and "'" + SECRET_NAME not in result.stdout
    assert_serving(sandbox)


def test_socket_to_localhost_is_refused(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = run_one(sandbox, f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
                                  "s.sendall(b'escaped')")
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.failed and result.error_type == "PermissionError"
    raw = run_one(sandbox, "import ctypes\nprint(ctypes.CDLL(None).socket(2, 1, 0))")  # below the audit hook
    if sandbox.isolation["seccomp"]:
        assert raw.stdout == "-1"
    assert_serving(sandbox)


def test_killing_the_parent(sandbox):
    pids = sandbox.worker_pids
    result = run_one(sandbox, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')")
    assert not result.timed_out
    assert_serving(sandbox)
    isolation = sandbox.isolation
    if isolation["pid_namespace"] or isolation["drops_privileges"] or isolation["landlock_abi"] >= 6:
        assert sandbox.worker_pids == pids  # the signal could not reach the worker: the program was told so
        assert (result.failed, result.error_type, result.stdout) == (True, "PermissionError", ""), result


def test_signalling_every_process(sandbox):
    isolation = sandbox.isolation
    if not (isolation["pid_namespace"] or isolation["seccomp"] or isolation["landlock_abi"] >= 6):
        pytest.skip("without a PID namespace, seccomp or Landlock scoping, kill(-1) would reach the caller")
    pids = sandbox.worker_pids
    result = run_one(sandbox, "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')")
    assert not result.timed_out
    assert_serving(sandbox)
    assert sandbox.worker_pids == pids


def test_new_namespaces_are_refused(sandbox):
    result = run_one(sandbox, "import ctypes, os, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                              "print(libc.unshare(0x10000000), ctypes.get_errno() == 1, os.getuid() != 0)")
    if sandbox.isolation["seccomp"]:  # a user namespace would hand the program capabilities again
        assert result.stdout == "-1 True True"
    assert_serving(sandbox)


def test_system_v_shared_memory_is_refused(sandbox):
    """A segment no process owns would outlive the program (and its memory limit) and reach the next one."""
    result = run_one(sandbox, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                              "print(libc.shmget(0, 1 << 20, 0o1600), libc.msgget(0, 0o1600), "
                              "libc.semget(0, 1, 0o1600), ctypes.get_errno() == 1)")
    if sandbox.isolation["seccomp"]:
        assert result.stdout == "-1 -1 -1 True", result
    assert_serving(sandbox)


def test_terminal_input_injection_is_refused(sandbox):
    result = run_one(sandbox, "import fcntl, termios\nfcntl.ioctl(0, termios.TIOCSTI, b'x')")
    assert result.failed  # stdin is /dev/null (not a terminal) in any case
    if sandbox.isolation["seccomp"]:
        assert result.error_type == "PermissionError"
    assert_serving(sandbox)


def test_exit_midway(sandbox):
    result = run_one(sandbox, "print('partial')\nimport os\nos._exit(0)\nprint('never')")
    assert result.failed and result.error_type == "ExitedEarly" and "status 0" in result.error_message
    assert_serving(sandbox)


def test_ctypes_segfault(sandbox):
    result = run_one(sandbox, "import ctypes\nctypes.string_at(0)")
    assert result.failed and result.error_type == "KilledBySignal" and "SIGSEGV" in result.error_message
    assert_serving(sandbox)


@pytest.mark.parametrize("program", [
    "def f(n):\n    return f(n + 1)\nf(0)",
    "import sys\nsys.setrecursionlimit(10**8)\nx = []\nfor _ in range(10**5):\n    x = [x]\nprint(repr(x)[:5])",
], ids=["python", "c_stack"])
def test_deep_recursion(sandbox, program):
    result = run_one(sandbox, program)
    assert result.failed and not result.timed_out
    assert result.error_type in {"RecursionError", "KilledBySignal", "MemoryError"}
    assert_serving(sandbox)


def test_threads_outliving_the_program(sandbox):
    result = run_one(sandbox, "import threading, time\ndef spin():\n    while True:\n        time.sleep(0.01)\n"
                              "for _ in range(4):\n    threading.Thread(target=spin).start()\nprint('main done')")
    assert (result.stdout, result.failed) == ("main done", False)
    assert result.wall_s < 1.0
    assert_serving(sandbox)


def test_replacing_builtins_and_sys_modules(sandbox):
    result = run_one(sandbox, "import builtins, sys, json, os\nprint('before')\n"
                              "for name in ('print', 'len', 'isinstance', 'str', 'type', 'memoryview', '__import__'):\n"
                              "    setattr(builtins, name, None)\n"
                              "json.dumps = json.encoder.c_make_encoder = os.write = os._exit = None\n"
                              "sys.stdout = None\nsys.modules.clear()")
    assert (result.stdout, result.failed) == ("before", False)
    assert_serving(sandbox)


def test_forged_report_cannot_break_the_worker(sandbox):
    result = run_one(sandbox, "import os\nos.write(3, (10**6).to_bytes(4, 'big') + b'{\"not\": \"json')\n"
                              "os.write(3, b'x' * 10**6)")
    assert result.failed and result.error_type in {"SandboxError", "ExitedEarly"}
    assert_serving(sandbox)


# ------------------------------------------------------------------------------------------ the pool itself
def test_dead_workers_are_replaced(full):
    os.kill(full.worker_pids[0], 9)
    slow = full.submit("import time\ntime.sleep(0.5)\nprint('slow')")
    time.sleep(0.2)
    os.kill(full.worker_pids[1], 9)  # killed while (most likely) running a program
    results = full.run([f"print({i})" for i in range(6)])
    assert [r.stdout for r in results] == [str(i) for i in range(6)]
    lost = slow.result()
    assert lost.stdout == "slow" or (lost.failed and lost.error_type == "SandboxError")
    assert_serving(full)


def test_closed_sandbox_refuses_work():
    with Sandbox(num_workers=1, timeout_s=TIMEOUT_S, preload=("math",)) as sandbox:
        assert sandbox.run(["import math\nprint(math.factorial(5))"])[0].stdout == "120"
    with pytest.raises(SandboxError, match="closed"):
        sandbox.submit("print(1)")


def test_command_line_prints_one_json_result_per_file(tmp_path):
    (tmp_path / "ok.py").write_text("print(sum(range(5)))\n")
    (tmp_path / "steps.txt").write_text("<code>\n# Step 1\nx = 2\n<end_of_step>\nprint(x * 3)\n<end_of_code>")
    (tmp_path / "bad.py").write_text("1 / 0\n")
    done = subprocess.run([sys.executable, "-m", "experiments.sandbox", "--timeout_s=5", "--num_workers=1",
                           str(tmp_path / "ok.py"), str(tmp_path / "steps.txt"), str(tmp_path / "bad.py")],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(d["stdout"], d["failed"], d["error_type"]) for d in lines] == [
        ("10", False, None), ("6", False, None), ("", True, "ZeroDivisionError")]
    assert lines[2]["observation"] == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize("args, message", [
    (["missing.py"], "No such file or directory"),
    (["."], "Is a directory"),
    (["latin1.py"], "latin1.py: not UTF-8 text (byte 7"),
    (["--timeout_s=0", "ok.py"], "flag --timeout_s=0.0: --timeout_s must be positive"),
    (["--num_workers=0", "ok.py"], "flag --num_workers=0"),
])
def test_command_line_names_a_bad_file_or_flag(tmp_path, args, message):
    (tmp_path / "ok.py").write_text("print(1)\n")
    (tmp_path / "latin1.py").write_bytes(b'print("\xe9")\n')
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "experiments.sandbox", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)  # in tmp_path: the files by relative name
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not done.stdout  # nothing ran
