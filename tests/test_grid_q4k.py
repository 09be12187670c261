"""--grid q4_k: llama.cpp's Q4_K grid as a quantization grid (quantization/q4k.py, grid.py).

The math against gguf's own Q4_K dequantize (bit for bit) and against the C reference's choices;
GPTQ and AWQ on the grid beat rounding to nearest on it; a tiny Llama quantized on the grid with
protected rows saves, reloads and exports to GGUF as Q4_K blocks bit-exactly (fallback linears as
Q5_0), with the adapter restoring the protected rows; refusals."""
import numpy as np
import pytest
import torch
from conftest import ToyTokenizer

import mvquant
from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, q4k
from mvquant.quantization import quantized_modules
from mvquant.quantization.methods.gptq import gptq_quantize
from mvquant.quantization.grid import linear_format


def _weights(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 7] *= 20                                  # an outlier column
    w[1] = torch.rand(cols, generator=g) * 0.1     # an all-positive row (min clamped to 0)
    w[2, :32] = 0.0                                # a flat sub-block (scale 0)
    w[3, :256] = 0.0                               # a flat super-block
    return w


def test_blocks_bit_exact_against_gguf_dequantize():
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    w = _weights()
    codes, sb, sub = q4k.quantize(w)
    blocks = q4k.to_blocks(codes, sb, sub)
    assert blocks.shape == (48, 2 * q4k.BLOCK_BYTES)
    ref = torch.from_numpy(np.ascontiguousarray(dequantize(blocks, T.Q4_K), dtype=np.float32)).view(48, 512)
    assert torch.equal(ref, q4k.dequantize(codes, sb, sub))


def test_grid_values_and_error():
    w = _weights()
    codes, sb, sub = q4k.quantize(w)
    assert int(codes.max()) <= 15 and int(sub.max()) <= 63 and sb.dtype == torch.float16
    deq = q4k.dequantize(codes, sb, sub)
    assert torch.equal(deq[3, :256], torch.zeros(256))                       # a flat zero super-block stays exact
    s, off = q4k.scale_offset(sb, sub)
    se, oe = s.repeat_interleave(32, -1), off.repeat_interleave(32, -1)
    # rounding to nearest against the stored (d*sc, dmin*m): inside the sub-block's range [-off, 15 s - off]
    # (the range search may clip outliers) every weight is within half a step
    inside = (w >= -oe) & (w <= 15 * se - oe)
    assert inside.float().mean() > 0.95
    assert bool(((deq - w).abs() <= se * 0.5 + 1e-7)[inside].all())
    rel = float((deq - w).pow(2).mean().sqrt() / w.std())
    assert rel < 0.12                                                          # 4-bit: about 1/15 of the range


# One block_q4_K as ggml's quantize_row_q4_K_ref writes it (llama-cpp-python 0.3.36's libggml-base.so,
# ggml_quantize_chunk(GGML_TYPE_Q4_K, ...) on torch.randn(1, 256, generator seed 0) * 0.02): d, dmin,
# the 12 packed 6-bit scales/mins, 128 bytes of codes. The comparison over many rows is in test_llamacpp.py.
REF_BLOCK = ("d006ef12f3bfb9bbb2a46ebfb058d1ae345437566b5b77604973495968cd0c0733728a5b4a32673f3b7697f90d1eac35e54aaaab"
             "023f85a89195a5a5a36ab66986198497c9a56a98767ef07693c3c7d9c436947aca59bfb397987592672396187668086cd889f6b7"
             "2844f098b439282964ea8a9978ac652d775159bb4bb0cb041e088d3cd07da4707dcfb35a4987f196")


def test_same_block_as_llamacpp_reference():
    w = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    assert bytes(q4k.to_blocks(*q4k.quantize(w))[0]) == bytes.fromhex(REF_BLOCK)


def _hessian(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)) / cols ** 0.5
    x[:, 5] *= 8
    return x, x.t() @ x


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_q4k_beats_rtn_on_q4k(act_order):
    w = _weights(32, 512)
    x, h = _hessian(512)
    codes, sb, sub = gptq_quantize(w, h, bits=4, group_size=32, symmetric=False, act_order=act_order, grid="q4_k")
    assert codes.shape == w.shape and sb.shape == (32, 2, 2) and sub.shape == (32, 16, 2)
    gptq_err = float((x @ (q4k.dequantize(codes, sb, sub) - w).t()).pow(2).mean())
    rtn_err = float((x @ (q4k.dequantize(*q4k.quantize(w)) - w).t()).pow(2).mean())
    assert gptq_err < 0.8 * rtn_err


def test_linear_format_fallback():
    cfg = QuantConfig(method="gptq", grid="q4_k")
    assert (cfg.bits, cfg.group_size, cfg.symmetric) == (4, 32, False)
    assert linear_format(cfg, 512) == ("q4_k", 4, 32, False)
    assert linear_format(cfg, 576) == ("int", 5, 32, True)                     # llama-quantize's Q5_0 fallback
    assert linear_format(QuantConfig(bits=3, group_size=64), 576) == ("int", 3, 64, False)


@pytest.mark.parametrize("bad,match", [
    (dict(grid="q4_k", bits=3), "--bits 4"), (dict(grid="q4_k", method="smoothquant", bits=8), "--grid int"),
    (dict(grid="q8"), "unknown grid")])
def test_config_refusals(bad, match):
    with pytest.raises(MvquantError, match=match):
        QuantConfig(**bad)


def _tiny(tmp, method, hidden=256, inter=512):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mvquant.models.builtin import builtin_model_dir

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=2, vocab_size=len(tok),
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    quantize(model, QuantConfig(method=method, bits=4, grid="q4_k", protect="massive", calib_samples=4,
                                calib_seq_len=32), report=report, tokenizer=ToyTokenizer(), progress=False)
    return model, mvquant.save_quantized(model, tok, tmp / f"ck-{method}-{hidden}", report=report)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_model_on_q4k_saves_reloads_and_exports(tmp_path, method):
    from gguf import GGMLQuantizationType as T
    from test_export_gguf import _converter_or_skip, _gguf_names, _llama_perm, _read, _tensor

    model, ck = _tiny(tmp_path, method)
    mods = quantized_modules(model)
    assert {m.grid for m in mods.values()} == {"q4_k"} and sum(m.n_protected for m in mods.values()) > 0
    again = mvquant.load(ck)
    x = torch.randint(0, 1000, (1, 12))
    with torch.inference_mode():
        assert torch.equal(model(x).logits, again(x).logits)
    _converter_or_skip()
    out = tmp_path / f"{method}.gguf"
    assert main(["export", str(ck), "--format", "gguf", "--output", str(out), "--gguf-embed", "q8_0"]) == 0
    _, tensors = _read(out)
    _, adapter = _read(out.with_name(f"{method}.protect.gguf"))
    names = _gguf_names(again, "llama")
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0
    for hf, m in quantized_modules(again).items():
        gname = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        t = tensors[gname]
        assert t.tensor_type == T.Q4_K
        perm = torch.arange(m.out_features)
        if hf.endswith(("q_proj", "k_proj")):
            perm = _llama_perm(m.out_features, 4 if hf.endswith("q_proj") else 2)
        want = m.dequantized_weight(torch.float32)[perm]
        base = _tensor(t)
        rows = torch.argsort(perm)[m.protected_rows.long()]
        keep = torch.ones(m.out_features, dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(base[keep], want[keep])                          # Q4_K blocks: bit-exact
        if m.n_protected:
            a, b = _tensor(adapter[f"{gname}.lora_a"]), _tensor(adapter[f"{gname}.lora_b"])
            assert torch.equal(base + b @ a, want)                           # adapter: protected rows exact
            assert torch.equal(base[rows], q4k.dequantize(*q4k.quantize(want[rows])))   # base: RTN on Q4_K


def test_fallback_linears_export_as_q5_0(tmp_path):
    from gguf import GGMLQuantizationType as T
    from test_export_gguf import _converter_or_skip, _read

    model, ck = _tiny(tmp_path, "rtn", hidden=64, inter=256)
    grids = {n.rsplit(".", 1)[1]: (m.grid, m.bits) for n, m in quantized_modules(model).items()}
    assert grids["down_proj"] == ("q4_k", 4) and grids["q_proj"] == ("int", 5)
    _converter_or_skip()
    out = tmp_path / "fb.gguf"
    assert main(["export", str(ck), "--format", "gguf", "--output", str(out)]) == 0
    _, tensors = _read(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q4_K
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q5_0 and tensors["blk.0.ffn_up.weight"].tensor_type == T.Q5_0


def test_cli_refusals(tmp_path, capsys):
    assert main(["quantize", "--grid", "q4_k", "--group-size", "64", "--output", str(tmp_path / "x")]) == 2
    assert "sub-blocks of 32" in capsys.readouterr().err and not (tmp_path / "x").exists()
    _, ck = _tiny(tmp_path, "rtn", hidden=64, inter=256)
    assert main(["export", str(ck), "--output", str(tmp_path / "ct")]) == 2
    assert "--format gguf" in capsys.readouterr().err and not (tmp_path / "ct").exists()
