"""Where computation runs: `--device cpu | cuda | cuda:N`, checked before any work."""
from __future__ import annotations

import torch

from ..errors import MvquantError


def compute_device(name: str | None) -> torch.device:
    """--device: cpu (default), cuda, cuda:N; refused clearly when no GPU is visible."""
    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MvquantError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MvquantError(f"--device {name}: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
                               "False; a CPU-only torch build, or no driver): drop --device or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MvquantError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible: "
                               "use cuda:0 .. cuda:N-1")
    elif device.type != "cpu":
        raise MvquantError(f"--device {name} is not supported: use cpu, cuda or cuda:N")
    return device
