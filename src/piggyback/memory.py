"""Up-front memory estimates: a run whose training step cannot fit is refused before any
data are read, with the limit named, instead of growing until the kernel kills it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError


def activation_values(network: nn.Module, size: int) -> tuple[int, int] | None:
    """(sum, largest) of the values the modules of `network` make for one size x size
    image (each new tensor once: no-ops and in-place outputs are not new), from a forward
    pass on the meta device (no memory, no compute); None when it cannot run at that size."""
    made: dict[int, torch.Tensor] = {}  # held, so that no id is reused during the pass

    def record(_: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if isinstance(output, torch.Tensor) and not any(output is given for given in inputs):
            made[id(output)] = output

    hooks = [module.register_forward_hook(record) for module in network.modules()]
    try:
        with torch.no_grad():
            network.to("meta").eval()(torch.empty(1, 3, size, size, device="meta"))
    except Exception:  # a model fixed to another size: no estimate rather than a false refusal
        return None
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [tensor.numel() for tensor in made.values()]
    return (sum(sizes), max(sizes)) if sizes else None


def step_bytes(network: nn.Module, size: int, batch: int, *, method: str, amp: str | None) -> int:
    """A lower bound on one training step's activation memory: what backward keeps of
    every layer (piggyback, finetune), or two layers' outputs at once where no gradient
    flows through the backbone (classifier). 0 when it cannot be estimated."""
    values = activation_values(network, size)
    if values is None:
        return 0
    total, largest = values
    per_image = 2 * largest if method == "classifier" else total
    return per_image * batch * (2 if amp else 4)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device` now: CUDA's own figure, the kernel's
    MemAvailable on the CPU; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_activation_memory(
    backbone: str, size: int, batch_size: int, *, method: str, amp: str | None, device: str
) -> None:
    """Raise ConfigError when one step of `batch_size` images at `size` px (this
    process's share of the global batch) needs more memory than `device` has free."""
    from . import distributed
    from .backbones import meta_backbone
    from .train import resolve_device

    target = resolve_device(device)
    available = available_bytes(target)
    batch = max(1, batch_size // distributed.world_size())
    network = meta_backbone(backbone)
    needed = step_bytes(network, size, batch, method=method, amp=amp)
    if available is None or needed <= available:
        return
    fits = available * batch // needed
    raise ConfigError(
        f"--size {size} with --batch-size {batch_size} needs at least {needed / 1e9:,.1f} GB "
        f"of activations for one training step of {backbone}, more than the "
        f"{available / 1e9:,.1f} GB free on {target}: lower --size, or --batch-size "
        f"(at most {fits} images per step fit here)" + (" or add --amp bf16" if not amp else "")
    )
