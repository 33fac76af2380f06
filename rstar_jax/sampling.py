"""Batched step sampler: prefill each prompt once, share its cache with n samples, decode to a step tag.

This is the engine under MCTS expansion. Prompts are left-padded to a length bucket and the batch to
a power of two, so the number of compiled programs stays bounded; the decode loop is one jitted
`lax.while_loop` over donated state that stops as soon as every row has finished. On CPU a call's prompts
run as two batches in two threads (`concurrent_calls`), since one decode step of a small model keeps
only one core busy.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rstar_jax import tokenizer as tk
from rstar_jax.kv_store import StoredContext, store_for
from rstar_jax.models.qwen2 import KVCache, Qwen2, SharedPrefix, positions_from_mask

# Padded prompt lengths: steps of 64 to 512, then four per doubling (at most 25% padding). A prefill is
# compute on every padded token: powers of two cost the search 1.6x in generation (the longest leaf of a
# batch is ~300 tokens, so 512; measured on a 256-problem miniature search, 105 s -> 66 s).
DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
                          2560, 3072, 3584, 4096)
# Lengths of the tokens a prefill runs after a stored context (a node's step, or a prompt's last token): few,
# since each (step bucket, prompt bucket, batch) pair is a program to compile.
STEP_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FINISH_REASONS = ("length", "stop", "eos")  # index = code stored on device
# XLA:CPU runs a decode step of the miniature on about one core (its ops are too small to split): two
# calls in two threads, each with half of the prompts, did 1.7x the work per second on 2 cores (same samples).
CPU_CONCURRENT_CALLS = 2
# XLA:CPU compiles single dots through YNNPACK by default, which re-packs an operand (the KV cache, every
# step) into freshly faulted pages: on the miniature, a 64 x 8 block generation spent 2.2M page faults and
# 12.8 s, 6.2 s with YNNPACK kept to elementwise and reduce fusions. Decode only: prefill and training
# run large matmuls, where the default is as fast or faster (48M model: decode benchmark unchanged, a
# training step 8% slower without it).
CPU_DECODE_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclasses.dataclass
class Sample:
    """One continuation. `text` ends with its stop string when `finish_reason == "stop"`."""

    token_ids: list[int]
    text: str
    logprobs: list[float]  # per generated token, under the model's (temperature 1) distribution
    finish_reason: str  # "stop" | "eos" | "length"
    stop: str | None = None  # which stop string ended it


@struct.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array  # [R, V] fp32: next-token logits, R = rows (prompts x n)
    positions: jax.Array  # [R] int32: position of the next token
    keys: jax.Array  # [R] typed PRNG keys, one stream per (prompt, sample)
    tokens: jax.Array  # [R, S] int32 generated tokens (pad after finishing)
    logprobs: jax.Array  # [R, S] fp32
    recent: jax.Array  # [R, L] int32: the last L generated tokens, for multi-token stop sequences
    done: jax.Array  # [R] bool
    finish: jax.Array  # [R] int32 index into FINISH_REASONS
    length: jax.Array  # [R] int32 tokens generated
    step: jax.Array  # [] int32


@dataclasses.dataclass
class _Reuse:
    """Where the keys/values of a prompt's first `k` tokens come from: a stored context (`entry`, whose ids
    begin the prompt's), else computed by the call (`kv`). Only the tokens after them run in its prefill."""

    k: int
    entry: StoredContext | None = None
    kv: np.ndarray | None = None  # [2, L, G, k, Dh] when there is no entry


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {buckets[-1]}")


def _filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p on [R, V] logits (masked entries -> -inf)."""
    logits = logits / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest set whose mass reaches top_p: keep a token if the mass before it is < top_p.
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _sample_rows(keys: jax.Array, logits: jax.Array, block: int = 256) -> jax.Array:
    """One token per row from softmax(logits) by inverse CDF, two-level so no pass is a long scan.

    keys: [R] typed keys; logits: [R, V] (-inf = never). One uniform per row instead of the V that
    Gumbel-max (`jax.random.categorical`) draws: on CPU that is the difference between 30% of a
    decode step and ~2%. Returns [R] int32.
    """
    rows, vocab = logits.shape
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised, [R, V]
    pad = -vocab % block
    blocks = jnp.pad(probs, ((0, 0), (0, pad))).reshape(rows, -1, block)  # [R, NB, block]
    block_mass = jnp.sum(blocks, axis=-1)  # [R, NB]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    # u in (0, total]: the first CDF entry >= u always has positive mass, so masked tokens never win.
    u = jax.vmap(lambda k: jax.random.uniform(k, minval=jnp.finfo(jnp.float32).tiny))(keys) * block_cdf[:, -1]
    chosen = jnp.minimum(jnp.sum(block_cdf < u[:, None], axis=-1), block_cdf.shape[1] - 1)  # [R]
    within = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [R, block]
    within_cdf = jnp.cumsum(within, axis=-1)
    before = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=1)[:, 0]
    u_in = jnp.clip(u - before, jnp.finfo(jnp.float32).tiny, within_cdf[:, -1])
    offset = jnp.minimum(jnp.sum(within_cdf < u_in[:, None], axis=-1), block - 1)
    return (chosen * block + offset).astype(jnp.int32)


def _grow_own_cache(state: DecodeState, *, length: int) -> DecodeState:
    """Pads the rows' own KV cache to `length` slots (new slots invalid); the shared prefix is untouched."""
    cache = state.cache
    extra = length - cache.length
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))  # [R, G, S, Dh] along S
    return state.replace(cache=cache.replace(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                                             valid=jnp.pad(cache.valid, ((0, 0), (0, extra)))))


def default_concurrent_calls(mesh: jax.sharding.Mesh | None = None) -> int:
    """Programs to run at once in parallel threads: CPU_CONCURRENT_CALLS on CPU without a multi-device mesh
    (small programs keep about one core busy each), else 1 (one program spans the devices)."""
    one_device = mesh is None or mesh.size == 1
    return CPU_CONCURRENT_CALLS if jax.default_backend() == "cpu" and one_device else 1


class ConcurrentMap:
    """`map(fn, items)` in order, over `workers` threads (inline when there is one worker or one item)."""

    def __init__(self, workers: int, name: str):
        if workers < 1:
            raise ValueError(f"concurrent_calls must be >= 1, got {workers}")
        self.workers = workers
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name) if workers > 1 else None

    def __call__(self, fn: Callable, items: Sequence) -> list:
        return list(self._pool.map(fn, items)) if self._pool and len(items) > 1 else list(map(fn, items))


def decode_compiler_options(xla_defaults: bool = False) -> dict[str, str] | None:
    """The decode program's XLA options: CPU_DECODE_COMPILER_OPTIONS on CPU, the defaults elsewhere."""
    return None if xla_defaults or jax.default_backend() != "cpu" else dict(CPU_DECODE_COMPILER_OPTIONS)


class Sampler:
    """`generate(prompts, n)` -> n `Sample`s per prompt. Owns the compiled prefill/decode programs."""

    def __init__(self, model: Qwen2, decode_fn: Callable[[list[int]], str], *,
                 stop_strings: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 stop_sequences: Sequence[Sequence[int]] = (), eos_token_ids: Sequence[int] = (),
                 pad_id: int = 0, valid_vocab_size: int | None = None,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, batch_multiple: int = 1,
                 first_segment: int = 64, mesh: jax.sharding.Mesh | None = None, xla_defaults: bool = False,
                 concurrent_calls: int | None = None, cache_mib: float = 0):
        """
        decode_fn: token ids -> text (special tokens kept, no whitespace clean-up).
        stop_strings: text stops, kept in the sample; checked on the decoded text, so a stop split across
          tokens is still found. stop_token_ids / stop_sequences: the same stops in token form, checked on
          device so rows finish early (a tag that is one special token, or its usual tokenisation).
        valid_vocab_size: logits at ids >= this are never sampled (embedding rows beyond the tokenizer).
        batch_multiple: the padded batch is a multiple of this (the mesh's batch-sharding size).
        first_segment: own-cache slots of the first decode segment; the cache doubles while rows are
          live, so a step that ends early never pays attention over max_new_tokens slots.
        xla_defaults: compile decode with XLA's default options (benchmarks: see CPU_DECODE_COMPILER_OPTIONS).
        concurrent_calls: a call's prompts are split, by length, into this many groups that prefill and
          decode in parallel threads. Default: CPU_CONCURRENT_CALLS on CPU without a multi-device mesh, else 1.
        cache_mib: host memory for the keys/values of prompts named by `generate(texts=...)`, so a prompt
          that extends a stored one (an MCTS leaf's context extends its parent's) prefills only its new tokens.
        """
        self.graphdef, self.params = nnx.split(model)
        self.config = model.config
        self.decode_fn = decode_fn
        self.stop_strings = tuple(stop_strings)
        self.pad_id = pad_id
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.batch_multiple = batch_multiple
        self.mesh = mesh
        seqs = [list(s) for s in stop_sequences] + [[t] for t in stop_token_ids]
        width = max([len(s) for s in seqs], default=1)
        # [K, L] right-aligned stop sequences, -1 = wildcard (shorter sequences).
        self._stop_seqs = np.full((max(len(seqs), 1), width), -1, np.int32)
        self._stop_seqs[:, -1] = -3  # an empty table never matches
        for i, s in enumerate(seqs):
            self._stop_seqs[i, width - len(s):] = s
        self._eos = np.asarray(list(eos_token_ids) or [-3], np.int32)
        vocab = self.config.vocab_size
        self._vocab_mask = np.arange(vocab) < (valid_vocab_size or vocab)
        self.store = store_for(cache_mib)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("n", "max_new_tokens", "segment"))
        self._prefill_after = jax.jit(self._prefill_after_impl, static_argnames=("n", "max_new_tokens", "segment"))
        self._context_kv = jax.jit(self._context_kv_impl)
        self.first_segment = first_segment
        self._decode = jax.jit(self._decode_impl, static_argnames=("config",), donate_argnums=(1,),
                               compiler_options=decode_compiler_options(xla_defaults))
        self._grow = jax.jit(_grow_own_cache, static_argnames=("length",))
        self._map = ConcurrentMap(default_concurrent_calls(mesh) if concurrent_calls is None else concurrent_calls,
                                  "sampler")
        self.last_timing: dict[str, float] = {}

    @property
    def concurrent_calls(self) -> int:
        return self._map.workers

    @classmethod
    def for_steps(cls, model: Qwen2, tokenizer, **kwargs) -> "Sampler":
        """A sampler of rStar steps: stops at the step tags (as tokens and as text), eos ends a row too."""
        return cls(model, lambda ids: tokenizer.decode(ids, skip_special_tokens=False), stop_strings=tk.STOP_TAGS,
                   stop_token_ids=tk.stop_token_ids(tokenizer), eos_token_ids=tk.eos_token_ids(tokenizer),
                   pad_id=tokenizer.pad_token_id or 0,
                   valid_vocab_size=tk.vocab_rows_needed(tokenizer), **kwargs)

    # ---- device programs -----------------------------------------------------------------------

    def _prefill_impl(self, params, tokens, mask, row_keys, filler, *, n: int, max_new_tokens: int,
                      segment: int) -> DecodeState:
        """tokens, mask: [B, P] left-padded; row_keys: [B * n]; filler: [B] True for the rows that only pad
        the batch (done from the start, so they never keep the loop running). Prefill once; the n samples
        share the prompt's cache."""
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        hidden, prompt_cache = model(tokens, positions_from_mask(mask), mask, KVCache.zeros(self.config, b, p))
        logits = model.logits(hidden[:, -1])  # [B, V]: left padding puts every row's last token at P-1
        prefix = SharedPrefix(k=prompt_cache.k, v=prompt_cache.v, valid=prompt_cache.valid)
        return self._start(logits, jnp.sum(mask, axis=-1, dtype=jnp.int32), prefix, row_keys, filler, n=n,
                           max_new_tokens=max_new_tokens, segment=segment)

    def _prefill_after_impl(self, params, context_kv, context_mask, rest, rest_mask, row_keys, filler, *, n: int,
                            max_new_tokens: int, segment: int) -> tuple[DecodeState, jax.Array]:
        """`_prefill` of prompts whose first tokens' keys/values are given: context_kv [2, L, B, G, W, Dh] holds
        them right-aligned before the last S slots, valid where context_mask [B, W]; rest, rest_mask [B, S] are
        the tokens after them, left-padded, run into the last S slots as into a decode cache. The samples share
        all W slots. Also returns the rest's keys/values [2, L, B, G, S, Dh]."""
        model = nnx.merge(self.graphdef, params)
        s, w = rest.shape[1], context_mask.shape[1]
        cache = KVCache(k=tuple(context_kv[0]), v=tuple(context_kv[1]), valid=context_mask, index=jnp.int32(w - s))
        start = jnp.sum(context_mask, axis=-1, dtype=jnp.int32)  # [B] the rest's first position
        hidden, cache = model(rest, start[:, None] + positions_from_mask(rest_mask), rest_mask, cache)
        prefix = SharedPrefix(k=cache.k, v=cache.v, valid=cache.valid)
        state = self._start(model.logits(hidden[:, -1]), start + jnp.sum(rest_mask, axis=-1, dtype=jnp.int32),
                            prefix, row_keys, filler, n=n, max_new_tokens=max_new_tokens, segment=segment)
        own = lambda layers: jnp.stack([x[:, :, w - s:] for x in layers])
        return state, jnp.stack([own(cache.k), own(cache.v)])

    def _context_kv_impl(self, params, tokens, mask):
        """tokens, mask: [B, P] left-padded -> their keys/values [2, L, B, G, P, Dh]."""
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        _, cache = model(tokens, positions_from_mask(mask), mask, KVCache.zeros(self.config, b, p))
        return jnp.stack([jnp.stack(cache.k), jnp.stack(cache.v)])

    def _start(self, logits, positions, prefix: SharedPrefix, row_keys, filler, *, n: int, max_new_tokens: int,
               segment: int) -> DecodeState:
        """The decode state after a prefill: logits [B, V] and positions [B] of each prompt's next token, fanned
        out to its n rows, which share `prefix`."""
        b = logits.shape[0]
        fan = lambda x: jnp.repeat(x, n, axis=0)
        cache = KVCache.zeros(self.config, b * n, segment).replace(prefix=prefix)
        rows = b * n
        return DecodeState(
            cache=cache, logits=fan(logits), positions=fan(positions), keys=row_keys,
            tokens=jnp.full((rows, max_new_tokens), self.pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
            recent=jnp.full((rows, self._stop_seqs.shape[1]), -2, jnp.int32),
            done=fan(filler), finish=jnp.zeros((rows,), jnp.int32),
            length=jnp.zeros((rows,), jnp.int32), step=jnp.zeros((), jnp.int32))

    def _decode_impl(self, params, state: DecodeState, *, config: SamplingConfig) -> DecodeState:
        model = nnx.merge(self.graphdef, params)
        max_steps = state.cache.length  # this segment's own slots; the host grows the cache for more
        stop_seqs, eos = jnp.asarray(self._stop_seqs), jnp.asarray(self._eos)
        vocab_mask = jnp.asarray(self._vocab_mask)

        def cond(s: DecodeState):
            return (s.step < max_steps) & ~jnp.all(s.done)

        def body(s: DecodeState):
            logits = jnp.where(vocab_mask, s.logits, -jnp.inf)  # [R, V]
            if config.temperature == 0:
                token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
                token = _sample_rows(step_keys, _filter_logits(logits, config))
            logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
            live = ~s.done
            token = jnp.where(live, token, self.pad_id)
            recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)  # [R, L]
            hit_stop = jnp.any(jnp.all((stop_seqs[None] == -1) | (stop_seqs[None] == recent[:, None]), -1), -1)
            hit_eos = jnp.any(token[:, None] == eos[None], -1)
            finish = jnp.where(live & hit_stop, 1, jnp.where(live & hit_eos, 2, s.finish))
            hidden, cache = model(token[:, None], s.positions[:, None], jnp.ones_like(token, bool)[:, None], s.cache)
            return DecodeState(
                cache=cache, logits=model.logits(hidden[:, 0]), positions=s.positions + 1, keys=s.keys,
                tokens=s.tokens.at[:, s.step].set(token),
                logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, logprob, 0.0)),
                recent=recent, done=s.done | hit_stop | hit_eos, finish=finish,
                length=s.length + live.astype(jnp.int32),
                step=s.step + 1)

        return jax.lax.while_loop(cond, body, state)

    # ---- host side -----------------------------------------------------------------------------

    def _batch_rows(self, count: int) -> int:
        """Padded batch size of `count` prompts: a power of two, a multiple of `batch_multiple`."""
        rows = max(self.batch_multiple, 1 << (count - 1).bit_length())
        return -(-rows // self.batch_multiple) * self.batch_multiple

    def _pad_batch(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(p) for p in prompts)
        width = _bucket(longest, self.prompt_buckets, "prompt length")
        rows = self._batch_rows(len(prompts))
        tokens = np.full((rows, width), self.pad_id, np.int32)
        mask = np.zeros((rows, width), bool)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
            mask[i, width - len(p):] = True
        mask[len(prompts):, -1] = True  # filler rows: one real token so their attention is well-defined
        return tokens, mask

    def _row_keys(self, seed: int, prompt_ids: Sequence[int], n: int, rows: int) -> jax.Array:
        base = jax.random.key(seed)
        ids = np.full((rows // n,), -1, np.int64)
        ids[:len(prompt_ids)] = prompt_ids
        per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(ids, jnp.uint32))
        samples = jnp.arange(n, dtype=jnp.uint32)
        per_row = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, samples))(per_prompt)
        return per_row.reshape(-1)

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, config: SamplingConfig = SamplingConfig(), *,
                 seed: int = 0, prompt_ids: Sequence[int] | None = None, texts: Sequence[str] | None = None,
                 parents: Sequence[str | None] | None = None) -> list[list[Sample]]:
        """prompts: token id lists. Returns n samples per prompt.

        Sample j of prompt i draws from the stream (seed, prompt_ids[i], j) (prompt_ids default to the
        positions), so a sample does not depend on what else is in the batch.
        With a store (`cache_mib`), texts[i] names prompt i (its text) and parents[i] a text it extends (an
        MCTS leaf's parent's context; None: none): the keys/values of a stored parent are reused (of the
        prompt itself when it has no parent), and the prompt's are stored. Same samples as without, up to
        float rounding.
        """
        if len(prompts) == 0:
            return []
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if config.top_k > self.config.vocab_size:
            raise ValueError(f"top_k={config.top_k} exceeds the vocabulary ({self.config.vocab_size})")
        prompt_ids = list(range(len(prompts)) if prompt_ids is None else prompt_ids)
        if len(prompt_ids) != len(prompts):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
        if texts is not None and len(texts) != len(prompts) or parents is not None and len(parents) != len(prompts):
            raise ValueError(f"texts and parents must name each of the {len(prompts)} prompts")
        if any(not 0 <= int(i) < 2**32 - 1 for i in prompt_ids):
            raise ValueError("prompt_ids must be integers in [0, 2**32 - 1) (they seed the sampling streams)")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if not 0 <= min(p) <= max(p) < self.config.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size})")
        longest = max(map(len, prompts)) + config.max_new_tokens
        if longest > self.config.max_position_embeddings:
            logging.warning("prompt + max_new_tokens reaches position %d, beyond the model's trained "
                            "max_position_embeddings=%d", longest, self.config.max_position_embeddings)
        start = time.perf_counter()
        reuse = None
        if self.store is not None and texts is not None:
            reuse = self._plan_reuse(prompts, texts, [None] * len(prompts) if parents is None else parents)
        # Groups of similar length (less padding), each a contiguous slice of the prompts sorted by length.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        groups = [g.tolist() for g in np.array_split(order, min(self._map.workers, len(prompts)))]
        run = lambda g: self._generate_group([prompts[i] for i in g], [prompt_ids[i] for i in g], n, config, seed,
                                             None if reuse is None else [reuse[i] for i in g])
        outs = self._map(run, groups)
        device_s = time.perf_counter() - start
        results = [None] * len(prompts)
        for g, (samples, _) in zip(groups, outs):
            for i, (tokens, logprobs, finish, length, own_kv) in zip(g, samples):
                results[i] = [self._to_sample(tokens[j], logprobs[j], int(finish[j]), int(length[j])) for j in range(n)]
                if reuse is not None:
                    self._store_prompt(texts[i], np.asarray(prompts[i], np.int32), reuse[i], own_kv)
        self.last_timing = {"device_s": device_s, "host_s": time.perf_counter() - start - device_s,
                            "steps": max(t["steps"] for _, t in outs), "groups": len(groups),
                            "batch_rows": sum(t["batch_rows"] for _, t in outs),
                            "prompt_bucket": max(t["prompt_bucket"] for _, t in outs)}
        return results

    def _plan_reuse(self, prompts, texts, parents) -> list[_Reuse]:
        """Each prompt's stored beginning (its parent's context, or itself when it has no parent), else the keys/
        values of all its tokens but the last, computed now (a prefill always runs at least one token)."""
        out, missing = [], []
        for i, (prompt, text, parent) in enumerate(zip(prompts, texts, parents)):
            entry = self.store.get(text if parent is None else parent)
            t = len(entry.ids) if entry is not None else 0
            if entry is not None and t <= len(prompt) and np.array_equal(entry.ids, prompt[:t]):
                out.append(_Reuse(min(t, len(prompt) - 1), entry))
            else:  # not stored, or a merge across the boundary changed its tokens
                out.append(_Reuse(len(prompt) - 1))
                if len(prompt) > 1:
                    missing.append(i)
        order = sorted(missing, key=lambda i: len(prompts[i]))
        chunks = [c.tolist() for c in np.array_split(order, min(self._map.workers, len(order)))] if order else []
        for chunk, kv in zip(chunks, self._map(lambda c: self._compute_kv([prompts[i][:-1] for i in c]), chunks)):
            for r, i in enumerate(chunk):
                out[i].kv = kv[:, :, r, :, kv.shape[4] - out[i].k:].copy()
        return out

    def _compute_kv(self, prompts) -> np.ndarray:
        """Keys/values [2, L, B, G, P, Dh] of left-padded prompts."""
        tokens, mask = self._pad_batch(prompts)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return np.asarray(self._context_kv(self.params, tokens, mask))

    def _pad_after(self, prompts, reuse: Sequence[_Reuse]) -> tuple[np.ndarray, ...]:
        """`_prefill_after`'s inputs: each prompt's first k tokens' keys/values right-aligned in the first W - S
        slots, its other tokens left-padded in S; W is a prompt bucket, so decode programs are those of
        `_prefill`."""
        rest = max(len(p) - r.k for p, r in zip(prompts, reuse))
        s = next((b for b in STEP_BUCKETS if b >= rest), rest)
        need = max(r.k for r in reuse) + s
        w = next((b for b in self.prompt_buckets if b >= need), -(-need // 256) * 256)
        rows, p, c = self._batch_rows(len(prompts)), w - s, self.config
        context_kv = np.zeros((2, c.num_layers, rows, c.num_kv_heads, w, c.head_dim), c.jnp_dtype)
        context_mask = np.zeros((rows, w), bool)
        tokens, mask = np.full((rows, s), self.pad_id, np.int32), np.zeros((rows, s), bool)
        for i, (prompt, r) in enumerate(zip(prompts, reuse)):
            if r.entry is not None:
                r.entry.write_kv(context_kv[:, :, i], p, length=r.k)
            elif r.k:
                context_kv[:, :, i, :, p - r.k:p] = r.kv
            context_mask[i, p - r.k:p] = True
            tail = prompt[r.k:]
            tokens[i, s - len(tail):], mask[i, s - len(tail):] = tail, True
        mask[len(prompts):, -1] = True  # filler rows: one real token so their attention is well-defined
        return context_kv, context_mask, tokens, mask

    def _store_prompt(self, text: str, ids: np.ndarray, reuse: _Reuse, own_kv: np.ndarray) -> None:
        """Stores the prompt's keys/values: own_kv [2, L, G, len(ids) - k, Dh] after its reused beginning."""
        if reuse.entry is None:
            kv = own_kv.copy() if reuse.kv is None else np.concatenate([reuse.kv, own_kv], axis=3)
            self.store.put(StoredContext(text, ids, kv))
        elif reuse.k == len(reuse.entry.ids):  # a parent's context (not the prompt itself, stored already)
            self.store.put(StoredContext(text, ids, own_kv.copy(), parent=reuse.entry))  # not a view of the batch

    def _generate_group(self, prompts, prompt_ids, n: int, config: SamplingConfig, seed: int,
                        reuse: Sequence[_Reuse] | None = None):
        """One padded batch through prefill and decode: per prompt, its n rows' (tokens, logprobs, finish,
        length) as numpy arrays and, with `reuse`, the keys/values of its tokens after its reused beginning;
        and the batch's shape figures."""
        if reuse is None:
            tokens, mask = self._pad_batch(prompts)
            rows, width = tokens.shape
        else:
            after = self._pad_after(prompts, reuse)
            rows, width = after[1].shape
        keys = self._row_keys(seed, prompt_ids, n, rows * n)
        filler = np.arange(rows) >= len(prompts)
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            segment = min(self.first_segment, config.max_new_tokens)
            shapes = dict(n=n, max_new_tokens=config.max_new_tokens, segment=segment)
            if reuse is None:
                state, rest_kv = self._prefill(self.params, tokens, mask, keys, filler, **shapes), None
            else:
                state, rest_kv = self._prefill_after(self.params, *after, keys, filler, **shapes)
            while True:  # decode segments of doubling length until every row is done or out of tokens
                state = self._decode(self.params, state, config=config)
                if segment == config.max_new_tokens or bool(jnp.all(state.done)):
                    break
                segment = min(2 * segment, config.max_new_tokens)
                state = self._grow(state, length=segment)
            out, rest_kv = jax.device_get(((state.tokens, state.logprobs, state.finish, state.length), rest_kv))
        own = [None] * len(prompts) if reuse is None else [
            rest_kv[:, :, i, :, rest_kv.shape[4] - (len(p) - r.k):] for i, (p, r) in enumerate(zip(prompts, reuse))]
        samples = [(*(a[i * n:(i + 1) * n] for a in out), own[i]) for i in range(len(prompts))]
        return samples, {"steps": int(out[3].max(initial=0)), "batch_rows": rows * n, "prompt_bucket": width}

    def _to_sample(self, tokens: np.ndarray, logprobs: np.ndarray, finish: int, length: int) -> Sample:
        ids = tokens[:length].tolist()
        text = self.decode_fn(ids)
        reason = FINISH_REASONS[finish]
        cut = self._first_stop(text)
        if cut is None:
            return Sample(ids, text, logprobs[:length].tolist(), reason)
        stop, end = cut
        # Shortest token prefix whose text contains the stop (binary search: containment only grows).
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._first_stop(self.decode_fn(ids[:mid])) is not None else (mid + 1, hi)
        k = lo
        return Sample(ids[:k], text[:end], logprobs[:k].tolist(), "stop", stop)

    def _first_stop(self, text: str) -> tuple[str, int] | None:
        found = [(text.find(s), s) for s in self.stop_strings if s in text]
        if not found:
            return None
        pos, stop = min(found)
        return stop, pos + len(stop)
