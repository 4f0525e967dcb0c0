"""Every operator of torch.ops.mtseg has a raw-op fuzzer: a new op without one fails here."""

from __future__ import annotations

from pathlib import Path

from fuzzing import op_names

HERE = Path(__file__).parent


def fuzzed_ops() -> set[str]:
    """Ops some fuzzer calls: ``call("<op>", ...)`` in the test files of this folder."""
    import re

    found = set()
    for path in HERE.glob("test_fuzz_*.py"):
        found |= set(re.findall(r'\bcall\(\s*"([A-Za-z_0-9]+)"', path.read_text()))
    return found


def test_every_op_has_a_fuzzer():
    ops = op_names()
    assert len(ops) >= 19, f"expected the 19 mtseg ops of this version at least, torch lists {sorted(ops)}"
    missing = ops - fuzzed_ops()
    assert not missing, f"torch.ops.mtseg ops without a fuzzer in tests/fuzz: {sorted(missing)}"


def test_every_fuzzed_op_exists():
    stale = fuzzed_ops() - op_names()
    assert not stale, f"fuzzers call ops that torch.ops.mtseg does not have: {sorted(stale)}"


def test_registry_matches_the_sources():
    """The ops torch lists are those csrc defines (m.def): the extension is not stale."""
    import re

    csrc = HERE.parents[1] / "csrc"
    defined = set()
    for path in csrc.rglob("*.c*"):
        text = path.read_text()
        # m.def("name(...)", possibly split over adjacent string literals
        defined |= set(re.findall(r'\bm\.def\(\s*"([A-Za-z_0-9]+)\(', text))
    assert defined == op_names(), f"csrc defines {sorted(defined)}, torch lists {sorted(op_names())}"
