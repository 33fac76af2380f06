"""Tiny random HF Qwen2 checkpoints built in the test (nothing is downloaded)."""
import torch
import transformers


def make_hf_qwen2(tmp_dir, *, tied=True, rope_theta=1e4, heads=4, kv_heads=2, vocab=160, seed=0,
                  hidden=64, layers=2):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=rope_theta,
        tie_word_embeddings=tied, max_position_embeddings=256, rms_norm_eps=1e-6)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms; randomise so parity covers them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_dir)
    return model


def make_bpe_tokenizer(tmp_dir, texts, vocab_size=300):
    """A small Qwen-style byte-level BPE (256 byte symbols + merges + `<|endoftext|>`) saved for AutoTokenizer.

    Byte-level, like Qwen's, because AutoTokenizer picks `Qwen2Tokenizer` when the directory's
    config.json says qwen2, and that class reads a BPE tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(tmp_dir)
    return fast
