"""Tokenizer: a ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from GGUF vocab + merges) plus the
checkpoint's own chat template rendered in jinja2's sandbox (checkpoints are untrusted input); and a byte-level
stand-in (:class:`ByteTokenizer`) for checkpoints that ship no tokenizer."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

GGUF_CONTROL = 3


class ChatTemplateError(ValueError):
    """The checkpoint's chat template failed (``raise_exception``, a jinja error) or ran past its bounds
    (:class:`TemplateLimits`)."""


@dataclasses.dataclass(frozen=True)
class TemplateLimits:
    """Bounds on rendering a checkpoint's chat template (untrusted input: jinja2's sandbox stops code execution,
    not a template that loops for hours or writes gigabytes).

    - ``seconds``: wall-clock time of one render.
    - ``max_chars`` + ``per_input_char`` × (characters of the messages' contents): the rendered text's length.
    - ``max_int_bits``: size of an integer ``**`` may produce inside the template (``10**10**10`` would otherwise
      run in C, past any time check)."""

    seconds: float = 10.0
    max_chars: int = 1 << 20
    per_input_char: int = 2
    max_int_bits: int = 4096

    def __post_init__(self):
        if not self.seconds > 0:
            raise ValueError(f"seconds={self.seconds}, allowed: > 0 s")
        if self.max_chars < 1 or self.per_input_char < 0 or self.max_int_bits < 1:
            raise ValueError(f"max_chars={self.max_chars} (>= 1), per_input_char={self.per_input_char} (>= 0) and "
                             f"max_int_bits={self.max_int_bits} (>= 1): out of range")


class _RenderTimeout(BaseException):
    """Raised by the trace hook inside the render; a BaseException so no ``except Exception`` in jinja's runtime
    swallows it."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox whose ``*`` (sequence repetition) and ``**`` cannot build values past the
    render's bounds before any size check could see them."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int, max_int_bits: int, **kw):
        super().__init__(**kw)
        self.max_chars = max_chars
        self.max_int_bits = max_int_bits

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                    raise ChatTemplateError(f"chat template: a repetition of {len(seq)} x {n} items exceeds the "
                                            f"render's bound of {self.max_chars} characters")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * math.log2(abs(left)) > self.max_int_bits:
                raise ChatTemplateError(f"chat template: {left} ** {right} exceeds the bound of {self.max_int_bits} "
                                        f"bits")
        return super().call_binop(context, operator, left, right)


class TextTokenizer:
    """Text <-> ids, chat templating and stop tokens for one model."""

    def __init__(self, tok: Tokenizer, chat_template: str | None, eos_ids: Sequence[int] = (),
                 bos_id: int | None = None, add_bos: bool = False, template_limits: TemplateLimits = TemplateLimits()):
        self.tok = tok
        self.template_limits = template_limits
        self.chat_template = chat_template
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.bos_id = bos_id
        self.add_bos = add_bos
        self._special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (special-token strings such as ``<|im_start|>`` map to their ids)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def stop_ids(self) -> tuple[int, ...]:
        """EOS plus the end-of-turn tokens the paper's harness stops on, when the vocabulary has them."""
        ids = list(self.eos_ids)
        for t in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<|end_of_text|>"):
            i = self.tok.token_to_id(t)
            if i is not None and i not in ids:
                ids.append(i)
        return tuple(ids)

    def apply_chat_template(self, messages: list[dict] | str, add_generation_prompt: bool = True, **kw) -> str:
        """Render the checkpoint's chat template (sandboxed jinja2, bounded by :attr:`template_limits`). A plain
        string becomes one user message. Raises :class:`ChatTemplateError` when the template fails or runs past
        its bounds."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass --no-chat / chat=False")
        lim = self.template_limits
        n_in = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        max_out = lim.max_chars + lim.per_input_char * n_in
        env = _BoundedSandbox(max_out, lim.max_int_bits, trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise ChatTemplateError(f"chat template error: {msg}")

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        bos = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.tok.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        try:
            template = env.from_string(self.chat_template)
        except Exception as e:  # noqa: BLE001 - any jinja syntax error of the checkpoint's template
            raise ChatTemplateError(f"chat template does not parse: {type(e).__name__}: {e}") from None
        return _render_bounded(template, lim, max_out, messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos, **kw)


def _render_bounded(template, limits: TemplateLimits, max_out: int, **context) -> str:
    """``template.render(**context)`` streamed chunk by chunk, stopped with :class:`ChatTemplateError` once its text
    passes ``max_out`` characters or the render passes ``limits.seconds`` (a ``sys.settrace`` hook checks the clock on
    every line the template's compiled code runs, empty loops included; the previous hook is restored after)."""
    deadline = time.monotonic() + limits.seconds

    def hook(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return hook

    prev = sys.gettrace()
    parts, n = [], 0
    sys.settrace(hook)
    try:
        for chunk in template.generate(**context):
            n += len(chunk)
            if n > max_out:
                raise ChatTemplateError(f"chat template: the rendered prompt passed {max_out} characters (bound: "
                                        f"TemplateLimits.max_chars + per_input_char x the messages' text); the "
                                        f"template repeats without end or is not a chat template; use --no-chat")
            parts.append(chunk)
    except _RenderTimeout:
        raise ChatTemplateError(f"chat template: rendering took more than {limits.seconds:g} s "
                                f"(TemplateLimits.seconds); the template loops without end or far too long; use "
                                f"--no-chat") from None
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - a jinja error in the checkpoint's template (undefined, sandbox refusal)
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(prev)
    return "".join(parts)


class ByteTokenizer:
    """Stand-in tokenizer for checkpoints without one (e.g. the tiny test fixtures): UTF-8 bytes shifted by
    ``offset`` (ids below it are the model's special ids), a plain-text chat template, the model's EOS ids as
    stop ids. Needs ``vocab_size >= 256 + offset``."""

    def __init__(self, vocab_size: int, eos_ids: Sequence[int] = (), offset: int = 3):
        if vocab_size < 256 + offset:
            raise ValueError(f"vocab_size={vocab_size}: a byte tokenizer needs >= {256 + offset} ids; this model has "
                             f"no tokenizer, so use a checkpoint with tokenizer.json")
        self.offset = offset
        self.eos_ids = tuple(int(i) for i in eos_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset).decode("utf-8", "replace")

    def apply_chat_template(self, text: str, add_generation_prompt: bool = True) -> str:
        return f"User: {text}\nAssistant:" if add_generation_prompt else f"User: {text}\n"

    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_ids


def tokenizer_from_gguf_fields(fields: dict) -> TextTokenizer:
    """Byte-level BPE tokenizer from GGUF metadata, matching llama.cpp's tokenization (model_assets.md §2)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    toks = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    types = list(fields.get("tokenizer.ggml.token_type", [1] * len(toks)))
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges, fuse_unk=False,
                              byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "")
    steps = []
    if pre in ("smollm", "llama-bpe", "qwen2", "default", ""):
        steps.append(pre_tokenizers.Digits(individual_digits=(pre in ("smollm", "qwen2", "default", ""))))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(toks, types) if ty == GGUF_CONTROL])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return TextTokenizer(tk, fields.get("tokenizer.chat_template"), (eos,) if eos is not None else (),
                         fields.get("tokenizer.ggml.bos_token_id"), bool(fields.get("tokenizer.ggml.add_bos_token", False)))


def tokenizer_from_hf_dir(path: str, eos_ids: Sequence[int] = (), bos_id: int | None = None) -> TextTokenizer | None:
    """``tokenizer.json`` + ``tokenizer_config.json`` of a HF checkpoint dir; ``None`` when absent."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        return None
    tk = Tokenizer.from_file(tj)
    template = None
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            tcfg = json.load(f)
        template = tcfg.get("chat_template")
        eos = tcfg.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tk.token_to_id(eos) is not None and not eos_ids:
            eos_ids = (tk.token_to_id(eos),)
    jt = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jt):
        with open(jt) as f:
            template = f.read()
    return TextTokenizer(tk, template, eos_ids, bos_id)
