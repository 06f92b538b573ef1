"""What `eval`, `predict`, `inspect`, `export` and `demo` do with their parsed flags
(`piggyback.cli` defines the flags). Heavy imports wait inside each verb, so that
`--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .trainrun import show_progress


def eval_command(args: argparse.Namespace) -> int:
    from .data import load_task_data, make_loader, source_path
    from .loop import evaluate
    from .modelfile import open_model_file
    from .train import resolve_device

    _check_positive(batch_size=args.batch_size)
    opened = open_model_file(
        args.task_file, backbone=args.backbone, weights=args.weights, size=args.size
    )
    info, source = opened.info, opened.info.metadata
    data_name = args.data or source.get("data")
    if not data_name:
        raise ConfigError(f"{args.task_file} records no dataset; pass --data")
    local = source_path(data_name)[1]
    if not args.data and local is not None and not local.exists():
        raise ConfigError(
            f"{args.task_file} was trained on {data_name!r}, which is not found here: pass "
            "--data with where that data is now"
        )
    data = load_task_data(
        data_name, info.spec, seed=source.get("seed", 0), limit=source.get("limit"),
        val_fraction=source.get("val_fraction", 0.1),
        test_fraction=source.get("test_fraction", 0.1),
    )  # fmt: skip
    if data.num_classes != info.num_classes:
        raise ConfigError(
            f"task {info.task!r} has {info.num_classes} classes but {data_name!r} has "
            f"{data.num_classes}: evaluate it on the dataset it was trained for"
        )
    device = resolve_device(args.device)
    opened.network.to(device)
    loader = make_loader(getattr(data, args.split), args.batch_size, shuffle=False)
    metrics = evaluate(opened.network, loader, device, info.num_classes, progress=False)
    if args.json:
        print(json.dumps({"task": info.task, "split": args.split, **metrics}, indent=2))
        return 0
    print(f"{opened.kind} {info.task} on {data_name} [{args.split}, {metrics['samples']} images]")
    top5 = f"   top-5 {metrics['top5']:.4f}" if info.num_classes > 5 else ""
    print(f"top-1 {metrics['top1']:.4f}{top5}   loss {metrics['loss']:.4f}")
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    for name, accuracy in zip(names, metrics["per_class"], strict=True):
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        print(f"  {name:<24} {shown}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from .images import readable_images, unreadable
    from .pipeline import read_image
    from .train import resolve_device

    _check_positive(topk=args.topk, batch_size=args.batch_size)
    given = [args.task_file, *args.images] if args.tasks else args.images
    if not args.tasks and (args.task_file is None or not args.images):
        raise ConfigError("pass a MODEL_FILE and images, or --tasks PATH and images")
    paths = _image_paths([path for path in given if path is not None])
    good, bad = readable_images(paths, strict=args.strict)
    if not good:
        more = f" (and {len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        raise DataError(f"no readable image: {bad[0]}{more}")
    for problem in bad:
        warnings.warn(f"skipped: {problem}", stacklevel=1)
    device = resolve_device(args.device)
    predictor = _task_inference(args, device) if args.tasks else _file_predictor(args, device)
    rows = []
    for start in range(0, len(good), args.batch_size):
        images, shown = [], []
        for path in (paths[i] for i in good[start : start + args.batch_size]):
            try:
                images.append(read_image(path))
            except DataError as exc:  # passed the header check, failed to decode
                if args.strict:
                    raise unreadable(exc) from exc
                warnings.warn(f"skipped: {exc}", stacklevel=1)
                continue
            shown.append(path)
        for path, result in zip(shown, predictor(images) if images else [], strict=True):
            rows.append({"image": str(path), **result})
            if not args.json:
                print(f"{path}: {_prediction_text(result)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _file_predictor(args: argparse.Namespace, device: Any) -> Any:
    """A predictor that ranks each image's classes with the model file given."""
    from .modelfile import open_model_file

    opened = open_model_file(
        args.task_file, backbone=args.backbone, weights=args.weights, size=args.size
    )
    opened.network.to(device)

    def predict(images: list[Any]) -> list[dict[str, Any]]:
        return [result.to_dict() for result in opened.predict(images, args.topk)]

    return predict


def _task_inference(args: argparse.Namespace, device: Any) -> Any:
    """A predictor that infers each image's task among `--tasks`, then ranks its classes."""
    from .pipeline import open_tasks, preprocess, rank

    model, spec, skipped = open_tasks(
        args.tasks, backbone=args.backbone, weights=args.weights, size=args.size
    )
    for line in skipped:
        warnings.warn(line, stacklevel=1)
    model.to(device)

    def predict(images: list[Any]) -> list[dict[str, Any]]:
        batch = preprocess(images, spec, device)
        found = model.infer_task(batch, rule=args.rule, threshold=args.threshold)
        results = []
        for i, task in enumerate(found.tasks):
            result: dict[str, Any] = {"task": task, "score": round(float(found.scores[i]), 6)}
            if task is not None:
                names = model.task_info[task].class_names
                result.update(rank(found.logits[task][i], names, args.topk).to_dict())
            else:
                best = found.candidates[int(found.candidate_scores[i].argmax())]
                result["closest_task"] = best
            results.append(result)
        return results

    return predict


def _prediction_text(result: dict[str, Any]) -> str:
    """One image's line: its task (when inferred) and its ranked classes."""
    if "task" in result and result["task"] is None:
        return f"no known task (closest {result['closest_task']}, score {result['score']:.3f})"
    ranked = zip(result["labels"], result["probabilities"], strict=True)
    classes = ", ".join(f"{label} {p:.3f}" for label, p in ranked)
    return (
        f"{result['task']} (score {result['score']:.3f}): {classes}"
        if "task" in result
        else classes
    )


def _check_positive(**flags: int) -> None:
    for name, value in flags.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _image_paths(given: list[Path]) -> list[Path]:
    """Image files as given, and the images under given folders (sorted)."""
    from .data import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for path in given:
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)
    if not paths:
        raise ConfigError(f"no images found in {[str(p) for p in given]}")
    return paths


def inspect_command(args: argparse.Namespace) -> int:
    from .modelfile import file_format
    from .report import describe_baked_file, describe_task_file, plot_layer_kept
    from .store import FORMAT

    if file_format(args.task_file) != FORMAT:
        report = describe_baked_file(args.task_file)
        if args.plot:
            raise ConfigError(
                f"--plot draws a task file's masks; {args.task_file} is a {report['kind']}, "
                "which has none"
            )
        print(json.dumps(report, indent=2) if args.json else _baked_text(report))
        return 0
    report = describe_task_file(args.task_file)
    if args.plot:
        plot_layer_kept(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mask = report["mask"]
    backbone = report["backbone"]
    print(f"task {report['task']}: {report['num_classes']} classes, ", end="")
    print(f"file {report['file_bytes']:,} bytes")
    print(f"backbone {backbone['class']} fingerprint {backbone['fingerprint'][:16]}")
    print(_input_text(report["metadata"].get("input_spec"), report["metadata"].get("size")))
    print(
        f"mask: {mask['kind']}, {mask['numel']:,} weights, kept {mask['kept']:.4f}, "
        f"{mask['bits_per_weight']:.4f} bits/weight stored ({mask['codec']}), "
        f"entropy floor {mask['entropy_bits_per_weight']:.4f}"
    )
    for layer in report["layers"]:
        print(f"  {layer['name']:<48} {layer['numel']:>10,}  kept {layer['kept']:.4f}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _baked_text(report: dict[str, Any]) -> str:
    source = report["metadata"]
    trained = f"trained on {source['data']}" if source.get("data") else "training not recorded"
    method = f" ({source['method']})" if source.get("method") else ""
    return "\n".join(
        [
            f"{report['kind']} {report['task']}: {report['num_classes']} classes, "
            f"file {report['file_bytes']:,} bytes",
            f"backbone {report['backbone']}, {report['parameters']:,} parameters",
            _input_text(report["input_spec"], None),
            f"{trained}{method}",
        ]
    )


def _input_text(spec: dict[str, Any] | None, size: int | None) -> str:
    """How images are prepared for the model, as its file records it."""
    if spec is None:
        return f"input: {size} px, the backbone's normalisation" if size else "input: not recorded"
    return (
        f"input: {spec['size']} px, {spec['interpolation']} resize, crop_pct "
        f"{spec['crop_pct']}, mean {spec['mean']}, std {spec['std']} (shorter side resized "
        "to size / crop_pct, then the centre cropped square)"
    )


def export_command(args: argparse.Namespace) -> int:
    from .export import export_task

    written = export_task(
        args.task_file, args.out, onnx_path=args.onnx, backbone=args.backbone,
        weights=args.weights, size=args.size,
    )  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0


def backbones_command(args: argparse.Namespace) -> int:
    from .backbones import list_backbones

    for name in list_backbones():
        if not args.pattern or args.pattern.lower() in name.lower():
            print(name)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        full=args.full,
        quick=args.quick,
        tasks=args.tasks,
        progress=show_progress(args.progress),
    )
    return 0
