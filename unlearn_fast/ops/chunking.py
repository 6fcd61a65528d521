"""How many tokens the LM-head ops (token log-probs, curvature products) process per chunk.

Both ops hold a chunk's logit-sized rows ([rows, V], or K+1 of them for the curvature product)
instead of all [T, V]; this is the one place that sizes a chunk, for every backend (the C++/CUDA
drivers and the Triton loops receive the row count from here).

* CUDA: the row kernels launch one block per token row, and the chunk's matmuls read the head W
  once per chunk, so a chunk should give every SM several blocks (``BLOCKS_PER_SM``) - at 1000+
  rows the logits matmul is compute-bound rather than bound by re-reading W - capped so that the
  chunk's rows take at most ``CUDA_MEMORY_FRACTION`` of the memory free on the device.
* CPU: a fixed budget (``CPU_CHUNK_BYTES``) that keeps a chunk's logits near the caches; the
  matmuls already saturate the cores at a few hundred rows.
"""

from __future__ import annotations

import torch

CPU_CHUNK_BYTES = 32 << 20
BLOCKS_PER_SM = 8
CUDA_MEMORY_FRACTION = 0.25  # the rest stays free for the activations around the op


def free_cuda_bytes(device: torch.device) -> int:
    """Bytes a new allocation can take on ``device``: free on the device plus what PyTorch's caching
    allocator holds reserved but unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def rows_per_chunk(device: torch.device, tokens: int, row_bytes: int, requested: int = 0) -> int:
    """Tokens per chunk for ``tokens`` tokens of ``row_bytes`` working memory each, in [1, tokens].

    ``requested`` > 0 overrides the device's choice (tests, benchmarks).
    """
    if requested > 0:
        rows = requested
    elif device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        budget = int(free_cuda_bytes(device) * CUDA_MEMORY_FRACTION)
        rows = min(sm_count * BLOCKS_PER_SM, budget // max(row_bytes, 1))
    else:
        rows = CPU_CHUNK_BYTES // max(row_bytes, 1)
    return max(1, min(rows, max(tokens, 1)))
