"""Bit packing along the last dim: 8 codes of `bits` bits go into `bits` bytes (little-endian
within the 8-code block). 4-bit is two codes per byte (low nibble first), 8-bit is one byte.
Rows stay independent: a row of n codes takes ceil(n / 8) * bits bytes."""
from __future__ import annotations

import torch

from ..errors import MvquantError


def packed_width(n: int, bits: int) -> int:
    if bits == 8:
        return n
    return -(-n // 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer tensor [..., n] with values in [0, 2**bits). Returns uint8 [..., packed_width]."""
    if bits not in (2, 3, 4, 5, 8):   # 5: the q4_k grid's Q5_0 fallback (grid.py)
        raise MvquantError(f"cannot pack {bits}-bit codes: use 2, 3, 4 or 8 bits")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    *lead, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(*lead, (n + pad) // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)                                    # [..., blocks] holds 8*bits bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF                # [..., blocks, bits]
    return out.to(torch.uint8).reshape(*lead, (n + pad) // 8 * bits).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., packed_width] -> uint8 codes [..., n]."""
    if bits == 8:
        return packed[..., :n]
    if bits == 4:  # the common case, without the int64 detour
        lo, hi = packed & 0x0F, packed >> 4
        return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :n]
    *lead, width = packed.shape
    b = packed.to(torch.int64).view(*lead, width // bits, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, width // bits * 8)[..., :n]
