"""The one reader of the fidelity tables (``docs/fidelity/<paper>.md``) for every fidelity test.

Table format: a Markdown table whose header holds (in any order, other columns allowed)
:data:`COLUMNS`. ``configs`` is a comma-separated list of config file names or globs under
``configs/`` (optionally in backticks), or ``method:<name>`` for a method's option defaults;
``config key`` a dotted key of the resolved config (``base:`` files and the method's defaults
applied), or one of :data:`NO_KEY` for a row that is documented only; ``project's value``
the key's value as a YAML literal in backticks. Cells are split on pipes outside backticks.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import yaml

from mtseg_harness.runs import load_config

REPO = Path(__file__).resolve().parents[3]
COLUMNS = ("element", "paper's value", "place in the paper", "configs", "config key", "project's value")
#: what a ``config key`` cell says for a row that no config sets
NO_KEY = ("", "-", "--", "—")
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def doc_path(paper: str) -> Path:
    return REPO / "docs" / "fidelity" / f"{paper}.md"


def cells(line: str) -> list[str]:
    """The stripped cells of a table line, split on pipes outside backticks."""
    out, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def fidelity_rows(path: Path) -> list[dict]:
    """Rows (dicts by header cell) of every table in ``path`` whose header holds :data:`COLUMNS`."""
    rows, header = [], None
    for line in Path(path).read_text().splitlines():
        if not line.startswith("|"):
            header = None  # a table ends at the first line outside it
            continue
        row = cells(line)
        if header is None:
            if set(COLUMNS) <= set(row):
                header = row
            continue
        if set("".join(row)) <= set("-: "):
            continue  # the separator line
        assert len(row) == len(header), f"{path.name}: row with {len(row)} cells, the header has {len(header)}: {line}"
        rows.append(dict(zip(header, row)))
    assert rows, f"{path.name}: no table with the columns {COLUMNS}"
    return rows


def unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()


def config_key(row: dict) -> str | None:
    """The row's dotted config key, None for a documented-only row."""
    key = unquote(row["config key"])
    return None if key in NO_KEY else key


def keyed_rows(path: Path) -> list[dict]:
    """The rows that name a config key (the ones checked against the configs)."""
    return [r for r in fidelity_rows(path) if config_key(r) is not None]


def targets(row: dict) -> list[str]:
    """Config file names the row's ``configs`` globs match, and its ``method:<name>`` entries, in order."""
    out = []
    for item in (unquote(s) for s in row["configs"].split(",")):
        if item.startswith("method:"):
            out.append(item)
            continue
        hits = fnmatch.filter(CONFIGS, item)
        assert hits, f"{row['element']!r}: {item!r} names no config in configs/"
        out += [h for h in hits if h not in out]
    return out


def value(row: dict):
    """The row's ``project's value``: a YAML literal in backticks."""
    text = row["project's value"].strip()
    assert len(text) >= 2 and text.startswith("`") and text.endswith("`"), \
        f"{row['element']!r}: project's value must be a YAML literal in backticks, got {text!r}"
    return yaml.safe_load(text[1:-1])


def lookup(cfg: dict, dotted: str):
    """``cfg[a][b]...`` for ``dotted`` ``a.b...``; an assertion names the key that does not resolve."""
    node = cfg
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"config key {dotted!r} not in the resolved config"
        node = node[part]
    return node


_RESOLVED: dict[str, dict] = {}


def resolved(name: str) -> dict:
    """The resolved config ``configs/<name>`` (loaded once per session)."""
    if name not in _RESOLVED:
        _RESOLVED[name] = load_config(REPO / "configs" / name)
    return _RESOLVED[name]
