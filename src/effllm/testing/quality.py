"""Quality measures on the texts effllm ships: sentence-embedding cosine (MiniLM) and
perplexity (causal LMs). Used by tests and by the ``quant.quality`` bench case."""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F


def shipped_text(name: str) -> str:
    return resources.files("effllm.data").joinpath(name).read_text()


def sentences() -> list[str]:
    """64 short sentences (``effllm/data/sentences.txt``): the embedding evaluation set."""
    return shipped_text("sentences.txt").strip().splitlines()


def calibration_texts(n: int = 8, words: int = 110) -> list[str]:
    """``n`` chunks of ``calibration.txt``: calibration data disjoint from every evaluation text
    (``sentences.txt``, ``haystack.txt``)."""
    tokens = shipped_text("calibration.txt").split()
    if n * words > len(tokens):
        raise ValueError(f"calibration_texts: {n} x {words} words asked, calibration.txt has {len(tokens)}")
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(n)]


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states (the sentence-transformers recipe)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, max_tokens: int = 1024) -> float:
    """exp(mean next-token NLL) of ``text`` (first ``max_tokens`` tokens)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    logits = model(ids).logits.float()
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(nll))
