"""What the dense (per-pixel) evaluators share on the host: cutting scenes into tiles (and stitching
them back), random crops, and the flips and rotations applied alike to an image and its map.

OSCD change detection and DynamicEarthNet segmentation both train on square windows of large scenes
and predict every evaluation scene as its non-overlapping tiles (`TiledScenes`, predicted by
`fit.predict`): the official OSCD metric is taken over batches of these tiles, the pooled metrics
over the pixels inside the scenes.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class TiledScenes:
    """Every scene of an evaluation set as its tiles, zero-padded at the bottom and right borders
    (as PIL's crop beyond the border did in SeCo's OSCD reader)."""

    images: tuple[np.ndarray, ...]  # per input image of a scene: [T, size, size, C]
    targets: np.ndarray  # [T, size, size], `pad` beyond the border
    inside: np.ndarray  # bool [T, size, size]: the pixel lies in its scene
    scene: np.ndarray  # [T]: the index of the tile's scene

    def __len__(self) -> int:
        return len(self.scene)

    def load(self, indices) -> tuple[np.ndarray, ...]:
        return tuple(images[indices] for images in self.images)


def tile_scenes(
    scenes: Sequence[tuple[np.ndarray, ...]], targets: Sequence[np.ndarray], size: int, pad=0
) -> TiledScenes:
    """`TiledScenes` of `scenes` (each a tuple of [H, W, C] images of one scene) and their
    [H, W] `targets`, in scene order and row-major order within a scene; target pixels beyond a
    scene's border are `pad`."""
    images = [[] for _ in scenes[0]]
    tiled_targets, inside, scene = [], [], []
    for index, (scene_images, target) in enumerate(zip(scenes, targets, strict=True)):
        for part, image in zip(images, scene_images, strict=True):
            part.append(tile(image, size)[0])
        target_tiles, _ = tile(target, size)
        mask_tiles, _ = tile(np.ones(target.shape, bool), size)
        target_tiles[~mask_tiles] = pad
        tiled_targets.append(target_tiles)
        inside.append(mask_tiles)
        scene.append(np.full(len(target_tiles), index))
    return TiledScenes(
        images=tuple(np.concatenate(part) for part in images),
        targets=np.concatenate(tiled_targets),
        inside=np.concatenate(inside),
        scene=np.concatenate(scene),
    )
