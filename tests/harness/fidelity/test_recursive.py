"""docs/fidelity/recursive.md against the configs and the methods' defaults.

The table format is read by :mod:`.fidelity_table` (shared by every fidelity test).
"""

import pytest

from mtseg_harness.methods import method_class

from .fidelity_table import REPO, config_key, doc_path, fidelity_rows, lookup, resolved, targets, value

DOC = doc_path("recursive")
METHODS = ("recursive_approx", "sl_only", "grabcut_pseudo")
#: protocol values a config sets per dataset, not method defaults
NOT_DEFAULTS = {"method.strong_count"}
ROWS = fidelity_rows(DOC)
KEYED = [r for r in ROWS if config_key(r) is not None]


def test_the_table_has_rows_and_every_guess_is_marked():
    assert len(KEYED) >= 20
    for r in ROWS:
        # a row either names where the paper (or the issue citing it) states the value, or says choice
        assert "**choice**" in r["paper's value"] or r["place in the paper"] not in ("—", ""), r["element"]


@pytest.mark.parametrize("row", KEYED, ids=[r["config key"] + ":" + r["element"][:30] for r in KEYED])
def test_every_row_matches_the_resolved_configs(row):
    key, want = config_key(row), value(row)
    for name in targets(row):
        cfg = resolved(name)
        assert cfg["method"]["name"] in METHODS, f"{name} is not one of this paper's configs"
        assert lookup(cfg, key) == want, f"{name}: {key} = {lookup(cfg, key)!r}, table says {want!r}"


def test_method_defaults_are_the_tables_values():
    checked = 0
    for row in KEYED:
        key = config_key(row)
        if not key.startswith("method.") or key in NOT_DEFAULTS:
            continue
        option, want = key.split(".", 1)[1], value(row)
        for name in {resolved(n)["method"]["name"] for n in targets(row)}:
            defaults = method_class(name).defaults
            assert option in defaults, f"{name} has no option {option}"
            assert defaults[option] == want, f"{name}.{option} defaults to {defaults[option]!r}, table says {want!r}"
            checked += 1
    assert checked >= 15


def test_every_paper_config_is_in_the_table():
    named = {n for r in KEYED for n in targets(r)}
    # the demo's configs (demo_*.yaml) are our own experiment, not a row of the paper
    ours = {p.name for p in (REPO / "configs").glob("*.yaml")
            if not p.name.startswith("demo_") and resolved(p.name)["method"]["name"] in METHODS}
    assert ours == named
