"""Reward-model training: the PPM (preference pairs), PQM (Q values) or ORM (outcome correctness).

  python -m experiments.train_rm --task=ppm --init_hf_dir=runs/r/round_1/policy/hf \
      --train_records=runs/r/round_1/search/extracted/pairs.jsonl --out_dir=runs/r/round_1/ppm \
      --batch_size=512 --epochs=1
  python -m experiments.train_rm --task=orm --preset=tiny --tokenizer_dir=tok --train_records=orm.jsonl ...

Records: ppm {id, prompt, pos, neg, pos_count, neg_count, margin}; pqm {id, prompt, response, q};
orm {id, prompt, response, correct}. The model is the policy backbone plus a value head (added fresh
with the reference init when --init_hf_dir has none); 5% of the records are held out for the
pairwise / outcome accuracy unless --eval_records or --holdout_fraction say otherwise. All flags:
experiments/train_common.py.
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
    train_common.run_training(flags.FLAGS.task, cfg)

if __name__ == "__main__":
    flags.DEFINE_enum("task", "ppm", ["ppm", "pqm", "orm"], "which reward model to train")
    train_common.define_flags()
    for module in (train_common, multihost):  # absl's --help lists the main module's flags only
        flags.adopt_module_key_flags(module)
    run(main)
