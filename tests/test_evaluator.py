"""The evaluator: the sharded evaluation's reassembly (pure) and evaluation during training on a real tiny run."""

from __future__ import annotations

import pytest

from sumtune.evaluator import assemble_eval


def test_assemble_eval_restores_row_order_and_weights_the_loss():
    rows = [{"text": f"t{i}", "summary": f"the cat sat {i}"} for i in range(5)]
    parts = [([0, 2, 4], ["the cat sat 0", "x", "the cat sat 4"], [4, 1, 4], 6.0, 3),
             ([1, 3], ["the cat sat 1", "y"], [4, 1], 3.0, 1)]  # token-weighted 2.25; a mean of means: 2.5
    metrics, records = assemble_eval(parts, rows)
    assert [r["prediction"] for r in records] == ["the cat sat 0", "the cat sat 1", "x", "y", "the cat sat 4"]
    assert metrics["loss"] == pytest.approx(9.0 / 4)
    assert metrics["gen_len"] == pytest.approx(14 / 5) and metrics["num_samples"] == 5
    assert 0 < metrics["rouge1"] < 100
    with pytest.raises(RuntimeError):
        assemble_eval(parts[:1], rows)
