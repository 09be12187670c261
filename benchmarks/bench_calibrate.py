"""Calibration cost vs a plain forward over the same tokens, and peak memory vs number of samples.

    python benchmarks/bench_calibrate.py [--samples 32] [--seq-len 512] [--repeats 3]

Prints (1) calibration wall time / plain forward wall time (full CausalLM forward, and decoder-only
forward without hooks, which isolates the hooks' cost), interleaved and repeated in one run, median
of the repeats; (2) peak RSS of a fresh process calibrating N and 4N samples (must not grow with N).
Target (issue 2): ratio <= 1.1 on the built-in model.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed(samples: int, seq_len: int, batch_size: int, repeats: int) -> None:
    import mvquant
    from mvquant.calibration import data as D
    from mvquant.calibration.calibrate import accumulate_norms

    model, tok = mvquant.load_model()
    layout = mvquant.get_layout(model)
    seqs = D.token_windows(D.load_texts(), tok, samples=samples, seq_len=seq_len, seed=0)
    pad = tok.pad_token_id

    def plain(body):
        with torch.inference_mode():
            for ids, mask in D.batches(seqs, batch_size, pad):
                body(input_ids=ids, attention_mask=mask, use_cache=False)

    runs = {"calibrate": lambda: accumulate_norms(model, layout, seqs, batch_size=batch_size, pad_id=pad, progress=False),
            "forward (CausalLM, logits)": lambda: plain(model),
            "forward (decoder only, no hooks)": lambda: plain(model.base_model)}
    plain(model)  # warm-up
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = samples * seq_len
    print(f"built-in model, {samples} x {seq_len} tokens, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    for name, t in med.items():
        print(f"  {name:34s} {t:7.2f} s  ({tokens / t:7.0f} tok/s)  all: {', '.join(f'{x:.2f}' for x in times[name])}")
    print(f"  ratio calibrate / forward (CausalLM)        = {med['calibrate'] / med['forward (CausalLM, logits)']:.3f}  (target <= 1.1)")
    print(f"  ratio calibrate / forward (decoder, no hook) = {med['calibrate'] / med['forward (decoder only, no hooks)']:.3f}  (hook overhead)")


def peak_rss_mb(samples: int, seq_len: int) -> float:
    code = ("import resource, mvquant; m, t = mvquant.load_model(); "
            f"mvquant.calibrate(m, t, samples={samples}, seq_len={seq_len}, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    speed(args.samples, args.seq_len, args.batch_size, args.repeats)
    small, large = args.samples // 4 or 1, args.samples
    a, b = peak_rss_mb(small, args.seq_len), peak_rss_mb(large, args.seq_len)
    print(f"peak RSS: {small} samples {a:.0f} MiB, {large} samples {b:.0f} MiB, ratio {b / a:.3f} (flat = memory independent of N)")


if __name__ == "__main__":
    main()
