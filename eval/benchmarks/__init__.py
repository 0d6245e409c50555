"""The paper's benchmarks: loaders of the real data, the synthetic Text2JSON generator, and per-benchmark scoring.

Usage:
    from eval.benchmarks import load, get_benchmark
    samples, report = load("longproc", count_tokens=n_tokens_after_chat_template, max_prompt_tokens=131072)
    bench = get_benchmark(samples[0].benchmark)
    scores = [bench.score(s, prediction) for s, prediction in ...]
    bench.aggregate(samples, scores)

Registered names: "text2json" (the authors' JSONL format), "text2json_synth" (§2.7 generator), "multineedle"
(NeedleBench essays), "multineedle_synth" (generated haystack and needles), "longproc", and the RULER-style
generated tasks of ruler.py ("ruler_niah_multikey", "ruler_niah_multivalue", "ruler_vt", "ruler_cwe",
"ruler_fwe"), "toy_retrieval" (a data-free smoke test, eval/benchmarks/toy.py).
"""
from .base import (Benchmark, CountTokens, FileCheck, SimpleCodec, Sample, SkipReport, TokenCodec, as_codec,
                   available, cl100k_codec, count_simple_tokens, dataset_of, filter_by_length, get_benchmark, load,
                   register)
from .longproc import load_longproc
from .multineedle import build_multineedle, build_multineedle_synth
from . import ruler  # noqa: F401  (registers the RULER-style tasks)
from .text2json import generate_text2json, load_text2json, make_text2json_sample, write_text2json_jsonl
from .toy import ToyRetrieval

__all__ = [
    "Benchmark", "CountTokens", "FileCheck", "Sample", "SkipReport", "SimpleCodec", "TokenCodec", "as_codec",
    "available", "build_multineedle", "build_multineedle_synth", "cl100k_codec", "count_simple_tokens",
    "dataset_of", "filter_by_length", "generate_text2json", "get_benchmark", "load", "load_longproc",
    "load_text2json", "make_text2json_sample", "register", "ToyRetrieval", "write_text2json_jsonl",
]
