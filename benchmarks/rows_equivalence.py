"""A --protect-as rows export served by vLLM (+ plugins/mvquant-vllm) vs the mvquant checkpoint it came from.

    python benchmarks/rows_equivalence.py CKPT OUT [--venv .venv-serve] [--limit 10] [--json R.json]

Step 1 runs vLLM offline in the serving environment (mvquant not importable there): for every layer
the mvquant-rows method serves, its effective weight, read by running the layer's own quant method
(vLLM's W4A16 kernel + the row overwrite) on the identity; prompt log-probabilities (top 20 and the
prompt token) and 32 greedy tokens for export_equivalence.PROMPTS; greedy passkey answers on the first
--limit items of passkey_128 and passkey_256. Step 2 (here) compares them with mvquant.load(CKPT): the
protected rows against the stored fp16 rows (the target: difference 0), the other rows against the
dequantized packed rows, log-probabilities, greedy tokens, passkey answers item by item.
MVQUANT_VLLM_INT4=vllm|torch picks the W4A16 kernel as in bench_serve.py."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _passkey_score, passkey_items  # noqa: E402
from export_equivalence import NEW, PROMPTS  # noqa: E402

SERVE_SIDE = textwrap.dedent('''
    import json, os, sys, torch
    from safetensors.torch import save_file
    out, dest, prompts, new, passkeys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    from vllm import LLM, SamplingParams
    from mvquant_vllm.quant import effective_weights

    llm = LLM(model=out, dtype="float16", max_model_len=2048, seed=0)
    res = {}
    for part in llm.apply_model(effective_weights):
        res.update({"w." + k: v for k, v in part.items()})
    sp = SamplingParams(max_tokens=new, temperature=0, prompt_logprobs=20, ignore_eos=True)
    for i, o in enumerate(llm.generate(prompts, sp)):
        ids = o.prompt_token_ids
        res[f"ids.{i}"] = torch.tensor(ids)
        res[f"greedy.{i}"] = torch.tensor(o.outputs[0].token_ids)
        pos, toks, vals = [], [], []
        for p, d in enumerate(o.prompt_logprobs):
            for t, lp in (d or {}).items():
                pos.append(p); toks.append(t); vals.append(lp.logprob)
        res[f"lp.{i}"] = torch.tensor([pos, toks]).t().contiguous()
        res[f"lpv.{i}"] = torch.tensor(vals, dtype=torch.float32)
    outs = llm.generate(passkeys, SamplingParams(max_tokens=32, temperature=0))
    import vllm
    meta = {"vllm": vllm.__version__, "passkey_texts": json.dumps([o.outputs[0].text for o in outs])}
    save_file(res, dest, metadata=meta)
''')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--venv", default=".venv-serve")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from safetensors import safe_open

    import mvquant
    from mvquant.quantization import quantized_modules
    from mvquant.serving.server import serve_env

    items = passkey_items(a.limit)
    dest = Path(tempfile.mkdtemp()) / "served.safetensors"
    env = serve_env() | {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}      # apply_model sends a function
    subprocess.run([str(Path(a.venv).resolve() / "bin" / "python"), "-c", SERVE_SIDE, str(Path(a.out).resolve()),
                    str(dest), json.dumps(PROMPTS), str(NEW), json.dumps([c for _, c, _ in items])],
                   check=True, env=env, cwd="/")
    with safe_open(str(dest), "pt") as f:
        served = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    ref, tok = mvquant.load(a.ckpt, return_tokenizer=True)
    mods = quantized_modules(ref)
    results = {"ckpt": a.ckpt, "out": a.out, "vllm": meta["vllm"], "MVQUANT_VLLM_INT4": os.environ.get(
        "MVQUANT_VLLM_INT4", "auto"), "served_dtype": "float16"}

    # 1. effective weights inside vLLM
    prot_abs, other_rel, n_rows, n_mods = 0.0, 0.0, 0, 0
    for key, w in served.items():
        if not key.startswith("w."):
            continue
        m = mods[key[2:]]
        w = w.float()
        n_mods += 1
        if m.n_protected:
            p = m.protected_rows.long()
            prot_abs = max(prot_abs, (w[p] - m.protected_weight.float()).abs().max().item())
            n_rows += m.n_protected
        q = m.quantized_rows
        deq = m.dequantized_weight(torch.float32)[q]
        other_rel = max(other_rel, ((w[q] - deq).abs().max() / deq.abs().max()).item())
    results["effective_weights"] = {"modules": n_mods, "protected_rows": n_rows,
                                    "protected_max_abs_diff_vs_stored_fp16": prot_abs,
                                    "packed_rows_max_rel_diff_vs_dequantized": other_rel}

    # 2. log-probabilities and greedy tokens against mvquant in process (its bf16 kernels, then exact float)
    for mode in ("bf16-kernels", "exact-float"):
        if mode == "exact-float":
            for q in mods.values():
                q.compute = "dequant"
                q.prepare()
        diffs, agree, first_div = [], 0, []
        with torch.no_grad():
            for i in range(len(PROMPTS)):
                ids = served[f"ids.{i}"][None]
                lps = torch.log_softmax(ref(ids).logits[0].float(), -1)
                pos, toks = served[f"lp.{i}"].t()
                diffs.append((lps[pos - 1, toks] - served[f"lpv.{i}"]).abs().max().item())   # position p scored at p-1
                g = ref.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
                s = served[f"greedy.{i}"]
                same = (g[: len(s)] == s[: len(g)]).tolist()
                agree += sum(same)
                first_div.append(same.index(False) if False in same else len(same))
        results[mode] = {"max_abs_logprob_diff": max(diffs), "greedy_token_agreement": agree / (NEW * len(PROMPTS)),
                         "tokens_before_first_divergence": first_div}

    # 3. greedy passkey answers, item by item (mvquant on its default kernels)
    ref = mvquant.load(a.ckpt)
    texts = []
    with torch.no_grad():
        for _, ctx, _ in items:
            ids = tok(ctx, return_tensors="pt").input_ids
            g = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    served_texts = json.loads(meta["passkey_texts"])
    results["passkey"] = {"served": _passkey_score(items, served_texts), "in_process": _passkey_score(items, texts),
                          "items": len(items), "same_answer": sum(
                              (s.strip().startswith(k)) == (t.strip().startswith(k))
                              for s, t, (_, _, k) in zip(served_texts, texts, items))}
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
