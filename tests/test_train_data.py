"""Training records and batches: clear errors, over-length policy, deterministic resumable host-sharded
length-bucketed batches."""
import numpy as np
import pytest

from rstar_jax.train.batching import BatchConfig, BatchIterator, IteratorState
from rstar_jax.train.records import Record, RecordError, holdout_split, read_records
from rstar_jax.train.tasks import PPMTask, SFTTask
from tests.train_fixtures import CharTokenizer, sft_records, write_jsonl


def test_bad_records_name_file_line_and_field(tmp_path):
    good = {"id": "a", "prompt": "p", "response": "r"}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, {"id": "b", "prompt": "p"}])
    with pytest.raises(RecordError, match=r"sft.jsonl:2: field 'response': expected a string, got nothing"):
        read_records("sft", path)
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": \n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: malformed JSON"):
        read_records("sft", str(tmp_path / "bad.jsonl"))
    pair = {"id": "x", "prompt": "p", "pos": "a", "neg": "b", "pos_count": 0, "neg_count": 1, "margin": 0.1}
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: field 'pos_count': expected an integer >= 1, got 0"):
        read_records("pair", write_jsonl(tmp_path / "pairs.jsonl", [pair]))
    with pytest.raises(RecordError, match=r"orm.jsonl:1: field 'correct': expected true or false"):
        read_records("orm", write_jsonl(tmp_path / "orm.jsonl", [{"id": "o", "prompt": "p", "response": "r",
                                                                  "correct": 1}]))


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match=r"empty dataset: no sft records in .*empty.jsonl"):
        read_records("sft", str(tmp_path / "empty.jsonl"))
    with pytest.raises(RecordError, match="no such sft records file"):
        read_records("sft", str(tmp_path / "missing.jsonl"))
    with pytest.raises(RecordError, match=rf"{tmp_path}: a directory, not a sft records file"):
        read_records("sft", str(tmp_path))


def test_a_file_listed_twice_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"id": "a", "prompt": "p", "response": "r"}])
    with pytest.raises(RecordError, match=r"sft.jsonl: listed twice; its records would be read twice"):
        read_records("sft", [path, path])
    with pytest.raises(RecordError, match=r"/\./sft.jsonl: listed twice \(also as .*/sft.jsonl\)"):
        read_records("sft", [path, f"{tmp_path}/./sft.jsonl"])


def test_a_missing_number_is_reported_as_missing(tmp_path):
    pair = {"id": "x", "prompt": "p", "pos": "a", "neg": "b", "pos_count": 1, "neg_count": 1}
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: field 'margin': expected a finite number, got nothing "
                                          r"\(missing\)"):
        read_records("pair", write_jsonl(tmp_path / "pairs.jsonl", [pair]))
    with pytest.raises(RecordError, match=r"field 'margin': expected a finite number, got None"):
        read_records("pair", write_jsonl(tmp_path / "null.jsonl", [{**pair, "margin": None}]))
    with pytest.raises(RecordError, match=r"field 'neg_count': expected an integer >= 1, got nothing \(missing\)"):
        read_records("pair", write_jsonl(tmp_path / "count.jsonl", [{k: v for k, v in pair.items()
                                                                      if k != "neg_count"}]))


def test_overlength_refused_or_truncated(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"id": "ok", "prompt": "ab", "response": "cd"},
                                                 {"id": "long", "prompt": "ab", "response": "x" * 40},
                                                 {"id": "prompt_only", "prompt": "y" * 40, "response": "z"}])
    records = read_records("sft", path)
    with pytest.raises(RecordError, match=r"long.jsonl:2: record 'long' is 43 tokens, over max_len=16 "
                                          r"\(raise --max_len, or pass --overlength=truncate"):
        SFTTask(CharTokenizer(), 16, "error").tokenize(records)
    examples, stats = SFTTask(CharTokenizer(), 16, "truncate").tokenize(records)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)  # the prompt-only one has no target left
    assert [len(e.seqs[0]) for e in examples] == [5, 16]
    # Reward models keep the end (their score is read at the last token).
    pair = {"id": "p", "prompt": "q" * 20, "pos": "good", "neg": "bad", "pos_count": 1, "neg_count": 1, "margin": 0}
    (ex,), stats = PPMTask(CharTokenizer(), 8, "truncate").tokenize(read_records("pair", write_jsonl(
        tmp_path / "p.jsonl", [pair])))
    assert stats.truncated == 1 and list(ex.seqs[0][-4:]) == CharTokenizer().encode("good")


def test_sft_rows_mask_the_prompt_and_end_with_eos():
    task = SFTTask(CharTokenizer(), 32)
    (ex,), _ = task.tokenize(sft_records(1))  # "q0=" -> "0!"
    batch = task.collate([ex, None], 8)
    tok = CharTokenizer()
    assert batch["tokens"][0, :6].tolist() == tok.encode("q0=0!") + [tok.eos_token_id]
    assert batch["loss_mask"][0].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert not batch["mask"][1].any()  # a padding row


def _examples(n=50, seed=0):
    rng = np.random.default_rng(seed)
    recs = [type(r)({**r.fields, "response": "x" * int(rng.integers(1, 60))}, r.where) for r in sft_records(n)]
    task = SFTTask(CharTokenizer(), 64)
    return task, task.tokenize(recs)[0]


def test_batches_are_deterministic_bucketed_and_resumable():
    task, examples = _examples()
    cfg = BatchConfig(batch_size=8, microbatches=2, seed=3, length_buckets=(16, 32, 64))
    a = BatchIterator(examples, task, cfg)
    stream = [next(a) for _ in range(10)]  # crosses into the second epoch (7 batches per epoch)
    assert a.plan.batches_per_epoch == 7
    for batch, info in stream:
        assert batch["tokens"].shape == (2, 4, info["length"]) and info["length"] in (16, 32, 64)
        assert info["real_tokens"] == batch["mask"].sum()
    # Sorting windows by length cuts padding: 0.55 vs 0.45 real tokens with one batch per window.
    unsorted = BatchIterator(examples, task, BatchConfig(batch_size=8, microbatches=2, seed=3, bucket_window=1,
                                                         length_buckets=(16, 32, 64)))
    assert a.plan.fill_rate() > unsorted.plan.fill_rate() + 0.08
    seen = np.concatenate([b["tokens"][..., 0].ravel() for b, _ in stream[:7]])
    assert (seen != 0).sum() == len(examples)  # one epoch = every example once (+ padding rows)
    # Resume from a saved state at batch 4: the same batches follow.
    b = BatchIterator(examples, task, cfg)
    for _ in range(4):
        next(b)
    saved = b.state.to_dict()
    c = BatchIterator(examples, task, cfg, state=IteratorState(**saved))
    for (want, _), (got, _) in zip(stream[4:], [next(c) for _ in range(6)]):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    other = BatchIterator(examples, task, BatchConfig(batch_size=8, microbatches=2, seed=4,
                                                      length_buckets=(16, 32, 64)))
    assert not np.array_equal(next(other)[0]["tokens"], stream[0][0]["tokens"])


def test_hosts_get_disjoint_halves_of_each_microbatch():
    task, examples = _examples()
    cfg = BatchConfig(batch_size=8, microbatches=2, seed=0)
    whole = next(BatchIterator(examples, task, cfg))[0]["tokens"]  # [2, 4, T]
    halves = [next(BatchIterator(examples, task, cfg, process_index=i, process_count=2))[0]["tokens"]
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
    with pytest.raises(ValueError, match="must divide over 3 processes"):
        BatchIterator(examples, task, cfg, process_index=0, process_count=3)


def test_holdout_split_is_seeded_and_disjoint():
    recs = sft_records(40)
    train, held = holdout_split(recs, 0.05, seed=1)
    assert len(held) == 2 and len(train) == 38
    assert not {r.fields["id"] for r in held} & {r.fields["id"] for r in train}
    assert [r.fields["id"] for r in holdout_split(recs, 0.05, seed=1)[1]] == [r.fields["id"] for r in held]
    # Pairs of one step (one prompt, 2 positives x 2 negatives) are held out together, never split.
    pairs = [Record({"id": f"{s}/{p}-{n}", "prompt": f"q{s}", "pos": p, "neg": n}, f"pairs.jsonl:{k}")
             for k, (s, p, n) in enumerate((s, p, n) for s in range(10) for p in "ab" for n in "cd")]
    train, held = holdout_split(pairs, 0.05, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert {r.fields["prompt"] for r in held}.isdisjoint(r.fields["prompt"] for r in train)
    with pytest.raises(RecordError, match="leaves nothing to train on"):
        holdout_split(pairs[:4], 0.5, seed=0)


def test_holdout_keeps_a_problem_s_pairs_of_every_step_together():
    """Step pairs below the root have the path in their prompt; final-answer pairs hold every step's text."""
    from rstar_jax.tokenizer import format_prompt
    recs = []
    for q in range(8):
        prompt, path = format_prompt(f"question {q}"), ""
        for depth in range(3):
            recs += [Record({"id": f"q{q}/step{depth}/{p}-{n}", "prompt": prompt + path, "pos": f"s{p}", "neg": f"s{n}"},
                            "pairs.jsonl") for p in "ab" for n in "cd"]
            path += f"step {depth}\n"
        recs.append(Record({"id": f"q{q}/final/1-2", "prompt": prompt, "pos": path, "neg": "x"}, "pairs.jsonl"))
    for seed in range(10):
        train, held = holdout_split(recs, 0.05, seed)
        problem = lambda r: r.fields["id"].split("/")[0]
        assert len(held) == 13 and {problem(r) for r in held}.isdisjoint(map(problem, train))
