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
