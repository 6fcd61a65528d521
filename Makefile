# The two commands of the README: `make demo` (the main job) and `make test`.
# Both set up .venv from nothing on the first run (a few minutes), then reuse it.
.PHONY: setup demo test lint bench bench-report

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/unlearn-fast demo

test: setup
	.venv/bin/python -m pytest -q

# ruff, configured in pyproject.toml (CI runs the same two commands).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# The benchmark suite, then bench/results/latest.md: tables of ratios against each group's
# baseline and a PNG plot per group (bench/report.py).
bench-report: setup
	mkdir -p bench/results
	.venv/bin/python -m pytest bench -q --benchmark-only --benchmark-json=bench/results/latest.json
	.venv/bin/python bench/report.py bench/results/latest.json

bench: bench-report
