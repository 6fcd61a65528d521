"""bench/report.py: the Markdown report of a benchmark run, with its ratios and PNG plots."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "bench" / "report.py")
report_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_module)


def bench(group, impl, median, peak=0):
    return {
        "group": group,
        "stats": {"median": median, "iqr": median / 10},
        "extra_info": {"impl": impl, "baseline": "torch", "shape": "7 x 5", "peak_bytes_above_inputs": peak * 2**20},
    }


DATA = {
    "datetime": "2026-11-23T17:00:00",
    "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
    "benchmarks": [
        bench("op A", "fused", 0.5, peak=10),
        bench("op A", "torch", 2.0, peak=40),
        bench("op B", "torch", 1.0),
        bench("op B", "fused", 3.0),
    ],
}


def test_report_has_ratios_tables_and_plots(tmp_path):
    source = tmp_path / "latest.json"
    source.write_text(json.dumps(DATA))
    text = report_module.report(json.loads(source.read_text()), tmp_path / "latest.md")
    assert (tmp_path / "latest.md").read_text() == text
    assert "Test CPU" in text
    # Baseline first; time and memory against it.
    assert "| op A | torch | 7 x 5 | 2 | 1.000x | 40 | 1.000x |" in text
    assert "| op A | fused | 7 x 5 | 0.5 | 0.250x | 10 | 0.250x |" in text
    assert "| fused | 7 x 5 | 3 | 3.000x | 0 | n/a |" in text  # op B's own table: no memory measured
    for n in (1, 2):
        png = tmp_path / f"latest-{n}.png"
        assert f"]({png.name})" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_plots(tmp_path):
    text = report_module.report(DATA, tmp_path / "r.md", plots=False)
    assert "png" not in text and not list(tmp_path.glob("*.png"))
