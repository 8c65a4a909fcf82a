"""sumtune.generation.summaries: generate_summaries (what evaluate, summarize and the API call) hands every setting
to the path it takes, sumtune's T5 path or transformers' `generate`, runs every input in one generate_ids call and
moves the progress bar after each batch. The tiny random T5 of tests/_generation_helpers.py, the real T5 tokenizer.
"""

from __future__ import annotations

import pytest
from _generation_helpers import EOS, MAX_NEW, PAD, hf_generate, repeated_ngrams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summaries_pass_every_generation_setting_on_both_paths(merged32, inputs, t5_tokenizer_dir):
    """`generate_summaries` (what evaluate, summarize and the API call) hands every setting to the path it takes:
    sumtune's T5 path (here: transformers' generate on sumtune's encoder output, for the n-gram ban) and plain
    transformers `generate` (models sumtune's decoder does not know; `dense_model=None` takes it for this T5)."""
    from transformers import AutoTokenizer

    from sumtune.generation.summaries import generate_summaries, generation_path

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD, EOS)
    assert generation_path(merged32) == "sumtune's T5 decoder"
    assert generation_path(merged32, no_repeat_ngram_size=3) == "transformers' generate on sumtune's encoder output"
    subset = inputs[:5]
    settings = dict(max_new_tokens=MAX_NEW, min_new_tokens=10, no_repeat_ngram_size=2)
    expected = hf_generate(merged32, subset, **settings)
    assert all(len(row) >= 10 and repeated_ngrams(row, 2) == 0 for row in expected)
    expected_texts = [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]
    for dense in ({}, {"dense_model": None}):
        texts, lengths = generate_summaries(merged32, tokenizer, [""] * len(subset), prefix="", max_source_tokens=256,
                                            source_ids=subset, batch_size=5, **settings, **dense)
        assert texts == expected_texts and lengths == [len(row) for row in expected]


class RecordingProgress:
    """What generate_summaries needs of a sumtune Progress: a bar whose updates are kept."""

    def __init__(self):
        self.updates, self.closed = [], False

    def bar(self, total, desc, unit):
        self.total = total
        return self

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


def test_summaries_run_every_input_in_one_call_and_move_the_bar_after_each_batch(merged32, inputs, t5_tokenizer_dir,
                                                                              monkeypatch):
    """One generate_ids call over all inputs (so the next batch's encoder can run ahead across the whole set), the
    bar moved by each batch's rows, on both paths; no input, no call and no bar movement."""
    from transformers import AutoTokenizer

    from sumtune.generation import decoding, summaries

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    calls, generate = [], decoding.generate_ids
    monkeypatch.setattr(summaries, "generate_ids", lambda model, ids, **k: calls.append(len(ids))
                        or generate(model, ids, **k))
    for dense in ({}, {"dense_model": None}):
        progress = RecordingProgress()
        texts, _ = summaries.generate_summaries(merged32, tokenizer, [""] * 5, prefix="", max_source_tokens=256,
                                                source_ids=inputs[:5], batch_size=2, max_new_tokens=6,
                                                progress=progress, **dense)
        assert len(texts) == 5 and progress.total == 5 and progress.updates == [2, 2, 1] and progress.closed
    assert calls == [5]  # the sumtune path once; the transformers path (dense_model=None) does not call it
    progress = RecordingProgress()
    assert summaries.generate_summaries(merged32, tokenizer, [], prefix="", max_source_tokens=256,
                                        max_new_tokens=6, progress=progress) == ([], [])
    assert progress.updates == [] and calls == [5]
