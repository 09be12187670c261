"""QuantLinear: stored tensors, protected rows, and every compute path against a plain matmul."""
import pytest
import torch
import torch.nn.functional as F

from mvquant.quantization import core
from mvquant.quantization.linear import QuantLinear


def _layer(out_f=48, in_f=96, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g), (torch.randn(out_f, generator=g) if bias else None)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, None, True), (4, 24, False), (8, None, False),
                                                  (8, None, True), (8, 32, True), (3, 32, False), (2, 16, True)])
def test_forward_matches_dequantized_weight(bits, group, symmetric):
    w, b = _layer()
    rows = torch.tensor([3, 4, 40])
    q = QuantLinear.from_weight(w, b, bits=bits, group_size=group, symmetric=symmetric, protected_rows=rows)
    x = torch.randn(7, 96)
    # independent reference: RTN of the non-protected rows + fp16 protected rows, then a float matmul
    keep = torch.ones(48, dtype=torch.bool)
    keep[rows] = False
    codes, scale, zero = core.quantize_weight(w[keep], bits, group, symmetric)
    ref_w = torch.empty_like(w)
    ref_w[keep] = core.dequantize_codes(codes, scale, zero, bits, group)
    ref_w[rows] = w[rows].half().float()
    ref = x @ ref_w.t() + b
    assert torch.equal(q.dequantized_weight(), ref_w)
    out = q(x)
    tol = 3e-2 if q.kernel in ("int4pack", "int8pack") else 1e-5  # bf16 activations in the torch kernels
    assert (out - ref).abs().max() <= tol * ref.abs().max(), q.kernel
    q.compute = "dequant"
    q.prepare()
    assert q.kernel == "dequant"
    assert torch.allclose(q(x), ref, atol=1e-5, rtol=1e-5)


def test_kernel_choice():
    w, b = _layer()
    assert QuantLinear.from_weight(w, b, bits=4, group_size=32, symmetric=False).kernel == "int4pack"
    assert QuantLinear.from_weight(w, b, bits=4, group_size=24, symmetric=False).kernel == "dequant"
    assert QuantLinear.from_weight(w, b, bits=8, group_size=None, symmetric=False).kernel == "int8pack"
    assert QuantLinear.from_weight(w, b, bits=3, group_size=32, symmetric=False).kernel == "dequant"
    assert QuantLinear.from_weight(w, b, bits=8, group_size=None, symmetric=True, act_bits=8).kernel == "int_mm"


@pytest.mark.parametrize("in_f", [60, 100, 104, 120, 576])
def test_int_kernels_pad_awkward_shapes(in_f):
    """in_features not a multiple of 8 / of the group, rows not a multiple of 16 (the kernels' limits)."""
    w, b = _layer(out_f=37, in_f=in_f, bias=False)
    x = torch.randn(3, in_f)
    for bits, group in ((4, 128), (4, None), (8, None)):
        q = QuantLinear.from_weight(w, None, bits=bits, group_size=group, symmetric=False)
        assert q.kernel in ("int4pack", "int8pack")
        ref = x @ q.dequantized_weight().t()
        assert (q(x) - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_protected_rows_are_bit_exact_fp16():
    w, b = _layer(bias=False)
    rows = torch.tensor([0, 5, 6, 47])
    q = QuantLinear.from_weight(w, None, bits=2, group_size=16, symmetric=False, protected_rows=rows)
    assert q.protected_weight.dtype == torch.float16
    assert torch.equal(q.protected_weight, w[rows].half())
    assert torch.equal(q.protected_rows, rows.to(torch.int32))
    x = torch.randn(4, 96)
    # the protected outputs are exactly the fp16 rows applied to the unmodified input
    assert torch.equal(q(x)[:, rows], F.linear(x, w[rows].half().float()))


def test_all_rows_protected_and_no_rows_protected():
    w, b = _layer(out_f=16, in_f=32)
    x = torch.randn(2, 32)
    q = QuantLinear.from_weight(w, b, bits=4, group_size=32, symmetric=False, protected_rows=torch.arange(16))
    assert q.qweight.shape[0] == 0
    assert torch.equal(q(x), F.linear(x, w.half().float()) + b)
    q0 = QuantLinear.from_weight(w, b, bits=4, group_size=32, symmetric=False)
    assert q0.n_protected == 0 and q0.qweight.shape == (16, 16)


def test_input_scale_basis():
    """AWQ / SmoothQuant store codes of W * s and divide x by s: same function up to quantization."""
    w, b = _layer(bias=False)
    s = (torch.rand(96) + 0.5).half().float()  # stored in fp16
    q = QuantLinear.from_weight(w, None, bits=8, group_size=None, symmetric=True, input_scale=s, compute="dequant")
    x = torch.randn(5, 96)
    ref = (x / s) @ core.fake_quantize(w * s, 8, None, True).t()
    assert torch.allclose(q(x), ref, atol=1e-5)
    assert torch.allclose(q.dequantized_weight(), core.fake_quantize(w * s, 8, None, True) / s)


def test_w8a8_quantizes_activations_per_token():
    w, _ = _layer(bias=False)
    q = QuantLinear.from_weight(w, None, bits=8, group_size=None, symmetric=True, act_bits=8)
    assert q.kernel == "int_mm"
    x = torch.randn(6, 96)
    # independent integer computation: int8 tokens x int8 weights, then the two scales
    xq, xs = core.quantize_activations_per_token(x)
    codes, scale, _ = core.quantize_weight(w, 8, None, True)
    wq = codes.long() - 128
    ref = (xq.long() @ wq.t()).float() * xs * scale.float().t()
    assert torch.allclose(q(x), ref, rtol=1e-6, atol=1e-6)
    q.compute = "dequant"
    q.prepare()
    assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-5)  # the fallback quantizes activations too


def test_storage_bytes_count_everything():
    w, b = _layer(out_f=32, in_f=64)
    q = QuantLinear.from_weight(w, b, bits=4, group_size=32, symmetric=False, protected_rows=torch.tensor([1, 2]))
    parts = q.storage_bytes()  # 2 zero points per row pack into one 8-code block = 4 bytes
    assert parts == {"qweight": 30 * 32, "scales": 30 * 2 * 2, "zeros": 30 * 4, "protected_rows": 2 * 4,
                     "protected_weight": 2 * 64 * 2}
