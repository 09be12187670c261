"""plugins/mvquant-vllm: the W4A16 kernel it gives vLLM on CPUs without one (AVX2). Its math is pure
torch: compressed-tensors' own packing in, torch's int4 GEMM out, equal to the dequantized weight
within bf16 rounding. (The plugin inside a running vLLM is checked by the `serve`-marked tests.)"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "mvquant-vllm"))
from mvquant_vllm.int4 import int4pack_linear, to_int4pack, unpack_nibbles  # noqa: E402

pack_to_int32 = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").pack_to_int32


def packed_linear(n, k, group, asym, seed=0):
    """Codes, zero points and scales as compressed-tensors stores them, and the weight they mean."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    z = torch.randint(0, 16, (n, k // group), generator=g) if asym else torch.full((n, k // group), 8)
    s = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    w = ((q.view(n, k // group, group) - z[..., None]).float() * s[..., None]).view(n, k)
    wp = pack_to_int32((q - 8).to(torch.int8), 4)
    zp = pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0) if asym else None
    return q, z, wp, zp, s, w


@pytest.mark.parametrize("n,k,group,asym", [(200, 576, 64, True), (96, 1024, 128, False), (48, 576, 576, True),
                                            (1536, 512, 256, True)])
def test_int4pack_equals_the_dequantized_compressed_tensors_weight(n, k, group, asym):
    q, z, wp, zp, s, w = packed_linear(n, k, group, asym)
    assert torch.equal(unpack_nibbles(wp, k, 1), q.to(torch.int32))
    if asym:
        assert torch.equal(unpack_nibbles(zp, n, 0), z.to(torch.int32))
    layout = to_int4pack(wp, s.to(torch.float16), zp, k)
    x = torch.randn(2, 7, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    y = int4pack_linear(x, layout, bias)
    ref = x @ w.t() + bias
    assert y.shape == (2, 7, n) and y.dtype == x.dtype
    # bf16 activations and scales: a few parts in a thousand of the output's range
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_group_the_kernel_cannot_run_is_refused():
    _, _, wp, zp, s, _ = packed_linear(32, 96, 48, True)
    with pytest.raises(ValueError, match="multiple of 32"):
        to_int4pack(wp, s, zp, 96)
