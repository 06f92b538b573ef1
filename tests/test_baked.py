"""Baked model files (exports, fine-tuned baselines) from strangers: every header field
checked before use, the network sized on the meta device before any allocation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from piggyback import PiggybackModel, TaskFileError
from piggyback import baked as baked_module
from piggyback.backbones import InputSpec, create_backbone
from piggyback.baked import ModelInfo, read_baked, spec_record, write_baked
from piggyback.layers import new_head
from piggyback.modelfile import open_model_file
from piggyback.report import describe_baked_file
from piggyback.taskmeta import MAX_CLASSES, MAX_INPUT_SIZE

SPEC = InputSpec(16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bilinear", 0.875)
INFO = ModelInfo("t", 3, ["x", "y", "z"], SPEC, {"data": "digits", "method": "finetune"})


@pytest.fixture
def baked(tmp_path: Path) -> Path:
    network = create_backbone("test_resnet")
    head = PiggybackModel(create_backbone("test_resnet")).head_name
    setattr(network, head, new_head(getattr(network, head), 3))
    return write_baked(tmp_path / "t.safetensors", network.eval(), INFO, backbone="test_resnet",
                       head=head)  # fmt: skip


def rewrite(path: Path, **entries: str) -> None:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    path.write_bytes(safetensors_save(tensors, metadata={**header, **entries}))


def test_round_trip_keeps_the_network_and_what_it_needs(baked: Path) -> None:
    info, network = read_baked(baked)
    assert info == ModelInfo(
        "t", 3, ["x", "y", "z"], SPEC, {"data": "digits", "method": "finetune"}
    )
    assert network(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    opened = open_model_file(baked, size=24)
    assert opened.kind == "fine-tuned model" and opened.info.spec == replace(SPEC, size=24)
    report = describe_baked_file(baked)
    assert report["input_spec"] == spec_record(SPEC) and report["kind"] == "fine-tuned model"


def spec_with(**fields: object) -> str:
    return json.dumps({**spec_record(SPEC), **fields})


BAD_ENTRIES = {
    "class count as text": ({"num_classes": "three"}, "num_classes"),
    "no classes": ({"num_classes": "0"}, "num_classes"),
    "class count past the limit": ({"num_classes": str(MAX_CLASSES + 1)}, "num_classes"),
    "huge class count": ({"num_classes": "9" * 40}, "num_classes"),
    "class names of the wrong length": ({"class_names": '["x"]'}, "class_names"),
    "class names not JSON": ({"class_names": "[x"}, "class_names"),
    "class name as number": ({"class_names": "[1, 2, 3]"}, "class_names"),
    "no input spec": ({"input_spec": "null"}, "input_spec"),
    "huge input size": ({"input_spec": spec_with(size=MAX_INPUT_SIZE + 1)}, "input_spec.size"),
    "input size as text": ({"input_spec": spec_with(size="16")}, "input_spec.size"),
    "two channels": ({"input_spec": spec_with(mean=[0.5, 0.5])}, "input_spec.mean"),
    "infinite std": ({"input_spec": spec_with(std=[1e400, 1, 1])}, "input_spec.std"),
    "zero std": ({"input_spec": spec_with(std=[0, 1, 1])}, "std values must be > 0"),
    "crop above 1": ({"input_spec": spec_with(crop_pct=2)}, "input_spec.crop_pct"),
    "crop as text": ({"input_spec": spec_with(crop_pct="1")}, "input_spec.crop_pct"),
    "unknown interpolation": ({"input_spec": spec_with(interpolation="lanczos")}, "lanczos"),
    "metadata not an object": ({"metadata": "[]"}, "metadata"),
    "recorded size as text": ({"metadata": '{"size": "32"}'}, "metadata.size"),
    "deeply nested metadata": ({"metadata": "[" * 100_000 + "]" * 100_000}, "metadata"),
    "task name as number": ({"task": "7" * 200}, "task"),
    "unknown backbone": ({"backbone": "resnet9000"}, "cannot be built"),
    "no backbone": ({"backbone": ""}, "does not record its backbone"),
    "head that is not there": ({"head": "nothing.here"}, "cannot be built"),
    "another backbone's tensors": ({"backbone": "resnet18"}, "does not fit backbone"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_each_bad_header_entry_is_refused_by_name(baked: Path, case: str) -> None:
    entries, words = BAD_ENTRIES[case]
    rewrite(baked, **entries)
    with pytest.raises(TaskFileError, match=words):
        read_baked(baked)


def test_a_header_naming_a_large_network_allocates_nothing(
    baked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few kilobytes naming a ResNet-152 are refused from its shapes on the meta device."""
    devices = []
    real = baked_module.create_backbone

    def spy(name: str) -> torch.nn.Module:
        devices.append(torch.get_default_device().type)
        return real(name)

    monkeypatch.setattr(baked_module, "create_backbone", spy)
    rewrite(baked, backbone="resnet152")
    with pytest.raises(TaskFileError, match="does not fit backbone 'resnet152'"):
        read_baked(baked)
    assert devices == ["meta"]


def test_truncated_file_is_a_task_file_error(baked: Path) -> None:
    baked.write_bytes(baked.read_bytes()[:100])
    with pytest.raises(TaskFileError, match="not a readable safetensors file"):
        open_model_file(baked)
