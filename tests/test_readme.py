"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README should hold exactly one Python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 18  # the promised ~15 lines (+ imports)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert (tmp_path / "birds.safetensors").exists()
    served, plain, images = namespace["served"], namespace["plain"], namespace["images"]
    assert type(plain) is type(namespace["backbone"])
    served.set_task("birds").eval()
    import torch

    with torch.no_grad():
        assert torch.allclose(plain(images), served(images), atol=1e-5)
