"""Sandbox worker: a fork server with the step libraries already imported that runs each program in a fresh,
locked-down child process.

Started by ``rstar_jax.verify.sandbox.Sandbox`` as ``python -s -B -P <this file>`` with a scrubbed environment.
Standard library only, so it never imports the rest of the package (or JAX). The isolation mechanisms live in
sibling files, imported as top-level modules before anything is locked down: ``sandbox_linux`` (system calls
through ctypes, Landlock), ``sandbox_seccomp`` (the syscall filter), ``sandbox_namespaces`` (namespaces and
mounts) and ``sandbox_lockdown`` (what each child applies to itself).

Processes of one worker:
  launcher     host namespaces. Unshares new mount, network, IPC, UTS and PID namespaces (inside a new user
               namespace when not root), forks the fork server and waits for it.
  fork server  pid 1 of the new PID namespace: its own /proc, a read-only view of the file system, no network
               interfaces. Imports numpy/sympy once, then per request mounts a fresh tmpfs on /tmp and forks:
  child        own session; resource limits; no new privileges; Landlock (writes only under /tmp, no TCP, no
               signals to processes outside its own); unprivileged uid when started as root; no capabilities;
               a seccomp filter (no sockets, no namespace, mount, ptrace or kernel-module calls); /dev/null as
               stdin/stdout/stderr. It runs the program with a bounded capture of sys.stdout, reports over a
               pipe and exits. The fork server then kills everything left in its namespace and drops the tmpfs.
Every layer degrades on its own where the platform refuses it; the ``ready`` message lists what is in force.

Protocol on the launcher's stdin/stdout: frames of a 4-byte big-endian length and UTF-8 JSON. The host sends the
configuration and gets ``{"ready": isolation}`` or ``{"fatal": message}``; then each ``{"id", "source",
"timeout_s"}`` request gets one reply. The child reports to the fork server in the same framing over a pipe that
the program can also write to: that report is untrusted, size-bounded and validated.
"""
from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import math
import os
import platform
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

# The sibling modules, found through their directory, which is on sys.path only for these imports (-P kept it
# off): loaded now, before the mount namespace may hide their files from the sandbox uid, then dropped from
# sys.modules (they live on through the names bound here), so that programs see the same modules as ever.
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
try:
    import sandbox_linux as linux
    import sandbox_namespaces as namespaces
    from sandbox_lockdown import REPORT_FD, Lockdown
finally:
    del sys.path[0]
    for _sibling in ("sandbox_linux", "sandbox_seccomp", "sandbox_namespaces", "sandbox_lockdown"):
        sys.modules.pop(_sibling, None)

# ------------------------------------------------------------------------------------------------ framing
MAX_REQUEST_BYTES = 64 << 20


def read_frame(fd: int, limit: int = MAX_REQUEST_BYTES) -> bytes | None:
    """One frame from a blocking fd; None at a clean end of file."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes exceeds the {limit}-byte limit")
    body = _read_exactly(fd, size)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return body


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise EOFError("stream ended inside a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, message: dict) -> None:
    payload = json.dumps(message, ensure_ascii=True).encode("ascii")
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------------------------------------- the child
EXIT_LOCKDOWN_FAILED = 71

# Bound before any untrusted code runs: replacing builtins, module attributes or sys.modules inside the
# program must not stop the child from reporting and exiting. The report goes through the C JSON encoder
# directly, since json.dumps runs Python code that looks builtins up at call time.
_exit, _getpid, _write = os._exit, os.getpid, os.write
_compile, _exec, _type, _str, _len, _isinstance, _memoryview = compile, exec, type, str, len, isinstance, memoryview
_SystemExit, _BaseException = SystemExit, BaseException
_join = "".join
_encode_json = (json.encoder.c_make_encoder(None, None, json.encoder.encode_basestring_ascii, None, ":", ",",
                                            False, False, True)
                if json.encoder.c_make_encoder is not None else None)


class BoundedText(io.TextIOBase):
    """The child's sys.stdout: keeps the first and the last ``keep`` characters written."""

    def __init__(self, keep: int):
        self._keep = keep
        self._head: list[str] = []
        self._head_len = 0
        self._tail: list[str] = []
        self._tail_len = 0
        self.chars = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not _isinstance(text, _str):
            raise TypeError(f"write() argument must be str, not {_type(text).__name__}")
        size = _len(text)
        self.chars += size
        start = 0
        room = self._keep - self._head_len
        if room > 0:
            part = text[:room]
            self._head.append(part)
            self._head_len += _len(part)
            start = _len(part)
        if start < size:
            if size - start >= self._keep:  # slice just the end of a huge write, never copy all of it
                self._tail, self._tail_len = [text[-self._keep:]], self._keep
            else:
                self._tail.append(text[start:])
                self._tail_len += size - start
                if self._tail_len > 2 * self._keep:
                    kept = _join(self._tail)[-self._keep:]
                    self._tail, self._tail_len = [kept], _len(kept)
        return size

    def snapshot(self) -> tuple[str, str, int]:
        return _join(self._head), _join(self._tail)[-self._keep:], self.chars


def _describe(exc: BaseException, limit: int = 2000) -> str:
    try:
        text = _str(exc)
    except _BaseException:  # a hostile __str__
        return "<unprintable exception>"
    return text[:limit] if _isinstance(text, _str) else "<unprintable exception>"


def _run_untrusted(source: str, keep: int) -> dict:
    """Execute the program as __main__ with sys.stdout captured; the report of how it ended."""
    me = _getpid()
    out = BoundedText(keep)
    sys.stdout = out
    error_type = error_message = None
    try:
        _exec(_compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except _SystemExit as exc:  # sys.exit()/exit(): a normal end when the status is 0 or None
        if exc.code is not None and exc.code != 0:
            error_type, error_message = "SystemExit", _describe(exc)
    except _BaseException as exc:
        error_type, error_message = _type(exc).__name__[:200], _describe(exc)
    if _getpid() != me:  # a process the program forked came back here: only the original reports
        _exit(0)
    head, tail, chars = out.snapshot()
    return {"stdout_head": head, "stdout_tail": tail, "stdout_chars": chars,
            "error_type": error_type, "error_message": error_message}


def _send_report(report: dict, _dumps=json.dumps) -> None:
    text = _join(_encode_json(report, 0)) if _encode_json is not None else _dumps(report, ensure_ascii=True)
    payload = text.encode("ascii")
    data = _memoryview(_len(payload).to_bytes(4, "big") + payload)
    while data:
        data = data[_write(REPORT_FD, data):]


def child_main(lockdown: Lockdown, source: str, report_fd: int, work_dir: str, timeout_s: float,
               keep: int) -> None:
    """Entry of a freshly forked child; never returns."""
    status = EXIT_LOCKDOWN_FAILED
    try:
        try:
            lockdown.apply(report_fd, work_dir, timeout_s)
        except BaseException as exc:
            report = {"stdout_head": "", "stdout_tail": "", "stdout_chars": 0, "error_type": "SandboxError",
                      "error_message": f"isolation setup failed, program not run: {exc!r}"[:2000]}
        else:
            status = 0
            report = _run_untrusted(source, keep)
        _send_report(report)
    finally:
        _exit(status)


# -------------------------------------------------------------------------------------------- fork server
_PROBE_SOURCE = r"""
import json, os, sys
status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'pid': os.getpid(), 'cwd': os.getcwd(),
                  'cap_eff': status['CapEff'].strip(), 'seccomp': status.get('Seccomp', '0').strip(),
                  'no_new_privs': status.get('NoNewPrivs', '0').strip(),
                  'applied': sys.modules[MODULE].SERVER.lockdown.applied,
                  'stdlib_readable': os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK)}))
"""

# Trusted warm-up run once in the fork server: loads the lazily imported parts of SymPy/NumPy that step
# programs reach first, so that every child starts with them in memory.
_WARMUP_SOURCE = r"""
import math, fractions, itertools, collections, decimal
import numpy as np
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(sp.Eq(x**2 - 5*x + 6, 0), x)
sp.solve([sp.Eq(x + y, 10), sp.Eq(x - y, 2)], [x, y])
sp.simplify((x**2 - 1) / (x - 1)); sp.factor(x**2 - 1); sp.expand((x + 1)**3)
sp.nsimplify(0.5); sp.N(sp.pi, 10); sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.sin(x), x)
sp.Rational(1, 3) + sp.sqrt(2); sp.Matrix([[1, 2], [3, 4]]).det(); sp.binomial(10, 3); sp.isprime(97)
str(sp.Rational(1, 3)); sp.latex(x**2)
a = np.array([[2.0, 1.0], [1.0, 3.0]])
np.linalg.solve(a, np.array([1.0, 2.0])); np.linalg.det(a); np.mean(a); np.arange(10).sum(); str(a)
fractions.Fraction(1, 3) + fractions.Fraction(1, 6); math.comb(10, 3); list(itertools.permutations(range(3)))
decimal.Decimal('1.10') + decimal.Decimal('2.2'); collections.Counter('abca')
"""

_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
SERVER: "ForkServer | None" = None  # the running fork server (the start-up probe reads its lockdown state)


class ForkServer:
    def __init__(self, config: dict, namespaces_in_force: dict):
        self.config = config
        self.identity = tuple(config["identity"]) if config.get("identity") and os.geteuid() == 0 else None
        self.isolation = dict(namespaces_in_force)
        self.private_tmp = False
        self.work_dir = "/tmp"
        self.lockdown: Lockdown | None = None
        self._current: int | None = None  # pid of the last child

    # ---- start-up
    def start(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a same-uid child (user-namespace mode) must not stop us
        try:
            with open("/proc/self/oom_score_adj", "w") as f:  # inherited: the OOM killer takes programs first
                f.write("1000")
        except OSError:
            pass
        if not self.isolation["pid_namespace"]:
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # orphans of a program come back to us to be killed
        if self.isolation["mount_namespace"]:
            self._set_up_mounts()
        else:
            self.work_dir = self._make_host_work_dir()
        self.lockdown = Lockdown(self.config["limits"], self.identity)
        # The children's environment, set once here: nothing of the host's, the same paths for every run.
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.work_dir, "TMPDIR": self.work_dir,
                           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        tempfile.tempdir = self.work_dir
        self._preload()
        gc.collect()
        gc.freeze()  # the collector would otherwise write to (and so copy) every inherited object in each child
        self._probe()
        # Huge pages for the heap, now that it is complete (after the probe, whose fork split some): forking and
        # each child's exit then cost a fraction of the page-table work.
        self.isolation["huge_page_bytes"] = linux.collapse_anonymous_memory()

    def _set_up_mounts(self) -> None:
        namespaces.make_mounts_private()
        if self.identity is not None:
            self.isolation["exposed_for_imports"] = namespaces.expose_to_others(namespaces.import_roots())
        try:  # one trial of the per-run tmpfs decides how working directories are made
            self._mount_tmp()
            linux.umount_detached("/tmp")
            self.private_tmp = True
        except OSError:
            self.work_dir = self._make_host_work_dir()
        # Without a private tmpfs the host work dir is the one writable place.
        self.isolation["readonly_root"] = namespaces.make_root_readonly(None if self.private_tmp else self.work_dir)
        self.isolation["private_proc"] = self.isolation["pid_namespace"] and namespaces.mount_private_proc()

    def _make_host_work_dir(self) -> str:
        """Without a private tmpfs: one private directory in the host's temp dir, emptied after every run."""
        work_dir = tempfile.mkdtemp(prefix="rstar-sandbox-")
        if self.identity is not None:
            os.chown(work_dir, *self.identity)
        return work_dir

    def _preload(self) -> None:
        loaded, failed = [], []
        for name in self.config["preload"]:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except Exception:  # e.g. scipy not installed: a program may still import what it needs
                failed.append(name)
        self.isolation["preloaded"], self.isolation["preload_failed"] = loaded, failed
        if {"numpy", "sympy"} <= set(loaded):
            saved = sys.stdout
            sys.stdout = io.StringIO()
            try:
                exec(compile(_WARMUP_SOURCE, "<warmup>", "exec"), {"__name__": "__warmup__"})
            finally:
                sys.stdout = saved

    def _probe(self) -> None:
        """Run a program that reports on itself through the full path; refuse to serve unless the privilege
        drop happened and no capability survived."""
        global SERVER
        SERVER = self
        reply = self.run({"id": -1, "source": f"MODULE = {__name__!r}\n{_PROBE_SOURCE}", "timeout_s": 30.0})
        self.cleanup()
        if reply["failed"]:
            raise RuntimeError(f"sandbox self-test failed: {reply['error_type']}: {reply['error_message']}")
        seen = json.loads(reply["stdout_head"])
        if self.identity is not None and (seen["uid"], seen["gid"]) != self.identity:
            raise RuntimeError(f"sandbox self-test ran as uid {seen['uid']}, expected {self.identity[0]}")
        if int(seen["cap_eff"], 16) != 0:
            raise RuntimeError(f"sandbox self-test kept capabilities {seen['cap_eff']}")
        self.isolation.update(
            uid=seen["uid"], gid=seen["gid"], drops_privileges=self.identity is not None,
            no_new_privs=seen["no_new_privs"] == "1", seccomp=seen["seccomp"] == "2" and seen["applied"]["seccomp"],
            landlock_abi=seen["applied"]["landlock"], private_tmp=self.private_tmp,
            host_work_dir=None if self.private_tmp else self.work_dir, program_pid=seen["pid"],
            stdlib_readable=seen["stdlib_readable"], python=platform.python_version())

    # ---- serving
    def serve(self, in_fd: int, out_fd: int) -> None:
        while True:
            frame = read_frame(in_fd)
            if frame is None:
                if not self.private_tmp:
                    shutil.rmtree(self.work_dir, ignore_errors=True)
                return
            write_frame(out_fd, self.run(json.loads(frame)))
            self.cleanup()  # after replying: the host can queue the next request meanwhile

    def run(self, request: dict) -> dict:
        timeout_s = float(request["timeout_s"])
        if self.private_tmp:
            self._mount_tmp()
        self.lockdown.prepare(self.work_dir)
        read_fd, write_fd = os.pipe()
        hard_exit = os._exit  # a local: the program can rebind module attributes, not this frame's variables
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                child_main(self.lockdown, request["source"], write_fd, self.work_dir, timeout_s,
                           self.config["limits"]["output_keep_chars"])
            finally:  # the child never continues into the fork server's code, whatever the program did
                hard_exit(EXIT_LOCKDOWN_FAILED)
        os.close(write_fd)
        self.lockdown.release()
        self._current = pid
        try:
            outcome, detail = self._await(pid, read_fd, started + timeout_s)
        finally:
            os.close(read_fd)
        reply = self._reply(outcome, detail, timeout_s)
        reply.update(id=request["id"], wall_s=time.monotonic() - started)
        return reply

    def _await(self, pid: int, read_fd: int, deadline: float) -> tuple[str, bytes | int | None]:
        """Wait for the child's report, its exit or the wall-clock deadline, whichever comes first:
        ("report", payload), ("exited", wait status), ("timeout", None) or ("oversized", None)."""
        limit = self.config["max_report_bytes"] + 4
        os.set_blocking(read_fd, False)
        buffer = bytearray()
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        try:
            exit_fd = os.pidfd_open(pid)
            poller.register(exit_fd, select.POLLIN)
        except (AttributeError, OSError):
            exit_fd = None  # before Linux 5.3: look for the exit every few milliseconds
        try:
            while True:
                if _frame_complete(buffer):
                    return "report", _first_frame(buffer)
                if len(buffer) > limit:
                    return "oversized", None
                status = None
                if exit_fd is None:
                    done, wait_status = os.waitpid(pid, os.WNOHANG)
                    status = wait_status if done == pid else None
                if status is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return "timeout", None
                    wait_ms = left * 1000 if exit_fd is not None else min(left * 1000, 5)
                    for fd, _ in poller.poll(math.ceil(wait_ms)):
                        if fd == read_fd:
                            if not _read_available(read_fd, buffer, limit):
                                poller.unregister(read_fd)  # end of file: only the exit is left to see
                        else:
                            status = os.waitpid(pid, 0)[1]
                if status is not None:
                    _read_available(read_fd, buffer, limit)
                    if _frame_complete(buffer):
                        return "report", _first_frame(buffer)
                    return "exited", status
        finally:
            if exit_fd is not None:
                os.close(exit_fd)

    def _reply(self, outcome: str, detail: bytes | int | None, timeout_s: float) -> dict:
        reply = {"stdout_head": "", "stdout_tail": "", "stdout_chars": 0, "failed": True, "timed_out": False,
                 "error_type": None, "error_message": None}
        if outcome == "timeout":
            reply.update(timed_out=True, error_type="TimeoutError", error_message=(
                f"Execution of the code snippet has timed out for exceeding {timeout_s:g} seconds."))
        elif outcome == "report":
            report = validated_report(detail, self.config["limits"]["output_keep_chars"])
            if report is None:
                reply.update(error_type="SandboxError", error_message="the program's process sent a malformed report")
            else:
                reply.update(report, failed=report["error_type"] is not None)
        elif outcome == "oversized":
            reply.update(error_type="SandboxError", error_message="the program's report exceeded its size limit")
        elif os.WIFSIGNALED(detail):
            sig = os.WTERMSIG(detail)
            if sig == signal.SIGXCPU:
                reply.update(timed_out=True, error_type="TimeoutError",
                             error_message="the program exceeded its CPU time limit")
            else:
                name = _SIGNAL_NAMES.get(sig, f"signal {sig}")
                reply.update(error_type="KilledBySignal",
                             error_message=f"the program's process was killed by {name} ({signal.strsignal(sig)})")
        elif os.waitstatus_to_exitcode(detail) == EXIT_LOCKDOWN_FAILED:
            reply.update(error_type="SandboxError", error_message="isolation setup failed; the program did not run")
        else:
            code = os.waitstatus_to_exitcode(detail)
            reply.update(error_type="ExitedEarly",
                         error_message=f"the program's process exited with status {code} before the program ended")
        return reply

    # ---- between runs
    def cleanup(self) -> None:
        """Kill every process the last program left behind and drop its working directory."""
        if self.isolation["pid_namespace"]:
            _kill_namespace()
        else:
            _kill_descendants(self._current)
        if self.private_tmp:
            linux.umount_detached("/tmp")
        else:
            _clear_directory(self.work_dir)

    def _mount_tmp(self) -> None:
        uid, gid = self.identity if self.identity is not None else (os.getuid(), os.getgid())
        namespaces.mount_tmpfs("/tmp", self.config["limits"]["tmpfs_bytes"], uid, gid)


def _clear_directory(path: str) -> None:
    """Remove everything inside ``path`` (never following links), making unreadable directories readable."""
    def make_removable(function, target, exc_info):
        os.chmod(os.path.dirname(target) if function is not os.open else target, 0o700)
        function(target)

    for entry in os.scandir(path):
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                shutil.rmtree(entry.path, onerror=make_removable)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _frame_complete(buffer: bytearray) -> bool:
    return len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big")


def _first_frame(buffer: bytearray) -> bytes:
    return bytes(buffer[4:4 + int.from_bytes(buffer[:4], "big")])


def _read_available(fd: int, buffer: bytearray, limit: int) -> bool:
    """Append what can be read now (up to just past ``limit``); False at end of file."""
    while len(buffer) <= limit:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buffer += chunk
    return True


_REPORT_KEYS = {"stdout_head", "stdout_tail", "stdout_chars", "error_type", "error_message"}


def validated_report(payload: bytes, keep: int) -> dict | None:
    """The child's report if it has exactly the expected shape, strings clipped and made valid UTF-8."""
    try:
        report = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(report, dict) or set(report) != _REPORT_KEYS:
        return None
    clean = {}
    for key, limit in (("stdout_head", keep), ("stdout_tail", keep), ("error_type", 200), ("error_message", 2000)):
        value = report[key]
        if value is None and key.startswith("error"):
            clean[key] = None
        elif isinstance(value, str):
            clean[key] = value[:limit].encode("utf-8", "replace").decode("utf-8")
        else:
            return None
    chars = report["stdout_chars"]
    if type(chars) is not int or chars < len(clean["stdout_head"]) + len(clean["stdout_tail"]):
        return None
    clean["stdout_chars"] = chars
    return clean


def _kill_namespace(timeout_s: float = 10.0) -> None:
    """As pid 1 of the namespace: SIGKILL everything else in it. A process with a fatal signal pending never
    runs user code again and cannot fork, so the next program may start at once; the exit of the program's
    own process is left to finish in the background (reaped next time). Leftovers of a program that forked
    are reaped now, so that they stop counting against the next program's process limit."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    if len(_children()) > 1:
        _reap_all(timeout_s)
    else:
        _reap_some()


def _kill_descendants(pid: int, timeout_s: float = 10.0) -> None:
    """Without a PID namespace: kill the program's process group, then whatever was reparented to us (we are
    a child subreaper, so every surviving descendant ends up our child), until none is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + timeout_s
    while True:  # listed anew each time: a process in its own session reaches us only as its parent dies
        children = _children()
        if not children and not _reap_some():
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap_some()
        if time.monotonic() > deadline:
            raise RuntimeError("could not kill the processes a program left behind")
        time.sleep(0.0002)


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _reap_some() -> bool:
    """Reap exited children without blocking; True if any child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _reap_all(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _reap_some():
        if time.monotonic() > deadline:
            raise RuntimeError("processes a program left behind did not die")
        time.sleep(0.0002)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    frame = read_frame(0)
    if frame is None:
        return
    config = json.loads(frame)
    sys.path[:] = config["sys_path"]
    try:
        server = ForkServer(config, namespaces.enter_namespaces(config["namespaces"]))
        server.start()
    except BaseException:
        write_frame(1, {"fatal": traceback.format_exc(limit=8)})
        os._exit(1)
    write_frame(1, {"ready": server.isolation})
    server.serve(0, 1)


if __name__ == "__main__":
    main()
