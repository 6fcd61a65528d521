"""The LM-head cross-entropy, forward + backward, on the CPU: our frozen-head path against today's
path (weight gradient computed), and Cut Cross-Entropy as the peer, in one run.

    OMP_NUM_THREADS=1 python bench/lm_head.py [--tokens-smollm2 512] [--tokens-8b 64] [--steps 2]

The loss is the same for every case: -sum_t log p(label_t), with ours = ``token_logprob_sum`` (token
weights -1; its gradient is formed in the forward pass, chunked, the path of the library's losses)
and CCE = ``cut_cross_entropy.linear_cross_entropy(..., reduction="sum", impl="torch_compile")``
(its implementation for CPUs: torch.compile of ``e @ c.T`` + ``F.cross_entropy``). "frozen": the
head's weight does not require grad (LoRA); "trainable": it does. fp32, one thread, the C++ CPU
kernels (UNLEARN_FAST_BACKEND=cpp).

Each case runs in a fresh process: the inputs are made, one warm-up step runs (it compiles CCE),
then the peak resident memory above that point (VmHWM reset through /proc/self/clear_refs, as in
bench/conftest.py) over the first timed step, and the median time of ``--steps`` steps.
MALLOC_MMAP_THRESHOLD_ makes glibc hand freed buffers back to the OS, so buffers the warm-up freed
cannot hide a later step's peak. The gradients a step leaves (x.grad, and w.grad when trainable)
count in its peak. CPU figures: compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {"SmolLM2": (576, 49152), "Llama-3-8B": (4096, 128256)}  # (H, V)

CASE = """
import json, statistics, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
T, H, V, impl, trainable, steps = {T}, {H}, {V}, {impl!r}, {trainable}, {steps}
x = torch.randn(T, H, requires_grad=True)
w = (torch.randn(V, H) * 0.02).requires_grad_(trainable)
labels = torch.randint(0, V, (T,))
if impl == "ours":
    from unlearn_fast.ops import token_logprob_sum
    minus_one = torch.full((T,), -1.0)
    def step():
        token_logprob_sum(x, w, labels, minus_one).total.backward()
else:
    from cut_cross_entropy import linear_cross_entropy
    def step():
        linear_cross_entropy(x, w, labels, reduction="sum", impl="torch_compile").backward()
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
step()  # warm-up (CCE compiles here)
times = []
for i in range(steps):
    x.grad = w.grad = None
    if i == 0:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = status("VmRSS")
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    if i == 0:
        peak = status("VmHWM") - before
print(json.dumps({{"time_s": statistics.median(times), "peak_bytes": max(peak, 0)}}))
"""


def run_case(tokens: int, width: int, vocab: int, impl: str, trainable: bool, steps: int) -> dict:
    code = CASE.format(T=tokens, H=width, V=vocab, impl=impl, trainable=trainable, steps=steps)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", UNLEARN_FAST_BACKEND="cpp")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens-smollm2", type=int, default=512)
    parser.add_argument("--tokens-8b", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case (after one warm-up)")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ", ".join(HEADS))
    args = parser.parse_args()
    tokens = {"SmolLM2": args.tokens_smollm2, "Llama-3-8B": args.tokens_8b}
    print("| head | T, H, V | head grad | ours time | CCE time | ours peak MB | CCE peak MB | time ours/CCE | "
          "peak ours/CCE |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for head in args.heads.split(","):
        width, vocab = HEADS[head]
        for trainable in (False, True):
            ours, cce = (run_case(tokens[head], width, vocab, impl, trainable, args.steps) for impl in ("ours", "cce"))
            results[head, trainable] = ours, cce
            print(
                f"| {head} | {tokens[head]}, {width}, {vocab} | {'trainable' if trainable else 'frozen'} | "
                f"{ours['time_s']:.3g} s | {cce['time_s']:.3g} s | {ours['peak_bytes'] / 2**20:.0f} | "
                f"{cce['peak_bytes'] / 2**20:.0f} | {ours['time_s'] / cce['time_s']:.2f}x | "
                f"{ours['peak_bytes'] / max(cce['peak_bytes'], 1):.2f}x |",
                flush=True,
            )
    print("\nfrozen head vs trainable (weight gradient computed), same impl:")
    for head in args.heads.split(","):
        for name, i in (("ours", 0), ("CCE", 1)):
            frozen, full = results[head, False][i], results[head, True][i]
            print(
                f"- {head} {name}: time {frozen['time_s'] / full['time_s']:.2f}x, "
                f"peak memory {frozen['peak_bytes'] / max(full['peak_bytes'], 1):.2f}x"
            )


if __name__ == "__main__":
    main()
