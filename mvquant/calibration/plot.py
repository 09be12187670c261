"""Figure-2 style heatmaps: M[head, dim] / head mean for Q, K and V of chosen layers."""
from __future__ import annotations

import io

from .report import CalibrationReport


def default_layers(num_layers: int) -> list[int]:
    return sorted({0, 1, num_layers // 2, num_layers - 1} & set(range(num_layers)))


def plot_report(report: CalibrationReport, layers: list[int] | None = None) -> bytes:
    """Return PNG bytes: one row per layer, columns Q/K/V, each a head x dim image of M / mean_d M.

    The colour scale is shared across a row so Q/K/V compare directly; dims above lambda are outlined
    by the colour bar's mark at lambda.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layers if layers is not None else default_layers(report.meta["num_layers"])
    lam = report.meta.get("lambda") or 5.0
    fig, axes = plt.subplots(len(layers), 3, figsize=(13, 2.4 * len(layers) + 1.0), squeeze=False,
                             layout="constrained")
    for row, layer in enumerate(layers):
        ratios = {k: report.norm(layer, k) / report.norm(layer, k).mean(dim=-1, keepdim=True) for k in "qkv"}
        vmax = max(float(r.max()) for r in ratios.values())
        for col, kind in enumerate("qkv"):
            ax = axes[row][col]
            im = ax.imshow(ratios[kind].numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                           interpolation="nearest")
            n = report.layers[layer][kind]["count"]
            ax.set_title(f"layer {layer} {kind.upper()}: {n} massive dims", fontsize=9)
            ax.set_ylabel("head", fontsize=8)
            heads = ratios[kind].shape[0]
            ax.set_yticks(range(0, heads, max(1, heads // 8)))
            if row == len(layers) - 1:
                ax.set_xlabel("dim (RoPE pair i and i+R/2 share a frequency)", fontsize=8)
            ax.tick_params(labelsize=7)
        cbar = fig.colorbar(im, ax=list(axes[row]), fraction=0.02, pad=0.01, label="x head mean")
        cbar.ax.axhline(lam, color="cyan", linewidth=1)
        cbar.ax.tick_params(labelsize=7)
    rope = report.rope
    sub = (f"RoPE rotary_dim {rope['rotary_dim']}, theta {rope['theta']:g}, pairing {rope['pairing']}"
           if rope else report.meta.get("note", ""))
    fig.suptitle(f"{report.model}: ||X[:, h, d]||_2 / mean_d (cyan: lambda = {lam:g})\n{sub}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
