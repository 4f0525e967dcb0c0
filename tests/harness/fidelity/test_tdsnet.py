"""docs/fidelity/tdsnet.md against the resolved configs and the TDSNet method's defaults.

Every row with a config key names the configs it applies to (file names or globs under
configs/, or ``method:<name>`` for a method's option defaults) and the YAML literal the key
resolves to (with ``base:`` files); each must match.
"""

from __future__ import annotations

import dataclasses

import pytest

from mtseg_harness.methods import method_class

from .fidelity_table import config_key, doc_path, fidelity_rows, keyed_rows, lookup, resolved, targets, value

DOC = doc_path("tdsnet")
ROWS = keyed_rows(DOC)
CASES = [(config_key(r), t, r) for r in ROWS for t in targets(r)]


def test_the_table_has_rows_with_keys_and_every_row_has_a_source():
    rows = fidelity_rows(DOC)
    assert len(ROWS) >= 30
    for r in rows:
        assert r["paper's value"] and r["place in the paper"], r["element"]


@pytest.mark.parametrize("key,target,row", CASES, ids=[f"{t}:{k}" for k, t, _ in CASES])
def test_config_value_matches_the_fidelity_row(key, target, row):
    want = value(row)
    if target.startswith("method:"):
        options = {f.name: f.default for f in dataclasses.fields(method_class(target.split(":", 1)[1]).Options)}
        assert key.startswith("method."), key
        got = options[key.split(".", 1)[1]]
        got = list(got) if isinstance(got, tuple) else got
    else:
        got = lookup(resolved(target), key)
    assert got == want, f"{target}: {key} resolves to {got!r}, docs/fidelity/tdsnet.md says {want!r}"
