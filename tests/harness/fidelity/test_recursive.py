"""docs/fidelity/recursive.md against the configs and the methods' defaults.

Table format (shared by every docs/fidelity/<paper>.md): a Markdown table with the columns
``element | paper's value | place in the paper | configs | config key | project's value``;
``configs`` is a comma-separated list of config file names or globs under configs/ (in
backticks), ``config key`` a dotted key of the resolved config (``base:`` files applied),
``project's value`` its YAML literal (in backticks); rows without a config key say ``—``.
"""

from pathlib import Path

import pytest
import yaml

from mtseg_harness.methods import method_class
from mtseg_harness.runs import load_config

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "fidelity" / "recursive.md"
COLUMNS = ["element", "paper's value", "place in the paper", "configs", "config key", "project's value"]
METHODS = ("recursive_approx", "sl_only", "grabcut_pseudo")
#: protocol values a config sets per dataset, not method defaults
NOT_DEFAULTS = {"method.strong_count"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_fidelity(path) -> list[dict]:
    """The rows of the values table of a fidelity file, as dicts keyed by :data:`COLUMNS`."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|") and _cells(l) == COLUMNS)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(COLUMNS), f"{path}: row with {len(cells)} cells: {line}"
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def _unquote(cell: str) -> str:
    return cell.strip().strip("`")


def config_files(cell: str) -> list[Path]:
    files = []
    for pattern in (_unquote(p) for p in cell.split(",")):
        found = sorted((REPO / "configs").glob(pattern))
        assert found, f"configs pattern {pattern!r} matches no file in configs/"
        files += found
    return files


def resolved(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


ROWS = parse_fidelity(DOC)
KEYED = [r for r in ROWS if _unquote(r["config key"]) not in ("—", "-", "")]


def test_the_table_has_rows_and_every_guess_is_marked():
    assert len(KEYED) >= 20
    for r in ROWS:
        # a row either names where the paper (or the issue citing it) states the value, or says choice
        assert "**choice**" in r["paper's value"] or r["place in the paper"] not in ("—", ""), r["element"]


@pytest.mark.parametrize("row", KEYED, ids=[r["config key"] + ":" + r["element"][:30] for r in KEYED])
def test_every_row_matches_the_resolved_configs(row):
    key, value = _unquote(row["config key"]), yaml.safe_load(_unquote(row["project's value"]))
    for path in config_files(row["configs"]):
        cfg = load_config(path)
        assert cfg["method"]["name"] in METHODS, f"{path.name} is not one of this paper's configs"
        assert resolved(cfg, key) == value, f"{path.name}: {key} = {resolved(cfg, key)!r}, table says {value!r}"


def test_method_defaults_are_the_tables_values():
    checked = 0
    for row in KEYED:
        key = _unquote(row["config key"])
        if not key.startswith("method.") or key in NOT_DEFAULTS:
            continue
        option, value = key.split(".", 1)[1], yaml.safe_load(_unquote(row["project's value"]))
        for name in {load_config(p)["method"]["name"] for p in config_files(row["configs"])}:
            defaults = method_class(name).defaults
            assert option in defaults, f"{name} has no option {option}"
            assert defaults[option] == value, f"{name}.{option} defaults to {defaults[option]!r}, table says {value!r}"
            checked += 1
    assert checked >= 15


def test_every_paper_config_is_in_the_table():
    named = {p.name for r in KEYED for p in config_files(r["configs"])}
    # the demo's configs (demo_*.yaml) are our own experiment, not a row of the paper
    ours = {p.name for p in (REPO / "configs").glob("*.yaml")
            if not p.name.startswith("demo_") and load_config(p)["method"]["name"] in METHODS}
    assert ours == named
