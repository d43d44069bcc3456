"""A second retrieval set for the KV eviction benchmarks, built differently from the pass-key set.

The pass-key set (``effllm.demo.build_prompt``) hides a five-digit number in a haystack of
sentences effllm ships; policies were developed on it. This set changes everything but the
measurement: the haystack is Python's own reference documentation (``pydoc_data.topics``, which
effllm does not ship; topics joined in sorted key order, each prompt a different contiguous
slice), and the needle is one of four formats, each with its own wording, question and
reference answer:

- an access code ("K7-QX42": letters, digits and a hyphen),
- a person -> city fact (the answer is the city),
- a date ("14 March 2031"),
- a single word (a password).

Prompt ``i`` of ``n`` puts its needle at depth ``0.1 + 0.8 * i / (n - 1)``; formats cycle
``i % 4`` so with 8 prompts each format sits once in the first half and once in the second.
Values, slice and format are deterministic from the seed. The chat template is applied as in
the first set (one user turn: context, blank line, question). ``key`` is the string a greedy
answer must contain (exact match); ``key_mask`` marks the answer tokens that spell it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

FIRST_NAMES = ("Marta", "Idris", "Noor", "Tobias", "Ayumi", "Lucien", "Priya", "Oskar", "Selin", "Rafael")
LAST_NAMES = ("Okafor", "Lindqvist", "Haddad", "Moreau", "Tanaka", "Brennan", "Kowalski", "Ferreira")
CITIES = ("Valparaiso", "Trondheim", "Marrakesh", "Ljubljana", "Hobart", "Cartagena", "Tbilisi", "Nagasaki",
          "Winnipeg", "Zanzibar")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PROJECTS = ("Heron", "Basalt", "Juniper", "Meridian", "Falcon", "Cobalt", "Tamarind", "Orchid")
WORDS = ("lantern", "saffron", "glacier", "marble", "thimble", "walnut", "compass", "harbor", "velvet", "quartz")
ROOMS = ("archive room", "boiler room", "east gallery", "map room", "north vault", "print shop")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: not confused with 1 and 0


@dataclass
class RetrievalPrompt:
    input_ids: torch.Tensor  # (1, L)
    answer_ids: torch.Tensor  # (1, A)
    key: str  # what a correct greedy answer contains
    question: str
    key_mask: torch.Tensor  # (A,) bool: the answer tokens that spell the key
    kind: str
    depth: float


def _needle(kind: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(needle sentence, question, reference answer, key) for one needle format."""
    if kind == "code":
        key = (f"{rng.choice(LETTERS)}{rng.randint(2, 9)}-"
               f"{rng.choice(LETTERS)}{rng.choice(LETTERS)}{rng.randint(10, 99)}")
        room = rng.choice(ROOMS)
        return (f"Keep this in mind: the access code for the {room} is {key}.",
                f"What is the access code for the {room}? Answer with the code.",
                f"The access code for the {room} is {key}.", key)
    if kind == "city":
        name, city = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", rng.choice(CITIES)
        return (f"A short personal note: {name} moved to the city of {city} last spring.",
                f"Which city did {name} move to? Answer with the city.",
                f"{name} moved to {city}.", city)
    if kind == "date":
        project = rng.choice(PROJECTS)
        key = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2026, 2039)}"
        return (f"An unrelated announcement: the launch of the {project} project is set for {key}.",
                f"On which date is the launch of the {project} project set? Answer with the date.",
                f"The launch of the {project} project is set for {key}.", key)
    if kind == "word":
        room, word = rng.choice(ROOMS), rng.choice(WORDS)
        return (f"One more thing to remember: the password for the {room} is the word {word}.",
                f"What is the password for the {room}? Answer with the word.",
                f"The password for the {room} is {word}.", word)
    raise ValueError(f"kind must be one of code, city, date, word; got {kind!r}")


KINDS = ("code", "city", "date", "word")


def haystack_sentences() -> list[str]:
    """Python's reference topics (sorted by key), split into sentences with whitespace collapsed:
    prose and code lines alike, as a model would read them."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        sentences += [s for s in re.split(r"(?<=[.!?:])\s+", flat) if s]
    return sentences


def _key_mask(tokenizer, answer: str, key: str) -> torch.Tensor:
    """The answer's tokens that overlap the key's characters."""
    start = answer.rindex(key)
    end = start + len(key)
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    return torch.tensor([a < end and b > start for a, b in enc["offset_mapping"]])


def retrieval_prompt(tokenizer, seed: int, samples: int = 8, prompt_tokens: int = 1000,
                     sentences: list[str] | None = None) -> RetrievalPrompt:
    """Prompt ``seed`` of a set of ``samples``: format ``seed % 4``, depth 0.1-0.9 by seed."""
    if not 0 <= seed < samples:
        raise ValueError(f"seed must be in [0, samples={samples}); got {seed}")
    rng = random.Random(1000 + seed)  # other values than the pass-key set's seeds
    kind = KINDS[seed % len(KINDS)]
    depth = 0.1 + 0.8 * seed / max(1, samples - 1)
    needle, question, answer, key = _needle(kind, rng)
    sentences = sentences if sentences is not None else haystack_sentences()

    def render(body: list[str]) -> list[int]:
        messages = [{"role": "user", "content": " ".join(body) + "\n\n" + question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids

    budget = max(0, prompt_tokens - len(render([needle])))
    # each prompt starts at its own place in the text: slices spread over the whole reference
    start = rng.randrange(len(sentences))
    body: list[str] = []
    used = 0
    while True:
        sentence = sentences[(start + len(body)) % len(sentences)]
        cost = len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
        if used + cost > budget:
            if used < budget // 2:  # one very long sentence (a code listing): skip it
                start += 1
                continue
            break
        body.append(sentence)
        used += cost
    body.insert(int(len(body) * depth), needle)
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    return RetrievalPrompt(torch.tensor([render(body)]), torch.tensor([answer_ids]), key, question,
                           _key_mask(tokenizer, answer, key), kind, depth)
