#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, the one command that checks what CI cannot:
#   1. build the extension with the CUDA kernels for this GPU's architecture (a failed CUDA build is an error);
#   2. every op's `cuda` and `triton` (compiled, not interpreted) backends against the float64 reference,
#      on GPU tensors: tests/test_properties.py with UNLEARN_FAST_PROPERTY_EXAMPLES examples (default 200);
#   2b. every op of the registry (csrc/ops.cpp) at real sizes in bf16 and fp32 against its PyTorch reference,
#      with a roofline table (scripts/gpu_ops_check.py -> bench/results/gpu_ops.md);
#   3. SOUL end to end on the GPU (tiny random Llama, float64) with UNLEARN_FAST_BACKEND=cuda, then =triton:
#      the same final parameters as with the reference ops;
#   3b. with 2+ GPUs: SOUL on FSDP-sharded layers over NCCL (torchrun) against the single-process run;
#   4. the whole test suite with the CUDA build expected (CPU tensors on the C++ kernels, Triton's CPU tests
#      left to CI's interpreter);
#   5. the benchmarks and their report (make bench-report: bench/results/latest.md and PNG plots).
# Usage: bash scripts/gpu_check.sh [--no-bench] [--dry-run]
#   --dry-run prints every command and every op check it would run, and needs no GPU (tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0 BENCH=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --no-bench) BENCH=0 ;;
    *) echo "gpu_check.sh: unknown option $arg (use --no-bench, --dry-run)" >&2; exit 2 ;;
  esac
done
# Print a command, then run it unless --dry-run.
run() { echo "+ $(printf '%q ' "$@")"; if [ "$DRY" = 0 ]; then "$@"; fi; }

if [ "$DRY" = 1 ]; then
  PYTHON="${PYTHON:-python}"
  ARCH="<this GPU's capability>"
else
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  . .venv/bin/activate
  PYTHON=python
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible to torch')"
  ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi

export UNLEARN_FAST_CUDA_ARCHS="${UNLEARN_FAST_CUDA_ARCHS:-8.0;9.0}"
case ";$UNLEARN_FAST_CUDA_ARCHS;" in *";$ARCH;"*) ;; *) UNLEARN_FAST_CUDA_ARCHS="$UNLEARN_FAST_CUDA_ARCHS;$ARCH" ;; esac
echo "== 1. building the CUDA kernels for $UNLEARN_FAST_CUDA_ARCHS"
run env UNLEARN_FAST_FORCE_CUDA=1 bash scripts/build_ext.sh
run unlearn-fast backends

# Real Triton compilation on the GPU (tests/conftest.py would otherwise switch the interpreter on).
export TRITON_INTERPRET=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

echo "== 2. every op on GPU tensors, cuda and triton backends, against the reference"
run env UNLEARN_FAST_PROPERTY_EXAMPLES="${UNLEARN_FAST_PROPERTY_EXAMPLES:-200}" \
  "$PYTHON" -m pytest tests/test_properties.py -q -k "cuda-cuda or cuda-triton"

echo "== 2b. every registered op at real sizes, bf16 and fp32, against its reference; roofline"
"$PYTHON" scripts/gpu_ops_check.py --dry-run  # the list, also in a dry run
run mkdir -p bench/results
run "$PYTHON" scripts/gpu_ops_check.py --write bench/results/gpu_ops.md

echo "== 3. SOUL on the GPU with each backend forced"
for backend in cuda triton; do
  if [ "$DRY" = 1 ]; then echo "+ UNLEARN_FAST_BACKEND=$backend python - $backend  # SOUL vs the reference ops"; continue; fi
  UNLEARN_FAST_BACKEND=$backend python - "$backend" <<'EOF'
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import SOUL
from unlearn_fast.backend import use_backend


def run(estimator):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(config).double().cuda()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(2):
        ids = torch.randint(0, 512, (4, 24), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        data.append({"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(), "labels": labels.cuda()})
    soul = SOUL(objective="gdiff", estimator=estimator, lr=1e-2, steps=6, hessian_interval=2)
    return torch.cat([p.detach().reshape(-1) for p in soul.unlearn(model, data[:1], data[1:], progress=False).model.parameters()])


backend = sys.argv[1]
for estimator in ("gnb", "hutchinson", "empirical"):
    got = run(estimator)
    with use_backend("reference"):
        want = run(estimator)
    error = ((got - want).norm() / want.norm()).item()
    print(f"SOUL {estimator} on {backend}: relative difference from the reference ops {error:.2e}")
    assert error < 1e-9, f"SOUL with the {backend} kernels departs from the reference ops ({error:.2e})"
EOF
done

echo "== 3b. FSDP over NCCL (2+ GPUs): SOUL on sharded layers equals one process on the CPU"
if [ "$DRY" = 1 ]; then
  echo "+ python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_torchrun_script.py ... nccl"
elif [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  out=$(mktemp -d)
  PYTHONPATH=tests python -m torch.distributed.run --standalone --nproc-per-node 2 \
    tests/fsdp_torchrun_script.py "$out/params.pt" nccl
  PYTHONPATH=tests python - "$out/params.pt" <<'EOF'
import sys

import torch
from test_fsdp import compute_one, full_parameters

got, want = torch.load(sys.argv[1]), full_parameters(compute_one(shard=False))
torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
print("FSDP over NCCL: equal to the single-process run")
EOF
else
  echo "skipped: fewer than 2 GPUs"
fi

echo "== 4. the whole test suite, the CUDA build expected"
run env UNLEARN_FAST_EXPECT_CUDA_BUILD=1 "$PYTHON" -m pytest tests -q -x

if [ "$BENCH" = 1 ]; then
  echo "== 5. benchmarks"
  run make bench-report
fi
if [ "$DRY" = 1 ]; then echo "gpu_check.sh: dry run, nothing was run"; else echo "gpu_check.sh: all checks passed"; fi
