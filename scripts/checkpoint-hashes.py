"""Byte-identity check for refactors: sha256 of the safetensors of checkpoints quantized from tiny random
models (5 architectures x RTN/GPTQ/AWQ/SmoothQuant, int and q4_k grids, x protect none/massive/random), in
memory and streamed from a model directory (`mvquant quantize`'s default path).

    python scripts/checkpoint-hashes.py > new.json                     # from the repository root
    git worktree add /tmp/old COMMIT && (cd /tmp/old && PYTHONPATH=/tmp/old python "$OLDPWD/scripts/checkpoint-hashes.py") > old.json
    diff old.json new.json
"""
import hashlib, json, sys, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path.cwd() / "tests"))
import torch
from conftest import ToyTokenizer, make_tiny_model
import mvquant
from mvquant import QuantConfig, quantize

out = {}
with tempfile.TemporaryDirectory() as tmp:
    for arch in ["llama", "qwen3", "gemma3_text", "phi3", "gpt_neox"]:
        base = make_tiny_model(arch)
        report = mvquant.calibrate(base, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
        for method, bits, extra in [("rtn", 4, {}), ("rtn", 3, {"symmetric": True}), ("gptq", 4, {}), ("awq", 4, {}),
                                    ("smoothquant", 8, {}), ("gptq", 4, {"grid": "q4_k"}), ("awq", 4, {"grid": "q4_k"})]:
            for protect in ["none", "massive", "random"]:
                model = make_tiny_model(arch)
                cfg = QuantConfig(method=method, bits=bits, group_size=32 if method != "smoothquant" else None,
                                  protect=protect, calib_samples=4, calib_seq_len=32, **extra)
                quantize(model, cfg, report=report, tokenizer=ToyTokenizer(), progress=False)
                d = mvquant.save_quantized(model, None, Path(tmp) / f"{arch}-{method}{bits}{extra.get('grid', '')}-{protect}",
                                           report=report)
                key = f"{arch}-{method}{bits}{extra.get('grid', '')}-{protect}"
                out[key] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                            for f in sorted(Path(d).iterdir()) if f.suffix == ".safetensors" or f.name == "config.json"}
    try:  # the streaming entry point (moved to mvquant.pipeline by the redesign of issue 20)
        from mvquant.pipeline import quantize_to_checkpoint
    except ImportError:
        from mvquant.pipeline.stream import quantize_to_checkpoint
    for arch in ["llama", "gemma3_text"]:
        src = Path(tmp) / f"src-{arch}"
        make_tiny_model(arch).save_pretrained(src)
        report = mvquant.calibrate(make_tiny_model(arch), ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
        for method in ["rtn", "gptq", "awq"]:
            cfg = QuantConfig(method=method, bits=4, group_size=32, protect="massive", calib_samples=4, calib_seq_len=32)
            d = Path(tmp) / f"stream-{arch}-{method}"
            quantize_to_checkpoint(src, cfg, d, report=report, tokenizer=ToyTokenizer(), progress=False)
            out[f"stream-{arch}-{method}"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                                              for f in sorted(d.iterdir()) if f.suffix == ".safetensors" or f.name == "config.json"}
print(json.dumps(out, indent=1, sort_keys=True))
