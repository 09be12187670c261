"""GGUF quality on the built-in model: mvquant's exports against llama-quantize's Q4_K_M, with and
without an importance matrix, at (about) equal file size; perplexity in llama.cpp on held-out text.

Files, all scored by llama.cpp (llama-cpp-python in .venv-llamacpp/) on the same token ids:
  llama.cpp F16                the converter's F16 GGUF of the dense model (the reference)
  llama.cpp Q4_K_M             llama-quantize from that F16
  llama.cpp Q4_K_M + imatrix   the same with an importance matrix (llama-imatrix on the very calibration
                               windows mvquant's GPTQ/AWQ saw, decoded to text): llama.cpp's strongest baseline
  each --checkpoint            `mvquant export --format gguf --gguf-embed q8_0` (token embedding Q8_0, as
                               Q4_K_M stores it), with its protect adapter and without
Held-out: windows of python-docs (seed 12345) that share no 32-token run with the calibration windows.
Per file: perplexity and mean NLL (± se over tokens); against Q4_K_M (and + imatrix) the paired
difference of per-window mean NLL, mean ± se over windows and a 95% normal interval.

    bash scripts/setup-llamacpp.sh
    python benchmarks/gguf_quality.py --checkpoint "GPTQ q4_k + massive=CKPT" ... \
        --output evals/results/llamacpp/quality.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mvquant.calibration import data as D  # noqa: E402
from mvquant.evaluation.perplexity import perplexity_summary  # noqa: E402
from mvquant.evaluation.llamacpp import LlamaCpp, venv_tool  # noqa: E402
from mvquant.export.gguf_export import adapter_path, export_gguf, llamacpp_dir  # noqa: E402
from mvquant.models.builtin import builtin_model_dir  # noqa: E402

NGRAM = 32
Z95 = 1.959964


def ngrams(seq: list[int], n: int = NGRAM) -> set[tuple]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def held_out(candidates: list[list[int]], calibration: list[list[int]], n: int) -> tuple[list[list[int]], int]:
    """The first n candidate windows sharing no NGRAM-token run with any calibration window."""
    seen = set().union(*(ngrams(c) for c in calibration))
    kept = [w for w in candidates if not (ngrams(w) & seen)]
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} held-out windows of {len(candidates)}: lower --windows")
    return kept[:n], len(candidates) - len(kept)


def nll_summary(nll: list[float]) -> dict:
    n = len(nll)
    m = sum(nll) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in nll) / (n - 1))
    return {"ppl": math.exp(m), "nll": m, "nll_se": sd / math.sqrt(n), "tokens": n}


def paired(a: list[list[float]], b: list[list[float]]) -> dict:
    """Per-window mean NLL of a minus b: mean, se over windows, 95% interval (negative: a is better)."""
    p = perplexity_summary([statistics.fmean(x) for x in a], [statistics.fmean(y) for y in b])
    m, se = p["delta_nll"], p["delta_nll_se"]
    return {"diff": m, "se": se, "ci95": [m - Z95 * se, m + Z95 * se], "windows": p["windows"]}


def llamacpp_files(work: Path, calibration_text: Path, threads: int) -> dict[str, Path]:
    f16 = work / "smollm2-f16.gguf"
    subprocess.run([sys.executable, str(llamacpp_dir() / "convert_hf_to_gguf.py"), str(builtin_model_dir("smollm2-135m")),
                    "--outtype", "f16", "--outfile", str(f16)], check=True, capture_output=True)
    quantize, imatrix = venv_tool("llama-quantize"), venv_tool("llama-imatrix")
    if quantize is None:
        raise SystemExit("llama-quantize was not built: run bash scripts/setup-llamacpp.sh")
    files = {"llama.cpp F16": f16, "llama.cpp Q4_K_M": work / "smollm2-Q4_K_M.gguf"}
    subprocess.run([str(quantize), str(f16), str(files["llama.cpp Q4_K_M"]), "Q4_K_M", str(threads)],
                   check=True, capture_output=True)
    if imatrix is None:
        print("llama-imatrix was not built: no Q4_K_M + imatrix baseline", file=sys.stderr)
        return files
    imat = work / "imatrix.gguf"
    subprocess.run([str(imatrix), "-m", str(f16), "-f", str(calibration_text), "-o", str(imat), "-c", "256",
                    "-t", str(threads), "--no-ppl"], check=True, capture_output=True)
    files["llama.cpp Q4_K_M + imatrix"] = work / "smollm2-Q4_K_M-imatrix.gguf"
    subprocess.run([str(quantize), "--imatrix", str(imat), str(f16), str(files["llama.cpp Q4_K_M + imatrix"]),
                    "Q4_K_M", str(threads)], check=True, capture_output=True)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=DIR",
                   help="an mvquant checkpoint of the built-in model to export and score (repeatable)")
    p.add_argument("--windows", type=int, default=40, help="held-out windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (as mvquant quantize's default)")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", help="write the result JSON here")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))
    texts = D.load_texts("python-docs")
    calibration = D.token_windows(texts, tok, samples=a.calib_samples, seq_len=a.calib_seq_len, seed=0)
    candidates = D.token_windows(texts, tok, samples=2 * a.windows, seq_len=a.seq_len, seed=12345)
    windows, dropped = held_out(candidates, calibration, a.windows)

    work = Path(tempfile.mkdtemp(prefix="gguf-quality-"))
    calib_text = work / "calibration.txt"
    calib_text.write_text("\n".join(tok.decode(w) for w in calibration))
    files = {k: (v, None) for k, v in llamacpp_files(work, calib_text, a.threads).items()}
    exports = {}
    for spec in a.checkpoint:
        label, _, ck = spec.rpartition("=")
        out = work / f"{len(exports)}.gguf"
        exports[label] = export_gguf(ck, out, embed="q8_0")
        if exports[label]["adapter"]:
            files[f"{label} + adapter"] = (out, adapter_path(out))
            files[f"{label}, no adapter"] = (out, None)
        else:
            files[label] = (out, None)

    rows, per_window = {}, {}
    for label, (path, lora) in files.items():
        with LlamaCpp(path, lora=lora, threads=a.threads) as lm:
            per_window[label] = [lm.nll(w) for w in windows]
        rows[label] = {"file_mib": round(path.stat().st_size / 2**20, 2),
                       "adapter_mib": round(lora.stat().st_size / 2**20, 3) if lora else 0.0,
                       **nll_summary([x for w in per_window[label] for x in w])}
        print(label, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[label].items()}, flush=True)
    for base in ("llama.cpp Q4_K_M", "llama.cpp Q4_K_M + imatrix"):
        if base in per_window:
            for label, r in rows.items():
                r[f"vs {base}"] = paired(per_window[label], per_window[base])

    print(f"\n{'file':<36} {'MiB':>7} {'ppl':>7} {'nll ± se':>16} {'Δnll vs Q4_K_M [95%]':>28} {'vs + imatrix':>26}")
    for label, r in rows.items():
        def cell(key):
            c = r.get(key)
            return f"{c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c else "-"
        size = r["file_mib"] + r["adapter_mib"]
        print(f"{label:<36} {size:>7.1f} {r['ppl']:>7.3f} {r['nll']:>8.4f} ± {r['nll_se']:.4f} "
              f"{cell('vs llama.cpp Q4_K_M'):>28} {cell('vs llama.cpp Q4_K_M + imatrix'):>26}")
    result = {"model": "smollm2-135m", "windows": len(windows), "seq_len": a.seq_len, "dropped_overlapping": dropped,
              "held_out": f"python-docs windows (seed 12345) sharing no {NGRAM}-token run with the "
                          f"{len(calibration)} x {a.calib_seq_len} calibration windows (seed 0)",
              "exports": {k: {kk: v[kk] for kk in ("types", "bits_per_weight", "protected_rows", "bytes", "adapter_bytes")}
                          for k, v in exports.items()},
              "rows": rows, "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))}
    if a.output:
        from mvquant.io import atomic_write_json
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.output, result)
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
