"""Run model-written programs in isolated child processes forked from a pool of pre-warmed workers.

    with Sandbox(timeout_s=10) as sandbox:
        results = sandbox.run([program_a, program_b])   # one ExecResult each, in order
        results[0].stdout, results[0].failed, results[0].observation

Each worker is a separate interpreter (``sandbox_worker.py``) that imported numpy/sympy once and forks one
locked-down child per program; the model's code never runs in this process. See ``sandbox_worker`` for the
isolation layers and ``Sandbox.isolation`` for the ones in force on this machine.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import selectors
import shutil
import subprocess
import sys
import threading
import time
import weakref
from typing import Sequence

from rstar_jax.verify.program import format_captured

_log = logging.getLogger(__name__)

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")

# Modules imported once per worker (a program's own import of them is then free). Missing ones are skipped.
DEFAULT_PRELOAD = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "operator", "re",
    "random", "statistics", "string", "numbers", "heapq", "bisect", "json", "numpy", "sympy", "scipy",
)

# Longest program accepted (its JSON request must stay under the worker's 64 MiB frame limit).
MAX_PROGRAM_CHARS = 8 << 20

# error_type values produced by the sandbox itself (other values are the program's exception class names).
TIMEOUT = "TimeoutError"
KILLED_BY_SIGNAL = "KilledBySignal"
EXITED_EARLY = "ExitedEarly"
SANDBOX_ERROR = "SandboxError"


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """How one program ran. ``stdout`` is in the reference's display form (floats with at most 4 decimals,
    long output cut to its first and last 512 characters, stripped); ``failed`` comes from the exception
    status or the process's fate, never from the output text."""
    stdout: str
    failed: bool
    error_type: str | None = None
    error_message: str | None = None
    timed_out: bool = False
    wall_s: float = 0.0

    @property
    def observation(self) -> str:
        """The text the reference puts between <output> and <end_of_output>: the output, or the error."""
        if not self.failed:
            return self.stdout
        return f"{self.error_type}: {self.error_message}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-program resource limits (each child's rlimits and its private tmpfs)."""
    memory_bytes: int = 4 << 30        # address space (RLIMIT_AS); a 50 GB allocation fails with MemoryError
    max_processes: int = 32            # tasks of the sandbox uid (RLIMIT_NPROC): fork bombs stop here
    max_open_files: int = 64
    file_size_bytes: int = 16 << 20    # largest file a program may write
    tmpfs_bytes: int = 64 << 20        # its whole working directory
    cpu_margin_s: float = 1.0          # RLIMIT_CPU = timeout + margin, a backstop to the wall clock
    output_keep_chars: int = 8192      # head and tail of stdout kept (the display needs 512 of each)


def missing_layers(isolation: dict) -> list[str]:
    """The isolation layers the platform did not allow, each with what programs can do without it."""
    missing = []
    if not isolation.get("landlock_abi"):
        missing.append("Landlock (programs can read every file their uid can, and write outside their directory "
                       "where the file system is not read-only)")
    if not isolation.get("seccomp"):
        missing.append("seccomp (raw system calls: sockets below the audit hook, ptrace, shared memory)")
    if not isolation.get("pid_namespace"):
        missing.append("a PID namespace (programs see the host's processes)")
    if not isolation.get("drops_privileges"):
        missing.append("a separate uid (programs run as the caller's user: start as root to drop it)")
    return missing


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker could not start, the sandbox is closed)."""


class Sandbox:
    """A pool of sandbox workers serving ``run``/``submit`` from any thread.

    Args:
      num_workers: worker processes (programs run in parallel); default one per available core.
      timeout_s: default wall-clock limit per program (the reference uses 30 s).
      limits: resource limits of each program.
      preload: modules each worker imports once at start.
      namespaces: use Linux namespaces where the platform allows (False: rlimits, uid drop, seccomp only).
      uid_base: when started as root, worker ``i`` runs programs as uid/gid ``uid_base + i``; distinct ids
        keep one worker's fork bomb from using up another's process quota.
      start_timeout_s: how long a worker may take to import the preloaded modules and pass its self-test.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 30.0, *,
                 limits: SandboxLimits = SandboxLimits(), preload: Sequence[str] = DEFAULT_PRELOAD,
                 namespaces: bool = True, uid_base: int = 60000, start_timeout_s: float = 120.0):
        if num_workers is None:
            num_workers = len(os.sched_getaffinity(0))
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.limits = limits
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        base_config = {
            "sys_path": [p for p in sys.path if p],
            "preload": list(preload),
            "namespaces": bool(namespaces),
            "limits": dataclasses.asdict(limits),
            "max_report_bytes": 16 * limits.output_keep_chars + 65536,
        }
        self._workers = [_Worker(i, dict(base_config, identity=[uid_base + i] * 2), start_timeout_s)
                         for i in range(num_workers)]
        self._finalizer = weakref.finalize(self, _kill_workers, list(self._workers))
        try:
            for worker in self._workers:
                worker.spawn()
            for worker in self._workers:
                worker.handshake()
        except BaseException:
            self.close()
            raise
        if not self.isolation.get("stdlib_readable", True):
            _log.warning("sandbox: the interpreter's files are not readable by uid %s and there is no mount "
                         "namespace to expose them; programs can import only the preloaded modules",
                         self.isolation.get("uid"))
        missing = missing_layers(self.isolation)
        if missing:  # it still runs: each missing layer is one of several over the same risk
            _log.warning("sandbox: running without %s (see Sandbox.isolation)", "; ".join(missing))
        self._threads = [threading.Thread(target=self._serve, args=(w,), name=f"sandbox-worker-{w.index}",
                                          daemon=True) for w in self._workers]
        for thread in self._threads:
            thread.start()

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the workers' launchers (None while one is being replaced)."""
        return [w.process.pid if w.process is not None else None for w in self._workers]

    @property
    def isolation(self) -> dict:
        """What is in force on this machine, as the first worker's start-up self-test saw it."""
        return dict(self._workers[0].isolation)

    def submit(self, program: str, timeout_s: float | None = None) -> concurrent.futures.Future:
        """Queue one program; the future resolves to its ExecResult."""
        if not isinstance(program, str):
            raise TypeError(f"program must be a str, got {type(program).__name__}")
        if len(program) > MAX_PROGRAM_CHARS:
            raise ValueError(f"program of {len(program)} characters exceeds the {MAX_PROGRAM_CHARS} limit")
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            self._jobs.put((program, timeout_s, future))
        return future

    def run(self, programs: Sequence[str], timeout_s: float | None = None) -> list[ExecResult]:
        """Run a batch of programs in parallel; results in the order of ``programs``."""
        futures = [self.submit(program, timeout_s) for program in programs]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop the workers; queued programs fail with SandboxError, running ones may too. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = []
            while True:
                try:
                    pending.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for _ in getattr(self, "_threads", ()):
                self._jobs.put(None)
        for _, _, future in pending:
            future.set_exception(SandboxError("the sandbox was closed before the program ran"))
        for worker in self._workers:
            worker.stop()
        for thread in getattr(self, "_threads", ()):
            thread.join(timeout=5)
        self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _serve(self, worker: "_Worker") -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            program, timeout_s, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._execute(worker, program, timeout_s))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def _execute(self, worker: "_Worker", program: str, timeout_s: float) -> ExecResult:
        # A worker that dies without answering (killed from outside, or a bug) gets the program once more on a
        # fresh worker: programs are stateless and confined, so running one again is harmless.
        for attempt in range(2):
            if self._closed:
                raise SandboxError("the sandbox was closed before the program ran")
            if not worker.alive:
                worker.restart()
            try:
                reply = worker.request(program, timeout_s)
            except _NotDelivered:
                worker.kill()
                failure = ExecResult("", True, SANDBOX_ERROR, f"sandbox worker {worker.index} could not take "
                                                              "the program", wall_s=0.0)
                continue
            except _WorkerLost as lost:
                _log.warning("sandbox: %s", lost)
                worker.kill()
                failure = ExecResult("", True, TIMEOUT if lost.timed_out else SANDBOX_ERROR, str(lost),
                                     timed_out=lost.timed_out, wall_s=lost.wall_s)
                if lost.timed_out:
                    return failure
                continue
            return ExecResult(
                stdout=format_captured(reply["stdout_head"], reply["stdout_tail"], reply["stdout_chars"]),
                failed=bool(reply["failed"]), error_type=reply["error_type"], error_message=reply["error_message"],
                timed_out=bool(reply["timed_out"]), wall_s=float(reply["wall_s"]))
        return failure


class _NotDelivered(Exception):
    """The request could not be written: the worker was already gone."""


class _WorkerLost(Exception):
    def __init__(self, message: str, timed_out: bool, wall_s: float):
        super().__init__(message)
        self.timed_out, self.wall_s = timed_out, wall_s


class _Worker:
    """Host side of one worker process: spawn, handshake, request/reply with a backstop deadline."""

    # Beyond the program's own timeout, how long the worker may take to kill and clean up before we kill it.
    GRACE_S = 5.0

    def __init__(self, index: int, config: dict, start_timeout_s: float):
        self.index = index
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.isolation: dict = {}
        self.process: subprocess.Popen | None = None
        self._buffer = bytearray()
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        self._buffer = bytearray()
        self.process = subprocess.Popen(
            [sys.executable, "-s", "-B", "-P", WORKER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=_worker_environment(), start_new_session=True, close_fds=True)
        self._write({**self.config, "identity": self.config["identity"] if os.geteuid() == 0 else None})

    def handshake(self) -> None:
        reply = self._read(time.monotonic() + self.start_timeout_s)
        if reply is None:
            self.kill()
            raise SandboxError(f"sandbox worker {self.index} did not start within {self.start_timeout_s:g} s")
        if "fatal" in reply:
            self.kill()
            raise SandboxError(f"sandbox worker {self.index} failed to start:\n{reply['fatal']}")
        self.isolation = reply["ready"]

    def restart(self) -> None:
        self.kill()
        self.spawn()
        self.handshake()

    def request(self, program: str, timeout_s: float) -> dict:
        self._next_id += 1
        started = time.monotonic()
        try:
            self._write({"id": self._next_id, "source": program, "timeout_s": timeout_s})
        except (BrokenPipeError, OSError) as exc:
            raise _NotDelivered() from exc
        reply = self._read(started + timeout_s + self.GRACE_S + 0.1 * timeout_s)
        wall_s = time.monotonic() - started
        if reply is None:
            if self.alive:
                raise _WorkerLost(f"Execution of the code snippet has timed out for exceeding {timeout_s:g} "
                                  "seconds (the sandbox worker stopped responding and was replaced).",
                                  timed_out=True, wall_s=wall_s)
            raise _WorkerLost(f"sandbox worker {self.index} died while running the program; it was replaced",
                              timed_out=False, wall_s=wall_s)
        if reply.get("id") != self._next_id:
            raise _WorkerLost(f"sandbox worker {self.index} answered out of turn; it was replaced",
                              timed_out=False, wall_s=wall_s)
        return reply

    def stop(self) -> None:
        """Close the worker's input (it exits at end of file), then make sure it is gone."""
        if self.process is None:
            return
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        _kill_process(self.process)
        self.process = None
        _remove_work_dir(self.isolation)

    def _write(self, message: dict) -> None:
        payload = json.dumps(message).encode("utf-8")
        self.process.stdin.write(len(payload).to_bytes(4, "big") + payload)
        self.process.stdin.flush()

    def _read(self, deadline: float) -> dict | None:
        """The next frame, or None at end of file or when the deadline passes."""
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not _frame_complete(self._buffer):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        size = int.from_bytes(self._buffer[:4], "big")
        frame = bytes(self._buffer[4:4 + size])
        del self._buffer[:4 + size]
        return json.loads(frame)


def _frame_complete(buffer: bytearray) -> bool:
    return len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big")


def _worker_environment() -> dict:
    """A fresh environment: nothing of the caller's (secrets, proxies, tokens) reaches the workers."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0",  # the same set/dict order in every worker: reproducible outputs
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NUMEXPR_NUM_THREADS": "1"}


def _kill_process(process: subprocess.Popen) -> None:
    # Killing the launcher kills its fork server (parent-death signal) and with it the PID namespace.
    if process.poll() is None:
        try:
            os.killpg(process.pid, 9)
        except (ProcessLookupError, PermissionError):
            process.kill()
        process.wait()
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except (OSError, ValueError):
            pass


def _remove_work_dir(isolation: dict) -> None:
    """A worker without a private tmpfs works in a directory of the host's temp dir; remove it once the worker
    is gone (from inside its read-only mount namespace it cannot)."""
    path = isolation.get("host_work_dir")
    if path and os.path.basename(path).startswith("rstar-sandbox-"):
        shutil.rmtree(path, ignore_errors=True)


def _kill_workers(workers: list) -> None:
    for worker in workers:
        if worker.process is not None:
            _kill_process(worker.process)
            _remove_work_dir(worker.isolation)
