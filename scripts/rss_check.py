"""Peak RSS of a real SmolLM2 prefill + 8 decode steps for one method: `python scripts/rss_check.py METHOD [TOKENS]` (BENCHMARKS.md, issue 12's check of `kvjax bench memory` against a real process)."""
import resource, sys, time
import numpy as np
import models, kvjax
if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and not sys.argv[2].isdigit()):
    sys.exit("usage: python scripts/rss_check.py METHOD [TOKENS]  (METHOD: a kvjax policy, e.g. full or yakv; "
             "TOKENS: prompt length, default 8000)")
method = sys.argv[1]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
lm = models.load_model("smollm2-135m", dtype="float32")
eng = kvjax.Engine(lm, policy=method)
rng = np.random.default_rng(0)
ids = [rng.integers(100, 40000, T).tolist()]
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out = eng.generate(ids, kvjax.GenerationConfig(max_new_tokens=8), chat=False)
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{method} T={T}: maxrss before generate {r0/2**20:.3f} GiB, after {r1/2**20:.3f} GiB, delta {(r1-r0)/2**20:.3f} GiB, {time.perf_counter()-t:.1f} s, exact={eng.last_session.exact if eng.last_session else None}")
