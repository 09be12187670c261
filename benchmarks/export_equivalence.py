"""Exported checkpoint vs the mvquant checkpoint it came from, the export loaded WITHOUT mvquant.

    python benchmarks/export_equivalence.py CKPT OUT [--venv .venv-serve] [--json R.json]

Step 1 runs in the serving environment (transformers<5.20, compressed-tensors 0.17, peft; mvquant not
importable there): AutoModelForCausalLM.from_pretrained(OUT) [+ PeftModel.from_pretrained(OUT/protect-lora)],
logits and 32 greedy tokens for a few prompts, plus the effective weights of the protected rows.
Step 2 (here) loads CKPT with mvquant on its exact float path (and its default bf16 kernels) and compares:
max |logit difference|, greedy agreement, and the protected rows against their stored fp16 values."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "The passkey is 48213. Remember it. The grass is green. What is the passkey? The passkey is"]
NEW = 32

SERVE_SIDE = textwrap.dedent('''
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
    out, dest, prompts, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    try:
        import mvquant  # noqa
        sys.exit("mvquant is importable here: run this in the serving environment")
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    import os
    if os.path.isdir(out + "/protect-lora"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, out + "/protect-lora").merge_and_unload()
    model.eval()
    res = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = tok(p, return_tensors="pt").input_ids
            res[f"logits.{i}"] = model(ids).logits[0].float()
            g = model.generate(ids, max_new_tokens=new, do_sample=False)
            res[f"greedy.{i}"] = g[0, ids.shape[1]:]
            res[f"ids.{i}"] = ids[0]
        sd = model.state_dict()
        for k, v in sd.items():
            if k.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight")):
                res["w." + k] = v.float().contiguous()
    import transformers, compressed_tensors, peft
    save_file(res, dest, metadata={"versions": f"transformers {transformers.__version__}, compressed-tensors "
                                   f"{compressed_tensors.__version__}, peft {peft.__version__}"})
''')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--venv", default=".venv-serve")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from safetensors import safe_open

    import mvquant
    from mvquant.quantization import quantized_modules

    dest = Path(tempfile.mkdtemp()) / "served.safetensors"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    subprocess.run([str(Path(a.venv).resolve() / "bin" / "python"), "-c", SERVE_SIDE, str(Path(a.out).resolve()), str(dest), json.dumps(PROMPTS), str(NEW)],
                   check=True, env=env, cwd="/")
    with safe_open(str(dest), "pt") as f:
        served = {k: f.get_tensor(k) for k in f.keys()}
        versions = f.metadata()["versions"]
    ref = mvquant.load(a.ckpt)
    results = {"ckpt": a.ckpt, "out": a.out, "serve_env": versions, "prompts": len(PROMPTS), "new_tokens": NEW}
    for mode in ("bf16-kernels", "exact-float"):
        if mode == "exact-float":
            for q in quantized_modules(ref).values():
                q.compute = "dequant"
                q.prepare()
        diffs, agree, first_div = [], 0, []
        with torch.no_grad():
            for i in range(len(PROMPTS)):
                ids = served[f"ids.{i}"][None]
                logits = ref(ids).logits[0].float()
                diffs.append((logits - served[f"logits.{i}"]).abs().max().item())
                g = ref.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
                s = served[f"greedy.{i}"]
                n = min(len(g), len(s))
                same = (g[:n] == s[:n]).tolist()
                agree += sum(same)
                first_div.append(same.index(False) if False in same else n)
        results[mode] = {"max_abs_logit_diff": max(diffs), "logit_scale": served["logits.0"].abs().max().item(),
                         "greedy_token_agreement": agree / (NEW * len(PROMPTS)),
                         "tokens_before_first_divergence": first_div}
    # the protected rows of the served weights against the checkpoint's stored fp16 rows
    worst_rel, worst_abs, n_rows = 0.0, 0.0, 0
    for name, m in quantized_modules(ref).items():
        key = next((k for k in served if k.startswith("w.") and k.endswith(name + ".weight")), None)
        if key is None or not m.n_protected:
            continue
        w = served[key][m.protected_rows.long()]
        p = m.protected_weight.float()
        worst_abs = max(worst_abs, (w - p).abs().max().item())
        worst_rel = max(worst_rel, ((w - p).abs() / p.abs().clamp(min=1e-6)).max().item())
        n_rows += m.n_protected
    results["protected_rows"] = {"rows": n_rows, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
                                 "fp16_half_ulp_rel": 2 ** -11}
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
