"""Two CPU processes on localhost join `jax.distributed` and compute over one global 4-device mesh."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rstar_jax.models.config import preset

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
DEADLINE_S = 50
HIDDEN_SIZE = preset("tiny").hidden_size  # the worker's model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    for var in list(env):  # gRPC to the coordinator must not go through a proxy
        if var.lower() in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy"):
            del env[var]
    return env


def _run_workers(tmp_path) -> list[dict]:
    """Starts the processes, waits for all of them (killing all past the deadline), returns their reports."""
    port = _free_port()
    outs = [tmp_path / f"process_{i}.json" for i in range(NUM_PROCESSES)]
    logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(NUM_PROCESSES), str(port), str(outs[i])],
                              env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
             for i, log in enumerate(logs)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = [p.pid for p in procs if p.poll() is None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tails = []
    for i, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- process {i} (rc={procs[i].returncode}) ---\n" + log.read()[-3000:])
        log.close()
    details = "\n".join(tails)
    assert not timed_out, f"workers {timed_out} still running after {DEADLINE_S}s, killed\n{details}"
    assert all(p.returncode == 0 for p in procs), details
    return [json.loads(out.read_text()) for out in outs]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return _run_workers(tmp_path_factory.mktemp("distributed"))


def test_processes_form_one_global_mesh(reports):
    assert [r["process_index"] for r in reports] == list(range(NUM_PROCESSES))
    for r in reports:
        assert r["started"] is True
        assert r["process_count"] == NUM_PROCESSES
        assert (r["local_devices"], r["global_devices"]) == (LOCAL_DEVICES, NUM_PROCESSES * LOCAL_DEVICES)
        assert r["mesh_processes"] == list(range(NUM_PROCESSES))


def test_sharded_matmul_across_processes(reports):
    for r in reports:
        assert r["x_rows_here"] == 8 // NUM_PROCESSES  # each process materialised only its own rows
        assert r["matmul_err"] < 1e-5
        assert r["sum"] == pytest.approx(r["sum_expected"], abs=1e-4)


def test_sharded_model_forward_across_processes(reports):
    for r in reports:
        assert r["q_proj_rows_here"] == HIDDEN_SIZE // NUM_PROCESSES  # FSDP: each process holds half of D
        assert r["logits_max_abs"] > 0.5  # a comparison at atol 1e-5 means something
        assert r["forward_err"] < 1e-5
    assert reports[0]["logits_checksum"] == reports[1]["logits_checksum"]


def test_host_shard_splits_items_across_processes(reports):
    for r in reports:
        assert r["host_shard_owners"] == [1] * len(r["host_shard_owners"])
