"""Tokenizers: the miniature's SentencePiece directory, a Qwen-style byte-level BPE, step tags, vocab sync.

Every tokenizer is built here from generated step-format texts; nothing is downloaded.
"""
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rstar_jax import tokenizer as tk
from rstar_jax.models import PPM, ModelConfig, Qwen2

VOCAB = 400

# Held out from training: nested indentation, blank lines, tabs, trailing spaces, comments, LaTeX,
# characters never seen in training (byte fallback), and things that look like special pieces.
ROUND_TRIP = [
    "<code>\n# Step 1: define a helper\ndef f(n):\n    if n <= 1:\n        return 1\n\n    return n * f(n - 1)\n"
    "<end_of_step>\n# Now print the final answer\nprint(f(5))  # 120\n<end_of_code>\n<output>120<end_of_output>\n"
    "<answer>So the answer is \\boxed{120}.<end_of_answer>",
    "for i in range(3):\n\tx = [i ** 2 for i in range(10)]   \n  \n",
    "  leading and trailing spaces  ",
    "\\boxed{\\frac{3}{4}} and \\boxed{\\text{yes}}",
    "déjà vu: 3 × 4 = 12 ✓ 😀",
    "<0x41> <s> </s>x",
    "",
    "\n\n\n",
]


def _solution(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 999), rng.randint(2, 99), rng.randint(2, 9)
    name = rng.choice(["Tom", "Ana", "Li", "Sam"])
    item = rng.choice(["apples", "pens", "coins", "cards"])
    question = f"{name} has {a} {item}, buys {b} more and shares them equally with {c} friends. How many each?"
    total, each = a + b, (a + b) // c
    return (tk.format_prompt(question) +
            f"<code>\n# Step 1: count all the {item}\ntotal = {a} + {b}\n<end_of_step>\n"
            f"# Step 2: share them\neach = total // {c}\nif each < 0:\n    each = 0\n<end_of_step>\n"
            f"# Now print the final answer\nprint(each)\n<end_of_code>\n<output>{each}<end_of_output>\n"
            f"<answer>{name} has {total} {item}; each gets \\boxed{{{each}}}.<end_of_answer>")


def _corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [_solution(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return tk.build_sentencepiece_tokenizer(_corpus(), tmp_path_factory.mktemp("spm"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small Qwen-style tokenizer: byte-level BPE with `<|endoftext|>`, saved as a transformers directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(100, seed=1), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(out)
    return out


def test_format_prompt():
    assert tk.format_prompt("What is 2+3?") == (
        "<|user|>:\nWhat is 2+3?\n<|assistant|>: Let's think step by step and solve the problem with code.")
    assert set(tk.STOP_TAGS) < set(tk.STEP_TAGS) and len(tk.STEP_TAGS) == 7


def test_spm_directory_loads_with_autotokenizer(spm_dir):
    tok = transformers.AutoTokenizer.from_pretrained(spm_dir)  # Plain HF load, as any user would.
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_dir, tk.SPM_FILE))
    assert len(tok) == sp.get_piece_size() <= VOCAB
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    for tag in tk.STEP_TAGS:
        assert tok.encode(tag, add_special_tokens=False) == [sp.piece_to_id(tag)]
    assert tok.encode("x = 1", add_special_tokens=True) == tok.encode("x = 1", add_special_tokens=False)


def test_spm_round_trip_is_exact_and_matches_sentencepiece(spm_dir):
    tok = tk.load_tokenizer(spm_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_dir, tk.SPM_FILE))
    for text in ROUND_TRIP + _corpus(20, seed=7):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        if "<s>" not in text:  # HF matches special tokens in text, SentencePiece does not: see below.
            assert ids == sp.encode(text), text
    # A literal "<s>" becomes the bos id (HF convention, as Qwen's "<|endoftext|>"); decoding is still exact.
    assert tok.encode("a<s>b", add_special_tokens=False)[1] == tok.bos_token_id


def test_load_tokenizer_turns_off_space_cleanup(spm_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(spm_dir, name)) as f:
            config = json.load(f)
        if name == "tokenizer_config.json":
            config["clean_up_tokenization_spaces"] = True  # As some shipped configs have it.
        with open(tmp_path / name, "w") as f:
            json.dump(config, f)
    code = "print(a , b) . x  n't"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).clean_up_tokenization_spaces  # would eat spaces
    tok = tk.load_tokenizer(tmp_path)
    assert not tok.clean_up_tokenization_spaces
    assert tok.decode(tok.encode(code)) == code


def test_spm_tags_single_ids_in_context(spm_dir):
    tok = tk.load_tokenizer(spm_dir)
    ids = tk.tag_ids(tok)
    assert len(set(ids.values())) == len(tk.STEP_TAGS)
    text = "print(x)\n<end_of_code>\n<output>7<end_of_output>"
    tokens = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert "<end_of_code>" in tokens and "<output>" in tokens and "<end_of_output>" in tokens


def test_spm_digits_are_single_tokens(spm_dir):
    tok = tk.load_tokenizer(spm_dir)
    tokens = tok.convert_ids_to_tokens(tok.encode("total = 90817 + 4", add_special_tokens=False))
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == ["9", "0", "8", "1", "7", "4"]


def test_spm_stop_token_ids(spm_dir):
    tok = tk.load_tokenizer(spm_dir)
    stops = tk.stop_token_ids(tok)
    assert stops == tuple(tok.convert_tokens_to_ids(t) for t in tk.STOP_TAGS)
    assert tok.eos_token_id == 2 and 2 not in stops


def test_eos_ids_include_the_generation_config_s(bpe_dir, tmp_path):
    """An Instruct-style directory: the tokenizer's eos is `<|im_end|>`, generation also ends at `<|endoftext|>`."""
    assert tk.eos_token_ids(tk.load_tokenizer(bpe_dir)) == (tk.load_tokenizer(bpe_dir).eos_token_id,)
    instruct = tmp_path / "instruct"
    plain = tk.load_tokenizer(bpe_dir, add_step_tags=False)
    plain.add_special_tokens({"eos_token": "<|im_end|>"})
    plain.save_pretrained(instruct)
    im_end, endoftext = plain.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    (instruct / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    assert tk.eos_token_ids(tk.load_tokenizer(instruct)) == (im_end, endoftext)
    (instruct / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext}))
    assert tk.eos_token_ids(tk.load_tokenizer(instruct)) == (im_end, endoftext)


def test_spm_build_is_deterministic(spm_dir, tmp_path):
    again = tk.build_sentencepiece_tokenizer(_corpus(), tmp_path / "again", vocab_size=VOCAB)
    for name in ("tokenizer.json", tk.SPM_FILE):
        with open(os.path.join(spm_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_spm_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        tk.build_sentencepiece_tokenizer([], tmp_path / "empty")
    with pytest.raises(ValueError, match="vocab_size=100"):
        tk.build_sentencepiece_tokenizer(_corpus(5), tmp_path / "small", vocab_size=100)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        tk.load_tokenizer(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tk.load_tokenizer(tmp_path)


def test_bpe_gets_step_tags_as_single_ids(bpe_dir):
    plain = tk.load_tokenizer(bpe_dir, add_step_tags=False)
    assert len(plain.encode("<end_of_step>", add_special_tokens=False)) > 1  # Learned pieces, not one id.
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tk.stop_token_ids(plain)

    tok = tk.load_tokenizer(bpe_dir)
    assert len(tok) == len(plain) + len(tk.STEP_TAGS)
    ids = tk.tag_ids(tok)
    assert sorted(ids.values()) == list(range(len(plain), len(tok)))
    assert tk.stop_token_ids(tok) == (ids["<end_of_step>"], ids["<end_of_code>"], ids["<end_of_answer>"])
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tk.add_special_tags(tok) == 0  # Already there: nothing added twice.


def test_bpe_tags_survive_save_and_reload(bpe_dir, tmp_path):
    tok = tk.load_tokenizer(bpe_dir)
    tok.save_pretrained(tmp_path)  # What a fine-tuned checkpoint ships.
    again = tk.load_tokenizer(tmp_path, add_step_tags=False)
    assert tk.tag_ids(again) == tk.tag_ids(tok)
    with open(tmp_path / "tokenizer.json") as f:
        saved = {t["content"]: t["special"] for t in json.load(f)["added_tokens"]}
    assert all(saved[tag] for tag in tk.STEP_TAGS)


def _tiny_config(vocab_size, tied):
    return ModelConfig(vocab_size=vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=8, intermediate_size=32, tie_embeddings=tied)


@pytest.mark.parametrize("tied", [True, False])
def test_sync_model_vocab_grows_without_disturbing_rows(bpe_dir, tied):
    plain = tk.load_tokenizer(bpe_dir, add_step_tags=False)
    model = Qwen2(_tiny_config(len(plain), tied), rngs=nnx.Rngs(0))
    embed = np.asarray(model.embed[...])
    head = None if tied else np.asarray(model.lm_head[...])

    tk.sync_model_vocab(model, plain, nnx.Rngs(1))  # Nothing to add.
    assert model.config.vocab_size == len(plain)

    tok = tk.load_tokenizer(bpe_dir)
    tk.sync_model_vocab(model, tok, nnx.Rngs(1))
    assert model.config.vocab_size == len(tok) == len(plain) + len(tk.STEP_TAGS)
    assert model.embed.shape == (len(tok), 16)
    np.testing.assert_array_equal(np.asarray(model.embed[...])[:len(plain)], embed)
    if not tied:
        assert model.lm_head.shape == (16, len(tok))
        np.testing.assert_array_equal(np.asarray(model.lm_head[...])[:, :len(plain)], head)
    assert np.all(np.isfinite(np.asarray(model.embed[...])))


def test_sync_model_vocab_never_shrinks_and_pads(bpe_dir):
    tok = tk.load_tokenizer(bpe_dir)
    big = Qwen2(_tiny_config(len(tok) + 50, True), rngs=nnx.Rngs(0))  # Like Qwen: more rows than ids.
    tk.sync_model_vocab(big, tok, nnx.Rngs(1))
    assert big.config.vocab_size == len(tok) + 50

    plain = tk.load_tokenizer(bpe_dir, add_step_tags=False)
    ppm = PPM(_tiny_config(len(plain), True), rngs=nnx.Rngs(0))
    tk.sync_model_vocab(ppm, tok, nnx.Rngs(1), pad_to_multiple_of=64)
    assert ppm.config.vocab_size % 64 == 0 and ppm.config.vocab_size >= len(tok)

    scoring = PPM(_tiny_config(len(plain), False), rngs=nnx.Rngs(0))
    del scoring.backbone.lm_head  # an untied PPM as search loads it (load_hf(lm_head=False))
    tk.sync_model_vocab(scoring, tok, nnx.Rngs(1))
    assert scoring.backbone.embed.shape == (len(tok), 16) and not hasattr(scoring.backbone, "lm_head")


def test_spm_tokenizer_exported_with_a_qwen2_model_keeps_its_ids(spm_dir, tmp_path):
    """A model export writes config.json (model_type qwen2) beside the tokenizer; ids must not change."""
    from rstar_jax.models.hf_io import save_hf
    tok = tk.load_tokenizer(spm_dir)
    model = Qwen2(_tiny_config(len(tok), tied=True), rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path), tokenizer=tok)
    text = _solution(random.Random(3))
    reloaded = tk.load_tokenizer(tmp_path)
    assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text
    # HF generate() on the export stops at the tokenizer's end of text.
    import transformers
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert tok.eos_token_id is not None and config.eos_token_id == tok.eos_token_id
    assert (config.bos_token_id, config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert transformers.GenerationConfig.from_model_config(config).eos_token_id == tok.eos_token_id
