"""Tiled application of an encoder or decoder, so an image larger than memory allows can still be
encoded and decoded: activations are bounded by one tile; only the output is full size.

Tiles of ``tile`` pixels overlap by ``overlap`` pixels (the last tile of a row or column is moved
back to end at the border). In each overlap the outputs of the two tiles are cross-faded
linearly. A tile's outputs next to its own border have seen the tile's zero padding instead of
the image, so the outer quarter of each overlap side gets weight 0 and the cross-fade runs over
its middle half: a convolutional network whose receptive-field radius is at most a quarter of
the overlap (both in output pixels) gives exactly the untiled result. GroupNorm and attention see
one tile at a time, so with them the result is close to, not equal to, the untiled one: on the
trained f=4 first stages (64-px images), tiles of 48 px overlapping by 32 px gave reconstructions
26-29 dB PSNR from the untiled ones, and within 1 dB of their PSNR to the images; 32-px tiles
overlapping by 16 px were only 18-21 dB from the untiled ones (bench/results/first_stage_family.jsonl).
Use tiles as large as memory allows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, up: int = 1, down: int = 1
) -> torch.Tensor:
    """``fn(x)`` computed tile by tile. fn maps (B, C, h, w) to (B, C', h·up/down, w·up/down)
    (up = f for a decoder, down = f for an encoder); tile and overlap are in x's pixels and must
    be multiples of ``down``. Returns (B, C', H·up/down, W·up/down)."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tiling needs tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if tile % down or overlap % down:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the downsample factor {down}")
    height, width = x.shape[-2:]
    if height % down or width % down:
        raise ValueError(f"image size {(height, width)} must be divisible by f={down}")
    out_overlap = overlap * up // down
    out = weights = None
    for top, th in _spans(height, tile, overlap):
        for left, tw in _spans(width, tile, overlap):
            piece = fn(x[..., top : top + th, left : left + tw])  # (B, C', th·up/down, tw·up/down)
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], height * up // down, width * up // down)
                weights = piece.new_zeros(1, 1, *out.shape[-2:])
            wy = _ramp(piece.shape[-2], out_overlap, top > 0, top + th < height, piece)  # (th',)
            wx = _ramp(piece.shape[-1], out_overlap, left > 0, left + tw < width, piece)  # (tw',)
            w = wy[:, None] * wx[None, :]  # (th', tw')
            rows = slice(top * up // down, top * up // down + piece.shape[-2])
            cols = slice(left * up // down, left * up // down + piece.shape[-1])
            out[..., rows, cols] += w * piece
            weights[..., rows, cols] += w
    return out / weights  # every output pixel has a positive weight from some tile


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one axis; the last one ends at the border."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, tile) for s in starts]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, like: torch.Tensor) -> torch.Tensor:
    """Per-pixel weight along one axis (length,): 1 inside; on a side shared with another tile,
    0 over the outer quarter of the overlap, rising linearly over its middle half."""
    weight = torch.ones(length, dtype=like.dtype, device=like.device)
    if overlap == 0:
        return weight
    margin = overlap // 4
    distance = torch.arange(length, dtype=like.dtype, device=like.device)  # from the start side
    rise = ((distance - margin + 0.5) / (overlap - 2 * margin)).clamp(0.0, 1.0)
    if at_start:
        weight = weight * rise
    if at_end:
        weight = weight * rise.flip(0)
    return weight
