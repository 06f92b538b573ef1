"""`piggyback serve`: a real uvicorn server on loopback, called over real HTTP.

Predictions must equal the library's own `pipeline.predict`, one image at a time, on
every path the server has (masked mixed batches, baked cached tasks, per-task sizes);
bad requests and bad uploads must get a 4xx and leave the server serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import make_tiny
from hostsync import host_waits
from PIL import Image
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file
from test_model import train_steps

import piggyback
from piggyback import MaskConfig, PiggybackModel, read_task_file, store
from piggyback.backbones import InputSpec, create_backbone
from piggyback.cli import main
from piggyback.pipeline import predict
from piggyback.serve import (
    BakedCache,
    Batcher,
    Job,
    ServeConfig,
    TaskRegistry,
    build_model,
    create_app,
    running,
    startup_lines,
)
from piggyback.store import FORMAT, write_task_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = InputSpec(16, (0.5, 0.4, 0.3), (0.25, 0.3, 0.2), "bilinear")
TASKS = {"a": 3, "b": 5, "c": 4}  # c trains its own norms and records a 12 px input size
JSON = "application/json"


def make_tasks(seed: int = 0) -> PiggybackModel:
    """Three trained tasks on TinyNet: class names, per-task norms, another input size."""
    torch.manual_seed(seed)
    model = PiggybackModel(make_tiny(), MaskConfig())
    x = torch.randn(6, 3, 16, 16)
    model.add_task("a", 3, class_names=["cat", "dog", "owl"])
    model.add_task("b", 5)
    model.add_task("c", 4, train_bn=True, metadata={"size": 12})
    for task in TASKS:
        train_steps(model, task, x, steps=3)
        model.freeze_task(task)
    return model


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    piggyback.save(make_tasks(), directory)
    return directory


@pytest.fixture(scope="module")
def reference(task_dir: Path) -> PiggybackModel:
    """The library's own model of the same files, for what the server must answer."""
    return piggyback.load(task_dir, make_tiny())


def spec_of(model: PiggybackModel, task: str) -> InputSpec:
    return replace(SPEC, size=model.task_info[task].metadata.get("size") or SPEC.size)


def expected(model: PiggybackModel, task: str, data: bytes, topk: int) -> dict[str, Any]:
    """`pipeline.predict` on one image alone, the reference for every answer."""
    model.set_task(task)
    with Image.open(io.BytesIO(data)) as image:
        (result,) = predict(model, [image.convert("RGB")], spec_of(model, task), topk=topk)
    return result.to_dict()


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["labels"] == want["labels"] and got["indices"] == want["indices"]
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def png(seed: int, size: tuple[int, int] = (20, 14)) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png(i, size) for i, size in enumerate([(20, 14), (16, 16), (9, 30), (32, 24)] * 2)]


def blank(mode: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def server(directory: Path, **settings: Any) -> Iterator[str]:
    config = ServeConfig(**{"max_upload_mb": 0.1, "max_batch": 8, **settings})
    model = PiggybackModel(make_tiny(), MaskConfig())
    with running(create_app(model, SPEC, directory, config)) as url:
        yield url


@pytest.fixture(scope="module")
def url(task_dir: Path) -> Iterator[str]:
    with server(task_dir, cache_size=1, max_request_pixels=3000) as base:
        yield base


def multipart(task: str, images: list[bytes], **fields: Any) -> dict[str, Any]:
    return {
        "data": {"task": task, **{k: str(v) for k, v in fields.items()}},
        "files": [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
    }


# ------------------------------------------------------------------ reading
def test_health_and_task_list(url: str, task_dir: Path) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    tasks = {t["name"]: t for t in httpx.get(f"{url}/tasks").json()["tasks"]}
    assert sorted(tasks) == sorted(TASKS)
    assert tasks["a"]["classes"] == ["cat", "dog", "owl"] and tasks["b"]["classes"] is None
    for name, classes in TASKS.items():
        meta = read_task_file(task_dir / f"{name}.safetensors")[0]
        assert tasks[name]["num_classes"] == classes
        assert tasks[name]["file_bytes"] == (task_dir / f"{name}.safetensors").stat().st_size
        assert tasks[name]["bits_per_weight"] == meta["mask"]["bits_per_weight"] <= 1
    assert tasks["c"]["input_size"] == 12 and tasks["a"]["input_size"] == 16


@pytest.mark.parametrize("task", sorted(TASKS))
def test_predictions_equal_the_library(url: str, reference: PiggybackModel, task: str) -> None:
    images = IMAGES[:3]
    by_form = httpx.post(f"{url}/predict", **multipart(task, images, topk=2))
    assert by_form.status_code == 200, by_form.text
    encoded = [base64.b64encode(data).decode() for data in images]
    encoded[0] = "data:image/png;base64," + encoded[0]
    by_json = httpx.post(f"{url}/predict", json={"task": task, "images": encoded, "topk": 2})
    assert by_json.status_code == 200, by_json.text
    for response in (by_form, by_json):
        rows = response.json()["predictions"]
        assert response.json()["task"] == task and len(rows) == len(images)
        for row, data in zip(rows, images, strict=True):
            assert_same(row, expected(reference, task, data, topk=2))
    if task == "a":
        assert set(by_form.json()["predictions"][0]["labels"]) <= {"cat", "dog", "owl"}


@pytest.mark.parametrize("cache_size", [0, 1, 4])
def test_concurrent_mixed_requests(
    task_dir: Path, reference: PiggybackModel, cache_size: int
) -> None:
    """200 requests at once over three tasks: masked, baked and mixed paths all agree."""
    rng = random.Random(cache_size)
    plan = [(rng.choice(sorted(TASKS)), rng.randrange(len(IMAGES))) for _ in range(200)]

    async def call_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/predict", **multipart(task, [IMAGES[i]], topk=3))
                    for task, i in plan
                )
            )

    with server(task_dir, cache_size=cache_size) as base:
        responses = asyncio.run(call_all(base))
        health = httpx.get(f"{base}/health").json()
    for (task, i), response in zip(plan, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same(response.json()["predictions"][0], expected(reference, task, IMAGES[i], 3))
    assert health["images"] == 200 and health["batches"] < 200, "requests were not batched"
    assert len(health["cached"]) <= cache_size


# ----------------------------------------------------------------- bad input
class Chunked:
    """A 200 kB body sent in chunks, so without a Content-Length; fresh on every send."""

    def __iter__(self) -> Iterator[bytes]:
        return (b"x" * 10_000 for _ in range(20))


BAD_PREDICTS: list[tuple[str, dict[str, Any], int]] = [
    ("unknown task", multipart("nope", IMAGES[:1]), 404),
    ("unknown task, json", {"json": {"task": "nope", "images": ["AAAA"]}}, 404),
    ("not an image", multipart("a", [b"not an image at all"]), 400),
    ("truncated png", multipart("a", [IMAGES[0][:40]]), 400),
    ("text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("no content type", {"content": b"hello"}, 415),
    ("broken json", {"content": b"{", "headers": {"content-type": JSON}}, 400),
    ("nested json", {"content": b"[" * 100_000, "headers": {"content-type": JSON}}, 400),
    ("a 5000-digit number", {"content": b"1" * 5000, "headers": {"content-type": JSON}}, 400),
    ("json list", {"json": ["a"]}, 422),
    ("no task", {"json": {"images": ["AAAA"]}}, 422),
    ("no images", {"json": {"task": "a", "images": []}}, 422),
    ("bad base64", {"json": {"task": "a", "images": ["%%%"]}}, 400),
    ("images not strings", {"json": {"task": "a", "images": [1]}}, 422),
    ("a pixel bomb", multipart("a", [blank("1", (6000, 5000))]), 413),
    ("a thin strip", multipart("a", [blank("L", (2000, 10))]), 422),
    ("topk 0", {"json": {"task": "a", "images": ["AAAA"], "topk": 0}}, 422),
    ("topk text", multipart("a", IMAGES[:1], topk="many"), 422),
    ("images as text", {"data": {"task": "a", "images": "x"}, "files": {"f": b"1"}}, 422),
    ("too many images", multipart("a", IMAGES + IMAGES[:1]), 413),
    ("too many pixels together", multipart("a", IMAGES), 413),  # 3,148 > 3,000
    ("body over the limit", multipart("a", [b"x" * 200_000]), 413),
    ("chunked body over the limit", {"content": Chunked()}, 413),
    (
        "broken multipart",
        {"content": b"--x\r\nbad", "headers": {"content-type": "multipart/form-data"}},
        400,
    ),
]


@pytest.mark.parametrize(
    ("request_args", "status"),
    [(args, status) for _, args, status in BAD_PREDICTS],
    ids=[name for name, _, _ in BAD_PREDICTS],
)
def test_bad_requests_get_a_4xx(
    url: str, reference: PiggybackModel, request_args: dict[str, Any], status: int
) -> None:
    response = httpx.post(f"{url}/predict", **request_args)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    good = httpx.post(f"{url}/predict", **multipart("b", IMAGES[:1]))
    assert good.status_code == 200, "the server must keep serving after a bad request"
    assert_same(good.json()["predictions"][0], expected(reference, "b", IMAGES[0], 5))


def test_unknown_route_is_a_json_404(url: str) -> None:
    response = httpx.get(f"{url}/nope")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


# ---------------------------------------------------------- adding tasks
@pytest.fixture
def own_dir(task_dir: Path, tmp_path: Path) -> Path:
    """A copy of the task folder that a test may change."""
    return Path(shutil.copytree(task_dir, tmp_path / "tasks"))


def new_task_file(directory: Path, name: str = "d", seed: int = 0) -> bytes:
    """A task `name` trained on TinyNet (of backbone seed `seed`), as file bytes."""
    model = PiggybackModel(make_tiny(seed), MaskConfig())
    model.add_task(name, 6)
    train_steps(model, name, torch.randn(4, 3, 16, 16))
    return model.save_task(name, directory / f"{name}-{seed}.safetensors").read_bytes()


def test_upload_predict_delete(own_dir: Path, tmp_path: Path) -> None:
    data = new_task_file(tmp_path)
    files = {"file": ("d.safetensors", data, "application/octet-stream")}
    with server(own_dir, allow_unauthenticated_writes=True) as base:
        created = httpx.post(f"{base}/tasks", files=files)
        assert created.status_code == 201, created.text
        assert created.json()["name"] == "d" and created.json()["num_classes"] == 6
        assert (own_dir / "d.safetensors").read_bytes() == data
        assert "d" in [t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"]]

        reference = PiggybackModel(make_tiny(), MaskConfig())
        reference.load_task(own_dir / "d.safetensors")
        answer = httpx.post(f"{base}/predict", **multipart("d", IMAGES[:2], topk=4))
        assert answer.status_code == 200, answer.text
        for row, image in zip(answer.json()["predictions"], IMAGES[:2], strict=True):
            assert_same(row, expected(reference.eval(), "d", image, topk=4))

        assert httpx.delete(f"{base}/tasks/d").json() == {"deleted": "d"}
        assert not (own_dir / "d.safetensors").exists()
        assert httpx.post(f"{base}/predict", **multipart("d", IMAGES[:1])).status_code == 404
        assert httpx.delete(f"{base}/tasks/d").status_code == 404
        raw = httpx.post(
            f"{base}/tasks", content=data, headers={"content-type": "application/octet-stream"}
        )
        assert raw.status_code == 201, raw.text
    with server(own_dir) as base:  # the upload persisted: a restart serves it
        assert httpx.post(f"{base}/predict", **multipart("d", IMAGES[:1])).status_code == 200


def _crafted(data: bytes, tmp_path: Path, **changes: Any) -> bytes:
    """A task file whose metadata was edited and signed again, as a forger would."""
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(data)
    meta, tensors = read_task_file(path)
    write_task_file(path, {**meta, **changes}, tensors)
    return path.read_bytes()


def _with_header(tensors: dict[str, torch.Tensor], text: str) -> bytes:
    """A task file whose JSON header is `text`, which the JSON parser refuses."""
    return safetensors_save(tensors, metadata={"format": FORMAT, "piggyback": text})


def bad_task_files(good: bytes, tmp_path: Path) -> list[tuple[str, bytes, str]]:
    """(kind, file bytes, what its error says): one task file of each bad kind, all made
    from `good` (a task on TinyNet), most with a valid checksum."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(good)
    meta, tensors = read_task_file(path)
    deep = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 10_000 + "]" * 10_000 + "}"
    int_fingerprint = {**meta["backbone"], "fingerprint": 123}
    return [
        ("not safetensors", b"\x00" * 64, "not a readable safetensors"),
        ("truncated", good[: len(good) // 2], "not a readable safetensors"),
        ("bad JSON", _with_header(tensors, "{not json"), "metadata"),
        ("nested JSON", _with_header(tensors, deep), "metadata"),
        ("other backbone", new_task_file(tmp_path, seed=1), "backbone"),
        ("path as name", _crafted(good, tmp_path, task="../evil"), "not allowed"),
        ("name not a string", _crafted(good, tmp_path, task=["x"]), "task"),
        ("class names not a list", _crafted(good, tmp_path, class_names=7), "class_names"),
        ("negative input size", _crafted(good, tmp_path, metadata={"size": -3}), "size"),
        ("huge input size", _crafted(good, tmp_path, metadata={"size": 1500}), "1500"),
        ("integer fingerprint", _crafted(good, tmp_path, backbone=int_fingerprint), "fingerprint"),
        ("huge mask", _crafted(good, tmp_path, mask={**meta["mask"], "numel": 10**12}), "mask"),
        ("wrong num_classes", _crafted(good, tmp_path, num_classes=1000), "head"),
    ]


def test_bad_uploads_are_refused(own_dir: Path, tmp_path: Path) -> None:
    """Each bad kind gets a 4xx naming the problem, on the same keep-alive connection."""
    good = new_task_file(tmp_path)
    before = sorted(p.name for p in own_dir.iterdir())
    cases = [
        *((data, 400, needle) for _, data, needle in bad_task_files(good, tmp_path)),
        (good[: len(good) // 2], 400, "uploaded file"),
        (new_task_file(tmp_path, name="a"), 409, "already served"),
    ]
    with server(own_dir, admin_token="t") as base:
        connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
        auth = {"authorization": "Bearer t"}
        headers = {"content-type": "application/octet-stream", **auth}
        connection.connect()
        sock = connection.sock
        for data, status, needle in cases:
            connection.request("POST", "/tasks", body=data, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            assert response.status == status, text
            assert needle in json.loads(text)["error"], text
            assert connection.sock is sock, "the server must keep the connection open"
        wrong_type = httpx.post(
            f"{base}/tasks", content=good, headers={**headers, "content-type": "x/y"}
        )
        assert wrong_type.status_code == 415
        no_file = httpx.post(
            f"{base}/tasks", data={"file": "text"}, files={"x": b"1"}, headers=auth
        )
        assert no_file.status_code == 422
        listed = [t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"]]
        assert sorted(listed) == sorted(TASKS)
        assert httpx.post(f"{base}/predict", **multipart("c", IMAGES[:1])).status_code == 200
    assert sorted(p.name for p in own_dir.iterdir()) == before
    assert not (own_dir.parent / "evil.safetensors").exists()


def test_start_up_skips_bad_files(own_dir: Path, tmp_path: Path) -> None:
    """Bad files in the folder are skipped, with their reasons on /health and /tasks."""
    bad = bad_task_files(new_task_file(tmp_path), tmp_path)
    names = [f"0-{i:02d}.safetensors" for i in range(len(bad))]  # sorted before the good
    for name, (_, data, _) in zip(names, bad, strict=True):
        (own_dir / name).write_bytes(data)
    with server(own_dir) as base:
        health = httpx.get(f"{base}/health").json()
        listing = httpx.get(f"{base}/tasks").json()
        assert httpx.post(f"{base}/predict", **multipart("c", IMAGES[:1])).status_code == 200
    assert health["tasks"] == len(TASKS) and listing["skipped"] == health["skipped"]
    assert [s["file"] for s in health["skipped"]] == names
    for (kind, _, needle), skipped in zip(bad, health["skipped"], strict=True):
        assert needle in skipped["reason"], (kind, skipped)
    assert str(own_dir) not in json.dumps(health), "reasons name files, not server paths"
    assert sorted(t["name"] for t in listing["tasks"]) == sorted(TASKS)


def test_start_up_says_the_backbone_the_tasks_and_what_it_skipped(own_dir: Path) -> None:
    (own_dir / "0-bad.safetensors").write_bytes(b"not a task file")
    model = PiggybackModel(make_tiny(), MaskConfig())
    app = create_app(model, SPEC, own_dir, ServeConfig())
    first, skipped, access = startup_lines(app, "cpu")
    assert first.startswith(f"backbone TinyNet (fingerprint {model.fingerprint[:16]}) on cpu")
    assert first.endswith(f"{len(TASKS)} task(s): {', '.join(sorted(TASKS))}")
    assert skipped.startswith("warning: skipped 0-bad.safetensors: ")
    assert access == ServeConfig().access


def test_predict_without_a_task_infers_it_when_asked(task_dir: Path) -> None:
    """--infer-task: each image gets the task whose output is surest (these tasks carry no
    calibration, so the entropy rule), with its score and classes; or none."""
    reference = piggyback.load(task_dir, make_tiny())
    with server(task_dir, infer_task=True, infer_rule="entropy", infer_threshold=0) as base:
        answer = httpx.post(f"{base}/predict", files=multipart("a", IMAGES[:3])["files"])
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task"] is None and len(body["predictions"]) == 3
        for data, row in zip(IMAGES[:3], body["predictions"], strict=True):
            assert row["task"] in TASKS and 0 <= row["score"] <= 1
            assert_same(row, expected(reference, row["task"], data, topk=5))
    with server(task_dir, infer_task=True, infer_rule="entropy", infer_threshold=2) as base:
        answer = httpx.post(f"{base}/predict", files=multipart("a", IMAGES[:2])["files"])
        assert [row["task"] for row in answer.json()["predictions"]] == [None, None]
    with server(task_dir, infer_task=True, infer_rule="calibrated") as base:  # none has one
        refused = httpx.post(f"{base}/predict", files=multipart("a", IMAGES[:1])["files"])
        assert refused.status_code == 400 and "--infer-rule entropy" in refused.json()["error"]
    with server(task_dir) as base:
        refused = httpx.post(f"{base}/predict", files=multipart("a", IMAGES[:1])["files"])
        assert refused.status_code == 422 and "--infer-task" in refused.json()["error"]


def test_input_size_is_bounded(own_dir: Path, tmp_path: Path) -> None:
    """A task may not ask for inputs above max_input_size: every image is resized to it."""
    large = _crafted(new_task_file(tmp_path), tmp_path, metadata={"size": 40})
    (own_dir / "large.safetensors").write_bytes(large)
    with server(own_dir, max_input_size=32, admin_token="t") as base:
        health = httpx.get(f"{base}/health").json()
        assert [s["file"] for s in health["skipped"]] == ["large.safetensors"]
        assert "at most 32 px" in health["skipped"][0]["reason"]
        headers = {"authorization": "Bearer t"}
        refused = httpx.post(f"{base}/tasks", files={"file": ("d", large)}, headers=headers)
        assert refused.status_code == 400 and "--max-input-size" in refused.json()["error"]
    with server(own_dir, max_input_size=40) as base:
        assert httpx.get(f"{base}/health").json()["skipped"] == []
    model = PiggybackModel(make_tiny(), MaskConfig())
    with pytest.raises(piggyback.ConfigError, match="max_input_size"):
        TaskRegistry(model, SPEC, own_dir, size=64, max_input_size=32)


def test_uploads_decode_outside_the_model_lock(
    own_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow (hostile) upload must not stall predictions: only installing holds the lock."""
    decode = store.task_masks

    def slow_decode(*args: Any) -> dict[str, torch.Tensor]:
        time.sleep(2)
        return decode(*args)

    files = {"file": ("d.safetensors", new_task_file(tmp_path))}
    with server(own_dir, admin_token="t") as base, ThreadPoolExecutor(1) as pool:
        monkeypatch.setattr(store, "task_masks", slow_decode)
        auth = {"authorization": "Bearer t"}
        upload = pool.submit(httpx.post, f"{base}/tasks", files=files, headers=auth, timeout=30)
        time.sleep(0.5)  # the upload is decoding now
        start = time.monotonic()
        answer = httpx.post(f"{base}/predict", **multipart("a", IMAGES[:1]))
        waited = time.monotonic() - start
        assert upload.result().status_code == 201 and answer.status_code == 200
    assert waited < 1.0, f"a prediction waited {waited:.1f} s for an upload's decoding"


def test_admin_token_guards_changes(own_dir: Path, tmp_path: Path) -> None:
    files = {"file": ("d.safetensors", new_task_file(tmp_path))}
    with server(own_dir, admin_token="s3cret") as base:
        for headers, status in [
            ({}, 401),
            ({"authorization": "Basic s3cret"}, 401),
            ({"authorization": "Bearer wrong"}, 403),
            ({"authorization": "Bearer s3cret"}, 201),
        ]:
            response = httpx.post(f"{base}/tasks", files=files, headers=headers)
            assert response.status_code == status, response.text
        assert httpx.delete(f"{base}/tasks/d").status_code == 401
        wrong = {"authorization": "Bearer s3cre"}
        assert httpx.delete(f"{base}/tasks/d", headers=wrong).status_code == 403
        right = {"authorization": "Bearer s3cret"}
        assert httpx.delete(f"{base}/tasks/d", headers=right).status_code == 200
        assert httpx.post(f"{base}/predict", **multipart("a", IMAGES[:1])).status_code == 200


def test_writes_are_off_without_an_admin_token(own_dir: Path, tmp_path: Path) -> None:
    files = {"file": ("d.safetensors", new_task_file(tmp_path))}
    with server(own_dir) as base:
        for response in (httpx.post(f"{base}/tasks", files=files), httpx.delete(f"{base}/tasks/a")):
            assert response.status_code == 403, response.text
            assert "--admin-token" in response.json()["error"]
            assert "--allow-unauthenticated-writes" in response.json()["error"]
        assert httpx.post(f"{base}/predict", **multipart("a", IMAGES[:1])).status_code == 200
    assert (own_dir / "a.safetensors").exists() and not (own_dir / "d.safetensors").exists()


def test_read_token_guards_reads(task_dir: Path) -> None:
    with server(task_dir, read_token="reader", admin_token="admin") as base:
        for headers, status in [
            ({}, 401),
            ({"authorization": "Bearer wrong"}, 403),
            ({"authorization": "Bearer reader"}, 200),
            ({"authorization": "Bearer admin"}, 200),  # the admin token may read too
        ]:
            answer = httpx.post(f"{base}/predict", **multipart("a", IMAGES[:1]), headers=headers)
            listing = httpx.get(f"{base}/tasks", headers=headers)
            assert answer.status_code == listing.status_code == status, answer.text
        assert httpx.get(f"{base}/health").status_code == 200
        upload = httpx.post(
            f"{base}/tasks", content=b"x", headers={"authorization": "Bearer reader"}
        )
        assert upload.status_code == 403, "the read token must not allow writes"


def test_access_settings() -> None:
    assert (
        "off" in ServeConfig().access and "predictions and task list: open" in ServeConfig().access
    )
    assert "anyone" in ServeConfig(allow_unauthenticated_writes=True).writes
    assert "read token" in ServeConfig(read_token="r").access
    with pytest.raises(piggyback.ConfigError, match="not both"):
        ServeConfig(admin_token="a", allow_unauthenticated_writes=True)
    with pytest.raises(piggyback.ConfigError, match="read_token"):
        ServeConfig(read_token=" ")


# ------------------------------------------------------- the backbone at start-up
def test_no_single_file_chooses_the_backbone(tmp_path: Path) -> None:
    """Files naming another backbone, missing weights or an unknown net, whose fingerprint
    is right, neither stop a start-up nor choose its backbone; and they are served."""
    torch.manual_seed(0)
    net = create_backbone("timm:test_efficientnet")
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    model = PiggybackModel(net, MaskConfig())
    tasks = tmp_path / "tasks"
    recorded = {
        "0-renamed": {"backbone": "resnet18"},
        "0-moved": {"backbone": "timm:test_efficientnet", "weights": "/nonexistent"},
        "0-unknown": {"backbone": "no_such_net"},
        "good": {"backbone": "timm:test_efficientnet", "weights": str(weights)},
    }
    for name, metadata in recorded.items():
        model.add_task(name, 3, metadata=metadata)
        model.freeze_task(name)
        model.save_task(name, tasks / f"{name}.safetensors")
    os.utime(tasks / "good.safetensors", (0, 0))  # the older file: the others were uploads
    for flags in ({}, {"backbone": "timm:test_efficientnet", "weights": weights}):
        built, spec = build_model(tasks, **flags)
        assert built.fingerprint == model.fingerprint
        registry = TaskRegistry(built, spec, tasks)
        assert sorted(registry.names) == sorted(recorded) and registry.skipped == {}
    (tasks / "good.safetensors").unlink()  # nothing builds as recorded: the default
    built, spec = build_model(tasks)
    registry = TaskRegistry(built, spec, tasks)
    assert registry.names == [] and len(registry.skipped) == len(recorded) - 1
    assert all("backbone" in reason for reason in registry.skipped.values())


def test_no_file_config_stops_a_start_up(tmp_path: Path) -> None:
    """A re-signed file whose mask config cannot wrap the backbone (a norm layer as the
    head), or that selects layers with a regular expression that takes hours to match,
    neither stops a start-up nor is ever matched: files wrap by their layers' names."""
    net = create_backbone("timm:test_efficientnet")
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    model = PiggybackModel(net, MaskConfig())
    tasks = tmp_path / "tasks"
    recorded = {"backbone": "timm:test_efficientnet", "weights": str(weights)}
    model.add_task("good", 3, metadata=recorded)
    model.freeze_task("good")
    good = model.save_task("good", tasks / "good.safetensors")
    meta, tensors = read_task_file(good)
    norm = next(iter(model.norms))
    hostile = {**meta["config"], "head": norm, "target_modules": "(.*)*(.*)*(.*)*(.*)*X"}
    write_task_file(tasks / "a0.safetensors", {**meta, "task": "a0", "config": hostile}, tensors)
    started = time.monotonic()
    built, spec = build_model(tasks)
    assert time.monotonic() - started < 30
    assert built.head_name == model.head_name and built.fingerprint == model.fingerprint
    assert sorted(TaskRegistry(built, spec, tasks).names) == ["a0", "good"]


# ------------------------------------------------------------------ timeouts
def slow_client(url: str, sent: bytes) -> socket.socket:
    """A connection that sent `sent` and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(sent)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before it closed the connection, or None if it stayed open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    finally:
        sock.close()
    return received


HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_slow_clients_are_disconnected(task_dir: Path) -> None:
    with server(task_dir, header_timeout_s=1.0, body_timeout_s=1.0) as base:
        slow = [slow_client(base, HEAD[: 10 + i % 20]) for i in range(150)]
        start = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 0.5, "slow clients must not delay others"
        assert all(closed_within(sock, 3) == b"" for sock in slow), "a slow head is dropped"

        body = slow_client(base, HEAD + b"Content-Length: 100\r\n\r\n{")
        answer = closed_within(body, 3)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer

        with httpx.Client(base_url=base) as client:  # after a response, the next head
            assert client.get("/health").status_code == 200
            (kept,) = [sock for sock in _sockets(client)]
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            assert closed_within(kept, 3) == b""


def _sockets(client: httpx.Client) -> list[socket.socket]:
    """The sockets of `client`'s pooled connections (httpx keeps them open)."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    return [c._connection._network_stream._sock for c in pool.connections]


def test_serve_command_survives_slow_clients_at_a_low_fd_limit(tmp_path: Path) -> None:
    """150 slow clients against 128 file descriptors: /health still answers, as soon as
    the header timeout has dropped them."""
    port = free_port()
    command = [
        sys.executable, "-m", "piggyback", "serve", "--tasks", str(tmp_path), "--port",
        str(port), "--header-timeout", "1",
    ]  # fmt: skip
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # noqa: E731
    log = tmp_path / "server.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(command, stdout=out, stderr=out, preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process)
        slow = [slow_client(url, HEAD) for _ in range(150)]
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        for sock in slow:
            sock.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "task uploads and deletions: off" in log.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_health(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError("the server did not start")


# ------------------------------------------------------------ pieces, CLI
@pytest.mark.parametrize("cache_size", [0, 1, 4])
def test_batched_logits_equal_one_at_a_time(
    task_dir: Path, reference: PiggybackModel, cache_size: int
) -> None:
    """One mixed batch (two input sizes, three tasks) equals a per-image loop."""
    model = PiggybackModel(make_tiny(), MaskConfig())
    registry = TaskRegistry(model, SPEC, task_dir, cache_size=cache_size)
    x = {task: torch.randn(2, 3, spec_of(reference, task).size, 16) for task in TASKS}
    jobs = [Job(task, x[task][i : i + 1]) for i in range(2) for task in TASKS]
    jobs.append(Job("gone", x["a"]))
    for _ in range(3):  # cold, then cached
        *outcomes, gone = registry.infer(jobs)
        for job, logits in zip(jobs, outcomes, strict=False):
            reference.set_task(job.task)
            with torch.no_grad():
                torch.testing.assert_close(logits, reference(job.images), rtol=0, atol=1e-5)
        assert isinstance(gone, piggyback.UnknownTaskError)
    assert len(registry.cache.tasks) == min(cache_size, len(TASKS))


@pytest.mark.parametrize(("images_per_thread", "threads"), [(2, [1, 2]), (4, [1, 2]), (0, [2, 2])])
def test_small_task_groups_run_on_one_cpu_thread(
    task_dir: Path, images_per_thread: int, threads: list[int]
) -> None:
    """A mixed batch of one image per task runs on one thread, a batch of 8 images of one
    task on two (0: always all); torch's count is restored after."""
    model = PiggybackModel(make_tiny(), MaskConfig())
    registry = TaskRegistry(
        model, SPEC, task_dir, cache_size=0, images_per_thread=images_per_thread
    )
    seen: list[int] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        images = torch.randn(8, 3, 16, 16)
        registry.infer([Job(task, images[:1]) for task in TASKS])
        registry.infer([Job("a", images)])
        assert seen == threads and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_amp_runs_every_batch_under_autocast(task_dir: Path, reference: PiggybackModel) -> None:
    """--amp bf16: cached and masked batches run in bf16, and answer as the library does
    under the same autocast; fp16 on the CPU and unknown precisions are refused."""
    registry = TaskRegistry(PiggybackModel(make_tiny(), MaskConfig()), SPEC, task_dir,
                            cache_size=1, amp="bf16")  # fmt: skip
    x = {task: torch.randn(2, 3, spec_of(reference, task).size, 16) for task in TASKS}
    jobs = [Job(task, x[task]) for task in TASKS]
    for _ in range(2):  # the first task is baked and cached after its first batch
        for job, logits in zip(jobs, registry.infer(jobs), strict=True):
            reference.set_task(job.task)
            with torch.no_grad():
                plain = reference(job.images)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    low = reference(job.images).float()
            assert logits.dtype == torch.float32 and not torch.equal(logits, plain)
            torch.testing.assert_close(logits, low, rtol=0.05, atol=0.05)
    with pytest.raises(piggyback.ConfigError, match="needs CUDA"):
        TaskRegistry(PiggybackModel(make_tiny(), MaskConfig()), SPEC, task_dir, amp="fp16")
    with pytest.raises(piggyback.ConfigError, match="amp='fp8'"):
        ServeConfig(amp="fp8")  # type: ignore[arg-type]


def test_batcher_fills_batches_and_isolates_errors() -> None:
    sizes: list[int] = []

    def run(jobs: list[Job]) -> list[torch.Tensor | Exception]:
        sizes.append(sum(job.rows for job in jobs))
        if any(job.task == "crash" for job in jobs):
            raise RuntimeError("a bug")
        return [ValueError("bad") if j.task == "bad" else j.images * 2 for j in jobs]

    async def scenario() -> list[Any]:
        batcher = Batcher(run, window_s=0.05, max_batch=4)
        batcher.start()
        submit = [batcher.submit(Job(str(i), torch.full((1,), float(i)))) for i in range(10)]
        first = await asyncio.gather(*submit)
        second = await asyncio.gather(
            batcher.submit(Job("bad", torch.ones(1))),
            batcher.submit(Job("ok", torch.ones(2))),
            return_exceptions=True,
        )
        crashed = await asyncio.gather(
            batcher.submit(Job("crash", torch.ones(1))), return_exceptions=True
        )
        after = await batcher.submit(Job("ok", torch.ones(1)))
        await batcher.stop()
        return [first, second, crashed, after]

    first, second, crashed, after = asyncio.run(scenario())
    assert [float(t) for t in first] == [2.0 * i for i in range(10)]
    assert sizes[:3] == [4, 4, 2], "full batches go at once, the rest when the window closes"
    assert isinstance(second[0], ValueError) and torch.equal(second[1], torch.full((2,), 2.0))
    assert isinstance(crashed[0], RuntimeError) and torch.equal(after, torch.full((1,), 2.0))


def test_two_files_of_one_task_serve_the_first(own_dir: Path) -> None:
    shutil.copy(own_dir / "a.safetensors", own_dir / "a-copy.safetensors")
    registry = TaskRegistry(PiggybackModel(make_tiny(), MaskConfig()), SPEC, own_dir)
    assert registry.entry("a").path.name == "a-copy.safetensors"
    assert list(registry.skipped) == ["a.safetensors"]
    assert "already served, from a-copy.safetensors" in registry.skipped["a.safetensors"]


def test_baked_cache_admits_by_frequency() -> None:
    baked: list[str] = []
    cache = BakedCache(2, bake=lambda task: baked.append(task) or torch.nn.Identity())
    for task in ["a", "a", "b", "b", "c"]:
        cache.get(task)
    assert cache.tasks == ["a", "b"], "a one-off task must not evict hot ones"
    assert cache.get("c") is None and cache.get("c") is None, "nor one as hot as they are"
    assert cache.get("c") is not None, "a task twice as hot as the LRU one takes its slot"
    assert cache.tasks == ["b", "c"] and baked == ["a", "b", "c"]
    cache.discard("c")
    assert cache.tasks == ["b"]
    assert BakedCache(0, bake=lambda task: torch.nn.Identity()).get("a") is None


def test_serve_command_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--tasks", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--tasks", str(tmp_path), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
    assert main(["serve", "--tasks", str(tmp_path), "--device", "tpu"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    assert main(["serve", "--tasks", str(tmp_path), "--device", "cpu", "--amp", "fp16"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert main(["serve", "--tasks", str(tmp_path), "--header-timeout", "0"]) == 2
    assert "header_timeout_s" in capsys.readouterr().err
    both = ["--admin-token", "t", "--allow-unauthenticated-writes"]
    assert main(["serve", "--tasks", str(tmp_path), *both]) == 2
    assert "not both" in capsys.readouterr().err


def run_quick(script: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Run a bench script with --quick; its JSON results and what it printed."""
    out = tmp_path / f"{script}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_quick(tmp_path: Path) -> None:
    payload, printed = run_quick("serve", tmp_path)
    rows = payload["rows"]
    assert [row["tasks"] for row in rows] == [1, 20]
    assert all(row["errors"] == 0 and row["req_per_s"] > 0 for row in rows)
    assert "| tasks |" in printed


def test_hostile_bench_quick(tmp_path: Path) -> None:
    """Each bad upload refused (or, on the right backbone, served), load without a 5xx,
    and three clean restarts on the same folder."""
    payload, printed = run_quick("serve_hostile", tmp_path)
    assert payload["passed"] and "PASS" in printed
    assert {row["status"] for row in payload["uploads"]} == {400, 201}
    assert payload["load"]["unexpected"] == {}
    assert all(row["ok"] for row in payload["restarts"])


def test_a_mixed_batch_queues_every_group_before_reading_any_back(task_dir: Path) -> None:
    """On a GPU each read of a result holds the host until the device is idle: the
    registry runs every group of a batch (a cached task's baked model, the masked model
    for the rest) before it reads their logits back."""
    model = PiggybackModel(make_tiny(), MaskConfig())
    registry = TaskRegistry(model, SPEC, task_dir, cache_size=1)
    jobs = [Job(task, torch.randn(1, 3, 16, 16)) for task in TASKS for _ in range(2)]
    for _ in range(3):
        registry.infer(jobs)  # until a task is cached
    modules = [model, *(registry.cache.get(task) for task in registry.cache.tasks)]
    with host_waits() as seen:
        hooks = [m.register_forward_hook(lambda *_: seen.append(("forward", ""))) for m in modules]
        try:
            registry.infer(jobs)
        finally:
            for hook in hooks:
                hook.remove()
    kinds = [what for what, _ in seen]
    assert kinds == ["forward", "forward", "cpu", "cpu"]
