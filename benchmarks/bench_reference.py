"""mvquant's GPTQ / AWQ against llm-compressor 0.14's GPTQModifier / AWQModifier on the built-in model.

Same model (the cached dequantized SmolLM2-135M safetensors), same scheme (int4 asymmetric, group
64, every decoder linear, lm_head left alone), same calibration token windows (python-docs source,
--calib-samples x --calib-seq-len, given to both as token ids), same held-out windows. llm-compressor
runs in its own virtual environment (bash scripts/setup-llmcompressor.sh) as a subprocess of this
script; both sides compute per-token NLLs with the same code, so differences are paired on the
same tokens. Prints perplexity (± standard error of the mean NLL) and each arm's paired NLL
difference to llm-compressor's run of the same method.

    bash scripts/setup-llmcompressor.sh
    python benchmarks/bench_reference.py --methods gptq --ours gptq --ours-after rtn --calib-samples 16
    python benchmarks/bench_reference.py --methods awq --ours awq --ours-after rtn --calib-samples 16 --save awq.json

Each AWQ arm re-runs the attention block / MLP at 20 grid points per layer: ~35 min per side on a
loaded 2-core machine at 16 x 256 calibration tokens. `--save` keeps every finished arm's per-token
NLLs; `--reuse` that file in a later run (same settings) to add arms without recomputing those.
llm-compressor's AWQModifier runs on CPU here with its input pinning skipped (it needs an accelerator).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def token_nll(model, windows) -> list[float]:
    import torch
    out = []
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0, :-1].float()
            out.extend(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").tolist())
    return out


def summary(nll: list[float]) -> tuple[float, float]:
    m = sum(nll) / len(nll)
    sd = math.sqrt(sum((x - m) ** 2 for x in nll) / (len(nll) - 1))
    return m, sd / math.sqrt(len(nll))


# -- worker: runs inside the llm-compressor venv (imports nothing from mvquant) ---------------------
def worker(spec_path: str) -> int:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if not torch.cuda.is_available():
        # AWQModifier pins its cached layer inputs (for faster host-to-GPU copies), which raises on a
        # machine without an accelerator; pinning changes no value, so skip it on CPU
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    results = {}
    for method in spec["methods"]:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=spec["bits"], type="int", symmetric=False, strategy="group", group_size=spec["group_size"]))
        groups = {"group_0": scheme}
        if method == "gptq":
            recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
        elif method == "awq":
            recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        else:
            raise SystemExit(f"unknown method {method}")
        calib = spec["calibration"]
        ds = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(c) for c in calib]})
        t = time.perf_counter()
        try:
            oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
                    max_seq_length=max(len(c) for c in calib), batch_size=1)
        except Exception as e:  # report it beside the other arms instead of losing them
            print(f"llm-compressor {method} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - t
        results[method] = {"nll": token_nll(model, spec["eval"]), "seconds": seconds}
        Path(spec["output"]).write_text(json.dumps(results))
        del model
    Path(spec["output"]).write_text(json.dumps(results))
    return 0


def _progress(name, r, save, rows, settings) -> None:
    m, se = summary(r["nll"])
    print(f"[{name}] ppl {math.exp(m):.3f} (nll {m:.4f} ± {se:.4f}), {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    if save:
        Path(save).write_text(json.dumps({"_settings": settings, **rows}))


# -- driver: mvquant's environment --------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", default=".venv-llmcompressor", help="llm-compressor's virtual environment")
    p.add_argument("--methods", default="gptq,awq")
    p.add_argument("--ours", default="gptq,awq", help="mvquant arms run before the reference")
    p.add_argument("--ours-after", default="rtn,gptq-actorder",
                   help="mvquant arms run after it (gptq-actorder: static groups, llm-compressor's default ordering)")
    p.add_argument("--save", help="write every arm's per-token NLLs to this JSON as it finishes")
    p.add_argument("--reuse", help="a --save file of an earlier run with the same settings: its arms join the "
                   "table (paired on the same tokens) and are not run again")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-reference", action="store_true", help="only mvquant's arms")
    p.add_argument("--skip-fp32", action="store_true", help="no unquantized arm")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    import torch

    import mvquant
    from mvquant.calibration import data as D
    from mvquant.models.builtin import builtin_model_dir
    from mvquant.pipeline import quantize
    from mvquant.quantization import QuantConfig

    torch.set_num_threads(args.threads)
    tok = mvquant.load_model()[1] if args.skip_fp32 else None
    if tok is None:
        model, tok = mvquant.load_model()
    calib = D.token_windows(D.load_texts("python-docs"), tok, samples=args.calib_samples,
                            seq_len=args.calib_seq_len, seed=0)
    windows = D.token_windows(D.load_texts("python-docs"), tok, samples=args.eval_windows, seq_len=256, seed=12345)
    rows: dict[str, dict] = {}
    settings = {"bits": args.bits, "group_size": args.group_size, "calib": calib, "eval": windows}
    reused = {}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        if old.pop("_settings", None) != settings:
            print(f"bench_reference: error: {args.reuse} was made with other settings (bits, group size, "
                  "calibration or held-out tokens) or by an older version: rerun those arms", file=sys.stderr)
            return 2
        reused = old
    rows.update({k: v for k, v in reused.items() if not k.startswith("llm-compressor ")})
    if not args.skip_fp32 and "fp32" not in rows:
        rows["fp32"] = {"nll": token_nll(model, windows), "seconds": 0.0}
        _progress("fp32", rows["fp32"], args.save, rows, settings)
        del model

    def run_ours(arm):
        method = arm.split("-")[0]
        model, tok = mvquant.load_model()
        cfg = QuantConfig(method=method, bits=args.bits, group_size=args.group_size, protect="none",
                          gptq_act_order=arm.endswith("actorder"), calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len)
        t = time.perf_counter()
        quantize(model, cfg, calibration_data=calib, tokenizer=tok, progress=False)
        rows[arm] = {"nll": token_nll(model, windows), "seconds": time.perf_counter() - t}
        _progress(arm, rows[arm], args.save, rows, settings)
        del model

    for arm in [a for a in args.ours.split(",") if a and a not in rows]:
        run_ours(arm)
    ref: dict[str, dict] = {k.removeprefix("llm-compressor "): v for k, v in reused.items()
                            if k.startswith("llm-compressor ")}
    if not args.skip_reference and any(m not in ref for m in args.methods.split(",") if m):
        py = Path(args.venv).absolute() / "bin" / "python"
        if not py.exists():
            print(f"bench_reference: error: no llm-compressor environment at {args.venv}: run "
                  "bash scripts/setup-llmcompressor.sh (or pass --venv DIR, or --skip-reference)", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"model": str(builtin_model_dir()), "methods": [m for m in args.methods.split(",") if m not in ref],
                    "bits": args.bits,
                    "group_size": args.group_size, "calibration": calib, "eval": windows,
                    "threads": args.threads, "output": os.path.join(tmp, "out.json")}
            Path(tmp, "spec.json").write_text(json.dumps(spec))
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            subprocess.run([str(py), os.path.abspath(__file__), "--worker", os.path.join(tmp, "spec.json")],
                           env=env, cwd=tmp, stdout=sys.stderr)
            if Path(tmp, "out.json").exists():
                ref.update(json.loads(Path(tmp, "out.json").read_text()))

    for m, r in ref.items():
        rows[f"llm-compressor {m}"] = r
        _progress(f"llm-compressor {m}", r, args.save, rows, settings)
    for arm in [a for a in args.ours_after.split(",") if a and a not in rows]:
        run_ours(arm)

    if not rows:
        return 1
    n = len(next(iter(rows.values()))["nll"])
    print(f"\nbuilt-in model (SmolLM2-135M), w{args.bits} asymmetric group {args.group_size}, protect none; "
          f"calibration {args.calib_samples} x {args.calib_seq_len} python-docs tokens (same ids for both); "
          f"perplexity on {args.eval_windows} x 256 held-out windows ({n} predicted tokens); {args.threads} threads")
    print(f"{'arm':<22} {'ppl':>8} {'nll':>8} {'± se':>7} {'Δnll vs llm-compressor (paired ± se)':>38} {'seconds':>8}")
    for name, r in rows.items():
        m, se = summary(r["nll"])
        base = ref.get(name.split("-")[0]) if not name.startswith("llm-compressor") else None
        if base is not None:
            d = [a - b for a, b in zip(r["nll"], base["nll"])]
            dm, dse = summary(d)
            delta = f"{dm:+.4f} ± {dse:.4f}"
        else:
            delta = "-"
        print(f"{name:<22} {math.exp(m):>8.3f} {m:>8.4f} {se:>7.4f} {delta:>38} {r['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
