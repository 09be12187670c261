"""The two exact-row corrections of plugins/mvquant-vllm/mvquant_vllm/rows.py, timed and checked on the
built-in model's fused qkv_proj shape (out 960 = 576 q + 192 k + 192 v, in 576), fp16 activations:

  overwrite  y[..., S] = x @ W_S^T                  (what the mvquant-rows format stores: W_S)
  delta      y[..., S] += x @ Delta_S^T, Delta_S = W_S - deQ(Q(W_S)) in fp16

beside the W4A16 GEMM they follow (torch's CPU int4 kernel, the plugin's; bf16 activations). Both
corrections multiply in fp32 as the plugin does (torch's fp16 GEMM is far slower on CPUs without
AVX512-FP16); fp16 activations in, fp16 out.

    python benchmarks/bench_rows.py [--rows 22] [--json R.json]

--rows: |S| of one layer (the built-in model's massive-protected export: 658 rows / 30 layers ~ 22).
Medians over torch.utils.benchmark's blocked runs; the ratio column is the correction's time over the
W4A16 GEMM's, measured in the same run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "mvquant-vllm"))
from mvquant_vllm.int4 import int4pack_linear, to_int4pack  # noqa: E402
from mvquant_vllm.rows import apply_delta, apply_rows  # noqa: E402

OUT, IN, GROUP = 960, 576, 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=22)
    ap.add_argument("--json", default=None)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    a = ap.parse_args()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from mvquant.quantization import core

    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g) * 0.05
    codes, scales, zeros = core.quantize_weight(w, 4, GROUP, False)
    base = core.dequantize_codes(codes, scales, zeros, 4, GROUP)
    index = torch.randperm(OUT, generator=g)[: a.rows].sort().values
    w_s = w[index].half()
    delta = (w_s.float() - base[index]).half()
    layout = to_int4pack(pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4), scales.half(),
                         pack_to_int32((zeros.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0), IN)

    # exactness: the protected rows' effective weights (identity input, fp16 as served)
    eye = torch.eye(IN, dtype=torch.float16)
    y0 = (eye.float() @ base.t()).half()
    # both held in fp32 as the plugin holds its rows (exact copies of the stored fp16 values)
    eff_rows = apply_rows(y0.clone(), eye, index, w_s.float()).t()[index].float()
    eff_delta = apply_delta(y0.clone(), eye, index, delta.float()).t()[index].float()
    res = {"shape": [OUT, IN], "group": GROUP, "rows": a.rows, "threads": torch.get_num_threads(),
           "exact": {"overwrite_max_abs_diff": (eff_rows - w_s.float()).abs().max().item(),
                     "delta_max_abs_diff": (eff_delta - w_s.float()).abs().max().item()},
           "timings_us": {}}
    for batch in (1, 16):
        x = torch.randn(batch, IN, generator=g).half()
        y = int4pack_linear(x, layout)
        ws, dl = w_s.float(), delta.float()
        stmts = {"w4a16 gemm": "int4pack_linear(x, layout)",
                 "overwrite": "apply_rows(y, x, index, ws)",
                 "delta": "apply_delta(y, x, index, dl)"}
        row = {}
        for name, stmt in stmts.items():
            m = benchmark.Timer(stmt, globals=locals() | globals()).blocked_autorange(min_run_time=a.min_run_time)
            row[name] = {"median_us": round(m.median * 1e6, 2), "iqr_us": round(m.iqr * 1e6, 2),
                         "runs": len(m.times)}
        for name in ("overwrite", "delta"):
            row[name]["vs_gemm"] = round(row[name]["median_us"] / row["w4a16 gemm"]["median_us"], 3)
        res["timings_us"][f"batch{batch}"] = row
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
