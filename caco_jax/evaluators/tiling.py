"""What the dense (per-pixel) evaluators share on the host: cutting images into tiles and stitching
predictions back, random crops, and the flips and rotations applied alike to an image and its map.

OSCD change detection and DynamicEarthNet segmentation both train on square windows of large scenes
and predict each evaluation scene whole, stitched from its non-overlapping tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def tile(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Cuts [H, W, ...] into [rows * cols, size, size, ...] tiles in row-major order, zero-padding
    the bottom and right borders; returns the tiles and (rows, cols)."""
    height, width = image.shape[:2]
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    padded = np.zeros((rows * size, cols * size, *image.shape[2:]), image.dtype)
    padded[:height, :width] = image
    tiles = padded.reshape(rows, size, cols, size, *image.shape[2:]).swapaxes(1, 2)
    return tiles.reshape(rows * cols, size, size, *image.shape[2:]), (rows, cols)


def stitch(tiles: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `tile`: reassembles the tiles and crops the padding to `shape` = (H, W)."""
    rows, cols = grid
    size = tiles.shape[1]
    full = tiles.reshape(rows, cols, size, size, *tiles.shape[3:]).swapaxes(1, 2)
    full = full.reshape(rows * size, cols * size, *tiles.shape[3:])
    return full[: shape[0], : shape[1]]


def random_crops(
    arrays: Sequence[np.ndarray], indices: np.ndarray, size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One `size` x `size` window per index, at a uniformly drawn position, cut at the same place
    from every array of `arrays` (each [N, H, W, ...] with the same H and W): the official
    DynamicEarthNet loader's `_crop`."""
    height, width = arrays[0].shape[1:3]
    if height < size or width < size:
        raise ValueError(f"random_crops: images of {height}x{width} px are smaller than {size} px")
    out = [np.empty((len(indices), size, size, *a.shape[3:]), a.dtype) for a in arrays]
    for row, index in enumerate(indices):
        top = int(rng.integers(height - size + 1))
        left = int(rng.integers(width - size + 1))
        for source, target in zip(arrays, out, strict=True):
            target[row] = source[index, top : top + size, left : left + size]
    return out


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Per example: horizontal flip with p = 0.5, then rotation by a random multiple of 90
    degrees, the same for every array of `arrays` (each [N, H, W, ...]; SeCo's RandomFlip +
    RandomRotation, applied alike to the images and the mask)."""
    out = [np.empty_like(a) for a in arrays]
    for i in range(arrays[0].shape[0]):
        flip = rng.random() < 0.5
        turns = int(rng.integers(4))
        for source, target in zip(arrays, out, strict=True):
            x = source[i][:, ::-1] if flip else source[i]
            target[i] = np.rot90(x, turns, axes=(0, 1))
    return out
