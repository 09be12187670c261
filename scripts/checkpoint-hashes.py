"""Byte-identity check for refactors: sha256 of the safetensors of checkpoints quantized in memory from
tiny random models (5 architectures x RTN/GPTQ/AWQ/SmoothQuant x protect none/massive).

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
from mvquant.quantization import QuantConfig, quantize

out = {}
with tempfile.TemporaryDirectory() as tmp:
    for arch in ["llama", "qwen3", "gemma3_text", "phi3", "gpt_neox"]:
        base = make_tiny_model(arch)
        report = mvquant.calibrate(base, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
        for method, bits, extra in [("rtn", 4, {}), ("rtn", 3, {"symmetric": True}), ("gptq", 4, {}), ("awq", 4, {}),
                                    ("smoothquant", 8, {})]:
            for protect in ["none", "massive"]:
                model = make_tiny_model(arch)
                cfg = QuantConfig(method=method, bits=bits, group_size=32 if method != "smoothquant" else None,
                                  protect=protect, calib_samples=4, calib_seq_len=32, **extra)
                quantize(model, cfg, report=report, tokenizer=ToyTokenizer(), progress=False)
                d = mvquant.save_quantized(model, None, Path(tmp) / f"{arch}-{method}{bits}-{protect}", report=report)
                key = f"{arch}-{method}{bits}-{protect}"
                out[key] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                            for f in sorted(Path(d).iterdir()) if f.suffix == ".safetensors"}
print(json.dumps(out, indent=1, sort_keys=True))
