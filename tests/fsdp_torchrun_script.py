"""Launched by tests/test_fsdp.py with ``torchrun --standalone --nproc-per-node 2``: the README's
FSDP recipe (init the process group, shard the layers, SOUL in place) on a tiny model; rank 0
saves the whole trained parameters to argv[1]."""

import sys

import torch
import torch.distributed as dist
from test_fsdp import compute_one, full_parameters

dist.init_process_group("gloo")
torch.set_num_threads(1)
model = compute_one(shard=True)
parameters = full_parameters(model)  # a collective: every rank gathers
if dist.get_rank() == 0:
    torch.save(parameters, sys.argv[1])
dist.destroy_process_group()
