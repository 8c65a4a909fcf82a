"""Fast generation for T5 summarizers: a dense inference copy of the training model, and batched decoding."""

from sumtune.generation.api import generate_ids, release_generation_cache
from sumtune.generation.merge import prepare_inference_model, supports_fast_generation

__all__ = ["generate_ids", "prepare_inference_model", "release_generation_cache", "supports_fast_generation"]
