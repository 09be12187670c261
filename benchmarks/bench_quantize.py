"""Quantization benchmark on the built-in model (SmolLM2-135M), all numbers from one run.

For each method: quantize time (calibration pass included), effective bits per weight of the
quantized linears (scales, zeros, protected rows included), checkpoint bytes vs an fp16 copy,
held-out perplexity (token-level mean NLL +- standard error), and CPU greedy decode tokens/s
at batch 1, as ratios to the dense fp32 model and to bitsandbytes NF4 measured in the same run.

    flock /tmp/mvquant-heavy.lock python benchmarks/bench_quantize.py --calibration report.json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import mvquant
from mvquant.calibration import data as D
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig


def decode_tokens_per_s(model, ids, new_tokens: int, repeats: int) -> float:
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates.append(new_tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def perplexity(model, windows) -> tuple[float, float, int]:
    """exp(mean NLL) over all predicted tokens, with the NLL's standard error and n."""
    nll = []
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    x = torch.cat(nll)
    return math.exp(float(x.mean())), float(x.std() / math.sqrt(len(x))), len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", help="report JSON for --protect massive (computed quickly if absent)")
    p.add_argument("--methods", default="rtn,awq,gptq,smoothquant,bnb-nf4,bnb-int8")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--protect", default="massive")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = mvquant.load_model()
    if args.calibration:
        report = mvquant.load_report(args.calibration)
    else:
        report = mvquant.calibrate(model, tok, samples=8, seq_len=256, progress=False)
    # held out from the calibration windows (different seed; overlap is possible but small)
    windows = D.token_windows(D.load_texts(), tok, samples=args.eval_windows, seq_len=256, seed=12345)
    prompt = tok("The history of the Python programming language begins", return_tensors="pt").input_ids
    n_params = sum(t.numel() for t in {t.data_ptr(): t for t in model.parameters()}.values())  # tied once
    fp16_bytes = 2 * n_params

    rows = []
    dense_tps = decode_tokens_per_s(model, prompt, args.new_tokens, args.repeats)
    ppl, se, n = perplexity(model, windows)
    rows.append({"method": "dense fp32", "tps": dense_tps, "ppl": ppl, "se": se, "n": n, "bits": 32.0,
                 "seconds": 0.0, "bytes": 4 * n_params, "kernels": "-"})
    del model
    for method in args.methods.split(","):
        model, tok = mvquant.load_model()
        bits = 8 if method in ("smoothquant", "bnb-int8") else args.bits
        cfg = QuantConfig(method=method, bits=bits, group_size=None if method == "smoothquant" else args.group_size,
                          protect="none" if method.startswith("bnb") else args.protect)
        try:
            t = time.perf_counter()
            quantize(model, cfg, report=report, tokenizer=tok, progress=False)
            seconds = time.perf_counter() - t
        except mvquant.MvquantError as e:
            print(f"{method}: skipped ({e})", file=sys.stderr)
            continue
        s = model.mvquant_summary
        size = None
        if not method.startswith("bnb"):
            with tempfile.TemporaryDirectory() as tmp:
                out = mvquant.save_quantized(model, None, Path(tmp) / "ck")
                size = sum(f.stat().st_size for f in out.iterdir())
        ppl, se, n = perplexity(model, windows)
        tps = decode_tokens_per_s(model, prompt, args.new_tokens, args.repeats)
        rows.append({"method": method, "tps": tps, "ppl": ppl, "se": se, "n": n, "bits": s["bits_per_weight"],
                     "seconds": seconds, "bytes": size, "kernels": ",".join(f"{k}x{v}" for k, v in s["kernels"].items()),
                     "protected": s["protected_rows"]})
        del model
    nf4 = next((r["tps"] for r in rows if r["method"] == "bnb-nf4"), None)
    print(f"\nbuilt-in model, {args.bits}-bit (smoothquant/bnb-int8: 8-bit), group {args.group_size}, "
          f"protect {args.protect}; decode batch 1, {args.new_tokens} new tokens, median of {args.repeats}, "
          f"{args.threads} threads; perplexity on {args.eval_windows} x 256-token python-docs windows")
    print(f"{'method':<12} {'quant s':>8} {'bits/w':>7} {'ckpt MiB':>9} {'vs fp16':>8} {'ppl':>8} {'+-se(nll)':>9} "
          f"{'tok/s':>7} {'vs dense':>8} {'vs nf4':>7}  kernels")
    for r in rows:
        ck = "-" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f}"
        ratio = "-" if r["bytes"] is None else f"{r['bytes'] / fp16_bytes:.3f}"
        vs_nf4 = "-" if not nf4 else f"{r['tps'] / nf4:.2f}"
        print(f"{r['method']:<12} {r['seconds']:>8.1f} {r['bits']:>7.3f} {ck:>9} {ratio:>8} {r['ppl']:>8.3f} "
              f"{r['se']:>9.4f} {r['tps']:>7.1f} {r['tps'] / dense_tps:>8.2f} {vs_nf4:>7}  {r['kernels']}")
    print(f"fp16 reference size: {fp16_bytes / 2**20:.1f} MiB ({n_params:,} parameters, tied embeddings once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
