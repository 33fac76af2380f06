"""One trainer for the policy (SFT) and the reward models (PPM, PQM, ORM): a pluggable `Task` loss.

The train state is (params, optimizer state, step): params in fp32 (the master copy; cast to the
compute dtype inside the step), every array sharded by its `logical_axes` through
`parallel.state_shardings`, the Adam moments like their parameters. The step is one `jax.jit` with
explicit in/out shardings: the batch [microbatches, rows, ...] is split over data x fsdp, microbatches
run sequentially in a `lax.scan` that sums gradients (gradient accumulation), and the summed loss is
divided by the whole batch's normaliser, so any split gives the full batch's gradient. Parameters the
task's loss never reads (`Task.frozen`: a PPM's inherited untied LM head) stay outside the state, as loaded.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from rstar_jax import parallel
from rstar_jax.train.optim import OptimConfig, make_optimizer
from rstar_jax.train.tasks import Task

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # when set, overrides epochs
    compute_dtype: str = "float32"  # bf16 casts params for the forward; master params and Adam stay fp32
    remat: bool = False  # recompute each decoder layer's activations in the backward pass
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate the held-out set only at the end
    profile_start: int = -1  # capture a jax.profiler trace of steps [start, start + profile_steps)
    profile_steps: int = 3
    profile_dir: str | None = None
    seed: int = 0  # step randomness (dropout): a function of (seed, step), so a resumed run repeats it

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected one of {COMPUTE_DTYPES}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs} must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, int(np.ceil(self.epochs * batches_per_epoch)))


@struct.dataclass
class TrainState:
    params: nnx.State  # fp32 master parameters
    opt_state: optax.OptState
    step: jax.Array  # [] int32: optimizer steps taken


class _RematLayer(nnx.Module):
    """A decoder layer whose activations are recomputed in the backward pass (`jax.checkpoint`)."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, *args):
        graphdef, state = nnx.split(self.layer)
        run = lambda state, *args: nnx.merge(graphdef, state)(*args)
        return jax.checkpoint(run)(state, *args)


def _backbone(model):
    return getattr(model, "backbone", model)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _sharding_of(x, mesh):
    """A Variable's sharding from its logical axes; anything else (optimizer counters) replicated."""
    if _is_var(x):
        axes = x.get_metadata().get("logical_axes") or (None,) * len(x.shape)
        return parallel.sharding_for(x.shape, axes, mesh)
    return NamedSharding(mesh, PartitionSpec())


class Trainer:
    def __init__(self, task: Task, model: nnx.Module, optim: OptimConfig, cfg: TrainConfig,
                 mesh: jax.sharding.Mesh, total_steps: int):
        self.task, self.cfg, self.mesh, self.total_steps = task, cfg, mesh, total_steps
        self.model_config = model.config
        parallel.check_tensor_parallel(mesh, self.model_config.num_kv_heads)
        self.graphdef, frozen, params, rest = nnx.split(model, task.frozen, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"the model has non-parameter state the trainer does not carry: {rest}")
        self._rest = rest
        self._frozen = jax.device_put(frozen, parallel.state_shardings(frozen, mesh))  # an argument of each step
        self.tx, self.schedule = make_optimizer(optim, total_steps)
        # fp32 master copy, whatever dtype the model was built or loaded in.
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        with jax.set_mesh(mesh):
            self._abs_params = jax.eval_shape(lambda: params)
            self.param_shardings = jax.tree.map(lambda x: _sharding_of(x, mesh), params, is_leaf=_is_var)
            abs_opt = jax.eval_shape(self.tx.init, params)
            self.opt_shardings = jax.tree.map(lambda x: _sharding_of(x, mesh), abs_opt, is_leaf=_is_var)
        self.state_shardings = TrainState(self.param_shardings, self.opt_shardings,
                                          NamedSharding(mesh, PartitionSpec()))
        self._initial_params = params
        self._jit_step = None
        self._jit_eval = None
        self._batch_shardings = {}

    # ------------------------------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        """The initial state (from the model given to the constructor), placed on the mesh."""
        if self._initial_params is None:
            raise RuntimeError("init_state after drop_initial_params: the initial parameters were freed")
        with jax.set_mesh(self.mesh):
            # A fresh copy: the step donates its state, which must not delete the model's own arrays.
            params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_shardings)(
                self._initial_params)
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(params, opt_state, step)

    def drop_initial_params(self) -> None:
        """Frees the constructor's copy of the parameters (init_state can no longer be called)."""
        self._initial_params = None

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state: the target a checkpoint is restored onto."""
        abs_state = jax.eval_shape(lambda: TrainState(self._abs_params, jax.eval_shape(self.tx.init, self._abs_params),
                                                      jnp.zeros((), jnp.int32)))
        # The shardings tree stops at each Variable (one leaf each), so the leaf orders agree.
        leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                  for x, s in zip(jax.tree.leaves(abs_state), jax.tree.leaves(self.state_shardings), strict=True)]
        return jax.tree.unflatten(jax.tree.structure(abs_state), leaves)

    def model(self, state: TrainState, dtype: str | None = None) -> nnx.Module:
        """The model with the state's parameters (cast to `dtype`, default the model config's)."""
        dt = jnp.dtype(dtype or self.model_config.dtype)
        params = jax.tree_util.tree_map_with_path(lambda p, x: x if _is_head(p) else x.astype(dt), state.params)
        return nnx.merge(self.graphdef, jax.tree.map(lambda x: x.astype(dt), self._frozen), params, self._rest)

    # ------------------------------------------------------------------------------------------- step

    def _forward_model(self, params, frozen):
        dt = jnp.dtype(self.cfg.compute_dtype)
        params = jax.tree_util.tree_map_with_path(lambda p, x: x if _is_head(p) else x.astype(dt), params)
        model = nnx.merge(self.graphdef, frozen, params, self._rest)
        if self.cfg.remat:
            layers = _backbone(model).layers
            for i in range(len(layers)):
                layers[i] = _RematLayer(layers[i])
        return model

    def _micro_loss(self, params, frozen, micro, norm, key):
        loss_sum, metrics = self.task.loss_sums(self._forward_model(params, frozen), micro, key)
        return loss_sum / norm, metrics

    def _train_step(self, state: TrainState, frozen: nnx.State, batch: dict):
        norm = jnp.maximum(self.task.normalizer(batch), 1e-6)  # a batch with no targets gives zero grads
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
        a = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(jax.random.key(self.cfg.seed), state.step), a)  # [A]
        if a == 1:
            (loss, metrics), grads = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[0], batch), norm, keys[0])
        else:
            def body(carry, xs):
                micro, key = xs
                (loss, metrics), grads = grad_fn(state.params, frozen, micro, norm, key)
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None
            first = jax.tree.map(lambda x: x[0], batch)
            zeros = jax.eval_shape(lambda: grad_fn(state.params, frozen, first, norm, keys[0]))
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1]))
            (loss, metrics, grads), _ = jax.lax.scan(body, init, (batch, keys))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state.step)}
        out.update({k: num / jnp.maximum(den, 1.0) for k, (num, den) in metrics.items()})
        return TrainState(params, opt_state, state.step + 1), out

    def _eval_step(self, params, frozen, batch):
        norm = self.task.normalizer(batch)
        sums = jax.tree.map(lambda x: x[0], batch)  # eval batches have one microbatch
        loss_sum, metrics = self.task.loss_sums(self._forward_model(params, frozen), sums)
        return {"loss_sum": loss_sum, "norm": norm, **{k: v for k, v in metrics.items()}}

    def _shardings_for(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
        """Batch arrays [A, rows, ...]: rows split over data x fsdp (as far as they divide)."""
        key = tuple(sorted(shapes.items()))
        if key not in self._batch_shardings:
            self._batch_shardings[key] = {
                k: parallel.sharding_for(s, (None, "batch") + (None,) * (len(s) - 2), self.mesh)
                for k, s in shapes.items()}
        return self._batch_shardings[key]

    def place_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local rows [A, rows/process_count, ...] -> global arrays [A, rows, ...] on the mesh."""
        n = jax.process_count()
        shapes = {k: (v.shape[0], v.shape[1] * n) + v.shape[2:] for k, v in local.items()}
        shardings = self._shardings_for(shapes)
        return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k]) for k, v in local.items()}

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if self._jit_step is None:
            self._jit_step = jax.jit(self._train_step, donate_argnums=0,
                                     out_shardings=(self.state_shardings, None))
        shardings = self._shardings_for({k: v.shape for k, v in batch.items()})
        batch = {k: v if isinstance(v, jax.Array) and v.sharding == shardings[k] else jax.device_put(v, shardings[k])
                 for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            return self._jit_step(state, self._frozen, batch)

    def evaluate(self, state: TrainState, batches) -> dict[str, float]:
        """Mean loss and metrics over host-local batches (each [1, rows, ...])."""
        if self._jit_eval is None:
            self._jit_eval = jax.jit(self._eval_step)
        loss_sum = norm = 0.0
        sums: dict[str, np.ndarray] = {}
        for local, _ in batches:
            with jax.set_mesh(self.mesh):
                out = jax.device_get(self._jit_eval(state.params, self._frozen, self.place_batch(local)))
            loss_sum, norm = loss_sum + float(out.pop("loss_sum")), norm + float(out.pop("norm"))
            for k, (num, den) in out.items():
                prev = sums.get(k, (0.0, 0.0))
                sums[k] = (prev[0] + float(num), prev[1] + float(den))
        result = {"loss": loss_sum / max(norm, 1e-6)}
        result.update({k: num / max(den, 1.0) for k, (num, den) in sums.items()})
        return result


def _is_head(path) -> bool:
    # The value head stays fp32 (the reference trains and serves it in fp32).
    return any(getattr(k, "key", None) == "v_head" for k in path)
