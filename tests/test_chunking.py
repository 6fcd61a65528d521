"""The chunk size of the LM-head ops, from the device: its logic on fake device properties."""

from types import SimpleNamespace

import pytest
import torch

from unlearn_fast.ops import chunking
from unlearn_fast.ops.chunking import BLOCKS_PER_SM, CPU_CHUNK_BYTES, CUDA_MEMORY_FRACTION, rows_per_chunk

GiB, MiB = 1 << 30, 1 << 20
CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(sm_count, free, reserved=0, allocated=0): the torch.cuda queries answer these."""

    def install(sm_count, free, reserved=0, allocated=0):
        props = SimpleNamespace(multi_processor_count=sm_count)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)

    return install


def test_cuda_gives_every_sm_several_blocks_when_memory_allows(fake_gpu):
    fake_gpu(sm_count=132, free=70 * GiB)  # an H100 with room to spare
    row_bytes = 128256 * 2  # a bf16 logits row of Llama-3's vocabulary
    assert rows_per_chunk(CUDA, 8192, row_bytes) == 132 * BLOCKS_PER_SM
    fake_gpu(sm_count=108, free=70 * GiB)  # an A100: rows follow the SM count
    assert rows_per_chunk(CUDA, 8192, row_bytes) == 108 * BLOCKS_PER_SM


def test_cuda_rows_capped_by_the_free_memory(fake_gpu):
    fake_gpu(sm_count=132, free=100 * MiB)
    row_bytes = 1 * MiB
    assert rows_per_chunk(CUDA, 8192, row_bytes) == int(100 * CUDA_MEMORY_FRACTION)
    # Memory PyTorch's caching allocator holds but does not use counts as free.
    fake_gpu(sm_count=132, free=100 * MiB, reserved=300 * MiB, allocated=100 * MiB)
    assert rows_per_chunk(CUDA, 8192, row_bytes) == int(300 * CUDA_MEMORY_FRACTION)
    fake_gpu(sm_count=132, free=0)  # a full device still makes progress, one row at a time
    assert rows_per_chunk(CUDA, 8192, row_bytes) == 1


def test_rows_never_exceed_the_tokens_and_a_request_wins(fake_gpu):
    fake_gpu(sm_count=132, free=70 * GiB)
    assert rows_per_chunk(CUDA, 97, 4096) == 97
    assert rows_per_chunk(CUDA, 0, 4096) == 1
    assert rows_per_chunk(CUDA, 8192, 4096, requested=40) == 40
    assert rows_per_chunk(CUDA, 30, 4096, requested=40) == 30


def test_cpu_uses_the_cache_sized_budget(monkeypatch):
    def no_cuda_query(*args, **kwargs):
        raise AssertionError("the CPU path must not query CUDA")

    monkeypatch.setattr(chunking, "free_cuda_bytes", no_cuda_query)
    cpu = torch.device("cpu")
    assert rows_per_chunk(cpu, 2048, 49152 * 4) == CPU_CHUNK_BYTES // (49152 * 4)
    assert rows_per_chunk(cpu, 2048, 2 * CPU_CHUNK_BYTES) == 1
    assert rows_per_chunk(cpu, 5, 4) == 5
