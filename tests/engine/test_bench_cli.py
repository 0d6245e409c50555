"""`kvjax bench decode` method specs and a tiny end-to-end decode benchmark (no timing assertions)."""
import pytest

from kvjax import bench
from kvjax.options import parse_methods


def test_method_specs_with_overrides():
    got = parse_methods("full, yakv-serving[sparse_budget=16;fetch_backend=device],yakv[sparse_budget=1/64],"
                              "shadowkv[outlier_budget=0;rank=none]")
    assert [(m, o) for _, m, o in got] == [
        ("full", {}), ("yakv-serving", {"sparse_budget": 16, "fetch_backend": "device"}),
        ("yakv", {"sparse_budget": 1 / 64}), ("shadowkv", {"outlier_budget": 0, "rank": None})]
    assert got[1][0] == "yakv-serving[sparse_budget=16;fetch_backend=device]"  # the row label keeps the options
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_methods("yakv[sparse_budget]")
    with pytest.raises(ValueError, match=r"NAME\[KEY=VALUE"):
        parse_methods("yakv[sparse_budget=2")


def test_bench_decode_rows_reflect_the_overrides():
    # min_attended_tokens=0: otherwise the serving preset raises every budget to 512 attended tokens
    a = "yakv-serving[sparse_budget=16;min_seqlen_to_prune=0;min_attended_tokens=0]"
    b = "yakv-serving[sparse_budget=64;min_seqlen_to_prune=0;min_attended_tokens=0]"
    rows = bench.bench_decode("smollm2-135m", ["full", a, b], [1024], "float32", steps=1)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", a, b}
    assert by["full"]["fetched_MB_per_step"] == 0 and by["full"]["host_MB"] == 0
    # 4x the sparse budget fetches 4x the rows; the state's host store is the same
    small, big = by[a], by[b]
    assert big["fetched_MB_per_step"] == pytest.approx(4 * small["fetched_MB_per_step"])
    assert big["host_MB"] == small["host_MB"] > 0
