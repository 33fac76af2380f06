"""Did my conversion work? Our model vs HF's PyTorch model on the same sample from one HF directory.

  python -m experiments.check_hf --hf_dir=DIR [--ppm] [--tolerance=1e-4] [--prompt="..."]

Loads DIR into our JAX model (fp32) and, when torch is installed, into `transformers`'
`Qwen2ForCausalLM` (fp32); runs both on the prompt (encoded with DIR's tokenizer when it has one,
else fixed token ids) and prints, per position, the max abs logit difference and whether the argmax
agrees. With --ppm it also compares the value-head score with a torch reimplementation (HF's last
hidden state -> linear with the stored `v_head.summary` tensors). The last line is
`max_abs_diff=<x>`; the exit status is 1 when that is above --tolerance (or not finite), or when DIR
does not load. Without torch it runs only our model, prints its top tokens, and exits 0 with a note.
"""
from __future__ import annotations

import math
import os

import numpy as np
from absl import flags

from experiments.usage import check_usage, run
from rstar_jax.errors import InputError

flags.DEFINE_string("hf_dir", None, "HF Qwen2 checkpoint directory (config.json + safetensors)")
flags.DEFINE_bool("ppm", False, "the directory holds a PPM (value head `v_head.summary.*`)")
flags.DEFINE_float("tolerance", 1e-4, "largest accepted max abs difference (logits, and PPM score)", lower_bound=0)
flags.DEFINE_string("prompt", "Question: what is 12 * 7? Let's think step by step.",
                    "text to run, when the directory has a tokenizer")
flags.register_validator("prompt", bool, "--prompt must not be empty")
FLAGS = flags.FLAGS

# The loader's hints name its Python arguments; this program's user needs the flag or file to change instead.
_HINTS = {
    "(a PPM starts from one with load_hf(..., init_missing_value_head=True), as experiments.train_rm does)":
        "(check it without --ppm)",
    "the checkpoint has a value head: load it with ppm=True": "the checkpoint has a value head: check it with --ppm",
    "load with tie_embeddings=False": "if they are meant to differ, set tie_word_embeddings to false in config.json",
}

_FIXED_LENGTH = 12
_TOP_K = 5


def _tokenizer(hf_dir: str):
    from rstar_jax import tokenizer as tk
    try:  # The project's AutoTokenizer load, without adding the step tags (their ids may exceed the vocab).
        return tk.load_tokenizer(hf_dir, add_step_tags=False)
    except FileNotFoundError:  # no tokenizer files: fixed token ids instead
        return None


def _token_ids(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    if tokenizer is None:  # spread over the vocabulary so that embedding rows beyond the first few are used
        return [(7919 * i + 11) % vocab_size for i in range(_FIXED_LENGTH)]
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InputError(f"--prompt={prompt!r} encodes to no tokens")
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        raise InputError(f"the tokenizer gives ids {too_big[:5]} beyond the model's vocab_size={vocab_size}")
    return ids


def _show(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id])) if tokenizer is not None else "-"


def _run_ours(model, ids: list[int], ppm: bool) -> tuple[np.ndarray, float | None]:
    """fp32 logits [T, V] of one unpadded row, and the PPM score at its last token."""
    import jax.numpy as jnp
    from rstar_jax.models import positions_from_mask
    tokens = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    backbone = model.backbone if ppm else model
    hidden, _ = backbone(tokens, positions_from_mask(mask), mask)
    logits = np.asarray(backbone.logits(hidden))[0]
    score = float(model(tokens, mask)[0]) if ppm else None
    return logits, score


def _run_hf(torch, hf_dir: str, ids: list[int], ppm: bool) -> tuple[np.ndarray, float | None]:
    """HF's fp32 logits [T, V], and the value head reimplemented on HF's last (final-norm) hidden state."""
    import transformers
    from rstar_jax.models.hf_io import SafetensorsReader
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a PPM's v_head keys are reported as unexpected: expected here
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), output_hidden_states=True)
        logits = out.logits[0].float().numpy()
        if not ppm:
            return logits, None
        reader = SafetensorsReader(hf_dir)
        weight = torch.from_numpy(reader.read("v_head.summary.weight").astype(np.float32))  # [1, D]
        bias = torch.from_numpy(reader.read("v_head.summary.bias").astype(np.float32))  # [1]
        score = torch.nn.functional.linear(out.hidden_states[-1][0, -1].float(), weight, bias)
    return logits, float(score[0])


def _print_top_tokens(logits: np.ndarray, tokenizer) -> None:
    top = np.argsort(-logits[-1])[:_TOP_K]
    print(f"our top {_TOP_K} next tokens after the last position:")
    for t in top:
        print(f"  {t:>7d}  logit={logits[-1, t]:+.4f}  {_show(tokenizer, int(t))}")


def _print_agreement(ids, ours: np.ndarray, ref: np.ndarray, tokenizer) -> float:
    diff = np.abs(ours - ref).max(axis=-1)  # per position
    print(f"{'pos':>4} {'token':>7} {'max_abs_diff':>13} {'argmax ours':>12} {'argmax hf':>10}  agree  text")
    for pos, token in enumerate(ids):
        a, b = int(ours[pos].argmax()), int(ref[pos].argmax())
        print(f"{pos:>4} {token:>7d} {diff[pos]:>13.3e} {a:>12d} {b:>10d}  {'yes' if a == b else 'NO ':<5}  "
              f"{_show(tokenizer, token)}")
    agree = int(sum(ours[p].argmax() == ref[p].argmax() for p in range(len(ids))))
    print(f"argmax agrees at {agree}/{len(ids)} positions")
    return float(diff.max())


def check(hf_dir: str, *, ppm: bool = False, tolerance: float = 1e-4, prompt: str = "") -> int:
    """Runs the check and prints its report; returns the process exit status."""
    from rstar_jax.models.hf_io import load_hf
    try:
        model = load_hf(hf_dir, ppm=ppm, dtype="float32")  # fp32 on both sides, so the tolerance means parity
    except ValueError as e:  # CheckpointError and config errors: the directory itself is the problem
        message = str(e)
        for python, flag in _HINTS.items():
            message = message.replace(python, flag)
        print(f"FAILED: {hf_dir} does not load into our model:\n{message}")
        return 1
    cfg = model.config
    print(f"{hf_dir}: {'PPM' if ppm else 'policy'}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}, rope_theta {cfg.rope_theta:g}, "
          f"tied {cfg.tie_embeddings}")
    tokenizer = _tokenizer(hf_dir)
    ids = _token_ids(tokenizer, prompt, cfg.vocab_size)
    source = f"the tokenizer: {prompt!r}" if tokenizer is not None else "fixed ids (no tokenizer files)"
    print(f"sample: {len(ids)} tokens from {source}")
    import jax
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 and TPUs to bf16 passes: not parity
        ours, our_score = _run_ours(model, ids, ppm)
    try:
        import torch
    except ImportError:
        _print_top_tokens(ours, tokenizer)
        if ppm:
            print(f"our value head score: {our_score:+.6f}")
        print("NOTE: torch is not installed, so HF's PyTorch model was not run and nothing was compared; "
              "install torch (pip install torch) for the parity check")
        return 0
    ref, hf_score = _run_hf(torch, hf_dir, ids, ppm)
    max_diff = _print_agreement(ids, ours, ref, tokenizer)
    if ppm:
        score_diff = abs(our_score - hf_score)
        print(f"value head score: ours={our_score:+.6f} hf={hf_score:+.6f} abs_diff={score_diff:.3e}")
        max_diff = float(np.max([max_diff, score_diff]))  # np.max keeps a NaN; builtin max may drop it
    ok = math.isfinite(max_diff) and max_diff <= tolerance  # NaN must fail, not compare False and pass
    print(f"{'OK' if ok else 'FAILED'}: max abs difference {max_diff:.3e} {'<=' if ok else 'is not <='} "
          f"tolerance {tolerance:g}")
    print(f"max_abs_diff={max_diff:.6g}")
    return 0 if ok else 1


def main(argv):
    check_usage(argv, "hf_dir")
    if not os.path.isdir(FLAGS.hf_dir):  # not "no config.json": there is no directory to look in
        raise InputError(f"--hf_dir={FLAGS.hf_dir}: " + ("not a directory" if os.path.exists(FLAGS.hf_dir)
                                                        else "no such directory"))
    return check(FLAGS.hf_dir, ppm=FLAGS.ppm, tolerance=FLAGS.tolerance, prompt=FLAGS.prompt)


if __name__ == "__main__":
    run(main)
