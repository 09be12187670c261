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
    lines.append("")
    lines.append("layer | massive dims Q  K  V | low-freq Q    K   | max ratio Q    K     V    | top Q dims (head:dim@pair ratio)")
    for layer in report.layers:
        q, k, v = layer["q"], layer["k"], layer["v"]
        top = ", ".join(f"{t['head']}:{t['dim']}@{t['pair']} {t['ratio']:.1f}x" for t in q["top"][:3])
        lines.append(f"{layer['index']:5d} | {q['count']:14d} {k['count']:2d} {v['count']:2d} | "
                     f"{_pct(q['low_frequency_share'])} {_pct(k['low_frequency_share'])} | "
                     f"{q['max_ratio']:6.1f} {k['max_ratio']:6.1f} {v['max_ratio']:6.1f} | {top}")
    s = report.summary()
    lines.append("")
    for kind in "qkv":
        lines.append(f"{kind.upper()}: massive dims in {s[kind]['layers_with_massive']}/{m['num_layers']} layers "
                     f"({s[kind]['total_massive_dims']} dims), low-frequency share {_pct(s[kind]['low_frequency_share'])}")
    return "\n".join(lines)
