"""Two more retrieval sets for the KV eviction benchmarks, built differently from the pass-key set.

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

The third set (``retrieval3``, session 26) was built after the second had been used to choose
between policies, to have one that nothing was chosen on: its haystack is the docstrings of a
fixed list of standard-library modules and of their public classes and functions (not the
reference topics), and its needles are plain statements with no "remember this" flag, in four
other formats: a phone number, a colour, a quantity and a ship's name (two words). Other seeds.
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
    return _plain_needle(kind, rng)


def _plain_needle(kind: str, rng: random.Random) -> tuple[str, str, str, str]:
    """The third set's formats: the fact stated in passing, as any other sentence."""
    if kind == "phone":
        shop = f"{rng.choice(SURNAMES)} {rng.choice(SHOPS)}"
        key = f"{rng.randint(200, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
        return (f"For deliveries, call the {shop} on {key}.",
                f"What is the phone number of the {shop}? Answer with the number.",
                f"The phone number of the {shop} is {key}.", key)
    if kind == "colour":
        thing, key = rng.choice(THINGS), rng.choice(COLOURS)
        return (f"The {thing} was painted {key} many years ago.",
                f"What colour was the {thing} painted? Answer with the colour.",
                f"The {thing} was painted {key}.", key)
    if kind == "quantity":
        dish, grain = rng.choice(DISHES), rng.choice(GRAINS)
        key = str(rng.randint(12, 95) * 10)
        return (f"The {dish} recipe calls for {key} grams of {grain}.",
                f"How many grams of {grain} does the {dish} recipe call for? Answer with the number.",
                f"The {dish} recipe calls for {key} grams of {grain}.", key)
    if kind == "ship":
        port, key = rng.choice(PORTS), f"{rng.choice(SHIP_WORDS[0])} {rng.choice(SHIP_WORDS[1])}"
        return (f"The ship that left {port} at dawn was named the {key}.",
                f"What was the name of the ship that left {port} at dawn? Answer with the name.",
                f"The ship that left {port} at dawn was the {key}.", key)
    raise ValueError(f"kind must be one of {', '.join(KINDS + PLAIN_KINDS)}; got {kind!r}")


KINDS = ("code", "city", "date", "word")
PLAIN_KINDS = ("phone", "colour", "quantity", "ship")
SURNAMES = ("Delgado", "Abernathy", "Nakamura", "Okonkwo", "Petrescu", "Vasquez", "Lindgren", "Achterberg")
SHOPS = ("bakery", "bookbindery", "flower stall", "cheese shop", "bicycle workshop", "tailor")
THINGS = ("wheelbarrow in the garden shed", "door of the lighthouse", "rowing boat by the mill",
          "bench outside the library", "gate of the old orchard", "tram shelter on Elm Street")
COLOURS = ("turquoise", "crimson", "ochre", "lavender", "olive", "scarlet", "teal", "mustard")
DISHES = ("harbour soup", "winter stew", "mountain bread", "lentil pie", "spiced porridge", "barley cake")
GRAINS = ("barley", "rye", "millet", "spelt", "buckwheat", "oats")
PORTS = ("Port Aldern", "Kessmouth", "Brinefield", "Saltvik", "Marrow Bay", "Eastholm")
SHIP_WORDS = (("Silver", "Northern", "Quiet", "Amber", "Restless", "Golden"),
              ("Kestrel", "Tide", "Lantern", "Heron", "Meridian", "Compass"))
# the third set's haystack: modules whose docstrings are mostly prose (a fixed list, any order)
DOC_MODULES = ("argparse", "asyncio", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext",
               "heapq", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "logging", "mailbox",
               "pathlib", "pickle", "random", "sched", "shutil", "smtplib", "statistics", "string", "subprocess",
               "tarfile", "tempfile", "textwrap", "threading", "unittest", "urllib.parse",
               "uuid", "warnings", "wave", "zipfile")


def haystack_sentences(source: str = "topics") -> list[str]:
    """``"topics"``: Python's reference topics (sorted by key); ``"docstrings"``: the docstrings
    of ``DOC_MODULES`` and of their public classes and functions (modules and names sorted;
    modules this Python lacks are skipped). Split into sentences with whitespace collapsed:
    prose and code lines alike, as a model would read them."""
    text = "\n\n".join(_topics() if source == "topics" else _docstrings())
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        sentences += [s for s in re.split(r"(?<=[.!?:])\s+", flat) if s]
    return sentences


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _docstrings() -> list[str]:
    import importlib
    import inspect

    docs = []
    for name in sorted(DOC_MODULES):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without one of them
            continue
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if (not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                    and getattr(obj, "__module__", None) == module.__name__):
                docs.append(inspect.getdoc(obj) or "")
    return [doc for doc in docs if doc]


def _key_mask(tokenizer, answer: str, key: str) -> torch.Tensor:
    """The answer's tokens that overlap the key's characters."""
    start = answer.rindex(key)
    end = start + len(key)
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    return torch.tensor([a < end and b > start for a, b in enc["offset_mapping"]])


def retrieval_prompt(tokenizer, seed: int, samples: int = 8, prompt_tokens: int = 1000,
                     sentences: list[str] | None = None, plain: bool = False) -> RetrievalPrompt:
    """Prompt ``seed`` of a set of ``samples``: format ``seed % 4``, depth 0.1-0.9 by seed.
    ``plain``: the third set's formats and seeds (``sentences`` then its haystack)."""
    if not 0 <= seed < samples:
        raise ValueError(f"seed must be in [0, samples={samples}); got {seed}")
    rng = random.Random((3000 if plain else 1000) + seed)  # other values than the pass-key set's seeds
    kind = (PLAIN_KINDS if plain else KINDS)[seed % 4]
    depth = 0.1 + 0.8 * seed / max(1, samples - 1)
    needle, question, answer, key = _needle(kind, rng)
    sentences = sentences if sentences is not None else haystack_sentences("docstrings" if plain else "topics")

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
