"""Turns a pytest-benchmark JSON file into a Markdown report: tables of ratios against the
baseline, and one PNG bar chart per benchmark group.

    python bench/report.py bench/results/latest.json [-o bench/results/latest.md] [--no-plots]

Every row is compared with the baseline implementation of its group measured in the same run
(CPU figures on this machine are only meaningful as such ratios). The plots go next to the
Markdown file (``<name>-<n>.png``), linked from it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def rows(data: dict) -> list[dict]:
    out = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        out.append(
            {
                "group": bench["group"],
                "impl": info["impl"],
                "baseline": info.get("baseline"),
                "shape": info.get("shape", ""),
                "median_s": bench["stats"]["median"],
                "iqr_s": bench["stats"].get("iqr", 0.0),
                "peak_mb": info.get("peak_bytes_above_inputs", 0) / 2**20,
            }
        )
    return out


def groups(data: dict) -> dict[str, list[dict]]:
    """Rows by group, the baseline first, groups sorted by name."""
    by_group = defaultdict(list)
    for row in rows(data):
        by_group[row["group"]].append(row)
    return {g: sorted(items, key=lambda r: r["impl"] != r["baseline"]) for g, items in sorted(by_group.items())}


def _baseline(items: list[dict]) -> dict | None:
    return next((r for r in items if r["impl"] == r["baseline"]), None)


def table(items: list[dict], group: str | None = None) -> list[str]:
    first = "| benchmark " if group else ""
    lines = [
        f"{first}| impl | shape | median time (s) | time vs baseline | peak MB above inputs | memory vs baseline |",
        f"{'|---' if group else ''}|---|---|---:|---:|---:|---:|",
    ]
    base = _baseline(items)
    for r in items:
        t_ratio = f"{r['median_s'] / base['median_s']:.3f}x" if base else "n/a"
        m_ratio = f"{r['peak_mb'] / base['peak_mb']:.3f}x" if base and base["peak_mb"] else "n/a"
        lead = f"| {group} " if group else ""
        lines.append(
            f"{lead}| {r['impl']} | {r['shape']} | {r['median_s']:.4g} | {t_ratio} | {r['peak_mb']:.0f} | {m_ratio} |"
        )
    return lines


def plot(items: list[dict], group: str, path: Path) -> Path:
    """Median time (with its interquartile range) and, where measured, peak memory per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_memory = any(r["peak_mb"] for r in items)
    fig, axes = plt.subplots(
        1, 2 if with_memory else 1, figsize=(10 if with_memory else 6, 0.5 * len(items) + 1.5), squeeze=False
    )
    names = [r["impl"] for r in items]
    colours = ["tab:grey" if r["impl"] == r["baseline"] else "tab:blue" for r in items]
    base = _baseline(items)
    ax = axes[0][0]
    ax.barh(names, [r["median_s"] for r in items], xerr=[r["iqr_s"] / 2 for r in items], color=colours)
    for y, r in enumerate(items):
        if base:
            ax.annotate(
                f"{r['median_s'] / base['median_s']:.2f}x",
                (r["median_s"] + r["iqr_s"] / 2, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    times = [r["median_s"] for r in items if r["median_s"] > 0]
    if times and max(times) > 20 * min(times):  # spans of orders of magnitude: a log axis
        ax.set_xscale("log")
    ax.margins(x=0.15)
    ax.set_xlabel("median time (s), bars: interquartile range; grey: baseline")
    ax.invert_yaxis()
    if with_memory:
        ax = axes[0][1]
        ax.barh(names, [r["peak_mb"] for r in items], color=colours)
        ax.set_xlabel("peak MB above inputs")
        ax.invert_yaxis()
        ax.set_yticks([])
    fig.suptitle(group, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(data: dict, output: Path, plots: bool = True) -> str:
    """The Markdown report (written to ``output``), with the plots beside it."""
    machine = data.get("machine_info", {})
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, torch threads as "
        f"configured; run at {data.get('datetime', '?')}. Ratios are against the baseline of each group, "
        "measured in the same run.",
        "",
        "## Summary",
        "",
    ]
    by_group = groups(data)
    for group, items in by_group.items():
        lines += table(items, group)[2 if lines[-1].startswith("|") else 0 :]
    for n, (group, items) in enumerate(by_group.items(), start=1):
        lines += ["", f"## {group}", "", *table(items)]
        if plots:
            png = plot(items, group, output.with_name(f"{output.stem}-{n}.png"))
            lines += ["", f"![{group}]({png.name})"]
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="Markdown file (default: next to the JSON)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args()
    output = args.output or args.json_file.with_suffix(".md")
    print(report(json.loads(args.json_file.read_text()), output, plots=not args.no_plots))


if __name__ == "__main__":
    main()
