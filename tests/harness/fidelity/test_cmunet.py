"""docs/fidelity/cmunet.md against the resolved configs and CMU-Net's method defaults.

The table format is read by :mod:`.fidelity_table` (shared by every fidelity test).
"""

import pytest

from mtseg_harness.methods import method_class

from .fidelity_table import CONFIGS, REPO, config_key, doc_path, fidelity_rows, keyed_rows, lookup, resolved, targets, value

DOC = doc_path("cmunet")


def checked_rows():
    return keyed_rows(DOC)


def test_the_table_is_there_and_covers_every_lits_config():
    rows = checked_rows()
    assert len(rows) >= 30
    covered = {n for r in rows for n in targets(r)}
    assert {n for n in CONFIGS if n.startswith("lits_")} <= covered


@pytest.mark.parametrize("row", checked_rows(), ids=lambda r: f"{r['config key']}:{r['configs']}")
def test_row_matches_the_resolved_configs(row):
    expected = value(row)
    for name in targets(row):
        assert lookup(resolved(name), config_key(row)) == expected, (name, row["element"])


def test_cmunet_method_defaults_are_the_papers():
    """CMU-Net's defaults (a config without options trains the paper's loss) are the table's CMU-Net rows."""
    defaults = method_class("cmunet").defaults
    rows = [r for r in checked_rows() if targets(r) == ["lits_cmunet_cmunet.yaml"] and config_key(r).startswith("method.")]
    assert {config_key(r) for r in rows} >= {"method.w_dice", "method.w_cls", "method.focal_pos", "method.focal_neg",
                                               "method.phase"}
    for r in rows:
        assert defaults[config_key(r).split(".", 1)[1]] == value(r), r["element"]


def test_no_guess_is_given_a_place_in_the_paper():
    """We could not read the paper: no row names a section, equation or table of it."""
    for r in fidelity_rows(DOC):
        place = r["place in the paper"].lower()
        assert not any(w in place for w in ("section", "sec.", "eq.", "equation", "table ", "fig")), r["element"]


def test_a_cmunet_config_outside_the_papers_lits_experiments_is_marked_our_choice():
    """CMU-Net is a 2D method on LiTS: a config of its method on other data is our extension,
    every row of it says **choice**, and its own comment says so."""
    ours = {n for n in CONFIGS if not n.startswith("lits_") and not n.startswith("demo_")
            and resolved(n)["method"]["name"] == "cmunet"}
    assert ours == {"brats18_unet3d_aniso_cmunet.yaml"}
    rows = [r for r in checked_rows() if set(targets(r)) & ours]
    assert {n for r in rows for n in targets(r)} == ours
    assert len(rows) >= 5 and all("**choice**" in r["paper's value"] for r in rows), [r["element"] for r in rows]
    for name in ours:
        text = (REPO / "configs" / name).read_text()
        assert "Our own experiment, not one of CMU-Net's" in text.split("\n", 1)[0], name
