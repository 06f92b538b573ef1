"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def run(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    return namespace


def test_readme_has_the_examples() -> None:
    vision, text, _ = examples()
    assert len(vision.strip().splitlines()) <= 18  # the promised ~15 lines (+ imports)
    assert "transformers" in text


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = run(examples()[0], tmp_path, monkeypatch)
    assert (tmp_path / "birds.safetensors").exists()
    served, plain, images = namespace["served"], namespace["plain"], namespace["images"]
    assert type(plain) is type(namespace["backbone"])
    served.set_task("birds").eval()
    import torch

    with torch.no_grad():
        assert torch.allclose(plain(images), served(images), atol=1e-5)
    exec(compile(examples()[2], str(README), "exec"), namespace)  # task inference, on `served`
    found = namespace["found"]
    assert len(found.tasks) == len(images) and set(found.tasks) <= {"birds", None}


def test_readme_hugging_face_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    import torch

    namespace = run(examples()[1], tmp_path, monkeypatch)
    served, plain, ids = namespace["served"], namespace["plain"], namespace["ids"]
    assert type(plain) is type(namespace["bert"]) and served.tasks == ["sentiment"]
    served.set_task("sentiment").eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, served(input_ids=ids).logits, atol=1e-5)
