"""The offline demo's data: a small summarization corpus generated deterministically, and a word tokenizer.

The corpus is ours (no downloaded text): short news-like reports built from templates, each with a one-line
summary that names the report's key facts. A summary can be written only by reading the report (the facts
vary row to row, the sentences come in varying order with distractors), so ROUGE before and after training
says whether the model learned to summarize.
"""

from __future__ import annotations

import random
from typing import Callable

CITIES = ["riverton", "oakdale", "brookfield", "millbrook", "fairview", "lakeside", "ashford", "granton",
          "westfield", "kingsport", "maplewood", "stonebridge", "harbor", "pinecrest", "elmwood", "northgate"]
ACTIONS = [("approve", "approves"), ("reject", "rejects"), ("delay", "delays"), ("expand", "expands")]
PROJECTS = ["the road repairs", "a new library", "the school budget", "a bike lane plan", "the water plant",
            "a park upgrade", "the bus routes", "a housing project", "the harbor bridge", "a solar farm"]
COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark", "wayne", "tyrell", "cyberdyne",
             "soylent", "wonka"]
PRODUCTS = ["phones", "cars", "chips", "software", "shoes", "coffee", "batteries", "robots"]
TEAMS = ["the lions", "the eagles", "the sharks", "the wolves", "the bears", "the hawks", "the tigers", "the foxes"]
WEATHER = [("storm", "heavy rain"), ("heat wave", "record heat"), ("snowstorm", "deep snow"), ("flood", "rising water")]
MONTHS = ["january", "march", "may", "june", "august", "october", "november", "december"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
FILLER = [
    "the meeting was streamed online for residents .",
    "local reporters asked several questions after the event .",
    "officials said more details would follow next week .",
    "the weather was mild and the hall was full .",
    "a spokesperson declined to comment further .",
    "the report was shared with the press on the same day .",
]


def _council(rng: random.Random) -> tuple[list[str], str]:
    city, (verb, verbs), project = rng.choice(CITIES), rng.choice(ACTIONS), rng.choice(PROJECTS)
    yes, no = rng.sample(NUMBERS, 2)
    facts = [
        f"the {city} city council met on {rng.choice(DAYS)} evening .",
        f"after a long debate , members voted {yes} to {no} to {verb} {project} .",
        f"the mayor said the decision about {project} was hard for {city} .",
        f"work could start in {rng.choice(MONTHS)} if funds are found .",
    ]
    return facts, f"{city} council {verbs} {project} ."


def _earnings(rng: random.Random) -> tuple[list[str], str]:
    company, product = rng.choice(COMPANIES), rng.choice(PRODUCTS)
    up = rng.random() < 0.5
    trend, word = ("rose", "higher") if up else ("fell", "lower")
    facts = [
        f"{company} published its results for the quarter on {rng.choice(DAYS)} .",
        f"profits {trend} by {rng.choice(NUMBERS)} percent as sales of {product} changed .",
        f"the chief executive of {company} said demand for {product} would guide the next year .",
        f"shares of {company} moved after the report .",
    ]
    return facts, f"{company} reports {word} profits on {product} ."


def _match(rng: random.Random) -> tuple[list[str], str]:
    winner, loser = rng.sample(TEAMS, 2)
    city = rng.choice(CITIES)
    a, b = rng.sample(NUMBERS, 2)
    facts = [
        f"{winner} played {loser} in {city} on {rng.choice(DAYS)} night .",
        f"{winner} won the game {a} to {b} after a strong second half .",
        f"fans of {loser} left early as the rain started .",
        f"the next game is in {rng.choice(MONTHS)} .",
    ]
    return facts, f"{winner} beat {loser} in {city} ."


def _weather(rng: random.Random) -> tuple[list[str], str]:
    (event, detail), city = rng.choice(WEATHER), rng.choice(CITIES)
    day = rng.choice(DAYS)
    facts = [
        f"a {event} hit {city} on {day} morning .",
        f"{detail} closed schools and several roads in {city} .",
        "crews worked through the night to clear the damage .",
        f"forecasters expect calmer weather by {rng.choice(DAYS)} .",
    ]
    return facts, f"{event} closes schools in {city} on {day} ."


TEMPLATES: list[Callable[[random.Random], tuple[list[str], str]]] = [_council, _earnings, _match, _weather]


def demo_records(n: int = 800, seed: int = 0) -> list[dict[str, str]]:
    """`n` deterministic (text, summary) rows; the same `seed` always gives the same corpus."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        facts, summary = TEMPLATES[i % len(TEMPLATES)](rng)
        first, rest = facts[0], facts[1:]
        rng.shuffle(rest)  # the lead sentence stays first, the rest come in any order
        sentences = [first, *rest, *rng.sample(FILLER, rng.randint(1, 3))]
        rows.append({"text": " ".join(sentences), "summary": summary})
    return rows


def build_word_tokenizer(texts: list[str]):
    """A T5-style word-level tokenizer over `texts` (pad=0, eos=1, unk=2, `</s>` appended), for random models.

    Used when a model has no tokenizer of its own (`tiny`, `random:`), so the demo needs nothing downloaded.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text.lower()):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1_000_000)
