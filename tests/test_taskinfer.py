"""Task inference (`PiggybackModel.infer_task`): which task an input belongs to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny
from test_cli import TINY_RUN, run, write_images
from test_model import train_steps
from torch import nn

from piggyback import MaskConfig, PiggybackModel, TaskFileError, read_task_file
from piggyback.errors import BackboneMismatchError, ConfigError
from piggyback.store import write_task_file
from piggyback.taskfeatures import (
    QUANTILES,
    TAIL,
    captured,
    decode16,
    encode16,
    feature_layers,
    feature_record,
    feature_scores,
    p_value,
)
from piggyback.taskinfer import (
    calibrate_task,
    calibration,
    normalised_entropy,
)
from piggyback.taskmeta import CALIBRATION_KEY, ENTROPY_QUANTILES, FEATURES_KEY


@pytest.fixture
def model() -> PiggybackModel:
    """Tasks of 3 and 5 classes with their own norms, trained a few steps each."""
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    x = torch.randn(8, 3, 16, 16)
    for task, classes in (("a", 3), ("b", 5)):
        model.add_task(task, classes)
        train_steps(model, task, x)
        model.freeze_task(task)
    return model.eval()


def test_scores_are_each_tasks_own_pass(model: PiggybackModel) -> None:
    """One mixed batch gives what a pass per task gives: 1 - normalised entropy."""
    x = torch.randn(6, 3, 16, 16)
    found = model.infer_task(x, rule="entropy", threshold=0.0)
    assert found.candidates == ["a", "b"] and found.candidate_scores.shape == (6, 2)
    for column, task in enumerate(found.candidates):
        with torch.no_grad():
            own = model.set_task(task)(x)
        torch.testing.assert_close(found.logits[task], own)
        torch.testing.assert_close(found.candidate_scores[:, column], 1 - normalised_entropy(own))
    best = found.candidate_scores.argmax(1).tolist()
    assert found.tasks == [found.candidates[i] for i in best]
    assert found.predicted_classes() == [
        int(found.logits[t][i].argmax()) for i, t in enumerate(found.tasks)
    ]


def test_normalised_entropy_compares_class_counts() -> None:
    assert normalised_entropy(torch.zeros(1, 2)).item() == pytest.approx(1.0)
    assert normalised_entropy(torch.zeros(1, 200)).item() == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0, abs=1e-6)


def test_threshold_refuses_and_a_batch_can_share_one_task(model: PiggybackModel) -> None:
    x = torch.randn(4, 3, 16, 16)
    assert model.infer_task(x, rule="entropy", threshold=1.01).tasks == [None] * 4
    assert None not in model.infer_task(x, rule="entropy", threshold=0.0).tasks
    shared = model.infer_task(x, rule="entropy", threshold=0.0, same_task=True)
    assert len(set(shared.tasks)) == 1
    alone = model.infer_task(x, tasks=["b"], rule="entropy", threshold=0.0)
    assert alone.tasks == ["b"] * 4 and alone.candidates == ["b"]


def test_calibrated_rule_reads_each_tasks_validation_quantiles(model: PiggybackModel) -> None:
    x, active = torch.randn(6, 3, 16, 16), model.active_task
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] have none"):
        model.infer_task(x, rule="calibrated")
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] have none"):
        model.infer_task(x)  # the default rule, features, needs the calibration too
    for task in ("a", "b"):
        record = calibrate_task(model, task, [torch.randn(5, 3, 16, 16) for _ in range(2)])
        assert len(record["quantiles"]) == ENTROPY_QUANTILES and record["samples"] == 10
    found = model.infer_task(x, rule="calibrated", threshold=0.0)
    assert ((found.candidate_scores >= 0) & (found.candidate_scores <= 1)).all()
    for column, task in enumerate(found.candidates):  # less entropy, more typical: higher
        entropy = normalised_entropy(found.logits[task])
        order = entropy.argsort()
        assert (found.candidate_scores[order, column].diff() <= 0).all()
    assert model.active_task == active and not model.training, "calibrating restores both"


def test_calibration_is_the_distribution_it_was_read_from() -> None:
    record = calibration(torch.linspace(0, 1, 1001))
    assert record["quantiles"][0] == 0 and record["quantiles"][-1] == 1
    assert record["quantiles"][50] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="at least one"):
        calibration(torch.empty(0))


def domain(shift: float, n: int = 12) -> torch.Tensor:
    """Images of one "domain": noise around its own brightness."""
    return torch.randn(n, 3, 16, 16) * 0.5 + shift


def calibrated(model: PiggybackModel) -> PiggybackModel:
    """Task a calibrated on bright images (labelled), b on dark ones (unlabelled)."""
    torch.manual_seed(1)
    calibrate_task(model, "a", [(domain(2.0), torch.arange(12) % 3) for _ in range(2)])
    calibrate_task(model, "b", [domain(-2.0) for _ in range(2)])
    return model


def test_features_rule_scores_each_task_on_its_own_pass(model: PiggybackModel) -> None:
    """The mixed batch's features are each task's own: the scores equal those of a pass
    per task; a task's own kind of image scores high, the other's low."""
    calibrated(model)
    record = model.task_info["a"].metadata[CALIBRATION_KEY][FEATURES_KEY]
    assert record["classes"] == 3 and len(record["quantiles"]) == QUANTILES
    assert [layer["name"] for layer in record["layers"]] == feature_layers(
        list(model.masked_layers)
    )
    assert model.task_info["b"].metadata[CALIBRATION_KEY][FEATURES_KEY]["classes"] == 1
    x = torch.cat([domain(2.0, 4), domain(-2.0, 4)])
    found = model.infer_task(x, threshold=0.0)
    assert found.rule == "features" and found.tasks == ["a"] * 4 + ["b"] * 4
    for column, task in enumerate(found.candidates):
        layers = feature_layers(list(model.masked_layers))
        with torch.no_grad(), captured(model, layers) as seen:
            model.set_task(task)(x)
        own = {name: torch.cat(seen[name, task]) for name in layers}
        stored = model.task_info[task].metadata[CALIBRATION_KEY][FEATURES_KEY]
        alone = feature_scores([stored], [own])[:, 0]
        torch.testing.assert_close(found.candidate_scores[:, column], alone)
    assert ((found.candidate_scores >= 0) & (found.candidate_scores <= 1)).all()
    assert model.infer_task(x, threshold=1.01).tasks == [None] * 8


@pytest.mark.parametrize(
    "backbone",
    ["torchvision vit_b_16", "torchvision swin_t", "nn.TransformerEncoder", "transformers vit"],
)
def test_features_are_read_at_layers_that_run(backbone: str) -> None:
    """Layers whose parents read their weights without calling them (an attention's
    out_proj or qkv) are never chosen; an output object's logits are read; the features
    rule then infers the task."""
    from test_any_backbone import BACKBONES

    if backbone == "transformers vit":
        pytest.importorskip("transformers")
    build, make = BACKBONES[backbone]
    torch.manual_seed(0)
    model = PiggybackModel(build())
    generator = torch.Generator().manual_seed(0)
    batches = [make(generator) for _ in range(3)]
    for task in ("a", "b"):
        model.add_task(task, 3)
        model.freeze_task(task)
        calibrate_task(model, task, batches)
    record = model.task_info["a"].metadata[CALIBRATION_KEY][FEATURES_KEY]
    ran: list[str] = []
    hooks = [
        layer.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, layer in model.masked_layers.items()
    ]
    with torch.no_grad():
        model.set_task("a")(batches[0])
    for hook in hooks:
        hook.remove()
    assert [layer["name"] for layer in record["layers"]] == feature_layers(ran)
    assert len(model.eval().infer_task(batches[0], threshold=0.0).tasks) == len(batches[0])


def test_candidates_scored_together_score_as_each_alone() -> None:
    """Scoring k candidates at once pads each to the most classes and directions among
    them; the padding changes no score: tasks of 3 classes and of 1, fitted on 40 and on 3
    images (8 and 3 directions kept at the wider layer)."""
    generator = torch.Generator().manual_seed(0)

    def features(n: int) -> dict[str, torch.Tensor]:
        return {
            name: nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
            for name, dim in (("narrow", 6), ("wide", 12))
        }

    records = [
        feature_record(features(40), torch.arange(40) % 3, 3),
        feature_record(features(3), None, 1),
    ]
    assert [len(r["layers"][1]["variances"]) for r in records] == [8, 3]
    inputs = [features(5), features(5)]
    together = feature_scores(records, inputs)
    for column, (record, seen) in enumerate(zip(records, inputs, strict=True)):
        torch.testing.assert_close(together[:, column], feature_scores([record], [seen])[:, 0])
    assert together.shape == (5, 2)


def test_p_value_is_monotone_and_ranks_beyond_the_last_quantile() -> None:
    quantiles = torch.linspace(-1, 1, QUANTILES)
    scores = p_value(torch.tensor([-5.0, -1.0, 0.0, 1.0, 2.0, 50.0]), quantiles)
    assert scores[0] == scores[1] == 1 and scores[2] == pytest.approx(0.5, abs=0.01)
    assert scores[3] == pytest.approx(TAIL, rel=1e-5) and 0 < scores[5] < scores[4] < TAIL


def test_sixteen_bit_text_is_exact_and_refuses_other_sizes() -> None:
    values = torch.randn(3, 5).half().float()
    assert torch.equal(decode16(encode16(values), (3, 5)), values)
    for text in (encode16(values)[:-4], "!" * len(encode16(values)), 7):
        with pytest.raises(ValueError):
            decode16(text, (3, 5))  # type: ignore[arg-type]


NAN16 = encode16(torch.tensor([[float("nan")] * 4]))
# The first feature layer's fields of a calibrated task file, made hostile one at a time.
BAD_FEATURES: dict[str, tuple[str, object]] = {
    "features as text": ("", "near"),
    "classes as bool": ("classes", True),
    "no layers": ("layers", []),
    "layer as list": ("layers.0", [1, 2]),
    "layer name as number": ("layers.0.name", 3),
    "dim of zero": ("layers.0.dim", 0),
    "dim beyond the means": ("layers.0.dim", 4),  # refused as means of the wrong size
    "means truncated": ("layers.0.means", "AAAA"),
    "means not base64": ("layers.0.means", None),
    "means with NaN": ("layers.0.means", NAN16),
    "negative variance": ("layers.0.variances", [-1.0]),
    "variance of NaN": ("layers.0.variances", [float("nan")]),
    "base of zero": ("layers.0.base", 0),
    "median as text": ("layers.0.median", "1"),
    "quantiles out of order": ("quantiles", [1 - i / 100 for i in range(QUANTILES)]),
    "quantiles of inf": ("quantiles", [float("inf")] * QUANTILES),
    "quantiles too few": ("quantiles", [0.0, 1.0]),
}


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_hostile_feature_statistics_are_refused_when_read(
    model: PiggybackModel, tmp_path: Path, case: str
) -> None:
    calibrated(model)
    path = model.save_task("a", tmp_path / "a.safetensors")
    meta, tensors = read_task_file(path)
    node: Any = meta["metadata"][CALIBRATION_KEY]
    field, value = BAD_FEATURES[case]
    keys = [FEATURES_KEY, *field.split(".")] if field else [FEATURES_KEY]
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    write_task_file(path, meta, tensors)
    named = "means" if case == "dim beyond the means" else field.split(".")[-1] or FEATURES_KEY
    with pytest.raises(TaskFileError, match=named):
        read_task_file(path)
    with pytest.raises(TaskFileError):
        PiggybackModel(make_tiny(), MaskConfig(train_bn=True)).load_task(path)


def test_feature_statistics_of_a_layer_the_model_lacks_are_refused_when_loaded(
    model: PiggybackModel, tmp_path: Path
) -> None:
    """A well-formed file whose statistics read a layer this model does not mask would
    fail every task's inference: it is refused when loaded, like any other misfit."""
    calibrated(model)
    path = model.save_task("a", tmp_path / "a.safetensors")
    meta, tensors = read_task_file(path)
    meta["metadata"][CALIBRATION_KEY][FEATURES_KEY]["layers"][0]["name"] = "no_such_layer"
    write_task_file(path, meta, tensors)
    read_task_file(path)  # well formed
    with pytest.raises(BackboneMismatchError, match="no_such_layer"):
        PiggybackModel(make_tiny(), MaskConfig(train_bn=True)).load_task(path)


def test_feature_statistics_of_the_wrong_width_are_refused_when_loaded(
    model: PiggybackModel, tmp_path: Path
) -> None:
    """A file whose statistics are well formed at a width the layer does not give (means
    and directions re-encoded to match) is refused when loaded, not at inference."""
    calibrated(model)
    path = model.save_task("a", tmp_path / "a.safetensors")
    meta, tensors = read_task_file(path)
    record = meta["metadata"][CALIBRATION_KEY][FEATURES_KEY]
    layer = record["layers"][0]
    dim = layer["dim"] + 1
    layer["dim"] = dim
    layer["means"] = encode16(torch.zeros(record["classes"], dim))
    layer["components"] = encode16(torch.zeros(len(layer["variances"]), dim))
    write_task_file(path, meta, tensors)
    read_task_file(path)  # well formed
    with pytest.raises(BackboneMismatchError, match=f"hold {dim} features"):
        PiggybackModel(make_tiny(), MaskConfig(train_bn=True)).load_task(path)


def test_feature_statistics_survive_the_task_file(model: PiggybackModel, tmp_path: Path) -> None:
    calibrated(model)
    x = torch.cat([domain(2.0, 3), domain(-2.0, 3)])
    before = model.infer_task(x, threshold=0.0)
    for task in ("a", "b"):
        model.save_task(task, tmp_path / f"{task}.safetensors")
    again = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    for task in ("a", "b"):
        again.load_task(tmp_path / f"{task}.safetensors")
    after = again.eval().infer_task(x, threshold=0.0)
    assert after.tasks == before.tasks
    torch.testing.assert_close(after.candidate_scores, before.candidate_scores, atol=2e-3, rtol=0)


def test_token_inputs_as_keywords() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.hidden = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.hidden(self.embed(input_ids).mean(1))))

    model = PiggybackModel(Tagger())
    model.add_task("x", 2)
    model.add_task("y", 3)
    ids = torch.randint(0, 50, (5, 7))
    found = model.infer_task(input_ids=ids, rule="entropy", threshold=0.0)
    assert len(found.tasks) == 5 and found.logits["y"].shape == (5, 3)
    for task in ("x", "y"):  # token features: pooled over positions
        calibrate_task(model, task, [torch.randint(0, 50, (6, 7)) for _ in range(2)])
    found = model.infer_task(input_ids=ids, threshold=0.0)
    assert found.rule == "features" and None not in found.tasks


def test_fit_stores_the_calibration_in_the_task_file(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from piggyback import read_task_file

    result = run(*TINY_RUN, "--epochs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    meta, _ = read_task_file(tmp_path / "digits.safetensors")
    record = meta["metadata"][CALIBRATION_KEY]
    assert len(record["quantiles"]) == ENTROPY_QUANTILES and record["samples"] == 8
    features = record[FEATURES_KEY]  # per class: fit's validation loader gives labels
    assert features["classes"] == meta["num_classes"] and len(features["layers"]) >= 1


def test_predict_infers_the_task_among_task_files(tmp_path: Path) -> None:
    """`predict --tasks`: two tasks on one seeded backbone, each image's task inferred."""
    pytest.importorskip("sklearn")
    for task in ("left", "right"):
        trained = run(*TINY_RUN, "--epochs", "1", "--task", task, "--out", str(tmp_path / task))
        assert trained.returncode == 0, trained.stderr
    images = write_images(tmp_path / "images", [(20, 16), (16, 16)])
    files = [str(tmp_path / t / f"{t}.safetensors") for t in ("left", "right")]
    flags = ["--tasks", files[0], "--tasks", files[1], "--rule", "entropy", "--threshold"]
    found = run("predict", *flags, "0", str(images), "--json")
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    assert len(rows) == 2 and all(r["task"] in ("left", "right") for r in rows)
    assert all(0 <= r["score"] <= 1 and len(r["labels"]) == 3 for r in rows)
    refused = run("predict", *flags, "1.5", str(images))
    assert refused.returncode == 0, refused.stderr
    assert all("no known task (closest " in line for line in refused.stdout.splitlines())
    default = run("predict", "--tasks", files[0], "--tasks", files[1], str(images), "--json")
    assert default.returncode == 0, default.stderr  # the features rule: fit stored its statistics
    rows = json.loads(default.stdout)
    assert len(rows) == 2 and all(r["task"] in ("left", "right", None) for r in rows)
    assert all(0 <= r["score"] <= 1 for r in rows)
