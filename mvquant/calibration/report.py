"""The calibration report: JSON (the keys in DESIGN.md plus statistics) and the raw M norms as
safetensors beside it. `CalibrationReport` is what quantize, eval and compare read."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MvquantError
from ..io import atomic_write_bytes, atomic_write_json, deterministic_safetensors
from . import stats as S

FORMAT = "mvquant.calibration/1"
NO_ROPE_NOTE = "no RoPE: no concentrated massive values expected"


def stats_path_for(json_path: str | os.PathLike) -> Path:
    p = Path(json_path)
    return p.with_name(p.stem + ".stats.safetensors")


@dataclass
class CalibrationReport:
    meta: dict                                   # everything in the JSON except `layers`
    layers: list[dict]                           # per layer: {"index", "q": {...}, "k": {...}, "v": {...}}
    norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)  # (layer, kind) -> M [h, d]

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_norms(cls, norms: dict[tuple[int, str], torch.Tensor], layout, *, model: str, lam: float = 5.0,
                   top_k: int | None = None, calibration: dict | None = None) -> "CalibrationReport":
        rope = layout.rope_info()
        rd, pairing = (rope["rotary_dim"], rope["pairing"]) if rope else (None, None)
        layers = []
        for i in range(layout.num_layers):
            entry = {"index": i}
            for kind in ("q", "k", "v"):
                m = norms[(i, kind)]
                sel = S.massive_by_topk(m, top_k) if top_k else S.massive_by_lambda(m, lam)
                ratio = S.concentration(m)
                mean = m.mean(dim=-1, keepdim=True)
                flat = (m / mean).flatten()
                top = torch.topk(flat, min(5, flat.numel()))
                entry[kind] = {
                    "massive": sel,
                    "massive_pairs": S.close_pairs(sel, rd, pairing),
                    "count": sum(len(s) for s in sel),
                    "heads_with_massive": sum(bool(s) for s in sel),
                    "low_frequency_share": S.low_frequency_share(sel, rd, pairing),
                    "max_ratio": round(float(ratio.max()), 3),
                    "top": [{"head": int(j) // m.shape[1], "dim": int(j) % m.shape[1],
                             "pair": S.pair_index(int(j) % m.shape[1], rd, pairing),
                             "ratio": round(float(r), 3)} for r, j in zip(top.values, top.indices)],
                }
            layers.append(entry)
        meta = {
            "format": FORMAT, "model": model, "model_type": layout.model_type,
            "lambda": lam, "top_k": top_k, "selection": f"top-{top_k} per head" if top_k else f"M > {lam} x head mean",
            "num_layers": layout.num_layers, "num_heads": layout.num_heads,
            "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "rope": rope, "note": None if rope else NO_ROPE_NOTE,
            "calibration": calibration or {},
        }
        report = cls(meta=meta, layers=layers, norms=dict(norms))
        report.meta["summary"] = report.summary()
        return report

    # -- reading --------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def rope(self) -> dict | None:
        return self.meta.get("rope")

    def massive(self, layer: int, kind: str, *, closed: bool = True) -> list[list[int]]:
        """Per head, the massive dims of (layer, kind); with `closed`, RoPE partners included."""
        return self.layers[layer][kind]["massive_pairs" if closed else "massive"]

    def norm(self, layer: int, kind: str) -> torch.Tensor:
        if (layer, kind) not in self.norms:
            raise MvquantError("this report has no raw statistics (its .stats.safetensors file is missing): "
                               "re-run mvquant calibrate")
        return self.norms[(layer, kind)]

    def check_matches(self, layout) -> None:
        """Refuse a report from another model: layers, heads and head_dim must agree."""
        want = {"model_type": layout.model_type, "num_layers": layout.num_layers, "num_heads": layout.num_heads,
                "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim}
        got = {k: self.meta.get(k) for k in want}
        if got != want:
            diff = ", ".join(f"{k} {got[k]} vs model {want[k]}" for k in want if got[k] != want[k])
            raise MvquantError(f"calibration report for '{self.model}' does not match this model ({diff}): "
                               "calibrate this model first (mvquant calibrate MODEL --output REPORT.json)")

    def summary(self) -> dict:
        """Model-level facts: share of layers with massive Q/K/V and of massive dims at low frequency."""
        out = {}
        rope = self.rope
        for kind in ("q", "k", "v"):
            counts = [layer[kind]["count"] for layer in self.layers]
            sel = [layer[kind]["massive"] for layer in self.layers]
            out[kind] = {
                "layers_with_massive": sum(c > 0 for c in counts),
                "share_layers_with_massive": sum(c > 0 for c in counts) / max(1, len(counts)),
                "total_massive_dims": sum(counts),
                "low_frequency_share": (S.low_frequency_share([d for s in sel for d in s], rope["rotary_dim"],
                                                              rope["pairing"]) if rope else None),
            }
        return out

    # -- files ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {**self.meta, "layers": self.layers}

    def save(self, path: str | os.PathLike) -> None:
        """Write the stats file first and the JSON last, each atomically: a JSON never points at nothing."""
        from safetensors.torch import save

        path = Path(path)
        stats_file = stats_path_for(path)
        tensors = {f"layers.{i}.{kind}": t.float().contiguous() for (i, kind), t in sorted(self.norms.items())}
        if tensors:
            atomic_write_bytes(stats_file, deterministic_safetensors(
                save(tensors, metadata={"format": FORMAT, "model": str(self.model)})))
            self.meta["stats_file"] = stats_file.name
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationReport":
        path = Path(path)
        if not path.is_file():
            raise MvquantError(f"calibration report '{path}' not found: run mvquant calibrate --output {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MvquantError(f"'{path}' is not a calibration report (invalid JSON: {e}): "
                               "give the file written by mvquant calibrate") from None
        missing = [k for k in ("model", "num_layers", "layers") if k not in data]
        if missing:
            raise MvquantError(f"'{path}' is not a calibration report (missing {', '.join(missing)}): "
                               "give the file written by mvquant calibrate")
        layers = data.pop("layers")
        norms = {}
        stats_file = path.with_name(data["stats_file"]) if data.get("stats_file") else None
        if stats_file is not None and stats_file.is_file():
            from safetensors.torch import load_file
            for key, t in load_file(str(stats_file)).items():
                _, i, kind = key.split(".")
                norms[(int(i), kind)] = t
        return cls(meta=data, layers=layers, norms=norms)


def load_report(path) -> CalibrationReport:
    return CalibrationReport.load(path)
