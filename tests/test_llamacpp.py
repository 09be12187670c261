"""llama.cpp runs mvquant's GGUF export of the built-in model (marked `llamacpp`, off by default):

    bash scripts/setup-llamacpp.sh && python -m pytest -m llamacpp tests/test_llamacpp.py

It quantizes SmolLM2 (RTN w4 g64, massive rows protected), exports it with `--format gguf`, runs it in
llama.cpp (llama-cpp-python in .venv-llamacpp/) with and without the protect adapter, and compares
logits and greedy tokens with mvquant in process. A control isolates llama.cpp's arithmetic: the same
effective weights written dense F32 by llama.cpp's converter. The result goes to
evals/results/llamacpp/test_llamacpp.json."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "evals" / "results" / "llamacpp" / "test_llamacpp.json"
PROMPTS = [
    "The passkey is 68231. Remember it. The grass is green. The sky is blue. What is the passkey? The passkey is",
    "Paris is the capital of France. Berlin is the capital of",
]
pytestmark = pytest.mark.llamacpp


def _env_or_skip():
    from mvquant.errors import MvquantError
    from mvquant.evaluation.llamacpp import venv_python
    from mvquant.export.gguf_export import llamacpp_dir

    try:
        return venv_python(), llamacpp_dir()
    except MvquantError as e:
        pytest.skip(str(e))


def _dense_copy(ck, out):
    """mvquant's effective weights (QuantLinear.dequantized_weight) as a plain fp32 transformers model."""
    import mvquant
    from transformers import AutoConfig, AutoModelForCausalLM
    from mvquant.quantization import quantized_modules

    model, tok = mvquant.load(ck, return_tokenizer=True)
    cfg = AutoConfig.from_pretrained(ck)
    del cfg.quantization_config
    dense = AutoModelForCausalLM.from_config(cfg).float()
    qm, sd = quantized_modules(model), model.state_dict()
    new = {k: (qm[k[:-7]].dequantized_weight(torch.float32) if k.endswith(".weight") and k[:-7] in qm else sd[k].float())
           for k in dense.state_dict()}
    dense.load_state_dict(new)
    dense.config.architectures = [type(dense).__name__]
    dense.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _compare(got, ref):
    d = np.abs(got - ref)
    return {"max_abs_dlogit": float(d.max()), "mean_abs_dlogit": float(d.mean()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def test_llamacpp_runs_the_export(tmp_path):
    import mvquant
    from mvquant.cli import main
    from mvquant.evaluation.llamacpp import LlamaCpp
    from mvquant.quantization import quantized_modules

    _, src = _env_or_skip()
    ck = tmp_path / "ck"
    assert main(["quantize", "--calibration", str(REPO / "evals/results/calibration/smollm2-135m.json"),
                 "--protect", "massive", "--bits", "4", "--group-size", "64", "--method", "rtn",
                 "--output", str(ck), "--quiet"]) == 0
    gg = tmp_path / "smol.gguf"
    assert main(["export", str(ck), "--format", "gguf", "--output", str(gg)]) == 0
    assert main(["export", str(ck), "--format", "gguf", "--protect-as", "f16", "--output", str(tmp_path / "f16.gguf")]) == 0
    dense = _dense_copy(ck, tmp_path / "dense")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(dense), "--outtype", "f32",
                    "--outfile", str(tmp_path / "dense-f32.gguf")], check=True, capture_output=True)

    model, tok = mvquant.load(ck, return_tokenizer=True)
    for q in quantized_modules(model).values():      # the exact float path, no bf16 kernel rounding
        q.compute = "dequant"
        q.prepare()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        ref = [model(torch.tensor([x])).logits[0].float().numpy() for x in ids]
        ref_gen = [model.generate(torch.tensor([x]), max_new_tokens=16, do_sample=False)[0, len(x):].tolist() for x in ids]
    files = {"export + adapter": (gg, gg.with_name("smol.protect.gguf")), "export, no adapter": (gg, None),
             "export --protect-as f16": (tmp_path / "f16.gguf", None),
             "control: same weights dense F32": (tmp_path / "dense-f32.gguf", None)}
    runs = {}
    for label, (path, lora) in files.items():
        with LlamaCpp(path, lora=lora) as lm:
            logits = [lm.logits(x) for x in ids]
            gen = [lm.generate(x, 16) for x in ids]
            info = lm.info
        cmp = [_compare(g, r) for g, r in zip(logits, ref)]
        runs[label] = {"file_mib": round(path.stat().st_size / 2**20, 2),
                       "max_abs_dlogit": max(c["max_abs_dlogit"] for c in cmp),
                       "mean_abs_dlogit": float(np.mean([c["mean_abs_dlogit"] for c in cmp])),
                       "argmax_agree": float(np.mean([c["argmax_agree"] for c in cmp])),
                       "greedy_equal": [g == r for g, r in zip(gen, ref_gen)],
                       "greedy_text": [tok.decode(g) for g in gen]}
    result = {"model": "smollm2-135m", "checkpoint": "rtn w4 g64 asymmetric, protect massive",
              "export": "Q5_0 linears (exact), adapter F32", "prompts": PROMPTS,
              "tokens": [len(x) for x in ids], "mvquant_greedy_text": [tok.decode(g) for g in ref_gen],
              "llamacpp_system_info": info["system_info"], "runs": runs,
              "command": "python -m pytest -m llamacpp tests/test_llamacpp.py"}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")

    ctrl, with_a, base = runs["control: same weights dense F32"], runs["export + adapter"], runs["export, no adapter"]
    # llama.cpp computes mvquant's function: the same weights in F32 agree with mvquant to float rounding
    assert ctrl["mean_abs_dlogit"] < 0.02 and ctrl["argmax_agree"] == 1.0 and all(ctrl["greedy_equal"])
    # the exported file: llama.cpp's quantized kernels round activations to 8 bits (q8_0/q8_1 dot
    # products), so logits move by a fraction of a logit; the adapter brings them closer than the base
    assert with_a["mean_abs_dlogit"] < 0.6 and with_a["argmax_agree"] >= 0.85
    assert with_a["mean_abs_dlogit"] < base["mean_abs_dlogit"]


GGML_Q4_K = 12   # ggml_type


def test_q4k_rounding_matches_ggml(tmp_path):
    """mvquant's Q4_K rounding (quantization/q4k.py) against ggml's own quantize_row_q4_K_ref
    (ggml_quantize_chunk without an importance matrix, what llama-quantize runs) on a real weight of the
    built-in model: the blocks are byte-identical except where float summation order flips a near tie."""
    python, _ = _env_or_skip()
    from mvquant.loading import load_model
    from mvquant.quantization import q4k

    model, _ = load_model("smollm2-135m")
    w = model.model.layers[3].mlp.down_proj.weight.detach().float()[:256]     # [256, 1536]: 6 super-blocks a row
    np.save(tmp_path / "w.npy", w.numpy())
    ours = q4k.to_blocks(*q4k.quantize(w)).reshape(-1, q4k.BLOCK_BYTES)
    script = f"""
import ctypes, glob, numpy as np, llama_cpp, os
lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib', 'libggml-base.so'))[0])
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
w = np.ascontiguousarray(np.load({str(tmp_path / 'w.npy')!r}), dtype=np.float32)
dst = np.zeros(w.size // 256 * 144, dtype=np.uint8)
lib.ggml_quantize_chunk({GGML_Q4_K}, w.ctypes.data, dst.ctypes.data, 0, w.shape[0], w.shape[1], None)
np.save({str(tmp_path / 'ref.npy')!r}, dst)
"""
    subprocess.run([str(python), "-c", script], check=True)
    ref = np.load(tmp_path / "ref.npy").reshape(-1, q4k.BLOCK_BYTES)
    same = (ours == ref).all(1).mean()
    assert same > 0.9, same
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize
    a, b = dequantize(ours, T.Q4_K), dequantize(ref, T.Q4_K)
    err_ours, err_ref = np.square(a.reshape(w.shape) - w.numpy()).mean(), np.square(b.reshape(w.shape) - w.numpy()).mean()
    assert abs(err_ours / err_ref - 1) < 0.01                                  # the same quality where they differ


def test_compare_scores_an_arm_in_llamacpp(tmp_path):
    """`mvquant compare` with `engine: llamacpp`: the arm's checkpoint exported to GGUF and scored in
    llama.cpp on the same items as the in-process arm of the same quantizer."""
    _env_or_skip()
    from mvquant.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""name: gguf-arms
model: smollm2-135m
tasks: [capitals]
limit: 12
arms:
  - {name: rtn-w4, method: rtn, bits: 4, group_size: 64}
  - {name: rtn-w4-llamacpp, method: rtn, bits: 4, group_size: 64, engine: llamacpp}
""")
    assert main(["compare", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 0
    import csv
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    a, b = rows["rtn-w4"], rows["rtn-w4-llamacpp"]
    assert list((tmp_path / "out").rglob("model.gguf"))
    assert int(a["n"]) == int(b["n"]) == 12
    # the same function up to llama.cpp's 8-bit activation rounding: at most one item in 12 may differ
    assert abs(float(a["acc"]) - float(b["acc"])) <= 1 / 12 + 1e-9
