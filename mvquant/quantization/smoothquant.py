"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with a per-channel
scale s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), then quantize both: weights int8 symmetric
per output row, activations int8 per token at run time (QuantLinear with act_bits=8). The
division by s happens inside the linear (not folded into the previous norm), so it applies to
every linear."""
from __future__ import annotations

import torch


def smooth_scales(x_abs_max: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = w.detach().float().abs().amax(0).clamp(min=1e-5)
    a_max = x_abs_max.float().clamp(min=1e-5)
    # rounded to fp16, the dtype QuantLinear stores it in
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-4, max=6e4).half().float()
