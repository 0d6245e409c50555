"""Named starting points of ``kvjax eval`` (``--preset``): models, methods, budgets and benchmark options, and the
paper's default budgets where they differ from a policy class's own.

A preset is a dict with ``models``, ``methods``, ``budgets`` (every method at each), ``benchmarks`` ({name:
options}) and ``recall_every``, and optionally ``method_budgets`` ({method: budgets} replacing ``budgets`` for
that method), ``method_families`` ({method: model families it runs on}) and ``dtype``; ``--budgets`` on the
command line replaces ``budgets`` and ``method_budgets`` alike."""
from __future__ import annotations

from typing import Any

from eval import paper, suite

#: The paper's default budgets where they differ from a policy class's own default: YAKV's eval config (1/32) and
#: ShadowKV's "default 1.5625%" the paper compares against (the class default is 2048 tokens).
PAPER_BUDGETS = {"yakv": 1 / 32, "shadowkv": 1 / 64}

#: Options a benchmark entry may carry that the runner consumes (not passed to the benchmark's build).
RUNNER_KEYS = ("max_new_tokens", "answer_prefix", "max_prompt_tokens")

TABLE_PREFIX = "table"  # answer_prefix value: "| name | k1 | k2 |\n|---|---|---|\n|" from the sample's own keys

PRESETS: dict[str, dict[str, Any]] = {
    # smollm2-135m in float32 on CPU. The benchmarks are kvjax's default suite (eval/suite.py: real NeedleBench /
    # LongProc where found without downloading, else generated; synthetic Text2JSON; RULER-style tasks); the
    # options of every benchmark it may run are here, the set is chosen per run by suite.default_benchmarks.
    # Text2JSON in the line format (the 135M model cannot write JSON) with a markdown-table header as answer prefix,
    # medical domain only (the domain where the 135M model recovers names and attributes; its movie titles come
    # back quoted and score 0), and MultiNeedle (3 needles) inside the model's 8k context, cut with the model's
    # own tokenizer. Generation is capped to fit the time; recall is measured every 4th step.
    "default": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv", "shadowkv"],
        "budgets": ["default"],
        "benchmarks": suite.OPTIONS,
        "recall_every": 4,
    },
    # The larger CPU run of BENCHMARKS.md (~80 min on 2 cores): 20 synthetic Text2JSON samples at 4k-7k tokens (all
    # four domains, line format, no answer prefix) + 10 MultiNeedle at 7.6k tokens (3 needles), full / yakv /
    # shadowkv at four equal budgets. At these lengths smollm2-135m's own Text2JSON score is 0 even with full
    # attention, so the comparison there rests on the fidelity metrics (and on MultiNeedle's task score).
    "larger": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv", "shadowkv"],
        "budgets": ["1/64", "1/32", "1/16", "1/8"],
        "benchmarks": {
            "text2json_synth": {"n_samples": 20, "target_tokens": [4000, 7000], "n_entities": 5,
                                "answer_format": "lines", "domains": ["products", "medical", "organisations", "movies"],
                                "answer_prefix": None, "max_new_tokens": 96},
            "multineedle": {"n_samples": 10, "context_length": 7600, "length_buffer": 200, "needle_count": 3,
                            "max_new_tokens": 40},
        },
        "recall_every": 4,
    },
    # The authors' evaluation (eval/paper.py: run_cfg.py's benchmarks, each method at the paper's budgets, every
    # deviation listed there); needs the checkpoints (--models DIR [DIR ...]) and the data (--data-dir).
    "paper": paper.PRESET,
    # A tokenizer-free smoke test (works with any model, e.g. the tiny HF fixtures).
    "toy": {
        "models": ["smollm2-135m"],
        "methods": ["full", "yakv"],
        "budgets": ["default"],
        "benchmarks": {"toy_retrieval": {"n_samples": 4, "n_pairs": 12, "max_new_tokens": 8}},
        "recall_every": 1,
    },
}
