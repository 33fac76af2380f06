"""Tokenizers for the policy and the PPM: rStar step tags, prompt format, and the miniature's tokenizer.

Real checkpoints (Qwen2.5 byte-level BPE) are loaded from a local directory with
`transformers.AutoTokenizer`, and the rStar tags are added as special tokens (one id each). The embedded
miniature trains its own SentencePiece BPE model and writes it as a `tokenizers` `tokenizer.json`, so
that the same `AutoTokenizer` path loads it (transformers 5 does not read a bare `tokenizer.model` passed
as `LlamaTokenizer(vocab_file=...)`: it silently builds an empty vocabulary instead).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

from rstar_jax.verify.program import ANSWER_END, CODE_END, STEP_END, STEP_TAGS

# A generation (one MCTS step) stops at the first of these; the tag stays in the node text.
STOP_TAGS = (STEP_END, CODE_END, ANSWER_END)
PROMPT_TEMPLATE = "<|user|>:\n{question}\n<|assistant|>: Let's think step by step and solve the problem with code."

# Files any HF tokenizer directory has at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Special pieces of the miniature's SentencePiece model, at fixed ids.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPM_FILE = "sentencepiece.model"  # Not `tokenizer.model`, so loaders never prefer it to tokenizer.json.
# Score for pieces that must never be produced by matching text (byte, control, tag pieces), the way
# SentencePiece keeps them out of its lattice; `tokenizers`' Unigram has no piece types, only scores.
_UNMATCHABLE_SCORE = -1e6
_VERIFY_TEXTS = 64
# tokenizer_config classes that mean "just tokenizer.json".
_PLAIN_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def format_prompt(question: str) -> str:
    """The policy prompt of rStar (RSTAR.md section 2); the response starts right after it."""
    return PROMPT_TEMPLATE.format(question=question)


# ---------------------------------------------------------------------------------------------------
# Loading and step tags


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(directory: str | os.PathLike, add_step_tags: bool = True):
    """Loads an HF tokenizer directory (no download) and makes every step tag a single special token.

    Decoding is made whitespace-exact (`clean_up_tokenization_spaces=False`) because decoded steps are
    executed as Python.
    """
    import transformers  # Heavy import; keep `import rstar_jax.tokenizer` cheap for worker processes.

    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    if not has_tokenizer_files(path):
        raise FileNotFoundError(f"no tokenizer files in {path!r}: expected one of {list(_TOKENIZER_FILES)}")
    # A plain tokenizer.json directory (the miniature's) must not be re-interpreted by AutoTokenizer as the
    # model's own class (a `config.json` saying qwen2 next to it makes that a Qwen2Tokenizer).
    config_file = os.path.join(path, "tokenizer_config.json")
    tokenizer_class = None
    if os.path.exists(config_file):
        with open(config_file) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    if tokenizer_class in _PLAIN_FAST_CLASSES and os.path.exists(os.path.join(path, "tokenizer.json")):
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.clean_up_tokenization_spaces = False
    if add_step_tags:
        add_special_tags(tokenizer, STEP_TAGS)
    return tokenizer


def add_special_tags(tokenizer, tags: Sequence[str] = STEP_TAGS) -> int:
    """Adds `tags` as special tokens where missing, checks each encodes to one id; returns how many were added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tags if t not in vocab]
    # normalized=False: match the literal tag, before any normalizer (NFC, space escaping) rewrites it.
    added = tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                                 special_tokens=True) if missing else 0
    tag_ids(tokenizer, tags)
    return added


def tag_ids(tokenizer, tags: Sequence[str] = STEP_TAGS) -> dict[str, int]:
    """{tag: id}; raises ValueError unless each tag encodes to exactly its one id, alone and inside text."""
    vocab = tokenizer.get_vocab()
    out = {}
    for tag in tags:
        if tag not in vocab:
            raise ValueError(f"tag {tag!r} is not in the tokenizer's vocabulary; load with add_step_tags=True")
        tid = vocab[tag]
        alone = tokenizer.encode(tag, add_special_tokens=False)
        if alone != [tid]:
            raise ValueError(f"tag {tag!r} encodes to {alone}, expected the single id [{tid}]")
        # Glued to neighbouring text, as in generated steps: `x = 1\n<end_of_step>`.
        glued = tokenizer.encode(f"x{tag}x", add_special_tokens=False)
        if glued.count(tid) != 1:
            raise ValueError(f"tag {tag!r} is split when glued to text: 'x{tag}x' -> {glued} (tag id {tid})")
        out[tag] = tid
    return out


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the tags that end one step's generation (eos ends it too, but as eos: pass it separately)."""
    return tuple(tag_ids(tokenizer, STOP_TAGS).values())


def eos_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's eos and those of the directory's `generation_config.json`
    (an Instruct checkpoint's tokenizer says `<|im_end|>` while generation also ends at `<|endoftext|>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    path = os.path.join(tokenizer.name_or_path or "", "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            listed = json.load(f).get("eos_token_id")
        ids += listed if isinstance(listed, list) else [] if listed is None else [listed]
    return tuple(dict.fromkeys(int(i) for i in ids))


def vocab_rows_needed(tokenizer) -> int:
    """Embedding rows the model needs: one past the largest id (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def sync_model_vocab(model, tokenizer, rngs, pad_to_multiple_of: int = 1):
    """Grows a `Qwen2` (or a `PPM`'s backbone) so every tokenizer id has an embedding row.

    Never shrinks: Qwen checkpoints carry more rows than the tokenizer has ids, which is fine. Existing
    rows are untouched (`resize_embeddings`). `pad_to_multiple_of` rounds a grown vocabulary up, e.g. so it
    divides over the mesh's vocab-sharding axis. Returns the model (changed in place).
    """
    from rstar_jax.models.qwen2 import resize_embeddings  # jax import; see load_tokenizer.

    backbone = getattr(model, "backbone", model)
    needed = vocab_rows_needed(tokenizer)
    have = backbone.config.vocab_size
    if needed <= have:
        return model
    needed = -(-needed // pad_to_multiple_of) * pad_to_multiple_of
    resize_embeddings(backbone, needed, rngs)
    return model


# ---------------------------------------------------------------------------------------------------
# The miniature's SentencePiece tokenizer


def build_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512,
                                  seed: int = 0, extra_symbols: Sequence[str] = ()) -> str:
    """Trains a SentencePiece BPE model on `texts` and writes an `AutoTokenizer` directory to `out_dir`.

    - Exact round trip of any text (byte fallback; no normalisation, no dummy prefix, no whitespace
      collapsing), so indented Python survives encode -> decode.
    - Digits are single tokens (`split_digits`), which helps a tiny model with arithmetic.
    - The step tags (and `extra_symbols`) are user-defined symbols and special tokens: one id each.
    - ids: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3; no bos/eos is added when encoding.
    - `vocab_size` is an upper bound: a small corpus may support fewer pieces. BPE rather than unigram: on
      the miniature's templated corpus unigram training stops at ~200 pieces besides the 256 byte ids and
      splits common words into letters; BPE keeps whole words (36% fewer tokens per solution).
    - Deterministic for the same texts, vocab_size and seed (single-threaded training).
    - Ids equal `SentencePieceProcessor.encode` except where the text holds a literal "<s>", "</s>",
      "<pad>" or "<unk>": HF matches special tokens in text (as Qwen does "<|endoftext|>"). A literal "▁"
      decodes as a space (SentencePiece's own whitespace escape).

    The written tokenizer is checked against the SentencePiece model on some of the texts (same ids, exact
    round trip); a mismatch raises RuntimeError. Returns `out_dir`.
    """
    import sentencepiece as spm

    texts = list(texts)
    if not texts:
        raise ValueError("build_sentencepiece_tokenizer needs at least one training text")
    symbols = list(dict.fromkeys([*STEP_TAGS, *extra_symbols]))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, user_defined_symbols=symbols,
            # Whitespace fidelity: no NFKC, keep runs of spaces, no leading "▁"; indentation may become one piece.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, character_coverage=1.0,
            # SentencePiece silently drops training texts longer than this.
            max_sentence_length=max(len(t.encode("utf-8")) for t in texts) + 1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        # Byte fallback alone needs 256 ids, plus 4 special pieces, the symbols and every seen character.
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, {len(texts)} texts): {e}") from e
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)

    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SPM_FILE), "wb") as f:
        f.write(proto)
    _fast_tokenizer_from_sp(sp, symbols).save_pretrained(out)
    _verify_directory(out, sp, texts[:_VERIFY_TEXTS], symbols)
    return out


def _unigram_vocab(sp, symbols: Sequence[str]) -> list[tuple[str, float]]:
    """(piece, score) for every SentencePiece id, with non-text pieces made unmatchable."""
    vocab = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        special = sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or piece in symbols
        vocab.append((piece, _UNMATCHABLE_SCORE if special else sp.get_score(i)))
    return vocab


def _bpe_model(sp):
    """SentencePiece BPE as a `tokenizers` BPE: ids as in `sp`, merges in SentencePiece's order (its piece ids)."""
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=UNK, fuse_unk=True, byte_fallback=True)


def _fast_tokenizer_from_sp(sp, symbols: Sequence[str]):
    """A `transformers` fast tokenizer that encodes exactly like the SentencePiece model `sp` (BPE or unigram)."""
    import transformers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        tok = Tokenizer(_bpe_model(sp))
    else:
        tok = Tokenizer(Unigram(_unigram_vocab(sp, symbols), unk_id=sp.unk_id(), byte_fallback=True))
    # The whole text is one sequence, as in SentencePiece; spaces are "▁" inside pieces.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [UNK, BOS, EOS, PAD, *symbols]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def _verify_directory(out: str, sp, texts: Sequence[str], symbols: Sequence[str]) -> None:
    """Loads `out` the way users will and checks it against `sp`: ids, round trip, specials."""
    tokenizer = load_tokenizer(out, add_step_tags=False)
    if len(tokenizer) != sp.get_piece_size():
        raise RuntimeError(f"{out}: AutoTokenizer loaded {len(tokenizer)} tokens, SentencePiece has "
                           f"{sp.get_piece_size()} ({type(tokenizer).__name__})")
    expected = {"unk": (UNK, 0), "bos": (BOS, 1), "eos": (EOS, 2), "pad": (PAD, 3)}
    for name, (token, tid) in expected.items():
        got = (getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id"))
        if got != (token, tid):
            raise RuntimeError(f"{out}: {name} token is {got}, expected {(token, tid)}")
    tag_ids(tokenizer, symbols)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        hf_only = any(t in text for t in (UNK, BOS, EOS, PAD))  # Special in HF, plain text in SentencePiece.
        if not hf_only and ids != sp.encode(text):
            raise RuntimeError(f"{out}: ids differ from SentencePiece on {text[:80]!r}")
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"{out}: decode(encode(text)) != text for {text[:80]!r}")

