"""Launched with ``torchrun --standalone --nproc-per-node N``: the README's FSDP recipe (init the
process group, shard the layers, SOUL in place) on a tiny model; rank 0 saves the whole trained
parameters to argv[1]. argv[2] ``nccl`` runs it on GPUs (scripts/gpu_check.sh; tests/test_fsdp.py
uses gloo on CPUs)."""

import gc
import os
import sys

import torch
import torch.distributed as dist
from test_fsdp import compute_one, full_parameters

backend = sys.argv[2] if len(sys.argv) > 2 else "gloo"
device = "cpu"
if backend == "nccl":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = "cuda"
dist.init_process_group(backend)
torch.set_num_threads(1)
model = compute_one(shard=True, device=device)
parameters = full_parameters(model).cpu()  # a collective: every rank gathers
if dist.get_rank() == 0:
    torch.save(parameters, sys.argv[1])
# FSDP modules sit in reference cycles and keep their last collectives' work objects: free them
# while the process group and the interpreter are alive (freed at interpreter exit instead, gloo's
# work objects can abort the process).
del model
gc.collect()
dist.barrier()
dist.destroy_process_group()
