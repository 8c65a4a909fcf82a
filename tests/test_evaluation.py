"""Evaluation: ROUGE as rouge_score computes it, on a real trained run's saved predictions, and `sumtune.evaluate`
reproducing what the run wrote."""

from __future__ import annotations

import json

import pytest

from sumtune.evaluation import rouge_scores


def saved(run, name: str = "eval"):
    records = [json.loads(line) for line in (run / name / "predictions.jsonl").read_text().splitlines()]
    return records, json.loads((run / name / "metrics.json").read_text())


def test_rouge_equals_rouge_score_on_the_saved_predictions(trained_run):
    """The trained run's summaries overlap their references (ROUGE-L well above 0), so equality means something."""
    from rouge_score import rouge_scorer

    records, metrics = saved(trained_run)
    ours = rouge_scores([r["prediction"] for r in records], [r["reference"] for r in records])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r["reference"], r["prediction"]) for r in records]
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(d[key].fmeasure for d in direct) / len(direct)
        assert ours[key] == pytest.approx(expected, abs=1e-9)
        assert metrics[key] == pytest.approx(expected, abs=1e-9)
    assert metrics["rougeL"] > 20 and metrics["rouge2"] > 5 and metrics["num_samples"] == len(records) == 16


def test_rouge_is_rouge_score_f_measure_with_stemming_times_100():
    """The scoring itself, on texts that partly overlap: F-measure (not recall), with stemming, ×100."""
    from rouge_score import rouge_scorer

    references = ["The bill amends the tax code. It takes effect in 2027.",
                  "Requires states to report voting results within ten days."]
    predictions = ["The bill amended tax codes.", "States must report results within days of voting."]
    ours = rouge_scores(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        scores = [scorer.score(r, p)[key] for r, p in zip(references, predictions)]
        expected = 100 * sum(s.fmeasure for s in scores) / len(scores)
        assert 0 < expected < 100 and ours[key] == pytest.approx(expected, abs=1e-9)
        assert ours[key] != pytest.approx(100 * sum(s.recall for s in scores) / len(scores))  # F, not recall
    unstemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert ours["rouge1"] > 100 * sum(unstemmed.score(r, p)["rouge1"].fmeasure
                                      for r, p in zip(references, predictions)) / 2  # "amended" ~ "amends"




def test_evaluate_reloads_the_run_and_reproduces_its_final_evaluation(trained_run, tmp_path):
    """`sumtune.evaluate` loads base + adapter from disk and generates again: the same predictions and scores
    as the evaluation the recipe ran on the in-memory model at the end of training (greedy, fp32 CPU)."""
    import sumtune

    metrics = sumtune.evaluate(trained_run, max_samples=16, device="cpu", output_dir=tmp_path / "again")
    records, final = saved(trained_run)
    again, _ = saved(tmp_path, "again")
    assert [r["prediction"] for r in again] == [r["prediction"] for r in records]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "num_samples"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-9)
    assert "loss" not in metrics  # generation only: the eval loss is the recipe's (it needs the training batches)


def test_predictions_carry_the_source_rows_id_and_text(trained_run):
    """The demo corpus has no id column: each prediction's id is its row's position in the source (not in the
    shuffled held-out split), and its text is that row's."""
    from sumtune.data import read_rows

    source = read_rows("demo", "")
    records, _ = saved(trained_run)
    assert [r["id"] for r in records] != list(range(len(records)))  # the split is shuffled: positions differ
    for record in records:
        assert source[record["id"]]["text"] == record["text"]
        assert source[record["id"]]["summary"] == record["reference"]


def test_a_later_evaluation_goes_to_its_own_directory_and_the_report_headlines_the_trainings(trained_run, tmp_path):
    """`sumtune.evaluate(run, max_samples=8)` writes RUN/eval/NAME/; the training's final evaluation (16 documents)
    stays where the report reads it, and the report lists the later one apart."""
    import shutil

    import sumtune
    from sumtune.report import build_html

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()}
    metrics = sumtune.evaluate(run, max_samples=8, device="cpu", progress=False)
    after = {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()}
    assert after == before
    (later,) = [p for p in (run / "eval").iterdir() if p.is_dir()]
    assert later.name.startswith("heldout-") and json.loads((later / "metrics.json").read_text()) == metrics
    assert metrics["num_samples"] == 8 and len((later / "predictions.jsonl").read_text().splitlines()) == 8

    named = sumtune.evaluate(run, max_samples=2, device="cpu", name="quick", progress=False)
    assert json.loads((run / "eval" / "quick" / "metrics.json").read_text()) == named
    with pytest.raises(sumtune.SumtuneError, match="already holds an evaluation; choose another name"):
        sumtune.evaluate(run, max_samples=2, device="cpu", name="quick")

    html = build_html(run)
    final = json.loads(before["metrics.json"])
    headline = html.split("<h2>Numbers</h2>")[1].split("<h2>")[0]
    assert f"Final evaluation of the training run on {final['num_samples']} " in headline
    others = html.split('<table class="other-evals">')[1].split("</table>")[0]
    assert later.name in others and "quick" in others


def test_the_api_draws_a_bar_only_when_asked_and_on_a_terminal(trained_run, tmp_path, monkeypatch):
    import io

    import sumtune

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for progress in (True, False):
        stream = Terminal()
        monkeypatch.setattr("sys.stderr", stream)
        sumtune.evaluate(trained_run, max_samples=2, device="cpu", progress=progress,
                         output_dir=tmp_path / str(progress))
        assert ("generating:" in stream.getvalue()) is progress, stream.getvalue()[-500:]
