"""The README's "your model, your data" block runs as written, on tiny models saved where it looks."""

import json
import re
from pathlib import Path

import torch
from conftest import save_tiny_model

from unlearn_fast import UnlearnResult

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test: your-model-your-data -->\s*```python\n(.*?)```", re.S)


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_your_model_your_data_block_runs(tmp_path, monkeypatch):
    code = BLOCK.search(README.read_text()).group(1)
    save_tiny_model(tmp_path / "models/my-llama")
    save_tiny_model(tmp_path / "models/my-moe", "qwen2_moe")
    forget = [{"question": f"What is the code of vault {i}?", "answer": f"It is {i}{i}7."} for i in range(4)]
    retain = [{"prompt": f"Where is town {i}?", "response": f"North of river {i}."} for i in range(4)]
    chat = [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in forget
    ]
    write_jsonl(tmp_path / "forget.jsonl", forget)
    write_jsonl(tmp_path / "retain.jsonl", retain)
    write_jsonl(tmp_path / "train.jsonl", chat + retain)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    for method in ("soul", "erase", "uoe"):
        saved = tmp_path / "runs" / method
        assert sorted(f.name for f in saved.iterdir()) == ["config.json", "result.json", "weights.safetensors"]
    assert isinstance(namespace["same"], UnlearnResult)
    for (name, p), q in zip(namespace["result"].model.named_parameters(), namespace["same"].model.parameters()):
        assert torch.equal(p, q), name
    assert namespace["edited"].report.task == "remove" and namespace["uoe"].target is not None
