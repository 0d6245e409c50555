"""The paper's evaluation as one preset: ``kvjax eval --preset paper --models DIR [DIR ...]``.

What the authors' harness runs (``run_cfg.py`` of ``yandex-research/context-intensive-kv-offloading`` and the
OpenCompass dataset configs it imports; shared/specs/benchmarks.md §1, algorithms.md §2, §5, §9), and what this
preset sets to match it:

Models: Qwen3-30B-A3B-Instruct-2507, Qwen3-4B-Instruct-2507, Llama-3.1-8B-Instruct, Llama-3.2-3B-Instruct (the
registry presets :data:`MODELS` name their configs; the run needs their checkpoint directories, ``--models``).
Batch size 1, bfloat16 (the checkpoints' dtype; ``--dtype`` overrides).

Benchmarks (``datasets = needlebench_en_datasets + text2json_datasets + longproc_datasets``), :data:`BENCHMARKS`:

* MultiNeedle: NeedleBench v2 parallel (multi-retrieval), English, one length ``context_length=128000``,
  ``length_buffer=3000``, depths 0, 10, …, 100 (11 needles), ``num_repeats_per_file=100`` samples,
  ``max_out_len=1024``; the harness's empty BOT turn appends ``"\\n\\n"`` to the prompt.
* Text2JSON: every record of ``text2json.jsonl`` (``TEXT2JSON_N_SAMPLES`` unset = all 500), prompt = the record's
  ``problem``, ``max_out_len=1024``, scored by ``Text2jsonEvaluator`` (IoU; ``NO_ORDER`` default).
* LongProc HTML-to-TSV: the ``html_to_tsv_8k`` split (120 samples), ``max_out_len=9216``, row-level F1.

Prompt path: the benchmark's user text as one user message through the model's own chat template with the
generation prompt, no system message added, tokenized without special tokens (eval/runner.py). Decoding: greedy,
stop on the EOS id(s) or the end-of-turn tokens ``<|eot_id|>``, ``<|im_end|>``, ``<|endoftext|>``, ``<|end|>``,
output decoded with special tokens skipped and scored unmodified. ``max_length = 128·1024`` tokens of input.

Methods and budgets (:data:`METHODS`, :data:`METHOD_BUDGETS`; each budget sets the method's budget knob, every other
hyper-parameter is the policy class's default, which is the paper's):

* ``full``: exact attention, the reference (the repository has no full-attention config; same prompt path).
* ``yakv`` at ``sparse_budget = 0.015625·2 = 1/32`` of the prompt, ``local_budget=64``, ``outlier_budget=0``,
  ``chunk_size=1``, no SVD; landmarks HIGGS EDEN4-256 (Hadamard group D), keys and values HIGGS EDEN2-256 with the
  Hadamard group C = Hkv·D (1024, and 512 for Qwen3-30B-A3B: exactly run_cfg.py's per-model
  ``*_hadamard_groupsize``), the authors' EDEN grids (``grids="paper"``).
* ``shadowkv`` at its default ``sparse_budget`` 1.5625 % (1/64) of the prompt and at 10× that, 15.625 %; rank 160,
  chunks of 8, local 32, outliers 384 tokens.
* ``arkvale`` at ``token_budget = 0.015625/2 = 1/128`` of the prompt, pages of 16, 2 sink + 5 window pages
  (the authors' fork's run_config.py).
* ``infinigen`` at ``budget=0.2`` of the current length, partial ratio 0.2 — on the Llama models only
  (:data:`METHOD_FAMILIES`): the authors' InfiniGen wrapper (``LlamaInfiniGenwithChatTemplate``) is Llama-only.
* ``lrqk`` at ``num_active = 0.0009765625 + 0.0016`` of the prompt, rank 16 (Llama) / 32 (Qwen3), 64 lite tokens
  (the authors' fork).

Deviations from the authors' run (on purpose or unavoidable), every one:

1. Over-long prompts are skipped and counted, never truncated: the harness right-truncates at 131,072 tokens
   (which would cut the question off). Also skipped: a prompt whose ``prompt + max_new_tokens`` exceeds the
   model's context (``max_position_embeddings``: 131,072 for the Llama models, so a LongProc prompt above
   121,856 tokens is skipped there; the harness would generate past the context).
2. Generation: at most ``max_out_len`` tokens counting the one from the prefill logits; the harness allows
   ``max_out_len + 1``.
3. MultiNeedle's haystack is cut and measured with the model's own tokenizer; the authors use tiktoken's
   cl100k_base (not a kvjax dependency, and its BPE file cannot be fetched offline), so the 125,000 haystack
   tokens are model tokens and the cut points differ by a few hundred characters.
4. Chat templates are rendered by kvjax's sandboxed jinja renderer: no ``strftime_now``, so the Llama templates
   print their built-in default date ("26 Jul 2024") in the system block where transformers may print today's;
   ``enable_thinking=False`` is not passed (the 2507-Instruct Qwen templates do not read it).
5. Text2JSON: the authors' file is not public; the preset reads ``text2json.jsonl`` from the data root
   (``--data-dir`` / ``$KVJAX_DATA`` / kvjax's cache) and stops with eval.data's error when it is absent.
6. ``keys_on_device=False`` (Qwen3-30B-A3B in run_cfg.py) only moves the authors' quantized keys to host memory;
   kvjax's YAKV always keeps the store in host memory, with the same numerics.
7. kvjax additions that do not change a task score: fidelity to full attention (teacher forcing on full's greedy
   output) and attention recall every 8th step (``recall_every=8``), per record.
8. The ShadowKV 10× budget (15.625 %) is taken from secondary write-ups of the paper ("raising ShadowKV's sparse
   token budget to 10× its default 1.5625 %"); the paper's own text was not available to check it. Quest is not
   one of the paper's baselines and is not in the preset (``--methods ...,quest`` adds it).
"""
from __future__ import annotations

from typing import Any

#: the authors' max_length: prompts are cut (here: skipped) above 128·1024 tokens
MAX_LENGTH = 128 * 1024

#: registry names of the paper's four models, in run_cfg.py's order (config presets: pass checkpoint dirs)
MODELS = ("qwen3-30b-a3b-instruct-2507", "qwen3-4b-instruct-2507", "llama-3.1-8b-instruct", "llama-3.2-3b-instruct")

#: benchmark options, in run_cfg.py's order (needlebench + text2json + longproc)
BENCHMARKS: dict[str, dict[str, Any]] = {
    "multineedle": {"context_length": 128_000, "length_buffer": 3000, "depths": list(range(0, 101, 10)),
                    "n_samples": 100, "language": "English", "max_new_tokens": 1024, "max_prompt_tokens": MAX_LENGTH},
    "text2json": {"max_new_tokens": 1024, "max_prompt_tokens": MAX_LENGTH},
    "longproc": {"split": "html_to_tsv_8k", "max_new_tokens": 9216, "max_prompt_tokens": MAX_LENGTH},
}

METHODS = ("full", "yakv", "shadowkv", "arkvale", "infinigen", "lrqk")

#: each method's budgets (its budget knob: sparse_budget, budget or num_active), as --budgets reads them
METHOD_BUDGETS: dict[str, tuple[str, ...]] = {
    "yakv": ("1/32",),
    "shadowkv": ("1/64", "0.15625"),
    "arkvale": ("1/128",),
    "infinigen": ("0.2",),
    "lrqk": ("0.0025765625",),
}

#: methods the paper ran on some model families only
METHOD_FAMILIES: dict[str, tuple[str, ...]] = {"infinigen": ("llama",)}

PRESET: dict[str, Any] = {
    "models": list(MODELS),
    "methods": list(METHODS),
    "budgets": ["default"],
    "method_budgets": {m: list(b) for m, b in METHOD_BUDGETS.items()},
    "method_families": {m: list(f) for m, f in METHOD_FAMILIES.items()},
    "benchmarks": BENCHMARKS,
    "dtype": "bfloat16",
    "recall_every": 8,
}

__all__ = ["BENCHMARKS", "MAX_LENGTH", "METHODS", "METHOD_BUDGETS", "METHOD_FAMILIES", "MODELS", "PRESET"]
