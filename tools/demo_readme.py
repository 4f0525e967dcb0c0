"""Copy the table and notes of a `make demo` run into the README's demo section.

    python tools/demo_readme.py [runs/demo/report.md] [README.md]

The README's demo results lie between the two marker lines :data:`BEGIN` and :data:`END`;
everything between them is replaced by the report's body (its table, notes and timing
line; the report's title is dropped), so the README shows exactly what the run printed.
tests/harness/training/test_demo.py checks that the README block and the demo's format agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- demo results: written by tools/demo_readme.py from runs/demo/report.md; do not edit by hand -->"
END = "<!-- end of demo results -->"


def report_body(report: str) -> str:
    """``report.md`` without its ``# title`` line, stripped."""
    lines = report.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def readme_block(readme: str) -> str:
    """The text between the markers (``ValueError`` when they are missing or out of order)."""
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README lacks the demo markers {BEGIN!r} ... {END!r} (in this order)")
    return readme[i + len(BEGIN):j].strip()


def splice(readme: str, report: str) -> str:
    """``readme`` with its demo block replaced by the body of ``report``."""
    readme_block(readme)  # the markers are there
    i, j = readme.find(BEGIN) + len(BEGIN), readme.find(END)
    return readme[:i] + "\n" + report_body(report) + "\n" + readme[j:]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    report = Path(argv[0] if argv else "runs/demo/report.md")
    readme = Path(argv[1] if len(argv) > 1 else "README.md")
    if not report.is_file():
        print(f"{report} not found: run `make demo` first", file=sys.stderr)
        return 2
    readme.write_text(splice(readme.read_text(), report.read_text()))
    print(f"{readme}: demo section replaced by {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
