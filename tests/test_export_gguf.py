"""mvquant export --format gguf: block packing bit-exact against gguf's own dequantize; tiny Llama and
Gemma 3 exports read back with gguf.GGUFReader and checked tensor by tensor against mvquant's weights
(Llama's q/k row permutation, the adapter restoring protected rows exactly, F16 form); refusals."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, ToyTokenizer

import mvquant
from mvquant.cli import main
from mvquant.errors import MvquantError
from mvquant.export import gguf_blocks
from mvquant.export.gguf_blocks import T, dequantize_blocks, gguf_type, to_blocks
from mvquant.export.gguf_export import adapter_path, llamacpp_dir
from mvquant.pipeline import quantize
from mvquant.quantization import QuantConfig, core
from mvquant.quantization import quantized_modules

# -- block packing: our codes -> ggml blocks -> gguf.quants.dequantize == our dequantize ----------------
GRIDS = [  # bits, symmetric, group, int4 choice, expected type
    (4, False, 32, "q5_0", T.Q5_0), (4, False, 64, "q5_0", T.Q5_0), (4, False, 128, "q5_0", T.Q5_0),
    (4, False, None, "q5_0", T.Q5_0), (4, True, 64, "q5_0", T.Q4_0), (3, False, 32, "q5_0", T.Q4_0),
    (3, False, 96, "q5_0", T.Q4_0), (3, True, None, "q5_0", T.Q4_0), (8, True, 64, "q5_0", T.Q8_0),
    (8, True, None, "q5_0", T.Q8_0),
]


@pytest.mark.parametrize("bits,sym,group,int4,qtype", GRIDS)
def test_blocks_bit_exact(bits, sym, group, int4, qtype):
    torch.manual_seed(bits * 1000 + (group or 0))
    w = torch.randn(12, 224) * torch.rand(12, 1) * 3          # 224 = 7 blocks; groups 64/96/128 end short
    assert gguf_type(bits, sym, group, 224, int4) == qtype
    codes, scales, zeros = core.quantize_weight(w, bits, group, sym)
    blocks = to_blocks(codes, scales, zeros, bits, group, qtype)
    assert blocks.shape == (12, 7 * gguf_blocks.GGML_QUANT_SIZES[qtype][1])
    ours = core.dequantize_codes(codes, scales, zeros, bits, group)
    assert torch.equal(dequantize_blocks(blocks, qtype, 224), ours)


@pytest.mark.parametrize("group", [32, 64, None])
def test_q4_1_within_fp16_rounding_of_the_min(group):
    torch.manual_seed(7)
    w = torch.randn(16, 256) + 0.5                             # asymmetric ranges: zero points away from 8
    codes, scales, zeros = core.quantize_weight(w, 4, group, False)
    blocks = to_blocks(codes, scales, zeros, 4, group, T.Q4_1)
    ours = core.dequantize_codes(codes, scales, zeros, 4, group)
    err = (dequantize_blocks(blocks, T.Q4_1, 256) - ours).abs()
    s = core.expand_groups(scales.float(), 256, group)
    # m = -s*z (z <= 15) rounded to fp16: at most half an fp16 ulp of 15 s, i.e. 15/2048 s
    assert (err <= s * 15 / 2048 + 1e-12).all() and err.max() > 0
    assert gguf_blocks.bits_per_weight(T.Q4_1) == 5.0 and gguf_blocks.bits_per_weight(T.Q5_0) == 5.5


def test_q5_0_high_bits_layout():
    """Element j's 5th bit is bit j of qh (ggml-common.h block_q5_0), little-endian after the fp16 d."""
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).unsqueeze(0)      # 0..15, 0..15
    one = torch.ones(1, 1, dtype=torch.float16)
    b = to_blocks(codes, one, torch.zeros(1, 1, dtype=torch.uint8), 4, 32, T.Q5_0)   # q5 = c + 16: all high bits
    assert b.shape == (1, 22) and int.from_bytes(b[0, 2:6].tobytes(), "little") == 0xFFFFFFFF
    b = to_blocks(codes, one, torch.full((1, 1), 15, dtype=torch.uint8), 4, 32, T.Q5_0)  # q5 = c + 1: only c = 15
    assert int.from_bytes(b[0, 2:6].tobytes(), "little") == (1 << 15) | (1 << 31)
    assert torch.equal(dequantize_blocks(b, T.Q5_0, 32)[0], codes[0].float() - 15)


@pytest.mark.parametrize("bits,sym,group,in_f,match", [
    (2, False, 32, 64, "2-bit"), (4, False, 16, 64, "group size 16"), (4, False, 48, 96, "group size 48"),
    (4, False, 32, 100, "100 inputs"), (5, False, 32, 64, "5-bit"),
])
def test_no_gguf_type(bits, sym, group, in_f, match):
    with pytest.raises(MvquantError, match=match):
        gguf_type(bits, sym, group, in_f)


def test_asymmetric_int8_out_of_range_refused():
    codes = torch.tensor([[255] * 16 + [0] * 16], dtype=torch.uint8)
    with pytest.raises(MvquantError, match="--symmetric"):
        to_blocks(codes, torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.uint8), 8, 32, T.Q8_0)


# -- exports of tiny random models, read back -----------------------------------------------------
def _converter_or_skip():
    try:
        return llamacpp_dir()
    except MvquantError as e:
        pytest.skip(str(e))


def _checkpoint(tmp, arch, **conf):
    """A tiny random model with the built-in model's BPE tokenizer (the converter hashes the tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mvquant.models.builtin import builtin_model_dir

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m"))
    cfg = dict(TINY_CONFIGS[arch])
    model_type = cfg.pop("model_type")
    cfg.update(vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).float().eval()
    report = mvquant.calibrate(model, ToyTokenizer(), samples=4, seq_len=32, top_k=1, progress=False)
    conf = dict(method="rtn", bits=4, group_size=32, protect="massive") | conf
    quantize(model, QuantConfig(**conf), report=report, tokenizer=ToyTokenizer(), progress=False)
    return mvquant.save_quantized(model, tok, tmp / f"ck-{arch}-{conf['bits']}", report=report)


def _read(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    fields.update({k: len(f.data) for k, f in r.fields.items() if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")})
    fields["tokenizer.ggml.pre"] = r.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in r.fields else None
    return fields, {t.name: t for t in r.tensors}


def _tensor(t) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))


def _gguf_names(model, arch):
    import gguf

    garch = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}[arch]
    return gguf.get_tensor_name_map(garch, model.config.num_hidden_layers)


def _llama_perm(n_rows, n_head):
    """convert_hf_to_gguf's LlamaModel.permute, restated on row indices: new row i = old row perm[i]."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    _converter_or_skip()
    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ("llama", "gemma3_text"):
        ck = _checkpoint(tmp, arch)
        assert main(["export", str(ck), "--format", "gguf", "--output", str(tmp / f"{arch}.gguf")]) == 0
        assert main(["export", str(ck), "--format", "gguf", "--protect-as", "f16",
                     "--output", str(tmp / f"{arch}-f16.gguf")]) == 0
        out[arch] = (ck, tmp)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_export_matches_mvquant_weights(exports, arch):
    ck, tmp = exports[arch]
    model = mvquant.load(ck)
    names = _gguf_names(model, arch)
    fields, tensors = _read(tmp / f"{arch}.gguf")
    afields, atensors = _read(adapter_path(tmp / f"{arch}.gguf"))
    assert fields["general.architecture"] == {"llama": "llama", "gemma3_text": "gemma3"}[arch]
    assert fields["general.file_type"] == 8                                    # MOSTLY_Q5_0
    assert fields["tokenizer.ggml.tokens"] == 49152 and fields["tokenizer.ggml.pre"] == "smollm"
    assert afields["general.type"] == "adapter" and afields["adapter.type"] == "lora"
    assert afields["general.architecture"] == fields["general.architecture"]
    cfg = model.config
    n_protected = 0
    for hf, m in quantized_modules(model).items():
        gname = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        t = tensors[gname]
        assert t.tensor_type == T.Q5_0
        perm = torch.arange(m.out_features)
        if arch == "llama" and hf.endswith(("q_proj", "k_proj")):
            perm = _llama_perm(m.out_features, cfg.num_attention_heads if hf.endswith("q_proj") else cfg.num_key_value_heads)
        want = m.dequantized_weight(torch.float32)[perm]                        # mvquant's weight, GGUF's row order
        base = _tensor(t)
        rows = torch.argsort(perm)[m.protected_rows.long()]                       # protected rows, permuted
        keep = torch.ones(m.out_features, dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(base[keep], want[keep])                               # packed rows: bit-exact
        if m.n_protected:
            n_protected += m.n_protected
            a, b = _tensor(atensors[f"{gname}.lora_a"]), _tensor(atensors[f"{gname}.lora_b"])
            assert a.shape == (m.n_protected, m.in_features) and b.shape == (m.out_features, m.n_protected)
            assert torch.equal(base + b @ a, want)                               # adapter: protected rows exact
            # without the adapter: the protected rows re-quantized RTN on the module's grid (a plain int4
            # model, never zeroed rows)
            rtn = core.fake_quantize(want[rows], m.bits, m.group_size, m.symmetric)
            assert torch.equal(base[rows], rtn) and (base[rows] - want[rows]).abs().max() > 0
        else:
            assert f"{gname}.lora_a" not in atensors
    assert n_protected > 0 and len(atensors) == 2 * sum(1 for m in quantized_modules(model).values() if m.n_protected)
    # dense tensors as the converter writes them: F16 matrices, F32 norms (Gemma's (1 + w) stored as 1 + w)
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.F16
    assert torch.equal(_tensor(emb), model.get_input_embeddings().weight.detach().half().float())
    norm = _tensor(tensors["blk.0.attn_norm.weight"])
    w = model.model.layers[0].input_layernorm.weight.detach().float()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32
    assert torch.allclose(norm, w + 1 if arch == "gemma3_text" else w, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_export_protect_as_f16(exports, arch):
    ck, tmp = exports[arch]
    model = mvquant.load(ck)
    names = _gguf_names(model, arch)
    _, tensors = _read(tmp / f"{arch}-f16.gguf")
    assert not adapter_path(tmp / f"{arch}-f16.gguf").exists()
    for hf, m in quantized_modules(model).items():
        t = tensors[names.get_name(f"{hf}.weight", try_suffixes=(".weight",))]
        perm = torch.arange(m.out_features)
        if arch == "llama" and hf.endswith(("q_proj", "k_proj")):
            perm = _llama_perm(m.out_features, model.config.num_attention_heads if hf.endswith("q_proj")
                               else model.config.num_key_value_heads)
        want = m.dequantized_weight(torch.float32)[perm]
        if m.n_protected:
            assert t.tensor_type == T.F16
            got = _tensor(t)
            rows = torch.argsort(perm)[m.protected_rows.long()]
            assert torch.equal(got[rows], want[rows])                             # protected rows exact (fp16)
            assert torch.equal(got, want.half().float())
        else:
            assert t.tensor_type == T.Q5_0 and torch.equal(_tensor(t), want)


def test_export_refusals(exports, tmp_path, capsys):
    ck, tmp = exports["llama"]
    out = tmp / "llama.gguf"
    before = out.stat().st_mtime_ns
    assert main(["export", str(ck), "--format", "gguf", "--output", str(out)]) == 2        # exists, no --force
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    # --force into the f16 form removes the replaced export's adapter (else --lora auto would pick it up)
    mine = tmp_path / "mine.gguf"
    # --force replaces only what mvquant wrote: not someone else's GGUF, not a file that is not GGUF
    for foreign in (b"GGUF not really", Path(out).read_bytes().replace(b"mvquant.export", b"someone.elses")):
        mine.write_bytes(foreign)
        assert main(["export", str(ck), "--format", "gguf", "--output", str(mine), "--force"]) == 2
        assert "was not written by mvquant export" in capsys.readouterr().err and mine.read_bytes() == foreign
    mine.unlink()
    shutil.copy(out, mine)
    shutil.copy(adapter_path(out), adapter_path(mine))
    assert main(["export", str(ck), "--format", "gguf", "--protect-as", "f16", "--output", str(mine)]) == 2
    assert main(["export", str(ck), "--format", "gguf", "--protect-as", "f16", "--output", str(mine), "--force"]) == 0
    assert mine.is_file() and not adapter_path(mine).exists()
    mine.unlink()
    capsys.readouterr()
    ck2 = _checkpoint(tmp_path, "llama", bits=2)
    assert main(["export", str(ck2), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "2-bit" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(ck), "--format", "gguf", "--output", str(tmp_path / "m.bin")]) == 2
    # an architecture llama.cpp's converter does not know: one line, exit 2, nothing written
    ck = Path(shutil.copytree(ck, tmp_path / "ck-foreign"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    man = json.loads((ck / "mvquant_manifest.json").read_text())
    data = (ck / "config.json").read_bytes()
    man["files"]["config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "mvquant_manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["export", str(ck), "--format", "gguf", "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]          # (transformers' load progress aside)
    assert len(errors) == 1 and "does not know the architecture 'NoSuchModelForCausalLM'" in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["ck-foreign", "ck-llama-2"]                                # nothing half-written


def test_eval_engine_llamacpp_refusals(tmp_path, capsys):
    """What `mvquant eval --engine llamacpp` refuses before loading anything (one line, exit 2)."""
    for argv, match in ((["eval", str(tmp_path / "ck"), "--engine", "llamacpp"], "scores a .gguf file"),
                        (["eval", "smollm2-135m", "--lora", "x.gguf"], "--lora is for --engine llamacpp"),
                        (["eval", str(tmp_path / "missing.gguf"), "--engine", "llamacpp", "--disrupt", "massive"],
                         "in process")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
