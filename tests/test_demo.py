"""effllm demo on the real model, small enough for CI."""

import argparse

import pytest

from effllm import demo

pytestmark = pytest.mark.model


def test_prompt_has_the_key_and_the_requested_length(smollm2):
    _, tok = smollm2
    prompt = demo.build_prompt(tok, 300, seed=3)
    n = prompt.input_ids.shape[1]
    assert 250 <= n <= 300
    assert f"pass key is {prompt.key}" in tok.decode(prompt.input_ids[0])
    assert tok.decode(prompt.answer_ids[0]).strip() == f"The secret pass key is {prompt.key}."


def test_demo_prints_a_row_per_feature(smollm2, capsys):
    args = argparse.Namespace(features="baseline,attention", prompt_tokens=200, new_tokens=4, threads=None, seed=0)
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if len(line.split()) == 8]
    rows = {parts[0]: parts for parts in table if parts[0] in ("baseline", "attention")}
    assert set(rows) == {"baseline", "attention"}
    # The torch attention path computes the same thing: greedy tokens agree fully.
    assert rows["attention"][-1] == "1.00"
    assert float(rows["attention"][3]) == float(rows["baseline"][3])  # same KV bytes


def test_demo_rejects_unknown_features():
    args = argparse.Namespace(features="baseline,warp", prompt_tokens=200, new_tokens=4, threads=None, seed=0)
    with pytest.raises(SystemExit, match="unknown feature"):
        demo.run(args)
