"""Models other than T5: a tiny BART goes through train → evaluate → summarize → merge like T5 does.

sumtune's own decoder knows T5 only; other encoder-decoders generate with transformers' `generate`, and merge builds
a dense model of their own class. Real bitsandbytes NF4, real PEFT, real T5 tokenizer and BillSum rows.
"""

from __future__ import annotations

import pytest
import torch

from sumtune.cli import main


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory, t5_tokenizer_dir):
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    config = BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=None, dropout=0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bart") / "model"
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bart_run(bart_dir, billsum_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("bart-run") / "run"
    args = ["train", "--model", str(bart_dir), "--dataset", str(billsum_jsonl), "--max-samples", "24",
            "--eval-ratio", "0.25", "--max-source-tokens", "64", "--max-target-tokens", "16", "--max-new-tokens", "12",
            "--batch-size", "4", "--max-steps", "4", "--lr", "3e-3", "--compute-dtype", "fp32",
            "--lora-targets", "all-linear", "--eval-every-steps", "4", "--eval-max-samples", "3",
            "--device", "cpu", "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    return out


def test_bart_trains_evaluates_summarizes_and_merges(bart_run, tmp_path, billsum_jsonl):
    import json

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BartForConditionalGeneration

    from sumtune.inference import Summarizer

    metrics = json.loads((bart_run / "eval" / "metrics.json").read_text())
    assert {"rouge1", "rougeL"} <= metrics.keys()
    text = json.loads(billsum_jsonl.read_text().splitlines()[0])["text"]
    summarizer = Summarizer.from_pretrained(bart_run, device="cpu")
    summary = summarizer.summarize(text, max_new_tokens=12)[0]
    assert summary

    from sumtune.generation import prepare_inference_model

    dense = prepare_inference_model(summarizer.model, torch.bfloat16)
    assert type(dense) is BartForConditionalGeneration
    assert {t.dtype for t in (*dense.parameters(), *dense.buffers()) if t.is_floating_point()} == {torch.bfloat16}

    merged = tmp_path / "merged"
    assert main(["merge", str(bart_run), str(merged), "--dtype", "fp32"]) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(merged)
    assert type(model) is BartForConditionalGeneration
    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer("summarize: " + text, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == summary

    # This random BART writes the same text with or without the adapter, so the merge is checked on logits:
    # the merged model must carry the adapter's effect, up to float rounding.
    peft_model = summarizer.model
    decoder_ids = torch.tensor([[tokenizer.pad_token_id, 5, 17, 900]])
    with torch.no_grad():
        with_adapter = peft_model(**inputs, decoder_input_ids=decoder_ids).logits
        with peft_model.disable_adapter():
            without = peft_model(**inputs, decoder_input_ids=decoder_ids).logits
        merged_logits = model(**inputs, decoder_input_ids=decoder_ids).logits
    effect = (with_adapter - without).abs().max().item()
    error = (merged_logits - with_adapter).abs().max().item()
    assert effect > 1e-3 and error < 0.01 * effect  # measured: effect 3e-2, error 2e-7

