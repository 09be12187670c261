"""The printed summary of a calibration report: one line per layer, then the model-level verdict."""
from __future__ import annotations

from .report import CalibrationReport


def _pct(x) -> str:
    return "  -  " if x is None else f"{100 * x:4.0f}%"


def format_summary(report: CalibrationReport) -> str:
    m = report.meta
    rope = report.rope
    lines = [f"model {m['model']} ({m['model_type']}): {m['num_layers']} layers, {m['num_heads']} Q heads, "
             f"{m['num_kv_heads']} KV heads, head_dim {m['head_dim']}"]
    if rope:
        lines.append(f"RoPE: rotary_dim {rope['rotary_dim']}, theta {rope['theta']:g}, pairing {rope['pairing']} "
                     f"(pair i has frequency theta^(-2i/{rope['rotary_dim']}); i >= {rope['rotary_dim'] // 4} is the low-frequency half)")
    else:
        lines.append(f"{m['note']}")
    cal = m.get("calibration") or {}
    if cal:
        lines.append(f"calibration: {cal.get('samples')} x {cal.get('seq_len')} tokens from {cal.get('source')} "
                     f"({cal.get('tokens')} tokens, {cal.get('seconds')} s); selection: {m['selection']}")
    per_layer_theta = rope and len(set(rope.get("theta_per_layer") or [])) > 1
    prenorm = all("q_prenorm" in layer and "k_prenorm" in layer for layer in report.layers)
    if per_layer_theta:
        lines.append("RoPE base per layer: " + ", ".join(
            f"{t:g} ({n} layers)" for t, n in sorted(_counts(rope["theta_per_layer"]).items())))
    if prenorm:
        lines.append("QK-norm: Q/K counted as attention reads them (after q_norm/k_norm, before RoPE); "
                     "'pre' = as W_q/W_k emit them, before the norm")
    lines.append("")
    lines.append("layer " + ("  base  " if per_layer_theta else "") + "| massive dims Q  K  V "
                 + ("| pre Q  K " if prenorm else "") + "| low-freq Q    K   | max ratio Q    K     V    "
                 + "| top Q dims (head:dim@pair ratio)")
    for layer in report.layers:
        q, k, v = layer["q"], layer["k"], layer["v"]
        top = ", ".join(f"{t['head']}:{t['dim']}@{t['pair']} {t['ratio']:.1f}x" for t in q["top"][:3])
        base = f" {layer.get('rope_theta') or 0:6.0e} " if per_layer_theta else ""
        pre = f"| {layer['q_prenorm']['count']:5d} {layer['k_prenorm']['count']:2d} " if prenorm else ""
        lines.append(f"{layer['index']:5d}{base} | {q['count']:14d} {k['count']:2d} {v['count']:2d} {pre}| "
                     f"{_pct(q['low_frequency_share'])} {_pct(k['low_frequency_share'])} | "
                     f"{q['max_ratio']:6.1f} {k['max_ratio']:6.1f} {v['max_ratio']:6.1f} | {top}")
    s = report.summary()
    lines.append("")
    for kind in [k for k in ("q", "k", "v", "q_prenorm", "k_prenorm") if k in s]:
        label = kind.upper() if len(kind) == 1 else f"{kind[0].upper()} before its norm"
        lines.append(f"{label}: massive dims in {s[kind]['layers_with_massive']}/{m['num_layers']} layers "
                     f"({s[kind]['total_massive_dims']} dims), low-frequency share {_pct(s[kind]['low_frequency_share'])}")
        for t, sub in (s[kind].get("by_attention_type") or {}).items():
            lines.append(f"   {t} (base {', '.join(f'{x:g}' for x in sub['rope_theta'])}): "
                         f"{sub['layers_with_massive']} layers, {sub['total_massive_dims']} dims, "
                         f"low-frequency share {_pct(sub['low_frequency_share'])}")
    if prenorm:
        for kind in ("q", "k"):
            same = sum(layer[f"{kind}_prenorm"]["top1_same_pair_as_normed"] for layer in report.layers)
            heads = m["num_heads"] if kind == "q" else m["num_kv_heads"]
            lines.append(f"{kind.upper()} largest pair the same before and after the norm: {same}/{heads * m['num_layers']} "
                         "(layer, head)s")
    return "\n".join(lines)


def _counts(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out
