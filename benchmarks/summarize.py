#!/usr/bin/env python
"""Print a markdown table per benchmark group from a pytest-benchmark JSON file.

    python benchmarks/summarize.py benchmarks/results/latest.json

For each group: contestant, device, input dtype, median time, throughput (images/s),
and one speed-up column per mtseg contestant of the group (CPU, and CUDA when it ran):
``row median / that mtseg median``, so a value above 1 means mtseg is that many times
faster than the row's contestant.

The contestant names, roles and sizes come from ``extra_info``, written by the
benchmarks in this folder; rows without it fall back to the test name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _contestant(bench: dict) -> str:
    return bench.get("extra_info", {}).get("contestant") or bench["name"]


def _is_mtseg(bench: dict) -> bool:
    role = bench.get("extra_info", {}).get("role")
    return role == "mtseg" if role is not None else "mtseg" in bench["name"]


def _throughput(bench: dict) -> str:
    n_images = bench.get("extra_info", {}).get("n_images")
    median = bench["stats"]["median"]
    if not n_images or median <= 0:
        return "—"
    return f"{n_images / median:,.0f}"


def _group_header(group: str, benches: list[dict]) -> str:
    info = next((b["extra_info"] for b in benches if b.get("extra_info")), {})
    parts = []
    if "n_images" in info:
        parts.append(f"{info['n_images']} images of {info.get('channels', '?')}x{info.get('image_size', '?')}")
    if "orientations" in info:
        parts.append(
            f"{info['orientations']} orientations, {tuple(info['pixels_per_cell'])} cells, "
            f"{tuple(info['cells_per_block'])} blocks, {info.get('block_norm', '?')}"
            f" -> {info.get('descriptor_dim', '?')} values/image"
        )
    if "torch_threads" in info:
        parts.append(f"torch threads {info['torch_threads']}, cv2 threads {info.get('cv2_threads')}")
    return f"### {group}\n\n" + ("; ".join(parts) + "\n" if parts else "")


def group_table(benches: list[dict]) -> str:
    # mtseg rows first (CPU before CUDA), then the peers, fastest first
    baselines = sorted(
        (b for b in benches if _is_mtseg(b)),
        key=lambda b: not str(b.get("extra_info", {}).get("device", "cpu")).startswith("cpu"),
    )
    peers = sorted((b for b in benches if not _is_mtseg(b)), key=lambda b: b["stats"]["median"])
    rows = baselines + peers

    header = ["Contestant", "Device", "Input", "Median (ms)", "Rounds", "Images/s"]
    header += [f"{_contestant(b)} speed-up" for b in baselines]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for bench in rows:
        info, stats = bench.get("extra_info", {}), bench["stats"]
        cells = [
            _contestant(bench),
            str(info.get("device", "?")),
            str(info.get("input_dtype", "?")).removeprefix("torch."),
            f"{stats['median'] * 1e3:,.2f}",
            str(stats.get("rounds", "?")),
            _throughput(bench),
        ]
        cells += [f"{stats['median'] / base['stats']['median']:.2f}x" for base in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(report: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for bench in report.get("benchmarks", []):
        groups.setdefault(bench.get("group") or "(no group)", []).append(bench)
    if not groups:
        return "No benchmarks in this file (were they all skipped?)."

    out = []
    for group, benches in groups.items():
        out.append(_group_header(group, benches))
        out.append(group_table(benches))
        out.append("")

    machine = report.get("machine_info", {})
    cpu = machine.get("cpu", {})
    out.append(
        f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs; Python {machine.get('python_version', '?')}; "
        f"run {report.get('datetime', '?')}."
    )
    out.append("Speed-up = row median / mtseg median (> 1: mtseg is faster).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path, help="file written by pytest --benchmark-json=...")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.json_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"summarize.py: cannot read {args.json_file}: {exc}", file=sys.stderr)
        return 1
    print(summarize(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
