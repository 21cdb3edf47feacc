"""On-device view construction: augmentation and normalisation of the host's uint8 batches.

Everything here is jit-able and vectorised over the batch (per-image randomness, no Python loops
over images). The official pipeline (`utkarshmall13/CACo`, torchvision on PIL images) is reproduced
op by op:

1. stretch: per band ``floor(clip((x - low) / (high - low) * 255, 0, 255)) / 255``, SeCo's
   ``normalize`` + ``ToTensor``, done first as the official reader does, so colour ops see the same
   values (``Normalization``).
2. A (caco/teco/seco: applied to t1 and t0 at full size, before cropping; moco: after cropping):
   colour jitter with p=0.8 (brightness, contrast, saturation in [0.6, 1.4], hue in [-0.1, 0.1],
   applied in a random order per image, as torchvision's ``ColorJitter``), grayscale with p=0.2,
   Gaussian blur with sigma ~ U[0.1, 2.0] with p=0.5, horizontal flip with p=0.5.
3. P: torchvision's ``RandomResizedCrop(224, scale=(0.2, 1), ratio=(3/4, 4/3))`` box sampling
   (10 tries, then the centre-crop fallback), resampled like PIL's bilinear resize of the cropped
   image (triangle filter widened by the downscale factor, i.e. antialiased, weights renormalised
   inside the crop), as two matrix products with per-image [crop, H] and [crop, W] resize matrices.
   For P(A(t)) the blur and flip, linear and last in A, are folded into those matrices.
4. ImageNet mean/std (or the per-band statistics of ``all_bands``).

View recipes (``make_views``; `methods.Method.views`): ``seco`` (CACo, TeCo, SeCo, as the official
``src/datasets/seco_dataset.py``): ``q = P(t0), k0 = P(A(t1)), k1 = P(t2), k2 = P(A(t0))``;
``moco``: ``q = A(P(t0)), k0 = A(P(t0))`` (pl_bolts' ``Moco2TrainImagenetTransforms``). The key of
subspace s is always ``k{s}``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from caco_jax.data.normalization import Normalization, merge_band_groups
from caco_jax.settings import Section

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentSettings(Section):
    """`config.augment`; the defaults are the official torchvision pipeline's."""

    SECTION = "augment"
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    crop_attempts: int = 10
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # bri., con., sat., hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    def validate(self) -> None:
        self.require(self.crop_size >= 1, "crop_size", "must be >= 1")
        scale, ratio, sigma = self.crop_scale, self.crop_ratio, self.blur_sigma
        self.require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            "crop_scale",
            "must be (low, high) with 0 < low <= high <= 1",
        )
        self.require(
            len(ratio) == 2 and 0 < ratio[0] <= ratio[1],
            "crop_ratio",
            "must be (low, high) with 0 < low <= high",
        )
        self.require(self.crop_attempts >= 1, "crop_attempts", "must be >= 1")
        self.require(
            len(self.jitter) == 4 and all(v >= 0 for v in self.jitter) and self.jitter[3] <= 0.5,
            "jitter",
            "must be 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5)",
        )
        for key in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            self.require(0.0 <= getattr(self, key) <= 1.0, key, "in [0, 1]")
        self.require(
            len(sigma) == 2 and 0 < sigma[0] <= sigma[1],
            "blur_sigma",
            "must be (low, high) with 0 < low <= high",
        )

    @property
    def blur_radius(self) -> int:
        """Kernel half-width: 3 sigma of the widest blur (13 taps for sigma <= 2)."""
        return math.ceil(3.0 * self.blur_sigma[1])


# ----------------------------------------------------------------------------- colour ops
# One image [H, W, C] in [0, 1]. torchvision's tensor formulas (F_t.adjust_*); for C != 3 (band
# subsets) only brightness and contrast have a meaning, the RGB-only ops leave the image unchanged.


def _is_rgb(img: jax.Array) -> bool:
    return img.shape[-1] == 3


def _luma(img: jax.Array) -> jax.Array:
    """[H, W, 1] torchvision luma 0.2989 R + 0.587 G + 0.114 B.

    Written out rather than as a dot over the channels: XLA fuses it into the surrounding
    elementwise ops instead of running a separate matrix-vector product per use.
    """
    red, green, blue = img[..., 0:1], img[..., 1:2], img[..., 2:3]
    return 0.2989 * red + 0.587 * green + 0.114 * blue


def grayscale(img: jax.Array) -> jax.Array:
    """torchvision's rgb_to_grayscale, repeated to 3 channels."""
    if not _is_rgb(img):
        return img
    return jnp.broadcast_to(_luma(img), img.shape)


# Brightness, contrast and saturation are each a blend clip(a x + b mean(gray(x)) + c gray(x)) with
# coefficients (a, b, c) from the factor, so that `color_jitter` can apply whichever of them its
# random order puts in a slot without computing all three.


def _gray(img: jax.Array) -> jax.Array:
    """[H, W, 1] grey level: luma for RGB, the band mean otherwise (only its image mean is used)."""
    if _is_rgb(img):
        return _luma(img)
    return jnp.mean(img, axis=-1, keepdims=True)


def _blend_op(img: jax.Array, coefficients: jax.Array) -> jax.Array:
    gray = _gray(img)
    a, b, c = coefficients[0], coefficients[1], coefficients[2]
    return jnp.clip(a * img + b * jnp.mean(gray) + c * gray, 0.0, 1.0)


def _brightness(factor, img) -> jax.Array:
    """Blend with black."""
    return jnp.stack([factor, 0.0, 0.0])


def _contrast(factor, img) -> jax.Array:
    """Blend with the mean grey level of the whole image (the mean of all bands for C != 3)."""
    return jnp.stack([factor, 1.0 - factor, 0.0])


def _saturation(factor, img) -> jax.Array:
    """Blend with the grey image (the identity for C != 3)."""
    if not _is_rgb(img):
        return jnp.array([1.0, 0.0, 0.0])
    return jnp.stack([factor, 0.0, 1.0 - factor])


def adjust_brightness(img: jax.Array, factor) -> jax.Array:
    return _blend_op(img, _brightness(factor, img))


def adjust_contrast(img: jax.Array, factor) -> jax.Array:
    return _blend_op(img, _contrast(factor, img))


def adjust_saturation(img: jax.Array, factor) -> jax.Array:
    return _blend_op(img, _saturation(factor, img))


def rgb_to_hsv(red, green, blue):
    """Planes in [0, 1] -> hue (turns, [0, 1)), saturation, value (the textbook hexcone model)."""
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    grey = chroma == 0
    safe_chroma = jnp.where(grey, 1.0, chroma)
    # The sector is set by the largest channel (red wins ties, then green).
    sixths = jnp.where(
        value == red,
        (green - blue) / safe_chroma,
        jnp.where(
            value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0
        ),
    )
    hue = jnp.where(grey, 0.0, (sixths / 6.0) % 1.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Hue (turns), saturation, value -> red, green, blue planes."""

    def channel(offset):
        # Distance of the hue from this channel's own sixth, as a trapezoid in [0, 1].
        k = (offset + hue * 6.0) % 6.0
        return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return channel(5.0), channel(3.0), channel(1.0)


def rotate_hue(image, delta):
    """Rotates the hue of an RGB image ``[..., 3]`` by ``delta`` turns, ``(h + delta) % 1``
    through HSV: dm-pix's op, for machines without dm-pix (benchmarks/device_check.py); the two
    agree to float32 rounding (tests/test_augment.py)."""
    hue, saturation, value = rgb_to_hsv(image[..., 0], image[..., 1], image[..., 2])
    return jnp.stack(hsv_to_rgb((hue + delta) % 1.0, saturation, value), axis=-1)


try:  # dm-pix is a core dependency, so every training run uses it
    from dm_pix import adjust_hue as _rotate_hue
except ImportError:  # a bare accelerator image (benchmarks/device_check.py)
    _rotate_hue = rotate_hue


def adjust_hue(img: jax.Array, delta) -> jax.Array:
    """Rotate the HSV hue by `delta` turns; dm-pix's op is torchvision's ``(h + delta) % 1``."""
    if not _is_rgb(img):
        return img
    return jnp.clip(_rotate_hue(img, delta), 0.0, 1.0)


JITTER_UNIFORMS = 8


def _between(u, low, high):
    return low + u * (high - low)


def color_jitter(u: jax.Array, img: jax.Array, strengths) -> jax.Array:
    """torchvision ColorJitter: four factors, applied in a random order drawn per image.

    `u` holds JITTER_UNIFORMS uniforms in [0, 1): the four factors, then four that rank the ops.
    """
    brightness, contrast, saturation, hue = strengths
    fb = _between(u[0], max(0.0, 1.0 - brightness), 1.0 + brightness)
    fc = _between(u[1], max(0.0, 1.0 - contrast), 1.0 + contrast)
    fs = _between(u[2], max(0.0, 1.0 - saturation), 1.0 + saturation)
    fh = _between(u[3], -hue, hue)
    order = jnp.argsort(u[4:8])  # a uniformly random permutation: 0 bri, 1 con, 2 sat, 3 hue
    # Blend coefficients per op (row 3: the identity); the costly hue shift runs once, between the
    # slots before and after its position.
    identity = jnp.array([1.0, 0.0, 0.0])
    table = jnp.stack([_brightness(fb, img), _contrast(fc, img), _saturation(fs, img), identity])
    hue_position = jnp.argmax(order == 3)
    for slot in range(3):  # positions 0 .. hue_position - 1
        op = jnp.where(slot < hue_position, order[slot], 3)
        img = _blend_op(img, table[op])
    img = adjust_hue(img, fh)
    for slot in range(3):  # positions hue_position + 1 .. 3
        position = hue_position + 1 + slot
        op = jnp.where(position <= 3, order[jnp.minimum(position, 3)], 3)
        img = _blend_op(img, table[op])
    return img


# ----------------------------------------------------------------------------- blur, flip


def _gaussian_weights(sigma, radius: int) -> jax.Array:
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    return weights / jnp.sum(weights)


def _separable(img: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """rows [h, H] @ img [H, W, C] @ cols [w, W]^T per channel -> [h, w, C]: any separable linear
    map of an image (resize, blur, flip) as two matrix products (BLAS / MXU work, no gathers).

    Rows first: that product contracts the image's leading axis (a plain matrix product over
    [H, W * C]) and, for a downscaling crop, shrinks the image before the second one.
    """
    shrunk = jnp.einsum("oh,hwc->owc", rows, img, precision=_HIGHEST)
    return jnp.einsum("pw,owc->opc", cols, shrunk, precision=_HIGHEST)


def _times_blur_matrix(matrix: jax.Array, weights: jax.Array) -> jax.Array:
    """matrix [n, N] @ G, G the [N, N] matrix of blurring along one axis with the symmetric
    `weights` (2 radius + 1 taps), edges replicated: blurring x along its axis 0 is G @ x.

    G = the zero-padded blur (a symmetric band) + the taps that fall off an edge, which land on the
    edge pixel. Costs n N (2 radius + 1) operations, not the n N^2 of a dense product.
    """
    radius = (weights.shape[0] - 1) // 2
    size = matrix.shape[1]
    padded = jnp.pad(matrix, ((0, 0), (radius, radius)))
    inner = sum(weights[k] * padded[:, k : k + size] for k in range(2 * radius + 1))
    edge = min(radius, size)
    # Pixel i < radius sends sum_{k < radius - i} weights[k] past its edge (mirrored: the far edge).
    spill = jnp.cumsum(weights)[radius - 1 - jnp.arange(edge)]
    first = jnp.sum(matrix[:, :edge] * spill, axis=1)
    last = jnp.sum(matrix[:, ::-1][:, :edge] * spill, axis=1)
    return inner.at[:, 0].add(first).at[:, -1].add(last)


def gaussian_blur(img: jax.Array, sigma, radius: int) -> jax.Array:
    """Separable Gaussian of std `sigma`, taps within `radius`, edges replicated (as PIL's blur).

    Applied as G_H @ img @ G_W^T: written as a sum of shifted taps, XLA fuses the blur with the
    colour ops that produce `img` and recomputes them per tap (measured 7-10x slower on CPU).
    """
    weights = _gaussian_weights(sigma, radius)
    height, width = img.shape[:2]
    rows = _times_blur_matrix(jnp.eye(height, dtype=jnp.float32), weights)
    cols = (
        rows if width == height else _times_blur_matrix(jnp.eye(width, dtype=jnp.float32), weights)
    )
    return _separable(img, rows, cols)


AUGMENT_UNIFORMS = JITTER_UNIFORMS + 5


def augment_colour(u: jax.Array, img: jax.Array, settings: AugmentSettings) -> jax.Array:
    """The pixelwise (non-linear) part of A: RandomApply(jitter, 0.8) then grayscale 0.2."""
    apply_jitter, apply_gray = u[JITTER_UNIFORMS], u[JITTER_UNIFORMS + 1]
    jittered = color_jitter(u[:JITTER_UNIFORMS], img, settings.jitter)
    img = jnp.where(apply_jitter < settings.jitter_p, jittered, img)
    return jnp.where(apply_gray < settings.grayscale_p, grayscale(img), img)


def augment_image(u: jax.Array, img: jax.Array, settings: AugmentSettings) -> jax.Array:
    """The official ``augment``: RandomApply(jitter, 0.8), grayscale 0.2, blur 0.5, flip 0.5.

    `u` holds AUGMENT_UNIFORMS uniforms in [0, 1) (one image's randomness).
    """
    apply_blur, sigma_u, apply_flip = u[JITTER_UNIFORMS + 2 :]
    img = augment_colour(u, img, settings)
    sigma = _between(sigma_u, *settings.blur_sigma)
    blurred = gaussian_blur(img, sigma, settings.blur_radius)
    img = jnp.where(apply_blur < settings.blur_p, blurred, img)
    return jnp.where(apply_flip < settings.flip_p, img[:, ::-1], img)


# ----------------------------------------------------------------------------- random resized crop


def crop_uniforms(settings: AugmentSettings) -> int:
    return 2 * settings.crop_attempts + 2


def crop_box(u: jax.Array, height: int, width: int, settings: AugmentSettings) -> jax.Array:
    """torchvision RandomResizedCrop.get_params: int32 (top, left, h, w).

    `u` holds crop_uniforms(settings) uniforms in [0, 1): scale and log-aspect of each try, then the
    position.
    """
    tries = settings.crop_attempts
    area = float(height * width)
    target = area * _between(u[:tries], *settings.crop_scale)
    log_ratio = (math.log(settings.crop_ratio[0]), math.log(settings.crop_ratio[1]))
    aspect = jnp.exp(_between(u[tries : 2 * tries], *log_ratio))
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # round half to even, like round()
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    fallback_h, fallback_w = _centre_crop_size(height, width, settings.crop_ratio)
    found = jnp.any(fits)
    h = jnp.where(found, h[first], fallback_h)
    w = jnp.where(found, w[first], fallback_w)
    top_random = jnp.floor(u[2 * tries] * (height - h + 1)).astype(jnp.int32)
    left_random = jnp.floor(u[2 * tries + 1] * (width - w + 1)).astype(jnp.int32)
    top = jnp.where(found, jnp.minimum(top_random, height - h), (height - h) // 2)
    left = jnp.where(found, jnp.minimum(left_random, width - w), (width - w) // 2)
    return jnp.stack([top, left, h, w]).astype(jnp.int32)


def _centre_crop_size(height: int, width: int, ratio) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def resize_matrix(start, length, in_size: int, out_size: int) -> jax.Array:
    """[out_size, in_size] matrix of PIL's bilinear resize of pixels [start, start + length).

    Output pixel o is sum_i matrix[o, i] * input[i]. PIL's filter is a triangle widened by the
    downscale factor (antialiasing) whose weights are renormalised over the pixels inside the crop;
    pixels outside the crop get weight 0. A dense matrix rather than a few gathered taps per output
    pixel: resampling becomes two matrix products (BLAS / MXU work, no gathers) that multiply the
    zeros too; on XLA:CPU they still beat the gathers at 64 px and break even at 224 px, and they
    take their input materialised instead of fusing (and recomputing) the ops upstream per tap
    (BENCHMARKS.md, "On-device augmentation").
    """
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)  # antialias: the triangle widens when downscaling
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    positions = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(positions[None, :] + 0.5 - centres[:, None]) / support)
    inside = (positions >= start) & (positions < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _crop_matrices(box, height: int, width: int, size: int) -> tuple[jax.Array, jax.Array]:
    return resize_matrix(box[0], box[2], height, size), resize_matrix(box[1], box[3], width, size)


def resized_crop(img: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """Crop `box` (top, left, h, w) of `img` [H, W, C] and resize it to [size, size, C]."""
    return _separable(img, *_crop_matrices(box, *img.shape[:2], size))


def augmented_crop(
    u: jax.Array, img: jax.Array, box: jax.Array, settings: AugmentSettings
) -> jax.Array:
    """P(A(img)) = resized_crop(augment_image(u, img, settings), box, crop_size).

    The colour ops run on the full image; the blur and the flip, which come after them and are
    linear, are folded into the crop's resize matrices (blur: G_H, G_W; flip: reversed columns):
    out = (rows G_H) colour(img) (cols F G_W)^T. That spares two full-size passes per image.
    """
    height, width = img.shape[:2]
    apply_blur, sigma_u, apply_flip = u[JITTER_UNIFORMS + 2 :]
    rows, cols = _crop_matrices(box, height, width, settings.crop_size)
    cols = jnp.where(apply_flip < settings.flip_p, cols[:, ::-1], cols)
    sigma = _between(sigma_u, *settings.blur_sigma)
    weights = _gaussian_weights(sigma, settings.blur_radius)
    blur = apply_blur < settings.blur_p
    rows = jnp.where(blur, _times_blur_matrix(rows, weights), rows)
    cols = jnp.where(blur, _times_blur_matrix(cols, weights), cols)
    return _separable(augment_colour(u, img, settings), rows, cols)


# ----------------------------------------------------------------------------- batched views


# One uniform draw per batch feeds every image's randomness: far cheaper to compile than a key
# split per image and op. The draws (shape and order) are those of the formulation this one
# replaced, so a given key gives the same views as before.


def _crop_uniforms(key, views: int, batch: int, settings):
    return jax.random.uniform(key, (views, batch, crop_uniforms(settings)))


def _augment_uniforms(key, views: int, batch: int):
    return jax.random.uniform(key, (views, batch, AUGMENT_UNIFORMS))


def _boxes(u, images, settings):
    height, width = images.shape[1:3]
    return jax.vmap(lambda ui: crop_box(ui, height, width, settings))(u)


def _crop_batch(u_crop, images, settings):
    boxes = _boxes(u_crop, images, settings)
    return jax.vmap(lambda x, b: resized_crop(x, b, settings.crop_size))(images, boxes)


def _augmented_crop_batch(u_augment, u_crop, images, settings):
    boxes = _boxes(u_crop, images, settings)
    return jax.vmap(lambda ui, x, b: augmented_crop(ui, x, b, settings))(u_augment, images, boxes)


def _augment_batch(u_augment, images, settings):
    return jax.vmap(lambda ui, x: augment_image(ui, x, settings))(u_augment, images)


def _multi_aug_views(key, acquisitions, settings):
    """SeCo/CACo: q = P(t0), k0 = P(A(t1)), k1 = P(t2), k2 = P(A(t0)).

    Each view is built from its acquisition directly (no concatenated copies of full-size images).
    """
    t0, t1, t2 = acquisitions[:, 0], acquisitions[:, 1], acquisitions[:, 2]
    batch = t0.shape[0]
    k_augment, k_crop = jax.random.split(key)
    u_t1, u_t0 = _augment_uniforms(k_augment, 2, batch)
    u_q, u_k0, u_k1, u_k2 = _crop_uniforms(k_crop, 4, batch, settings)
    return {
        "q": _crop_batch(u_q, t0, settings),
        "k0": _augmented_crop_batch(u_t1, u_k0, t1, settings),
        "k1": _crop_batch(u_k1, t2, settings),
        "k2": _augmented_crop_batch(u_t0, u_k2, t0, settings),
    }


def _moco_views(key, acquisitions, settings):
    """MoCo v2: two independent A(P(t0)) of one acquisition, A after the crop."""
    t0 = acquisitions[:, 0]
    k_crop, k_augment = jax.random.split(key)
    both = jnp.concatenate([t0, t0])
    crops = _crop_batch(_crop_uniforms(k_crop, 1, both.shape[0], settings)[0], both, settings)
    views = _augment_batch(_augment_uniforms(k_augment, 1, both.shape[0])[0], crops, settings)
    return dict(zip(("q", "k0"), jnp.split(views, 2), strict=True))


# `methods.Method.views` -> the function building those views.
VIEW_RECIPES = {"seco": _multi_aug_views, "moco": _moco_views}


def make_views(
    key: jax.Array,
    images,
    *,
    recipe: str,
    settings: AugmentSettings,
    normalization: Normalization | None = None,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """A method's views of a batch (``recipe`` = `methods.Method.views`), normalised, NHWC
    [B, crop, crop, C] each.

    `images` is the pipeline's ``images``: uint8 [B, V, H, W, C], or for ``all_bands`` the dict of
    resolution groups (merged here into 12 bands in layout.BANDS order). Returns ``q`` and ``k0``
    (moco) or ``q, k0, k1, k2`` (seco: CACo, TeCo, SeCo). `normalization` defaults to the RGB
    input; pass `data.normalization.for_records(...)` for ``all_bands``.
    """
    if recipe not in VIEW_RECIPES:
        raise ValueError(f"unknown view recipe {recipe!r}; known: {tuple(VIEW_RECIPES)}")
    norm = normalization or Normalization.rgb()
    raw = merge_band_groups(images) if isinstance(images, dict) else images
    if raw.shape[-1] != len(norm.mean):
        raise ValueError(
            f"images have {raw.shape[-1]} bands but the normalisation has {len(norm.mean)}"
        )
    # float32 for float32 and bfloat16 training; float64 runs (tests) augment in float64 too.
    stretched = norm.stretch(raw, jnp, dtype=jnp.promote_types(dtype, jnp.float32))
    views = VIEW_RECIPES[recipe](key, stretched, settings)
    return {name: norm.standardize(view, jnp).astype(dtype) for name, view in views.items()}


def item_keyed_views(settings: AugmentSettings, method, normalization: Normalization, dtype):
    """The step's view function: (key, images [n, V, H, W, C], item_ids [n]) -> views
    [1 + S, n, h, w, c] (q, k0, ...) for `methods.Method` ``method``.

    Each item's augmentation key is folded from the step key and its item id, so the views of an
    item do not depend on how the batch is split across devices (N devices = 1 device on the same
    batch).
    """
    names = ("q", *(f"k{v}" for v in range(method.num_subspaces)))

    def one_item(key, images):
        views = make_views(
            key,
            jax.tree.map(lambda x: x[None], images),
            recipe=method.views,
            settings=settings,
            normalization=normalization,
            dtype=dtype,
        )
        return jnp.stack([views[name][0] for name in names])

    def views(key, images, item_ids):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, item_ids)
        return jnp.swapaxes(jax.vmap(one_item)(keys, images), 0, 1)

    return views
