"""The pure math of massive values, checked against hand computations."""
import math

import pytest
import torch

from mvquant.calibration import stats as S


def test_sum_of_squares_masks_padding_exactly():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(3):
        for s in range(5):
            if mask[b, s]:
                expected += x[b, s].double() ** 2
    got = S.sum_of_squares(x, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S.sum_of_squares(x), (x.double() ** 2).sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_massive_by_lambda_follows_the_definition():
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0],    # mean 4.625: 30 > 5 x 4.625
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 20.0]])   # mean 3.375: 20 > 16.875
    assert S.massive_by_lambda(m, 5.0) == [[7], [7]]
    assert S.massive_by_lambda(m, 6.0) == [[7], []]                 # 20 < 6 x 3.375 = 20.25
    assert S.massive_by_lambda(torch.ones(3, 8), 5.0) == [[], [], []]


def test_topk_and_lowest():
    m = torch.tensor([[5.0, 1.0, 9.0, 3.0], [0.5, 7.0, 2.0, 8.0]])
    assert S.massive_by_topk(m, 1) == [[2], [3]]
    assert S.massive_by_topk(m, 2) == [[0, 2], [1, 3]]
    assert S.lowest_by_topk(m, 1) == [[1], [0]]
    assert S.massive_by_topk(m, 10) == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("pairing,rotary,dim,partner,pair", [
    ("half", 64, 23, 55, 23), ("half", 64, 55, 23, 23), ("half", 64, 0, 32, 0),
    ("interleaved", 64, 10, 11, 5), ("interleaved", 64, 11, 10, 5),
    ("half", 16, 20, None, None),          # partial rotary: dims past rotary_dim are not rotated
    (None, None, 3, None, None),           # no RoPE
])
def test_pairs(pairing, rotary, dim, partner, pair):
    assert S.pair_partner(dim, rotary, pairing) == partner
    assert S.pair_index(dim, rotary, pairing) == pair


def test_close_pairs_adds_partners_once():
    assert S.close_pairs([[23], [23, 55], []], 64, "half") == [[23, 55], [23, 55], []]
    assert S.close_pairs([[4, 20]], 16, "half") == [[4, 12, 20]]
    assert S.close_pairs([[3]], None, None) == [[3]]


def test_low_frequency_share_and_frequency():
    # 32 pairs; pairs >= 16 are the low-frequency half. dims 23 (pair 23) and 55 (pair 23) low, 2 high.
    assert S.low_frequency_share([[23, 55], [2]], 64, "half") == pytest.approx(2 / 3)
    assert S.low_frequency_share([[]], 64, "half") is None
    assert S.low_frequency_share([[1]], None, None) is None
    assert S.pair_frequency(0, 64, 1e5) == 1.0
    assert S.pair_frequency(16, 64, 1e5) == pytest.approx(1e5 ** -0.5)
    assert S.pair_frequency(31, 64, 1e5) < S.pair_frequency(16, 64, 1e5)


def test_concentration():
    m = torch.tensor([[1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(S.concentration(m), torch.tensor([5.0 / 2.0, 1.0]))
    assert math.isfinite(float(S.concentration(torch.zeros(1, 4))[0]))


def test_atomic_outputs_keep_usual_permissions_and_refuse_overwrite(tmp_path):
    import os
    from mvquant import MvquantError
    from mvquant.io import atomic_directory, atomic_write_text, check_output_path

    f = tmp_path / "a.txt"
    atomic_write_text(f, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(MvquantError, match="--force"):
        check_output_path(f)
    with atomic_directory(tmp_path / "d") as d:
        (d / "inner").write_text("y")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    with pytest.raises(RuntimeError):                 # a failure leaves no directory behind
        with atomic_directory(tmp_path / "e"):
            raise RuntimeError("boom")
    assert not (tmp_path / "e").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
