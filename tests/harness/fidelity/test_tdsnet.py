"""docs/fidelity/tdsnet.md against the resolved configs and the TDSNet method's defaults.

Every row with a config key names the configs it applies to (file names or globs under
configs/, or ``method:<name>`` for a method's option defaults) and the YAML literal the key
resolves to (with ``base:`` files); each must match.
"""

from __future__ import annotations

from pathlib import Path

import dataclasses
import fnmatch

import pytest
import yaml

from mtseg_harness.methods import method_class
from mtseg_harness.runs import load_config

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "fidelity" / "tdsnet.md"
COLUMNS = ["element", "paper's value", "place in the paper", "configs", "config key", "project's value"]


def parse_table(text: str) -> list[dict]:
    """Rows of the Markdown table whose header is :data:`COLUMNS` (the first such table)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells == COLUMNS:
            rows = []
            for row in lines[i + 2:]:
                if not row.strip().startswith("|"):
                    break
                vals = [c.strip() for c in row.strip().strip("|").split("|")]
                assert len(vals) == len(COLUMNS), f"{DOC.name}: row with {len(vals)} cells: {row}"
                rows.append(dict(zip(COLUMNS, vals)))
            return rows
    raise AssertionError(f"{DOC.name}: no table with the columns {COLUMNS}")


def _lookup(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        assert isinstance(cur, dict) and part in cur, f"config key {dotted!r} does not resolve"
        cur = cur[part]
    return cur


def _targets(spec: str) -> list[str]:
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item.startswith("method:"):
            out.append(item)
            continue
        hits = fnmatch.filter(names, item)
        assert hits, f"{DOC.name}: {item!r} names no config"
        out += hits
    return out


ROWS = [r for r in parse_table(DOC.read_text()) if r["config key"] not in ("-", "")]
CASES = [(r["config key"], t, r["project's value"]) for r in ROWS for t in _targets(r["configs"])]


def test_the_table_has_rows_with_keys_and_every_row_has_a_source():
    rows = parse_table(DOC.read_text())
    assert len(ROWS) >= 30
    for r in rows:
        assert r["paper's value"] and r["place in the paper"], r["element"]


@pytest.mark.parametrize("key,target,value", CASES, ids=[f"{t}:{k}" for k, t, _ in CASES])
def test_config_value_matches_the_fidelity_row(key, target, value):
    want = yaml.safe_load(value.strip("`"))
    if target.startswith("method:"):
        options = {f.name: f.default for f in dataclasses.fields(method_class(target.split(":", 1)[1]).Options)}
        assert key.startswith("method."), key
        got = options[key.split(".", 1)[1]]
        got = list(got) if isinstance(got, tuple) else got
    else:
        got = _lookup(load_config(REPO / "configs" / target), key)
    assert got == want, f"{target}: {key} resolves to {got!r}, docs/fidelity/tdsnet.md says {want!r}"
