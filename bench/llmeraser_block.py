"""m removal requests in one block solve against m sequential solves, on the tiny LoRA of the tests.

    OMP_NUM_THREADS=1 python bench/llmeraser_block.py [--requests 8]

The tiny float64 Llama + LoRA of tests/test_llmeraser.py, 32 training examples, exact
Gauss-Newton, CG to 1e-6; request j removes two examples. Reports both wall times (CPU, one
thread), their ratio and the largest relative difference of the steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_llmeraser import DATA, LAM, TOK, flat_adapter, several_module_model  # noqa: E402

from unlearn_fast.methods.llmeraser import LLMEraser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    model = several_module_model()
    er = LLMEraser(model, DATA, tokenizer=TOK, solver="cg", damping=LAM, tol=1e-6, check_fit=False)
    requests = [[2 * j, 2 * j + 1] for j in range(args.requests)]
    er.remove(requests[0], progress=False)  # warm-up
    start = time.perf_counter()
    block = er.remove_many(requests, progress=False)
    block_s = time.perf_counter() - start
    start = time.perf_counter()
    singles = [er.remove(r, progress=False) for r in requests]
    single_s = time.perf_counter() - start
    before = flat_adapter(model)
    diff = max(
        ((flat_adapter(a.model) - flat_adapter(b.model)).norm() / (flat_adapter(b.model) - before).norm()).item()
        for a, b in zip(block, singles)
    )
    print(
        f"{args.requests} requests, dim {er.dim}: block {block_s:.2f} s ({block[0].report.hvps} HVPs), sequential "
        f"{single_s:.2f} s ({sum(s.report.hvps for s in singles)} HVPs), ratio {block_s / single_s:.2f}; "
        f"max relative step difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
