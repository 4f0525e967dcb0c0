"""docs/fidelity/cmunet.md against the resolved configs and CMU-Net's method defaults.

The table format (shared by every docs/fidelity/*.md): a Markdown table whose header starts
``| element | paper's value | place in the paper | configs | config key | project's value |``;
``configs`` is a comma-separated list of globs in configs/, ``config key`` a dotted key of
the resolved config (``--`` or empty: documented only), ``project's value`` a YAML literal
in backticks.
"""

import fnmatch
from pathlib import Path

import pytest
import yaml

from mtseg_harness.methods import method_class
from mtseg_harness.runs import load_config

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "fidelity" / "cmunet.md"
HEADER = ["element", "paper's value", "place in the paper", "configs", "config key", "project's value"]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def fidelity_rows(path):
    """The rows of the table with :data:`HEADER` in ``path``: dicts by column name."""
    rows, header = [], None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = None  # a table ends at the first line outside it
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            if cells == HEADER:
                header = cells
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == len(HEADER), f"{path.name}: row with {len(cells)} cells: {line}"
        rows.append(dict(zip(HEADER, cells)))
    return rows


def checked_rows():
    return [r for r in fidelity_rows(DOC) if r["config key"] not in ("", "--")]


def configs_of(row):
    names = []
    for glob in (g.strip() for g in row["configs"].split(",")):
        match = fnmatch.filter(CONFIGS, glob)
        assert match, f"{DOC.name}: {row['element']!r}: no config matches {glob!r}"
        names += match
    return names


def value_of(row):
    text = row["project's value"]
    assert text.startswith("`") and text.endswith("`"), f"{row['element']!r}: value must be a YAML literal in backticks"
    return yaml.safe_load(text.strip("`"))


def lookup(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"config key {dotted!r} not in the resolved config"
        node = node[part]
    return node


_RESOLVED = {}


def resolved(name):
    if name not in _RESOLVED:
        _RESOLVED[name] = load_config(REPO / "configs" / name)
    return _RESOLVED[name]


def test_the_table_is_there_and_covers_every_lits_config():
    rows = checked_rows()
    assert len(rows) >= 30
    covered = {n for r in rows for n in configs_of(r)}
    assert {n for n in CONFIGS if n.startswith("lits_")} <= covered


@pytest.mark.parametrize("row", checked_rows(), ids=lambda r: f"{r['config key']}:{r['configs']}")
def test_row_matches_the_resolved_configs(row):
    expected = value_of(row)
    for name in configs_of(row):
        assert lookup(resolved(name), row["config key"]) == expected, (name, row["element"])


def test_cmunet_method_defaults_are_the_papers():
    """CMU-Net's defaults (a config without options trains the paper's loss) are the table's CMU-Net rows."""
    defaults = method_class("cmunet").defaults
    rows = [r for r in checked_rows() if r["configs"] == "lits_cmunet_cmunet.yaml" and r["config key"].startswith("method.")]
    assert {r["config key"] for r in rows} >= {"method.w_dice", "method.w_cls", "method.focal_pos", "method.focal_neg",
                                               "method.phase"}
    for r in rows:
        assert defaults[r["config key"].split(".", 1)[1]] == value_of(r), r["element"]


def test_no_guess_is_given_a_place_in_the_paper():
    """We could not read the paper: no row names a section, equation or table of it."""
    for r in fidelity_rows(DOC):
        place = r["place in the paper"].lower()
        assert not any(w in place for w in ("section", "sec.", "eq.", "equation", "table ", "fig")), r["element"]
