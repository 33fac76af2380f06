"""Orbax train-state checkpoints: restore onto another mesh, refuse another config, never take an
unmarked (partial) step, name a corrupt one; a run keeps its newest saves and saves its last step."""
import gc
import os
import shutil
import time

import jax
import numpy as np
import pytest

from rstar_jax.train.checkpoint import CheckpointMismatchError, Checkpointer, CorruptCheckpointError
from tests.train_fixtures import make_trainer

RUN = {"task": "sft", "model": {"hidden_size": 128}, "total_steps": 3}


@pytest.fixture
def open_checkpointer():
    """Checkpointer(directory, run_config), closed after the test."""
    opened = []
    yield lambda *a: opened.append(Checkpointer(*a)) or opened[-1]
    for c in opened:
        c.close()


def _flat(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint at step 2 of the tiny SFT run on a (2, 2, 2) mesh, and the state it holds."""
    directory = str(tmp_path_factory.mktemp("ckpt"))
    trainer, it = make_trainer(mesh_shape=(2, 2, 2), steps=3)
    state = trainer.init_state()
    for _ in range(2):
        state, _ = trainer.train_step(state, trainer.place_batch(next(it)[0]))
    ckpt = Checkpointer(directory, RUN)
    ckpt.save(2, state, it.state.to_dict())
    ckpt.close()
    return directory, _flat(state), it.state.to_dict()


def test_restores_state_and_data_position_onto_another_mesh(saved, open_checkpointer):
    directory, leaves, data_state = saved
    trainer, _ = make_trainer(mesh_shape=(1, 2, 1), steps=3)
    step, state, data = open_checkpointer(directory, RUN).restore_latest(trainer.abstract_state())
    assert step == 2 and data == data_state and int(state.step) == 2
    assert state.params["embed"].sharding.mesh.shape["fsdp"] == 2
    for got, want in zip(_flat(state), leaves, strict=True):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_of_another_config_is_refused(saved, open_checkpointer):
    directory, _, _ = saved
    trainer, _ = make_trainer(steps=3)
    other = {**RUN, "model": {"hidden_size": 256}}
    with pytest.raises(CheckpointMismatchError,
                       match=r"different config:\n  - model.hidden_size: checkpoint 128, now 256"):
        open_checkpointer(directory, other).restore_latest(trainer.abstract_state())


def test_unmarked_or_temporary_step_is_never_restored(saved, tmp_path, open_checkpointer):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], directory)
    # A step 5 that was cut short (no commit marker) and orbax's in-progress temp dir of a step 7.
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "5"))
    os.remove(os.path.join(directory, "5", "commit_success.txt"))
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "7.orbax-checkpoint-tmp-123"))
    trainer, _ = make_trainer(steps=3)
    ckpt = open_checkpointer(directory, RUN)
    assert ckpt.complete_steps() == [2]
    step, _, _ = ckpt.restore_latest(trainer.abstract_state())
    assert step == 2
    assert os.path.isdir(os.path.join(directory, "5.incomplete-0"))  # kept for inspection, out of the way


def _garble_state(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if name != "_METADATA":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")


# orbax leaves an asyncio callback behind after an aborted restore / save sequence (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_step_is_named_and_the_step_before_restored(saved, tmp_path, open_checkpointer):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], directory)
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "4"))
    _garble_state(os.path.join(directory, "4"))  # committed, but its arrays do not read back
    trainer, _ = make_trainer(steps=3)
    step, _, data = open_checkpointer(directory, RUN).restore_latest(trainer.abstract_state())
    assert step == 2 and data == saved[2]
    _garble_state(os.path.join(directory, "2"))
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {directory}/4: cannot restore the train state"):
        open_checkpointer(directory, RUN).restore_latest(trainer.abstract_state())
    # tensorstore's reads of the garbage still finish in the background: let them, under this test's filter.
    time.sleep(1.0)
    gc.collect()


def test_fit_keeps_the_newest_saves_and_saves_the_last_step(tmp_path, open_checkpointer):
    """every=2, keep=2 over 5 steps: saves at 2 and 4, and at the end (5, off the period); step 2 is deleted, and
    step 5 holds the final state and the data position after it."""
    from rstar_jax.train.loop import fit
    directory = str(tmp_path / "ckpt")
    trainer, it = make_trainer(steps=5)
    ckpt = open_checkpointer(directory, {**RUN, "total_steps": 5}, 2, 2)
    result = fit(trainer, it, checkpointer=ckpt)
    assert ckpt.complete_steps() == [4, 5]
    assert sorted(os.listdir(directory)) == ["4", "5"]  # step 2 removed, no temp or incomplete dirs left
    step, state, data = ckpt.restore_latest(trainer.abstract_state())
    assert step == 5 and int(state.step) == 5 and data == it.state.to_dict()
    for got, want in zip(_flat(state), _flat(result.state), strict=True):
        np.testing.assert_array_equal(got, want)
