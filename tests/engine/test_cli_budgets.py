"""One budget parser (kvjax.options.parse_budget) shared by `kvjax generate` and `kvjax eval`, mapped to each policy's
own knob (the class's declared Policy.budget_knob)."""
import pytest

from kvjax import cli
from kvjax.options import UsageError, budget_knob, budget_label, method_names, parse_budget

# the knob each method's budget sets, as the policies document it (algorithms.md): an oracle independent of the code
KNOB = {"yakv": "sparse_budget", "yakv-serving": "sparse_budget", "shadowkv": "sparse_budget", "arkvale": "budget",
        "quest": "budget", "infinigen": "budget", "lrqk": "num_active", "full": None}


def test_parse_budget_forms():
    assert parse_budget("1/64") == 1 / 64 and isinstance(parse_budget("1/64"), float)
    assert parse_budget("0.015625") == 0.015625
    assert parse_budget("1e-2") == 0.01
    assert parse_budget("2048") == 2048 and isinstance(parse_budget("2048"), int)
    assert parse_budget("1.0") == 1.0 and parse_budget("1") == 1  # the whole prompt vs one token
    for bad in ("0", "0.0", "-1", "-0.5", "1.5", "abc", "1/0", "", "2/1"):
        with pytest.raises(UsageError, match="--budget"):
            parse_budget(bad)
    with pytest.raises(UsageError, match="--budgets '0'"):
        parse_budget("0", "--budgets")
    assert [budget_label(v) for v in (1 / 64, 0.3, 2048)] == ["1/64", "0.3", "2048"]


def test_every_method_knob_is_the_declared_one():
    assert set(KNOB) == set(method_names())
    for m, knob in KNOB.items():
        assert budget_knob(m) == knob, m
    with pytest.raises(UsageError, match="allowed: .*lrqk"):
        budget_knob("nosuch")


@pytest.mark.parametrize("method", sorted(m for m, k in KNOB.items() if k))
@pytest.mark.parametrize("given,value", [("1/16", 1 / 16), ("0.1", 0.1), ("256", 256)])
def test_generate_budget_sets_each_methods_own_knob(method, given, value):
    pol = cli.build_policy(method, given, [])
    got = getattr(pol.config, KNOB[method])
    assert got == value and type(got) is type(value)


def test_full_takes_no_budget_and_options_still_apply():
    with pytest.raises(UsageError, match="takes no budget"):
        cli.build_policy("full", "0.5", [])
    pol = cli.build_policy("yakv", "1/8", ["local_budget=16"])
    assert (pol.config.sparse_budget, pol.config.local_budget) == (1 / 8, 16)


def test_eval_grid_uses_the_same_knobs():
    from eval import grid

    specs = grid.method_specs(["full", "arkvale", "lrqk", "quest"], [grid.parse_budget("1/16")], {})
    got = {s.method: s for s in specs}
    assert got["arkvale"].policy.config.budget == 1 / 16 and got["quest"].policy.config.budget == 1 / 16
    assert got["lrqk"].policy.config.num_active == 1 / 16
    assert got["full"].budget == "-"
    with pytest.raises(ValueError, match="--budgets '0'"):
        grid.parse_budget("0")
