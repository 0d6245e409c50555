"""A checkpoint's chat template is untrusted: its render is bounded in time and output size (TemplateLimits), with a
clear ChatTemplateError, and an ordinary template renders exactly as jinja2's sandbox renders it."""
import sys

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, models as tok_models

from models.tokenizer import ChatTemplateError, TemplateLimits, TextTokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tok(template, **limits):
    return TextTokenizer(Tokenizer(tok_models.BPE()), template, template_limits=TemplateLimits(**limits))


def test_ordinary_template_renders_as_the_plain_sandbox():
    text = "What is the capital of Japan? " * 50
    want = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML).render(
        messages=[{"role": "user", "content": text}], add_generation_prompt=True, bos_token="", eos_token="")
    assert tok(CHATML).apply_chat_template(text) == want


def test_nested_loops_stop_at_the_time_bound_and_the_trace_hook_is_restored():
    hang = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}ok"

    def outer_hook(frame, event, arg):
        return None

    sys.settrace(outer_hook)
    try:
        with pytest.raises(ChatTemplateError, match=r"more than 0.3 s \(TemplateLimits.seconds\)"):
            tok(hang, seconds=0.3).apply_chat_template("hi")
        assert sys.gettrace() is outer_hook
    finally:
        sys.settrace(None)


def test_output_size_is_bounded():
    spam = "{% for a in range(100000) %}{{ messages[0].content }}{% endfor %}"
    t = tok(spam, max_chars=1000, per_input_char=2)
    with pytest.raises(ChatTemplateError, match="passed 1020 characters"):  # 1000 + 2 x 10 input characters
        t.apply_chat_template("0123456789")
    # a template within its bound is not cut: 2 copies of the input fit 1000 + 2 x len
    assert tok("{{ messages[0].content }}{{ messages[0].content }}", max_chars=1).apply_chat_template("abc") == "abcabc"


def test_values_built_in_c_are_bounded_before_they_exist():
    with pytest.raises(ChatTemplateError, match="repetition"):
        tok('{{ "x" * 100000000 }}', max_chars=1000).apply_chat_template("hi")
    with pytest.raises(ChatTemplateError, match="bits"):
        tok("{{ 10 ** 100000 }}").apply_chat_template("hi")
    assert tok("{{ 2 ** 10 }}{{ 'ab' * 3 }}").apply_chat_template("hi") == "1024ababab"


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="chat template error: only user and assistant"):
        tok("{{ raise_exception('only user and assistant') }}").apply_chat_template("hi")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        tok("{% for %}").apply_chat_template("hi")
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok("{{ messages.append(1) }}").apply_chat_template("hi")
    with pytest.raises(ValueError):
        TemplateLimits(seconds=0)
