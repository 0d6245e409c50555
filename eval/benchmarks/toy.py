"""``toy_retrieval``: a tiny synthetic key-value retrieval benchmark that needs no data files and no tokenizer (the
``toy`` preset's smoke test, runnable with any model, e.g. the tiny HF test fixtures)."""
from __future__ import annotations

import random
from typing import Any

from .base import Sample, register


class ToyRetrieval:
    """A tiny synthetic key-value retrieval benchmark that needs no data files and no tokenizer.

    user_text: "Facts: key-17 is 4021. key-3 is 911. … Question: what is key-3? Answer:"; gold: the value
    string; score {"score": 1.0 if the gold value occurs in the prediction else 0.0}. Deterministic in
    (n_samples, n_pairs, seed)."""

    name = "toy_retrieval"

    def build(self, n_samples: int = 4, n_pairs: int = 12, seed: int = 0, max_new_tokens: int = 8):
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples={n_samples!r}, allowed: int >= 1")
        if not isinstance(n_pairs, int) or not 1 <= n_pairs <= 500:
            raise ValueError(f"n_pairs={n_pairs!r}, allowed: int in [1, 500]")
        out = []
        for i in range(n_samples):
            rng = random.Random(f"toy_retrieval:{seed}:{i}")
            keys = rng.sample(range(1, 1000), n_pairs)
            vals = [str(rng.randint(100, 9999)) for _ in keys]
            j = rng.randrange(n_pairs)
            facts = " ".join(f"key-{k} is {v}." for k, v in zip(keys, vals))
            text = f"Facts: {facts}\nQuestion: what is key-{keys[j]}? Answer:"
            out.append(Sample(id=f"toy_retrieval-{seed}-{i}", benchmark=self.name, user_text=text, gold=vals[j],
                              max_new_tokens=max_new_tokens, meta={"n_pairs": n_pairs, "seed": seed}))
        return out, []

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        text = sample.answer_prefix + (prediction if isinstance(prediction, str) else "")
        return {"score": float(sample.gold in text)}

    def aggregate(self, samples, scores):
        vals = [s["score"] for s in scores]
        return {"average_score": 100.0 * sum(vals) / len(vals) if vals else float("nan")}


register(ToyRetrieval())
