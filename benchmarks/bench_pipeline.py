"""Memory of `mvquant quantize` against model depth, and on a real-size shape.

Random models are built from a config (weights drawn layer by layer and written as one
safetensors shard per layer, so building them needs little memory), saved under --workdir, and
quantized by `python -m mvquant quantize` in a child process; its peak RSS and wall time come from
/usr/bin/time. The depth sweep keeps the width fixed (8, 16, 32 layers by default): the streamed,
layer-by-layer pipeline should hold one layer at a time, so the 32/8-layer peak RSS ratio stays
near 1. The real-size run reports peak RSS as a fraction of the model's bytes on disk. Last, the
built-in model's w4 checkpoint size against an fp16 copy. Models are deleted after use.

    flock /tmp/mvquant-heavy.lock python benchmarks/bench_pipeline.py --output results/bench_pipeline.json
    python benchmarks/bench_pipeline.py --layers 8 16 --real none      # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REAL_SHAPES = {  # public configs (model ids for reference only; nothing is downloaded)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
}


def write_random_model(path: Path, shape: dict, dtype=torch.bfloat16, seed: int = 0) -> int:
    """A Llama-architecture model with random weights as a sharded safetensors directory (one shard per
    decoder layer) plus the built-in model's tokenizer. Returns the weights' bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mvquant.models.builtin import builtin_model_dir

    config = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **shape)
    config.dtype = str(dtype).replace("torch.", "")
    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    keys = [k for k in meta.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")]
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        groups.setdefault(f"layer{int(parts[2]):03d}" if parts[1] == "layers" else "rest", []).append(k)
    weight_map, total = {}, 0
    for i, (group, ks) in enumerate(sorted(groups.items())):
        tensors = {}
        for k in ks:
            shape_k = tuple(meta.state_dict()[k].shape)
            if k.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape_k, generator=gen)
            else:
                t = 0.02 * torch.randn(shape_k, generator=gen)
            tensors[k] = t.to(dtype)
            total += tensors[k].numel() * tensors[k].element_size()
        name = f"model-{i + 1:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(ks, name))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(builtin_model_dir())).save_pretrained(path)
    return total


def run_quantize(model_dir: Path, out: Path, args: list[str], env: dict | None = None) -> dict:
    """`python -m mvquant quantize` in a child process: peak RSS (MiB) and wall seconds from /usr/bin/time."""
    tfile = out.parent / f".{out.name}.time"
    summary = out.parent / f".{out.name}.summary.json"
    cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(tfile), sys.executable, "-m", "mvquant", "quantize",
           str(model_dir), "--output", str(out), "--summary-json", str(summary), "--quiet", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"quantize failed ({r.returncode}): {r.stderr[-2000:]}")
    rss_kb, wall = tfile.read_text().split()[-2:]
    s = json.loads(summary.read_text())
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.mvquant"))
    tfile.unlink()
    summary.unlink()
    return {"peak_rss_mib": int(rss_kb) / 1024, "wall_s": float(wall), "weights_file_bytes": size,
            "model_bytes": s["model_bytes"], "model_bytes_fp16": s["model_bytes_fp16"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="*", default=[8, 16, 32], help="depths of the sweep (none: skip it)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--method", default="gptq")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--real", default="llama-3.2-1b", help=f"one of {', '.join(REAL_SHAPES)} or none")
    p.add_argument("--real-method", default="rtn")
    p.add_argument("--real-calib-samples", type=int, default=4)
    p.add_argument("--no-malloc-trim", action="store_true", help="depth sweep without returning freed memory "
                   "to the OS after each layer (MVQUANT_MALLOC_TRIM=0), for comparison")
    p.add_argument("--no-builtin", action="store_true", help="skip the built-in model's checkpoint size")
    p.add_argument("--workdir", default=None, help="where the random models go (default: a new dir in /tmp)")
    p.add_argument("--output", default=None, help="write the results as JSON")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mvquant-bench-pipeline-", dir=a.workdir))
    results: dict = {"host": {"cpus": os.cpu_count(), "note": "shared machine: compare ratios within one run"},
                     "args": vars(a),
                     "depth": [], "real": None, "builtin": None}
    qargs = ["--method", a.method, "--bits", "4", "--group-size", "128",
             "--calib-samples", str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len)]
    try:
        for n in a.layers:
            shape = dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=n,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                         tie_word_embeddings=False)
            d = work / f"depth{n}"
            t = time.perf_counter()
            nbytes = write_random_model(d, shape)
            built = time.perf_counter() - t
            r = run_quantize(d, work / f"depth{n}-q", qargs,
                             env={"MVQUANT_MALLOC_TRIM": "0"} if a.no_malloc_trim else None)
            r.update(layers=n, model_file_bytes=nbytes, build_s=round(built, 1))
            results["depth"].append(r)
            print(f"{n:3d} layers  model {nbytes / 2**20:8.1f} MiB  peak RSS {r['peak_rss_mib']:8.1f} MiB  "
                  f"wall {r['wall_s']:7.1f} s", flush=True)
            shutil.rmtree(d)
            shutil.rmtree(work / f"depth{n}-q")
        if len(results["depth"]) > 1:
            first, last = results["depth"][0], results["depth"][-1]
            results["depth_rss_ratio"] = last["peak_rss_mib"] / first["peak_rss_mib"]
            results["depth_wall_ratio"] = last["wall_s"] / first["wall_s"]
            print(f"peak RSS {last['layers']}/{first['layers']} layers: {results['depth_rss_ratio']:.3f}  "
                  f"(wall {results['depth_wall_ratio']:.2f}x)")
        if a.real != "none":
            d = work / a.real
            nbytes = write_random_model(d, REAL_SHAPES[a.real])
            rargs = ["--method", a.real_method, "--bits", "4", "--group-size", "128",
                     "--calib-samples", str(a.real_calib_samples), "--calib-seq-len", "128"]
            r = run_quantize(d, work / f"{a.real}-q", rargs)
            r.update(shape=a.real, method=a.real_method, model_file_bytes=nbytes,
                     rss_fraction_of_model=r["peak_rss_mib"] * 2**20 / nbytes)
            results["real"] = r
            print(f"{a.real} ({a.real_method}): model {nbytes / 2**30:.2f} GiB bf16, peak RSS "
                  f"{r['peak_rss_mib'] / 1024:.2f} GiB = {r['rss_fraction_of_model']:.2f}x the model's bytes, "
                  f"wall {r['wall_s']:.0f} s, checkpoint {r['weights_file_bytes'] / 2**30:.2f} GiB", flush=True)
            shutil.rmtree(d)
            shutil.rmtree(work / f"{a.real}-q")
        if not a.no_builtin:
            r = run_quantize("smollm2-135m", work / "builtin-w4", ["--method", "rtn", "--bits", "4",
                                                                  "--group-size", "128"])
            r["vs_fp16"] = r["model_bytes"] / r["model_bytes_fp16"]
            r["file_vs_fp16"] = r["weights_file_bytes"] / r["model_bytes_fp16"]
            results["builtin"] = r
            print(f"built-in w4 g128 rtn checkpoint: weights file {r['weights_file_bytes'] / 1e6:.1f} MB = "
                  f"{r['file_vs_fp16']:.3f}x an fp16 copy ({r['model_bytes_fp16'] / 1e6:.1f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.output:
        from mvquant.io import atomic_write_json
        atomic_write_json(a.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
