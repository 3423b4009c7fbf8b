"""Incremental UTF-8-safe detokenization and stop strings across token boundaries."""

from __future__ import annotations

import pytest

from loraplex import LLM, SamplingParams
from loraplex.tokenizer import IncrementalDetokenizer, Tokenizer

from conftest import build_byte_tokenizer


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_byte_tokenizer(d)
    return Tokenizer(d)


@pytest.mark.parametrize("text", ["héllo wörld", "price: 5€ 🚀 done", "日本語のテキスト",
                                  "a\nb\tc"])
def test_incremental_decode_never_splits_characters(byte_tok, text):
    ids = byte_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte chars span tokens
    det = IncrementalDetokenizer(byte_tok, [], skip_special_tokens=True)
    pieces = [det.add([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + det.flush() == text
    # a token that ends inside a character yields nothing until the character is complete
    assert any(p == "" for p in pieces) == any(len(c.encode()) > 1 for c in text)


def test_stop_string_spanning_tokens(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_model_len=256)
    prompt = "Count from one to twenty, separated by commas:"
    greedy = dict(temperature=0, max_tokens=40, ignore_eos=True)
    base = llm.generate(prompt, SamplingParams(**greedy))[0].outputs[0]
    text, tok = base.text, llm.engine.tokenizer
    # a stop string that starts inside one token and ends inside a later one
    stop = None
    for i in range(len(text) // 3, len(text) - 6):
        cand = text[i:i + 5]
        n_tokens = len(tok.encode(cand, add_special_tokens=False))
        if cand.strip() and n_tokens >= 2 and text.find(cand) == i:
            stop = cand
            break
    assert stop is not None, text
    want = text[:text.find(stop)]
    out = llm.generate(prompt, SamplingParams(**greedy, stop=[stop]))[0].outputs[0]
    assert out.text == want and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate(prompt, SamplingParams(**greedy, stop=[stop],
                                              include_stop_str_in_output=True))
    assert inc[0].outputs[0].text == want + stop


def test_streamed_text_is_never_retracted(tiny_model_factory):
    import asyncio

    from loraplex import AsyncEngine, EngineConfig

    eng = AsyncEngine.from_config(EngineConfig(model=str(tiny_model_factory("llama")),
                                               max_model_len=128))
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["zzz~"])

        async def run():
            return [o.outputs[0].text async for o in eng.generate("The cat", params)]

        texts = asyncio.run(run())
        assert all(texts[-1].startswith(t) for t in texts)
    finally:
        eng.shutdown()
