"""bench_score returns well-formed rows (tiny sizes; no timing assertions)."""
import pytest

from pallas_kernels.bench import SHAPES, bench_score, format_table


def test_bench_rows_and_table():
    rows = bench_score((384,), shape="smollm2", modes=("serve", "eval"), repeats=1, ref_methods=("dequant",))
    assert len(rows) == 2 * 2
    cfg = SHAPES["smollm2"]
    for r in rows:
        assert (r["kv_heads"], r["group"], r["head_dim"]) == (cfg["kv_heads"], cfg["group"], cfg["head_dim"])
        T = r["landmarks"]
        assert r["MB_read"] * 1e6 == pytest.approx(T * cfg["kv_heads"] * (cfg["head_dim"] // 4 + 4))
        assert r["score_ms"] > 0 and r["copy_ms"] > 0 and r["attn_ms"] > 0
        assert r["bw_frac"] == pytest.approx(r["copy_ms"] / r["score_ms"])
        assert r["cost_ratio"] == pytest.approx(r["score_ns_per_landmark"] / r["attn_ns_per_token"])
        assert r["bw_target_met"] is None                 # the bandwidth target applies from 32K landmarks
        assert r["hbm_target_met"] is None and r["layers"] == 1   # CPU: one layer, no HBM target
        assert r["hbm_frac"] == pytest.approx(r["score_GBps"] / r["stream_GBps"])
        assert r["cost_target_met"] == (r["cost_ratio"] <= 0.25)
    assert {r["method"] for r in rows} == {"dispatch[auto]", "ref:dequant"}
    table = format_table(rows)
    assert table.count("\n| 384 |") == 4
    assert "score/copy" in table and "shape=smollm2" in table


def test_bench_layers_are_per_layer_rows():
    """layers=2: inputs stacked over two layers scored one after the other; sizes and bandwidths are per layer."""
    rows = bench_score((256,), shape="smollm2", modes=("serve",), repeats=1, attention=False, layers=2)
    (r,) = rows
    cfg = SHAPES["smollm2"]
    assert r["layers"] == 2 and r["attn_ms"] is None and r["cost_target_met"] is None
    assert r["MB_read"] * 1e6 == pytest.approx(256 * cfg["kv_heads"] * (cfg["head_dim"] // 4 + 4))
    assert r["score_GBps"] == pytest.approx(r["MB_read"] / r["score_ms"])          # MB/ms = GB/s
    assert "layers=2" in format_table(rows)


def test_bench_argument_errors():
    with pytest.raises(ValueError, match="shape='llama'"):
        bench_score((256,), shape="llama")
    with pytest.raises(ValueError, match="landmark counts"):
        bench_score((0,), attention=False)
    with pytest.raises(ValueError, match="layers=0"):
        bench_score((256,), attention=False, layers=0)
    assert format_table([]) == "(no rows)"
