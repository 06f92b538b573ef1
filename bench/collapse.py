"""Step by step through the first epoch of mask training: why a recipe collapses.

Logs, every `--every` steps: the training loss, how many weights have crossed the
threshold (in all and in the two layers that lose most), how far the scores moved (mean
move per step as a multiple of the lr, and the largest move against the init-threshold
gap), the norm of the new head's gradient, and how far the activations after the norm
layers drifted from where they started, on a fixed probe batch.

    python bench/collapse.py --recipe paper --lr 3e-4 --out bench/results/collapse-paper.json
    python bench/collapse.py --recipe default --out bench/results/collapse-default.json

With per-task norms (the default recipe) the drift is measured as evaluation would see
it: after re-estimating the norms' statistics under the mask of that step.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import markdown_table, write_results

from piggyback import MaskConfig, PiggybackModel
from piggyback.backbones import DEFAULT_BACKBONE, create_backbone, input_spec
from piggyback.data import load_task_data, make_loader
from piggyback.layers import TaskNorm
from piggyback.norms import ImagePass, recalibrate_norms, start_norms_as_backbone
from piggyback.recipes import RECIPES
from piggyback.train import TrainConfig, setup_training


def norm_outputs(model: PiggybackModel, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every norm layer's output (timm's BatchNormAct: after the activation) on `images`."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        norm.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        for name, norm in model.norms.items()
        if isinstance(norm, TaskNorm)
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def drift(before: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far the activations moved from those of the task's first step (all-ones mask),
    relative to their size: mean and max over the norm layers, and at the last one."""
    rel = [float((now[k] - before[k]).norm() / before[k].norm().clamp_min(1e-12)) for k in before]
    last = list(before)[-1]
    return {
        "drift_mean": sum(rel) / len(rel),
        "drift_max": max(rel),
        "drift_last": rel[-1],
        "last_zero": float((now[last] == 0).float().mean()),
        "last_std": float(now[last].std()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="animals")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=1000, help="training images")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many (0: epoch)")
    parser.add_argument("--recipe", default="default", choices=list(RECIPES))
    parser.add_argument("--lr", type=float, help="scores lr (default: the recipe's)")
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/collapse.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    recipe = RECIPES[args.recipe]
    mask = MaskConfig(train_bn=recipe.train_bn)
    model = PiggybackModel(create_backbone(DEFAULT_BACKBONE), mask)
    data = load_task_data(args.task, input_spec(model.backbone, args.size), seed=args.seed,
                          limit=args.limit)  # fmt: skip
    lr = args.lr if args.lr is not None else recipe.lr
    config = TrainConfig.for_recipe(args.recipe, lr=lr, seed=args.seed, progress=False)
    network, groups = setup_training(model, args.task, data, config)
    device = torch.device("cpu")
    optimizer = torch.optim.Adam(groups)
    probe = next(iter(make_loader(data.val, 32, shuffle=False)))[0]
    # as `fit` does; then re-estimated at every logged step, on as many images as fit's
    norm_images = config.recalibrate_images
    first_pass = ImagePass(norm_images, 32, args.seed)
    start_norms_as_backbone(model, args.task, data.train, device, first_pass)
    network.eval()
    model.set_task(args.task)
    before = norm_outputs(model, probe)  # the task's network before any weight is dropped
    scores = {name: layer.scores[args.task] for name, layer in model.masked_layers.items()}
    start = {name: s.detach().clone() for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    gap = mask.init_scale - mask.threshold
    rows: list[dict[str, Any]] = []
    loader = make_loader(data.train, 32, shuffle=True, seed=args.seed)
    for step, (images, labels) in enumerate(loader, 1):
        network.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(network(images), labels)
        loss.backward()
        head_grad = sum(float(p.grad.norm() ** 2) for p in groups[-1]["params"]) ** 0.5
        optimizer.step()
        if step % args.every and step != 1:
            continue
        dropped = {n: int((s <= mask.threshold).sum()) for n, s in scores.items()}
        moved = torch.cat([(s.detach() - start[n]).abs().flatten() for n, s in scores.items()])
        worst = sorted(dropped, key=lambda n: dropped[n] / scores[n].numel(), reverse=True)[:2]
        recalibrate_norms(model, args.task, data.train, device, ImagePass(norm_images, 32, step))
        network.eval()
        row = {
            "step": step,
            "loss": float(loss.detach()),
            "dropped": sum(dropped.values()) / total,
            "step_mean": float(moved.mean()) / step,  # per-step move, as a multiple of lr below
            "moved_max_over_gap": float(moved.max()) / gap,
            "head_grad": head_grad,
            "worst_layers": ", ".join(f"{n} {dropped[n] / scores[n].numel():.0%}" for n in worst),
            **drift(before, norm_outputs(model, probe)),
        }
        row["step_mean"] /= lr
        rows.append(row)
        print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
        if args.steps and step >= args.steps:
            break
        if not math.isfinite(row["loss"]):
            break
    network.eval()
    with torch.no_grad():
        hits = [
            (network(x).argmax(1) == y).float() for x, y in make_loader(data.val, 64, shuffle=False)
        ]
    val_top1 = float(torch.cat(hits).mean())
    print(f"\nval top-1 after {rows[-1]['step']} steps: {100 * val_top1:.1f}")
    payload = {
        "settings": {**vars(args), "lr": lr, "gap": gap},
        "steps": rows,
        "val_top1": val_top1,
    }
    print(f"wrote {write_results(Path(args.out), payload)}")


if __name__ == "__main__":
    main()
