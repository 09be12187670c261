"""The calibration report: JSON (the keys in DESIGN.md plus statistics) and the raw M norms as
safetensors beside it. `CalibrationReport` is what quantize, eval and compare read."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MvquantError
from ..io import atomic_write_files, deterministic_safetensors
from ..models.adapters import PRENORM_KINDS
from . import stats as S

FORMAT = "mvquant.calibration/1"
NO_ROPE_NOTE = "no RoPE: no concentrated massive values expected"


def stats_path_for(json_path: str | os.PathLike) -> Path:
    p = Path(json_path)
    return p.with_name(p.stem + ".stats.safetensors")


class _Bad(Exception):
    """(field, problem) found by the schema checks; load() turns it into one MvquantError line."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


def _int(x, field: str, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise _Bad(field, f"must be an integer >= {lo}, got {json.dumps(x)}")
    return x


def _number(x, field: str, *, positive: bool = True, optional: bool = False):
    if x is None and optional:
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or (positive and x <= 0):
        raise _Bad(field, f"must be a {'positive ' if positive else ''}number, got {json.dumps(x)}")
    return x


def check_dims_per_head(sel, field: str, heads: int | None, head_dim: int | None) -> None:
    """`sel` must be a list (one entry per head) of lists of dim indices in 0..head_dim-1."""
    if not isinstance(sel, list):
        raise _Bad(field, f"must be a list with one list of dims per head, got {_kind(sel)}")
    if heads is not None and len(sel) != heads:
        raise _Bad(field, f"has {len(sel)} heads, expected {heads}")
    for h, dims in enumerate(sel):
        if not isinstance(dims, list):
            raise _Bad(f"{field}[{h}]", f"must be a list of dim indices, got {_kind(dims)} {json.dumps(dims)}")
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (head_dim is not None and d >= head_dim):
                limit = f"0..{head_dim - 1}" if head_dim else ">= 0"
                raise _Bad(f"{field}[{h}]", f"holds {json.dumps(d)}: dims must be integers in {limit}")


def check_layers(layers, num_layers: int, heads: dict[str, int | None], head_dim: int | None) -> None:
    """Per layer: `index` and q/k/v objects whose `massive` lists match the heads and head_dim."""
    if not isinstance(layers, list):
        raise _Bad("layers", f"must be a list with one object per layer, got {_kind(layers)}")
    if len(layers) != num_layers:
        raise _Bad("layers", f"has {len(layers)} entries but num_layers is {num_layers}")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise _Bad(f"layers[{i}]", f"must be an object, got {_kind(entry)}")
        if entry.get("index") != i or isinstance(entry.get("index"), bool):
            raise _Bad(f"layers[{i}].index", f"must be {i}, got {json.dumps(entry.get('index'))}")
        for kind in ("q", "k", "v", *PRENORM_KINDS.values()):
            obj = entry.get(kind)
            if kind not in ("q", "k", "v") and obj is None:   # pre-norm Q/K: only QK-norm models have them
                continue
            if not isinstance(obj, dict):
                raise _Bad(f"layers[{i}].{kind}", f"must be an object with a 'massive' list, got {_kind(obj)}")
            for key in ("massive", "massive_pairs"):
                if key in obj or key == "massive":
                    check_dims_per_head(obj.get(key), f"layers[{i}].{kind}.{key}", heads[kind], head_dim)


def _heads(num_heads, num_kv_heads) -> dict:
    """Heads per kind: Q (before or after its norm) has the query heads, K and V the KV heads."""
    return {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads,
            PRENORM_KINDS["q"]: num_heads, PRENORM_KINDS["k"]: num_kv_heads}


def check_report_data(data) -> None:
    """The schema of a report JSON: keys, types, per-layer/per-head shapes, value ranges."""
    if not isinstance(data, dict):
        raise _Bad("the top level", f"must be an object, got {_kind(data)}")
    missing = [k for k in ("model", "num_layers", "layers") if k not in data]
    if missing:
        raise _Bad(", ".join(missing), "missing")
    num_layers = _int(data["num_layers"], "num_layers", 1)
    dims = {k: None if data.get(k) is None else _int(data[k], k, 1) for k in ("num_heads", "num_kv_heads", "head_dim")}
    if "lambda" in data:
        _number(data["lambda"], "lambda", optional=True)
    if data.get("top_k") is not None:
        _int(data["top_k"], "top_k", 1)
    rope = data.get("rope")
    if rope is not None:
        if not isinstance(rope, dict):
            raise _Bad("rope", f"must be an object (rotary_dim, pairing, theta) or null, got {_kind(rope)}")
        rd = _int(rope.get("rotary_dim"), "rope.rotary_dim", 2)
        if dims["head_dim"] is not None and rd > dims["head_dim"]:
            raise _Bad("rope.rotary_dim", f"is {rd}, more than head_dim {dims['head_dim']}")
        if rope.get("pairing") not in ("half", "interleaved"):
            raise _Bad("rope.pairing", f"must be \"half\" or \"interleaved\", got {json.dumps(rope.get('pairing'))}")
        _number(rope.get("theta"), "rope.theta", optional=True)
    if data.get("stats_file") is not None and (not isinstance(data["stats_file"], str)
                                               or Path(data["stats_file"]).name != data["stats_file"]):
        raise _Bad("stats_file", f"must be a file name beside the report, got {json.dumps(data['stats_file'])}")
    heads = _heads(dims["num_heads"], dims["num_kv_heads"])
    check_layers(data["layers"], num_layers, heads, dims["head_dim"])


def load_stats(stats_file: Path, num_layers: int, heads: dict[str, int | None],
               head_dim: int | None) -> dict[tuple[int, str], torch.Tensor]:
    """The raw M statistics: `layers.{i}.{q,k,v}` -> [heads, head_dim], finite and >= 0."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(stats_file))
    except Exception as e:  # SafetensorError (truncated, not a safetensors file), OSError
        raise _Bad("the file", f"cannot be read: it is truncated or not safetensors ({str(e).strip().splitlines()[0][:120]})") from None
    norms = {}
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in heads:
            raise _Bad(key, "is not a statistics tensor (expected layers.<i>.q|k|v|q_prenorm|k_prenorm)")
        i, kind = int(parts[1]), parts[2]
        if i >= num_layers:
            raise _Bad(key, f"names layer {i} but the report has {num_layers} layers")
        want = (heads[kind], head_dim)
        if t.dim() != 2 or any(w is not None and w != g for w, g in zip(want, t.shape)):
            raise _Bad(key, f"has shape {tuple(t.shape)}, expected "
                            f"({want[0] or 'heads'}, {want[1] or 'head_dim'})")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise _Bad(key, "must hold finite norms >= 0")
        norms[(i, kind)] = t
    absent = [f"layers.{i}.{k}" for i in range(num_layers) for k in ("q", "k", "v") if (i, k) not in norms]
    if absent:
        raise _Bad(absent[0], f"is missing ({len(absent)} of {3 * num_layers} tensors absent)")
    return norms


def _top_entry(head: int, dim: int, ratio: float, rd, pairing, theta) -> dict:
    pair = S.pair_index(dim, rd, pairing)
    out = {"head": head, "dim": dim, "pair": pair, "ratio": round(ratio, 3)}
    if pair is not None and theta:
        out["wavelength"] = round(S.pair_wavelength(pair, rd, theta), 1)   # tokens, at this layer's base
    return out


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
            theta = layout.theta_of(i)
            if rope:
                entry["rope_theta"] = theta
            if layout.layer_types:
                entry["attention_type"] = layout.layer_types[i]
            for kind in ("q", "k", "v", *PRENORM_KINDS.values()):
                if (i, kind) not in norms:   # pre-norm Q/K exist only in QK-norm models
                    continue
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
                    "top": [_top_entry(int(j) // m.shape[1], int(j) % m.shape[1], float(r), rd, pairing, theta)
                            for r, j in zip(top.values, top.indices)],
                }
            for kind, pre in PRENORM_KINDS.items():
                if pre in entry:  # does the norm move the largest dim? (same RoPE pair, per head)
                    entry[pre]["top1_same_pair_as_normed"] = S.top1_agreement(norms[(i, pre)], norms[(i, kind)],
                                                                              rd, pairing)
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
        """Refuse a report from another model: layers, heads and head_dim must agree, down to each
        layer's per-head lists and the statistics' shapes."""
        want = {"model_type": layout.model_type, "num_layers": layout.num_layers, "num_heads": layout.num_heads,
                "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim}
        got = {k: self.meta.get(k) for k in want}
        if got != want:
            diff = ", ".join(f"{k} {got[k]} vs model {want[k]}" for k in want if got[k] != want[k])
            raise MvquantError(f"calibration report for '{self.model}' does not match this model ({diff}): "
                               "calibrate this model first (mvquant calibrate MODEL --output REPORT.json)")
        heads = _heads(layout.num_heads, layout.num_kv_heads)
        try:
            check_layers(self.layers, layout.num_layers, heads, layout.head_dim)
            for (i, kind), t in self.norms.items():
                if tuple(t.shape) != (heads[kind], layout.head_dim):
                    raise _Bad(f"statistics layers.{i}.{kind}", f"have shape {tuple(t.shape)}, the model needs "
                                                               f"({heads[kind]}, {layout.head_dim})")
        except _Bad as e:
            raise MvquantError(f"calibration report for '{self.model}' does not match this model ({e}): "
                               "calibrate this model first (mvquant calibrate MODEL --output REPORT.json)") from None

    def summary(self) -> dict:
        """Model-level facts: share of layers with massive Q/K/V and of massive dims at low frequency."""
        out = {}
        rope = self.rope
        kinds = [k for k in ("q", "k", "v", *PRENORM_KINDS.values()) if all(k in layer for layer in self.layers)]
        for kind in kinds:
            out[kind] = self._kind_summary(kind, self.layers)
            types = sorted({layer["attention_type"] for layer in self.layers if "attention_type" in layer})
            if len(types) > 1:  # local vs global layers (Gemma3): different RoPE bases
                out[kind]["by_attention_type"] = {
                    t: {**self._kind_summary(kind, [la for la in self.layers if la.get("attention_type") == t]),
                        "rope_theta": sorted({la.get("rope_theta") for la in self.layers
                                              if la.get("attention_type") == t and la.get("rope_theta")})}
                    for t in types}
        return out

    def _kind_summary(self, kind: str, layers: list[dict]) -> dict:
        rope = self.rope
        counts = [layer[kind]["count"] for layer in layers]
        sel = [layer[kind]["massive"] for layer in layers]
        return {
            "layers_with_massive": sum(c > 0 for c in counts),
            "share_layers_with_massive": sum(c > 0 for c in counts) / max(1, len(counts)),
            "total_massive_dims": sum(counts),
            "low_frequency_share": (S.low_frequency_share([d for s in sel for d in s], rope["rotary_dim"],
                                                          rope["pairing"]) if rope else None),
        }

    # -- files ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {**self.meta, "layers": self.layers}

    def save(self, path: str | os.PathLike) -> None:
        """The report and its stats file are one output: both are written, or neither (a full disk
        leaves no orphan stats file that would block the rerun)."""
        from safetensors.torch import save

        path = Path(path)
        stats_file = stats_path_for(path)
        tensors = {f"layers.{i}.{kind}": t.float().contiguous() for (i, kind), t in sorted(self.norms.items())}
        files = {}
        if tensors:
            files[stats_file] = deterministic_safetensors(save(tensors, metadata={"format": FORMAT, "model": str(self.model)}))
            self.meta["stats_file"] = stats_file.name
        files[path] = (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8")
        atomic_write_files(files)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationReport":
        """Read and validate a report and its statistics file: every problem is one MvquantError line
        naming the file, the field and the fix."""
        path = Path(path)
        if not path.is_file():
            raise MvquantError(f"calibration report '{path}' not found: run mvquant calibrate --output {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MvquantError(f"'{path}' is not a calibration report (invalid JSON: {e}): "
                               "give the file written by mvquant calibrate") from None
        model = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else "MODEL"
        fix = f"re-create it with mvquant calibrate {model} --output {path}"
        try:
            check_report_data(data)
        except _Bad as e:
            raise MvquantError(f"calibration report '{path}': {e.field} {e.problem}: {fix}") from None
        layers = data.pop("layers")
        rope = data.get("rope") or {}
        for entry in layers:  # DESIGN.md requires only `massive`; RoPE partners are derived from it
            for kind in [k for k in ("q", "k", "v", *PRENORM_KINDS.values()) if k in entry]:
                if "massive_pairs" not in entry[kind]:
                    entry[kind]["massive_pairs"] = S.close_pairs(entry[kind]["massive"], rope.get("rotary_dim"),
                                                                 rope.get("pairing"))
        norms = {}
        stats_file = path.with_name(data["stats_file"]) if data.get("stats_file") else None
        if stats_file is not None and stats_file.is_file():
            heads = _heads(data.get("num_heads"), data.get("num_kv_heads"))
            try:
                norms = load_stats(stats_file, data["num_layers"], heads, data.get("head_dim"))
            except _Bad as e:
                raise MvquantError(f"calibration statistics '{stats_file}' (beside '{path.name}'): {e.field} "
                                   f"{e.problem}: {fix}") from None
        return cls(meta=data, layers=layers, norms=norms)


def load_report(path) -> CalibrationReport:
    return CalibrationReport.load(path)
