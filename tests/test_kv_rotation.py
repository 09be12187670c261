"""vLLM's rotated KV schemes in our cache (issue 21): TurboQuant keys and int4_per_token_head, each
against a direct, loop-by-loop implementation of the published scheme, their error bounds, rotation
+ protection, and TurboQuant's unquantized boundary layers."""
from __future__ import annotations

import math

import pytest
import torch

from mvquant.errors import MvquantError
from mvquant.kvcache import KVConfig, MassiveKVLayer, bytes_per_token, kv_cache
from mvquant.kvcache import rotation as R
from tests.conftest import make_tiny_model

# Max (1960) / Lloyd: optimal quantizer of N(0, 1), positive half of the levels, and its MSE
MAX_LEVELS = {2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
MAX_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("d", [16, 64, 256, 96])
def test_hadamard_is_orthonormal_and_its_own_inverse(d):
    h = R.hadamard(d)
    assert torch.allclose(h @ h, torch.eye(d), atol=1e-5) and torch.equal(h, h.T)
    b = R.largest_pow2_divisor(d)
    nonzero = h.abs()[h != 0]
    assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / math.sqrt(b))) and nonzero.numel() == d * b


@pytest.mark.parametrize("bits", [2, 3])
def test_lloyd_max_matches_the_published_gaussian_quantizer(bits):
    for d in (64, 256):
        c, bounds = R.lloyd_max(d, bits)
        levels = (c * math.sqrt(d))[2 ** (bits - 1):].tolist()
        assert levels == pytest.approx(MAX_LEVELS[bits], abs=2e-3)
        assert torch.allclose(bounds, (c[1:] + c[:-1]) / 2)


def _direct_turbo(x, bits):
    """TurboQuant's key path written out vector by vector: normalize, rotate, nearest centroid,
    re-normalize the centroid vector, rotate back, scale by the fp16 norm."""
    d = x.shape[-1]
    c, _ = R.lloyd_max(d, bits)
    h = R.hadamard(d)
    out = torch.empty_like(x)
    for i, v in enumerate(x.reshape(-1, d)):
        n = v.norm()
        y = (v / (n + 1e-8)) @ h
        q = c[(y[:, None] - c[None, :]).abs().argmin(1)]
        q = q / q.norm()
        out.view(-1, d)[i] = n.half().float() * (q @ h)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_keys_equal_the_direct_scheme_and_its_distortion(bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 40, 64) * 3
    idx, norm = R.turbo_quantize(x, bits)
    assert idx.dtype == torch.uint8 and int(idx.max()) < 2 ** bits and norm.dtype == torch.float16
    got = R.turbo_dequantize(idx, norm, bits)
    assert torch.allclose(got, _direct_turbo(x, bits), atol=1e-5)
    # Gaussian vectors rotate to N(0, 1/d) coordinates: the relative error is Lloyd-Max's MSE
    rel = float(((got - x) ** 2).sum() / (x ** 2).sum())
    assert 0.5 * MAX_MSE[bits] < rel < 1.3 * MAX_MSE[bits]


def _direct_rht_int(x, bits):
    """int4_per_token_head written out: signs, unnormalized Sylvester Hadamard, asymmetric codes with an
    integer zero point over the head, then the inverse."""
    d = x.shape[-1]
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = R.rht_signs(d)
    y = (x * s) @ h
    qmax = 2 ** bits - 1
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = (hi - lo) / qmax
    zero = torch.floor(-lo / scale + 0.5).clamp(0, qmax)          # -lo >= 0 here: half rounds up
    q = torch.sign(y / scale + zero) * torch.floor((y / scale + zero).abs() + 0.5)
    return ((q.clamp(0, qmax) - zero) * scale) @ h * s / d, scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rht_per_token_head_equals_the_direct_scheme_and_its_bound(bits):
    torch.manual_seed(10 + bits)
    x = torch.randn(2, 2, 30, 64)
    x[..., 5] *= 40                                                  # an outlier channel
    got = R.rht_dequantize(*R.rht_quantize(x, bits))
    ref, scale = _direct_rht_int(x, bits)
    assert torch.allclose(got, ref, atol=1e-4 * float(x.abs().max()))
    # per rotated coordinate the error is at most one step (half a step of rounding, and the rounded
    # zero point can clamp the top code by half a step more): ||e|| <= sqrt(d) * scale, and the
    # inverse transform (H / d) divides that norm by sqrt(d)
    assert bool(((got - x).norm(dim=-1, keepdim=True) <= scale * (1 + 1e-3)).all())
    half = ((got - x).norm(dim=-1, keepdim=True) / scale).median()
    assert float(half) < 0.5                                           # typically well inside it


def test_rotation_with_protection_keeps_the_massive_channel_out():
    """A massive channel kept exact is zeroed before the rotation: the other channels' error does not
    grow with it, while without protection it spreads over every channel of the head."""
    torch.manual_seed(0)
    b, h, t, d = 1, 2, 40, 64
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    rest = torch.ones(d, dtype=torch.bool)
    rest[[7, 39]] = False
    errs = {}
    for axis in ("turboquant", "rht"):
        for scale, protected in ((1.0, [[7, 39], [7, 39]]), (100.0, [[7, 39], [7, 39]]), (100.0, [[], []])):
            kk = k.clone()
            kk[..., 7] *= scale
            layer = MassiveKVLayer(bits=3, axis_key=axis, residual=0, protected=protected)
            kr, vr = layer.update(kk, v)
            if protected[0]:
                assert torch.equal(kr[..., [7, 39]], kk[..., [7, 39]])
            errs[axis, scale, bool(protected[0])] = float((kr - kk)[..., rest].norm() / k[..., rest].norm())
        assert errs[axis, 100.0, True] == pytest.approx(errs[axis, 1.0, True], rel=1e-4)
        assert errs[axis, 100.0, False] > 3 * errs[axis, 100.0, True]


def test_turboquant_cache_keeps_boundary_layers_exact_and_counts_their_bytes():
    model = make_tiny_model("llama")
    n = model.config.num_hidden_layers
    ids = torch.randint(2, 100, (1, 40))
    cache = kv_cache(model, None, bits=3, protect="none", axis="turboquant", residual=0)
    model(ids, past_key_values=cache, use_cache=True)
    exact = KVConfig(axis="turboquant").exact_layers(n)
    assert exact == tuple(sorted(set(range(min(2, n // 2))) | set(range(n - min(2, n // 2), n))))
    for i, layer in enumerate(cache.layers):
        assert (layer.stored_tokens()["quantized"] == 0) == (i in exact)
    assert KVConfig(axis="turboquant", boundary=0).exact_layers(n) == ()
    assert KVConfig(axis="rht").exact_layers(n) == ()
    # bytes: 64-dim heads, 3-bit: K 24 B + fp16 norm 2 B, V 24 B + fp16 scale and minimum 4 B per head
    cfg = KVConfig(bits=3, axis="turboquant", protect="none")
    got = bytes_per_token(cfg, num_kv_heads=1, head_dim=64, protected=[[[]]] * 8)["bytes_per_token"]
    assert got == pytest.approx(4 * 256 + 4 * (24 + 2 + 24 + 4))
    rht = bytes_per_token(KVConfig(bits=4, axis="rht", protect="none"), 1, 64, [[[]]] * 8)["bytes_per_token"]
    assert rht == pytest.approx(8 * 2 * (32 + 4))


def test_rotated_schemes_run_a_model_and_refuse_what_they_cannot_do():
    model = make_tiny_model("llama")
    ids, nxt = torch.randint(2, 100, (2, 48)), torch.randint(2, 100, (2, 5))
    ref = model(torch.cat([ids, nxt], 1)).logits
    for axis in ("turboquant", "rht"):
        errs = []
        for bits in (4, 2):
            cache = kv_cache(model, None, bits=bits, protect="none", axis=axis, residual=8, boundary=0)
            a = model(ids, past_key_values=cache, use_cache=True).logits
            c = model(nxt, past_key_values=cache, use_cache=True).logits
            errs.append(float((torch.cat([a, c], 1) - ref).abs().max()))
        assert 0 < errs[0] < errs[1]
    with pytest.raises(MvquantError, match="turboquant takes --kv-bits 2, 3, 4"):
        KVConfig(bits=8, axis="turboquant").check()
    with pytest.raises(MvquantError, match="boundary layer count"):
        KVConfig(axis="turboquant", boundary=-1).check()
