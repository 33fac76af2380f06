"""Policy SFT: SFT records {id, prompt, response} in, orbax checkpoints and an HF export out.

  python -m experiments.sft --init_hf_dir=/ckpt/Qwen2.5-Math-7B \
      --train_records=runs/r/round_1/search/extracted/sft.jsonl --out_dir=runs/r/round_1/policy \
      --max_len=4096 --batch_size=128 --epochs=2 --learning_rate=7e-6 --compute_dtype=bfloat16 --mesh=-1,4,1
  python -m experiments.sft --preset=tiny --tokenizer_dir=tok --train_records=sft.jsonl --out_dir=runs/sft

Loss on the response (and its eos) only; starts from the base model every round (rStar). Re-running
the same command resumes from the newest complete checkpoint. All flags: experiments/train_common.py.
"""
from __future__ import annotations

from absl import app, flags

from experiments import multihost, train_common
from experiments.usage import check_usage, run


def main(argv):
    check_usage(argv)
    try:
        cfg = train_common.config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    train_common.run_training("sft", cfg)


if __name__ == "__main__":
    train_common.define_flags(reward=False)
    for module in (train_common, multihost):  # absl's --help lists the main module's flags only
        flags.adopt_module_key_flags(module)
    run(main)
