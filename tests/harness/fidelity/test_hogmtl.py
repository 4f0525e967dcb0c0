"""docs/fidelity/hogmtl.md against the configs and the method: every row with a config key
holds, in every config its globs name, the value the row states (YAML literal, resolved
config with ``base:`` files and the method's defaults); the HOG-MTL method's own defaults
agree with the rows; every HOG-MTL config is named by the table's rows."""

import fnmatch
from pathlib import Path

import pytest
import yaml

from mtseg_harness.methods import method_class
from mtseg_harness.runs import load_config

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "fidelity" / "hogmtl.md"
COLUMNS = ["element", "paper's value", "place in the paper", "config key", "configs", "project's value",
           "source / why"]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _cells(line: str) -> list[str]:
    # split on pipes outside backticks (a YAML literal may hold none, but a cell's text might)
    cells, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def parse_table(text: str) -> list[dict]:
    """The fidelity table's rows as dicts keyed by :data:`COLUMNS` (the first table with that header)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line) == COLUMNS:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                assert len(cells) == len(COLUMNS), f"row with {len(cells)} cells: {row}"
                rows.append(dict(zip(COLUMNS, cells)))
            return rows
    raise AssertionError(f"no table with the columns {COLUMNS} in {DOC}")


def matching(globs: str) -> list[str]:
    out = []
    for g in (g.strip() for g in globs.split(",")):
        hits = fnmatch.filter(CONFIGS, g)
        assert hits, f"glob {g!r} matches no config"
        out += hits
    return sorted(set(out))


def literal(cell: str):
    assert cell.startswith("`") and cell.endswith("`"), f"project's value must be a `YAML literal`: {cell}"
    return yaml.safe_load(cell[1:-1])


def lookup(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"{key} not in the resolved config"
        node = node[part]
    return node


ROWS = [r for r in parse_table(DOC.read_text()) if r["config key"] != "-"]
CHECKS = [(r["element"], r["config key"], name, r["project's value"]) for r in ROWS for name in matching(r["configs"])]


def test_the_table_parses_and_names_every_hogmtl_config():
    assert len(ROWS) >= 30
    named = {name for _, _, name, _ in CHECKS}
    hogmtl = set(fnmatch.filter(CONFIGS, "cadis_*.yaml") + fnmatch.filter(CONFIGS, "endovis17_*.yaml"))
    assert len(hogmtl) == 24 and named == hogmtl
    # a baseline beside every +HOG config
    assert {n.replace("_hog.", "_baseline.") for n in hogmtl if n.endswith("_hog.yaml")} <= hogmtl


_RESOLVED: dict = {}


@pytest.mark.parametrize("element, key, name, value", CHECKS, ids=[f"{c[2]}:{c[1]}" for c in CHECKS])
def test_config_value_is_the_tables(element, key, name, value):
    if name not in _RESOLVED:
        _RESOLVED[name] = load_config(REPO / "configs" / name)
    got, want = lookup(_RESOLVED[name], key), literal(value)
    assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{element}: {name} {key} = {got!r}"


def test_method_defaults_are_the_tables():
    cls = method_class("hog_mtl")
    hog_rows = [r for r in ROWS if r["config key"].startswith("method.") and r["configs"].count("_hog") == 2]
    assert {r["config key"] for r in hog_rows} >= {"method.name", "method.alpha", "method.beta", "method.dim",
                                                  "method.seg_loss"}
    for r in hog_rows:
        key = r["config key"].split(".", 1)[1]
        want = literal(r["project's value"])
        assert (cls.name if key == "name" else cls.defaults[key]) == want, r["element"]
    # the optimiser, schedule and step budget HOG-MTL lays under a config
    for r in ROWS:
        section, _, key = r["config key"].partition(".")
        if section in ("optim", "sched") or r["config key"] == "train.steps":
            preset = cls.config_defaults.get(section, {})
            if key in preset:
                assert preset[key] == literal(r["project's value"]), r["element"]
    assert set(cls.config_defaults["optim"]) <= {"name", "lr"} and cls.config_defaults["train"] == {"steps": 150_000}
