"""Benchmark of the sandboxed executor against two baselines on typical step programs.

    python -m experiments.bench.executor [--num_programs=300] [--num_workers=N]

(a) ``Sandbox``: a fork of a pre-warmed, locked-down worker per program;
(b) a fresh ``python -c`` subprocess per program (interpreter start and imports every time);
(c) an unsandboxed pool of warm worker processes running ``exec`` like the reference (no isolation, and
    SymPy's caches stay warm across programs).
Prints executions per second of each and, last, ``ratio=<a/b> isolation_cost=<a/c>``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time

from absl import app, flags

from rstar_jax.verify.program import assemble_program, format_output
from rstar_jax.verify.sandbox import DEFAULT_PRELOAD, Sandbox

_NUM_PROGRAMS = flags.DEFINE_integer("num_programs", 300, "programs run through (a) and (c)")
_NUM_FRESH = flags.DEFINE_integer("num_fresh", 24, "programs run through (b), fresh interpreters (slow)")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "parallel workers of each executor; default: cores")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 30.0, "per-program timeout of each executor")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed passes of each executor, taking turns; the best counts")


def arithmetic_steps(i: int) -> list[str]:
    return [
        "<code>\n# Step 1: Define the quantities given in the problem\n"
        f"apples = {12 + i}\nprice = {0.25 + 0.01 * i:.2f}\n<end_of_step>",
        "\n# Step 2: Total cost after a 15% discount\ntotal = apples * price\ndiscounted = total * (1 - 0.15)\n"
        "<end_of_step>",
        "\n# Now print the final answer\nprint(round(discounted, 2))\n<end_of_code>",
    ]


def sympy_steps(i: int) -> list[str]:
    return [
        "<code>\n# Step 1: Define the unknowns\nfrom sympy import symbols, Eq, solve\nx, y = symbols('x y')\n"
        "<end_of_step>",
        f"\n# Step 2: Set up the system of equations\neq1 = Eq(2*x + 3*y, {7 + i})\neq2 = Eq(x - y, {i % 5})\n"
        "<end_of_step>",
        "\n# Step 3: Solve the system\nsolution = solve((eq1, eq2), (x, y))\n<end_of_step>",
        "\n# Now print the final answer\nprint(solution[x] + solution[y])\n<end_of_code>",
    ]


def numpy_steps(i: int) -> list[str]:
    return [
        "<code>\n# Step 1: Build the matrix and the right-hand side\nimport numpy as np\n"
        f"A = np.array([[{2 + i % 7}, 1, 0], [1, 3, 1], [0, 1, 4]], dtype=float)\n"
        f"b = np.array([1.0, 2.0, {3 + i % 5}.0])\n<end_of_step>",
        "\n# Step 2: Solve the linear system\nv = np.linalg.solve(A, b)\n<end_of_step>",
        "\n# Now print the final answer\nprint(v.sum())\n<end_of_code>",
    ]


KINDS = ("arithmetic", "sympy solve", "numpy")


def step_programs(count: int) -> list[str]:
    """Distinct programs (different numbers each), cycling through the kinds of KINDS."""
    kinds = (arithmetic_steps, sympy_steps, numpy_steps)
    return [assemble_program(kinds[i % 3](i)) for i in range(count)]


# ---- (c): the reference's way, exec in a long-lived process with a signal-based timeout
def _warm_imports() -> None:
    for name in DEFAULT_PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass


def _on_alarm(signum, frame):
    raise TimeoutError("Execution of the code snippet has timed out.")


def exec_like_reference(program: str, timeout_s: float) -> tuple[str, bool]:
    buffer = io.StringIO()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        with contextlib.redirect_stdout(buffer):
            exec(program, {"__name__": "__main__"})
        failed = False
    except Exception:  # noqa: BLE001 - the reference's catch-all
        failed = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return format_output(buffer.getvalue()), failed


def _fresh_subprocess(program: str, timeout_s: float) -> tuple[str, bool]:
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout_s)
    return format_output(done.stdout), done.returncode != 0


def _best_rate(run_once, count: int, repeats: int) -> tuple[float, list]:
    best, outputs = 0.0, []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = run_once()
        best = max(best, count / (time.perf_counter() - started))
    return best, outputs


def main(argv):
    del argv
    workers = _NUM_WORKERS.value or len(os.sched_getaffinity(0))
    programs = step_programs(_NUM_PROGRAMS.value)
    fresh = programs[:_NUM_FRESH.value]
    timeout_s, repeats = _TIMEOUT_S.value, _REPEATS.value

    # The executors take turns pass by pass, so that all see the same machine load; the best pass counts.
    context = multiprocessing.get_context("forkserver")
    with Sandbox(num_workers=workers, timeout_s=timeout_s) as sandbox, \
            concurrent.futures.ThreadPoolExecutor(workers) as threads, \
            concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_warm_imports) as pool:
        isolation = sandbox.isolation
        sandbox.run(programs[:workers * 2])  # warm: workers up and through one program each
        list(pool.map(exec_like_reference, programs[:workers * 2], [timeout_s] * workers * 2))
        executors = {
            "a": lambda batch: sandbox.run(batch),
            "b": lambda batch: list(threads.map(lambda p: _fresh_subprocess(p, timeout_s), batch)),
            "c": lambda batch: list(pool.map(exec_like_reference, batch, [timeout_s] * len(batch))),
        }
        rates, results = {name: 0.0 for name in executors}, {}
        for _ in range(repeats):
            for name, execute in executors.items():
                batch = fresh if name == "b" else programs
                rate, results[name] = _best_rate(lambda: execute(batch), len(batch), 1)
                rates[name] = max(rates[name], rate)
        per_kind = []
        for k, kind in enumerate(KINDS):  # where the time goes: each kind alone, one pass each
            subset = programs[k::len(KINDS)]
            per_kind.append((kind, *(_best_rate(lambda: executors[name](subset), len(subset), 1)[0]
                                     for name in ("a", "c"))))
    rate_a, rate_b, rate_c = rates["a"], rates["b"], rates["c"]
    results_a, results_b, results_c = results["a"], results["b"], results["c"]

    failures = sum(r.failed for r in results_a)
    mismatches = sum(r.stdout != out for r, (out, _) in zip(results_a, results_c))
    mismatches += sum(r.stdout != out for r, (out, _) in zip(results_a, results_b))
    layers = [k for k in ("pid_namespace", "network_namespace", "mount_namespace", "readonly_root",
                          "drops_privileges", "seccomp") if isolation.get(k)]
    print(f"programs: {len(programs)} (arithmetic / sympy solve / numpy, distinct numbers), workers: {workers}")
    print(f"isolation in force: {', '.join(layers)}, landlock ABI {isolation.get('landlock_abi', 0)}")
    print(f"(a) sandbox:             {rate_a:8.1f} exec/s   failures {failures}, output mismatches vs (b)/(c) "
          f"{mismatches}")
    print(f"(b) fresh python -c:     {rate_b:8.1f} exec/s   ({len(fresh)} programs)")
    print(f"(c) warm exec pool:      {rate_c:8.1f} exec/s   (unsandboxed, like the reference)")
    for kind, kind_a, kind_c in per_kind:
        print(f"    {kind + ':':<13} (a) {kind_a:8.1f} exec/s   (c) {kind_c:8.1f} exec/s   a/c {kind_a / kind_c:.2f}")
    print(f"ratio={rate_a / rate_b:.2f} isolation_cost={rate_a / rate_c:.2f}")


if __name__ == "__main__":
    app.run(main)
