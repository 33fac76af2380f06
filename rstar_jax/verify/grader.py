"""The answer grader: is a model's final answer equal to the reference answer?

    with Grader(num_workers=2, timeout_s=5.0) as grader:
        verdict = grader.grade(step_text, reference)       # Verdict(equal, reason, extracted, ...)
        verdicts = grader.grade_batch([(text, ref), ...])

Cheap decisions (exact strings, plain numbers, words, list structure) are made in the calling thread.
Anything that needs sympy goes to a pool of warm worker processes, each a fresh interpreter with
sympy / math-verify already imported. A comparison that runs past `timeout_s` has its worker killed
(SIGKILL) and replaced in the background, and comes back as "not equal, timed out". No signals are
used in the caller, so the grader works from any thread; all methods are thread-safe.

The bound covers a comparison once a worker has it; a call that finds every worker busy first waits
for one (each busy worker is itself bounded, so the wait is too). `Verdict.time_s` is the grading time
of that pair (extraction, fast tier and the worker's comparison), without that wait.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rstar_jax.verify.answer_equiv import DEFAULT_REL_TOL, compare_answers
from rstar_jax.verify.answer_extract import canonical_answer, extract_answer, reference_answers

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_MAX_REPLY_BYTES = 1 << 16
# No benchmark answer comes close; the cap bounds the work done on untrusted text in the caller.
MAX_ANSWER_CHARS = 4000


@dataclass(frozen=True)
class Verdict:
    equal: bool
    reason: str
    extracted: str | None  # the answer found in the prediction (before canonicalisation)
    time_s: float
    timed_out: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class GraderError(RuntimeError):
    """The grader cannot work (no worker process could start, or it was used after close)."""


class _WorkerDied(Exception):
    def __init__(self, message: str, before_request: bool):
        super().__init__(message)
        self.before_request = before_request


class _WorkerProcess:
    """One warm worker: `python -m rstar_jax.verify.grader --worker`, JSON lines on stdin/stdout."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "rstar_jax.verify.grader", "--worker", f"--memory_limit_mb={memory_limit_mb}"]
        # A session of its own: a Ctrl-C meant for the caller does not kill workers mid-reply; they
        # exit when the caller closes their stdin or dies.
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, start_new_session=True
        )
        self._buffer = bytearray()

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self, timeout_s: float) -> None:
        reply = self._read_line(time.monotonic() + timeout_s)
        if reply is None:
            raise _WorkerDied(f"worker did not start within {timeout_s:.0f} s", before_request=True)
        if not reply.get("ready"):
            raise _WorkerDied(f"unexpected worker greeting {reply!r}", before_request=True)

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The worker's reply, or None when it did not answer within timeout_s."""
        try:
            self._process.stdin.write(json.dumps(payload).encode() + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise _WorkerDied(f"worker gone before the request ({error})", before_request=True) from error
        return self._read_line(time.monotonic() + timeout_s)

    def _read_line(self, deadline: float) -> dict | None:
        stdout = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([stdout], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(stdout, 65536)
            if not chunk:
                code = self._process.poll()
                raise _WorkerDied(f"worker exited (status {code})", before_request=False)
            self._buffer += chunk
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise _WorkerDied("worker reply too large", before_request=False)
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            return json.loads(line)
        except ValueError as error:
            raise _WorkerDied(f"unreadable worker reply ({error})", before_request=False) from None

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("grader worker %d did not die after SIGKILL", self.pid)
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """Idle workers handed to one caller at a time; timed-out or dead ones replaced in the background."""

    _START_ATTEMPTS = 3

    def __init__(self, size: int, memory_limit_mb: int, start_timeout_s: float):
        self._memory_limit_mb = memory_limit_mb
        self._start_timeout_s = start_timeout_s
        self._condition = threading.Condition()
        self._idle: list[_WorkerProcess] = []
        self._launched: set[_WorkerProcess] = set()  # started but not ready yet; close() kills them
        self._busy = 0
        self._starting = 0
        self._closed = False
        self._last_start_error = ""
        for _ in range(size):
            self._start_in_background()

    def _start_in_background(self) -> None:
        with self._condition:
            self._starting += 1
        self._launch_starter()

    def _launch_starter(self) -> None:
        threading.Thread(target=self._start_one, name="grader-worker-start", daemon=True).start()

    def _start_one(self) -> None:
        worker = None
        for attempt in range(self._START_ATTEMPTS):
            with self._condition:
                if self._closed:
                    break
                try:
                    candidate = _WorkerProcess(self._memory_limit_mb)
                except OSError as error:  # e.g. out of processes; counts as a failed attempt
                    self._last_start_error = f"attempt {attempt + 1}: {error}"
                    continue
                self._launched.add(candidate)
            try:
                candidate.wait_ready(self._start_timeout_s)
                worker = candidate
                break
            except (_WorkerDied, ValueError, OSError) as error:
                candidate.kill()
                with self._condition:
                    self._last_start_error = f"attempt {attempt + 1}: {error}"
                if not self._closed:
                    logger.warning("grader worker failed to start: %s", error)
            finally:
                with self._condition:
                    self._launched.discard(candidate)
        with self._condition:
            self._starting -= 1
            if worker is not None and not self._closed:
                self._idle.append(worker)
                worker = None
            self._condition.notify_all()
        if worker is not None:  # closed while starting
            worker.kill()

    def acquire(self) -> _WorkerProcess:
        with self._condition:
            while not self._idle:
                if self._closed:
                    raise GraderError("the grader is closed")
                if self._starting == 0 and self._busy == 0:
                    raise GraderError(f"no grader worker could start ({self._last_start_error})")
                self._condition.wait()
            self._busy += 1
            return self._idle.pop()

    def release(self, worker: _WorkerProcess) -> None:
        with self._condition:
            self._busy -= 1
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
            self._condition.notify_all()

    def discard(self, worker: _WorkerProcess) -> None:
        """Kill a worker that timed out or died, and start its replacement."""
        worker.kill()
        with self._condition:
            self._busy -= 1
            replace = not self._closed
            if replace:  # counted as starting before anyone can see the pool without it
                self._starting += 1
            self._condition.notify_all()
        if replace:
            self._launch_starter()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            doomed = self._idle + list(self._launched)
            self._idle = []
            self._condition.notify_all()
        for worker in doomed:
            worker.kill()


@dataclass(frozen=True)
class _Job:
    """A grade that needs a worker: canonical prediction and the references still undecided."""

    pred: str
    refs: tuple[str, ...]
    extracted: str
    prepare_s: float  # extraction and fast tier, in the caller
    cache_key: tuple


class Grader:
    """Grades final answers against reference answers; see the module docstring.

    Args:
      num_workers: worker processes for sympy comparisons (started once, kept warm).
      timeout_s: hard bound on one comparison of a prediction with its references in a worker.
      rel_tol: relative tolerance once either number is written with decimals (integers are exact).
      memory_limit_mb: address-space limit of each worker, so a huge expression fails fast.
      start_timeout_s: how long a worker may take to start.
      cache_size: verdicts remembered per (answer, references) pair; search repeats answers a lot.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        rel_tol: float = DEFAULT_REL_TOL,
        memory_limit_mb: int = 1024,
        start_timeout_s: float = 60.0,
        cache_size: int = 100_000,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.rel_tol = rel_tol
        self._memory_limit_mb = memory_limit_mb
        self._start_timeout_s = start_timeout_s
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool: _WorkerPool | None = None
        self._closed = False
        self._cache: collections.OrderedDict[tuple, tuple[bool, str, bool]] = collections.OrderedDict()
        self._timed_out_once: set[tuple] = set()  # comparisons that timed out once (not cached yet)
        self._stats = collections.Counter()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Grader":
        """Start the worker processes (in the background; the first sympy comparison waits for one)."""
        with self._lock:
            if self._closed:
                raise GraderError("the grader is closed")
            if self._pool is None:
                self._pool = _WorkerPool(self.num_workers, self._memory_limit_mb, self._start_timeout_s)
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> "Grader":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Counts of verdicts by path: fast, worker, cached, timed_out, crashed."""
        with self._lock:
            return dict(self._stats)

    # -- grading ----------------------------------------------------------------------------------
    def grade(self, pred: str, refs: object) -> Verdict:
        """Grade a prediction (model text or a bare answer) against one or several references."""
        prepared = self._prepare(pred, refs)
        return prepared if isinstance(prepared, Verdict) else self._run_job(prepared)

    def grade_batch(self, pairs: Iterable[tuple[str, object]]) -> list[Verdict]:
        """Grade many (prediction, references) pairs; worker comparisons run concurrently."""
        prepared = [self._prepare(pred, refs) for pred, refs in pairs]
        jobs = {p.cache_key: p for p in prepared if isinstance(p, _Job)}
        if not jobs:
            return list(prepared)
        with concurrent.futures.ThreadPoolExecutor(min(self.num_workers, len(jobs))) as executor:
            futures = {key: executor.submit(self._run_job, job) for key, job in jobs.items()}
            results = {key: future.result() for key, future in futures.items()}
        verdicts = []
        for item in prepared:
            if isinstance(item, Verdict):
                verdicts.append(item)
            else:
                shared = results[item.cache_key]  # one worker comparison serves every duplicate
                verdicts.append(Verdict(shared.equal, shared.reason, item.extracted, shared.time_s, shared.timed_out))
        return verdicts

    def _prepare(self, pred: str, refs: object) -> Verdict | _Job:
        """Extraction and the fast tier in the calling thread: a final Verdict, or a job for a worker."""
        started = time.monotonic()

        def verdict(equal: bool, reason: str, extracted: str | None, timed_out: bool = False) -> Verdict:
            return Verdict(equal, reason, extracted, time.monotonic() - started, timed_out)

        if not isinstance(pred, str):
            raise TypeError(f"prediction must be a string, got {type(pred).__name__}")
        extracted = extract_answer(pred)
        if extracted is None:
            return verdict(False, "no answer found", None)
        if len(extracted) > MAX_ANSWER_CHARS:
            return verdict(False, f"answer too long ({len(extracted)} characters)", extracted)
        answer = canonical_answer(extracted)
        if not answer:
            return verdict(False, "empty answer", extracted)
        candidates = tuple(dict.fromkeys(r for r in map(canonical_answer, reference_answers(refs)) if r))
        if not candidates:
            return verdict(False, "empty reference", extracted)

        cached = self._cache_get((answer, candidates))
        if cached is not None:
            return verdict(cached[0], cached[1], extracted, cached[2])

        key = (answer, candidates)
        undecided, last_reason = [], ""
        for candidate in candidates:
            equal, reason = compare_answers(answer, candidate, self.rel_tol)
            if equal:
                self._remember(key, True, reason, False, "fast")
                return verdict(True, reason, extracted)
            if equal is None:
                undecided.append(candidate)
            else:
                last_reason = reason
        if not undecided:
            self._remember(key, False, last_reason, False, "fast")
            return verdict(False, last_reason, extracted)
        return _Job(answer, tuple(undecided), extracted, time.monotonic() - started, key)

    def _run_job(self, job: _Job) -> Verdict:
        equal, reason, timed_out, worker_s = self._compare_in_worker(job)
        return Verdict(equal, reason, job.extracted, job.prepare_s + worker_s, timed_out)

    def _compare_in_worker(self, job: _Job) -> tuple[bool, str, bool, float]:
        """(equal, reason, timed_out, seconds the worker spent); waiting for a free worker not counted."""
        key = job.cache_key
        payload = {"pred": job.pred, "refs": list(job.refs), "rel_tol": self.rel_tol}
        for attempt in range(2):  # one retry when an idle worker had died before getting the request
            pool = self._pool or self.start()._pool
            if pool is None:
                raise GraderError("the grader is closed")
            worker = pool.acquire()
            sent = time.monotonic()
            try:
                reply = worker.request(payload, self.timeout_s)
            except _WorkerDied as error:
                pool.discard(worker)
                if error.before_request and attempt == 0:
                    continue
                reason = f"grader worker crashed: {error}"
                # Not cached: the crash may come from outside (the OOM killer), not from this answer.
                self._remember(key, False, reason, False, "crashed", cache=False)
                return False, reason, False, time.monotonic() - sent
            worker_s = time.monotonic() - sent
            if reply is None:
                pool.discard(worker)
                reason = f"timed out after {self.timeout_s:g} s"
                # A busy machine can time out a fair comparison: the verdict is cached only when it times out
                # again, so an adversarial answer costs at most two timeouts.
                with self._lock:
                    again = key in self._timed_out_once
                    self._timed_out_once.add(key)
                self._remember(key, False, reason, True, "timed_out", cache=again)
                return False, reason, True, worker_s
            pool.release(worker)
            self._remember(key, bool(reply["equal"]), reply["reason"], False, "worker")
            return bool(reply["equal"]), reply["reason"], False, worker_s
        raise AssertionError("unreachable")

    # -- verdict cache ----------------------------------------------------------------------------
    def _cache_get(self, key: tuple) -> tuple[bool, str, bool] | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._stats["cached"] += 1
            return hit

    def _remember(self, key: tuple, equal: bool, reason: str, timed_out: bool, path: str, cache: bool = True) -> None:
        with self._lock:
            self._stats[path] += 1
            if self._cache_size <= 0 or not cache:
                return
            self._cache[key] = (equal, reason, timed_out)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)


# ---------------------------------------------------------------------------------------------------
# Worker process side.


def _compare_with_references(pred: str, refs: Sequence[str], rel_tol: float) -> tuple[bool, str]:
    reason = "no reference"
    for ref in refs:
        equal, reason = compare_answers(pred, ref, rel_tol, symbolic=True)
        if equal:
            return True, reason
    return False, reason


def _exit_when_orphaned(parent_pid: int) -> None:
    """The grader may die without closing our stdin mid-computation; do not outlive it."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def _serve_worker(memory_limit_mb: int) -> None:
    import resource

    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # Warm up: imports, the ANTLR LaTeX parser and sympy's caches.
    compare_answers("\\frac{x}{2}+0.5", "\\frac{1+x}{2}", DEFAULT_REL_TOL, symbolic=True)
    try:
        protocol.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            try:
                request = json.loads(line)
                equal, reason = _compare_with_references(request["pred"], request["refs"], request["rel_tol"])
            except (Exception, MemoryError, RecursionError) as error:  # noqa: B014 - explicit on purpose
                equal, reason = False, f"error: {type(error).__name__}: {str(error)[:200]}"
            protocol.write(json.dumps({"equal": equal, "reason": reason}) + "\n")
    except BrokenPipeError:
        pass  # the grader closed while we were starting or working: nothing left to answer
    os._exit(0)


def _worker_main(argv: Sequence[str]) -> None:
    memory_limit_mb = 1024
    for arg in argv:
        if arg.startswith("--memory_limit_mb="):
            memory_limit_mb = int(arg.split("=", 1)[1])
    _serve_worker(memory_limit_mb)


if __name__ == "__main__":
    if "--worker" not in sys.argv[1:]:
        sys.exit("usage: python -m rstar_jax.verify.grader --worker [--memory_limit_mb=N] (internal)")
    _worker_main(sys.argv[1:])
