"""Figure-2 style heatmaps: M[head, dim] / head mean for Q, K and V of chosen layers (and, in QK-norm
models, Q/K before their norm)."""
from __future__ import annotations

import io

from .report import CalibrationReport

_LABELS = {"q_prenorm": "Q before q_norm", "q": "Q", "k_prenorm": "K before k_norm", "k": "K", "v": "V"}


def default_layers(num_layers: int, thetas: list | None = None) -> list[int]:
    """First, second, middle, last; with per-layer RoPE bases (Gemma's local/global layers), also the
    first layer of each other base."""
    layers = {0, 1, num_layers // 2, num_layers - 1}
    for theta in sorted(set(thetas or []) - {(thetas or [None])[0]}):
        layers.add(thetas.index(theta))
    return sorted(layers & set(range(num_layers)))


def plot_kinds(report: CalibrationReport) -> list[str]:
    """Q, K, V; with pre-norm statistics (QK-norm models) each Q/K is preceded by its pre-norm twin."""
    pre = all(("q_prenorm" in layer and "k_prenorm" in layer) for layer in report.layers) and \
        all((i, k) in report.norms for i in range(len(report.layers)) for k in ("q_prenorm", "k_prenorm"))
    return ["q_prenorm", "q", "k_prenorm", "k", "v"] if pre else ["q", "k", "v"]


def plot_report(report: CalibrationReport, layers: list[int] | None = None) -> bytes:
    """Return PNG bytes: one row per layer, one column per kind, each a head x dim image of M / mean_d M.

    The colour scale is shared across a row so the kinds compare directly. At head_dim 256 a massive
    dim is one pixel wide, so each selected dim is also marked (cyan) on its head's row, the RoPE
    half boundary (pair i and i + R/2) is a dashed line, and each title names the layer's RoPE base.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layers if layers is not None else default_layers(report.meta["num_layers"],
                                                              (report.rope or {}).get("theta_per_layer"))
    kinds = plot_kinds(report)
    lam = report.meta.get("lambda") or 5.0
    rope = report.rope
    fig, axes = plt.subplots(len(layers), len(kinds), figsize=(4.3 * len(kinds), 2.4 * len(layers) + 1.0),
                             squeeze=False, layout="constrained")
    for row, layer in enumerate(layers):
        ratios = {k: report.norm(layer, k) / report.norm(layer, k).mean(dim=-1, keepdim=True) for k in kinds}
        vmax = max(float(r.max()) for r in ratios.values())
        entry = report.layers[layer]
        base = f", base {entry['rope_theta']:g}" if entry.get("rope_theta") else ""
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            heads, dims = ratios[kind].shape
            im = ax.imshow(ratios[kind].numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                           interpolation="nearest")
            marks = [(d, h) for h, ds in enumerate(entry[kind]["massive"]) for d in ds]
            if marks:
                ax.scatter([d for d, _ in marks], [h for _, h in marks], marker="v", s=14, c="cyan",
                           linewidths=0)
            if rope and rope.get("rotary_dim"):
                ax.axvline(rope["rotary_dim"] / 2 - 0.5, color="white", linestyle="--", linewidth=0.6)
            ax.set_title(f"layer {layer} {_LABELS[kind]}{base}: {entry[kind]['count']} massive, "
                         f"max {entry[kind]['max_ratio']:.0f}x", fontsize=8)
            ax.set_ylabel("head", fontsize=8)
            ax.set_yticks(range(0, heads, max(1, heads // 8)))
            ax.set_xticks(range(0, dims, max(8, dims // 8)))
            if row == len(layers) - 1:
                ax.set_xlabel("dim (dashed: pair i | i + R/2)", fontsize=8)
            ax.tick_params(labelsize=7)
        cbar = fig.colorbar(im, ax=list(axes[row]), fraction=0.02, pad=0.01, label="x head mean")
        cbar.ax.axhline(lam, color="cyan", linewidth=1)
        cbar.ax.tick_params(labelsize=7)
    sub = (f"RoPE rotary_dim {rope['rotary_dim']}, theta {_thetas(rope)}, pairing {rope['pairing']}"
           if rope else report.meta.get("note", ""))
    fig.suptitle(f"{report.model}: ||X[:, h, d]||_2 / mean_d (cyan: > lambda = {lam:g}, the selected dims)\n{sub}",
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _thetas(rope: dict) -> str:
    per_layer = sorted(set(rope.get("theta_per_layer") or [])) or [rope["theta"]]
    return " / ".join(f"{t:g}" for t in per_layer) + (" (per layer)" if len(per_layer) > 1 else "")
