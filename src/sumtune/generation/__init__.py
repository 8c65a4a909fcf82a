"""Generation for summarizers.

- `summaries`: texts in, summaries out; dispatches (first match) to sumtune's T5 decoder on a dense copy or to
  transformers' `generate` for other models. Evaluation and `Summarizer` call this.
- `dense_copy`: the dense inference copy of a training model (base dequantized, LoRA merged).
- `decoding`: `generate_ids`, batched decoding for a dense T5 (greedy on `greedy`/`t5_decode`, CUDA graphs).
"""

from sumtune.generation.decoding import generate_ids, release_generation_cache
from sumtune.generation.dense_copy import prepare_inference_model, supports_fast_generation

__all__ = ["generate_ids", "prepare_inference_model", "release_generation_cache", "supports_fast_generation"]
