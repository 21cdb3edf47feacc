"""On-device augmentation against plain numpy versions of torchvision's and PIL's formulas."""

import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization, merge_band_groups
from caco_jax.pretrain import augment

RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(0.0, 1.0, (12, 10, 3)).astype(np.float32)
IMAGE[0, 0] = 0.5  # an achromatic pixel (hue undefined: torchvision sets h = 0)


# ----------------------------------------------------------------------------- numpy references
# torchvision.transforms.functional_tensor, written out for one HWC image in [0, 1].


def np_gray(img):
    return 0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def np_blend(img, other, factor):
    return np.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def np_brightness(img, f):
    return np_blend(img, 0.0, f)


def np_contrast(img, f):
    return np_blend(img, np_gray(img).mean(), f)


def np_saturation(img, f):
    return np_blend(img, np_gray(img)[..., None], f)


def np_hue(img, delta):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc, minc = img.max(-1), img.min(-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, 1.0, maxc)
    div = np.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = (h + delta) % 1.0
    v = maxc
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(int) % 6
    p = np.clip(v * (1 - s), 0, 1)
    q = np.clip(v * (1 - s * f), 0, 1)
    t = np.clip(v * (1 - s * (1 - f)), 0, 1)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros_like(img)
    for k, channels in enumerate(table):
        for c in range(3):
            out[..., c] = np.where(i == k, channels[c], out[..., c])
    return out


def np_blur(img, sigma, radius):
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    w /= w.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w[k] * np.take(padded, np.arange(k, k + n), axis=axis) for k in range(len(w)))
    return out


def np_crop_params(u, height, width, scale, ratio, tries=10):
    """torchvision RandomResizedCrop.get_params, fed the given uniforms instead of torch's RNG."""
    area = height * width
    for t in range(tries):
        target = area * (scale[0] + u[t] * (scale[1] - scale[0]))
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        aspect = math.exp(log_r[0] + u[tries + t] * (log_r[1] - log_r[0]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[2 * tries] * (height - h + 1))
            j = int(u[2 * tries + 1] * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def np_pil_bilinear(img, size):
    """PIL's ImagingResample with the bilinear filter (float, no uint8 rounding), both axes."""

    def weights(in_size):
        scale = in_size / size
        filterscale = max(scale, 1.0)
        support = filterscale
        w = np.zeros((size, in_size))
        for o in range(size):
            center = (o + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size)
            k = np.array(
                [max(0.0, 1.0 - abs((x - center + 0.5) / filterscale)) for x in range(xmin, xmax)]
            )
            w[o, xmin:xmax] = k / k.sum()
        return w

    rows, cols = weights(img.shape[0]), weights(img.shape[1])
    return np.einsum("oh,hwc,pw->opc", rows, img, cols, optimize=True)


def test_each_colour_op_matches_torchvision():
    x = jnp.asarray(IMAGE)
    ops = {
        name: jax.jit(lambda f, op=op: op(x, f))
        for name, op in (
            ("brightness", augment.adjust_brightness),
            ("contrast", augment.adjust_contrast),
            ("saturation", augment.adjust_saturation),
            ("hue", augment.adjust_hue),
        )
    }
    for f in (0.6, 1.0, 1.37):
        np.testing.assert_allclose(ops["brightness"](f), np_brightness(IMAGE, f), atol=1e-6)
        np.testing.assert_allclose(ops["contrast"](f), np_contrast(IMAGE, f), atol=1e-6)
        np.testing.assert_allclose(ops["saturation"](f), np_saturation(IMAGE, f), atol=1e-6)
    for delta in (-0.1, -0.03, 0.0, 0.08):
        np.testing.assert_allclose(ops["hue"](delta), np_hue(IMAGE, delta), atol=1e-5)
    gray = np.asarray(augment.grayscale(x))
    np.testing.assert_allclose(gray, np.repeat(np_gray(IMAGE)[..., None], 3, -1), atol=1e-6)


def test_band_subsets_keep_brightness_and_contrast_only():
    bands = jnp.asarray(RNG.uniform(0, 1, (6, 6, 12)), jnp.float32)
    np.testing.assert_array_equal(augment.adjust_hue(bands, 0.1), bands)
    np.testing.assert_array_equal(augment.adjust_saturation(bands, 0.5), bands)
    np.testing.assert_array_equal(augment.grayscale(bands), bands)
    expected = np.clip(0.5 * bands + 0.5 * float(jnp.mean(bands)), 0, 1)
    np.testing.assert_allclose(augment.adjust_contrast(bands, 0.5), expected, atol=1e-6)


def test_colour_jitter_applies_the_ops_in_the_drawn_order():
    # Factors: brightness 1.2, contrast 0.7, saturation 1.3, hue 0.05.
    factors = [0.75, 0.125, 0.875, 0.75]
    ops = {
        0: lambda x: np_brightness(x, 1.2),
        1: lambda x: np_contrast(x, 0.7),
        2: lambda x: np_saturation(x, 1.3),
        3: lambda x: np_hue(x, 0.05),
    }
    jitter = jax.jit(lambda u: augment.color_jitter(u, jnp.asarray(IMAGE), (0.4, 0.4, 0.4, 0.1)))
    for ranks in ([0.5, 0.9, 0.3, 0.1], [0.1, 0.9, 0.3, 0.5], [0.2, 0.1, 0.3, 0.9]):
        want = IMAGE.astype(np.float64)
        for op in np.argsort(ranks):
            want = ops[op](want)
        got = jitter(jnp.asarray(factors + ranks, jnp.float32))
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_augment_image_applies_jitter_then_gray_blur_flip():
    settings = augment.AugmentSettings()
    # Jitter as above (order hue, saturation, brightness, contrast); then gray, blur (sigma 1.05)
    # and flip all apply.
    u = np.array([0.75, 0.125, 0.875, 0.75, 0.5, 0.9, 0.3, 0.1, 0.1, 0.1, 0.1, 0.5, 0.1])
    augment_image = jax.jit(lambda v: augment.augment_image(v, jnp.asarray(IMAGE), settings))
    got = augment_image(jnp.asarray(u, jnp.float32))
    want = np_hue(IMAGE, 0.05)
    want = np_saturation(want, 1.3)
    want = np_brightness(want, 1.2)
    want = np_contrast(want, 0.7)
    want = np.repeat(np_gray(want)[..., None], 3, -1)
    want = np_blur(want, 0.1 + 0.5 * 1.9, settings.blur_radius)[:, ::-1]
    np.testing.assert_allclose(got, want, atol=2e-5)
    # Probabilities above the thresholds: the image passes unchanged.
    skip = jnp.asarray([*u[:8].tolist(), 0.95, 0.95, 0.95, 0.5, 0.95], jnp.float32)
    np.testing.assert_array_equal(augment_image(skip), IMAGE)


def test_gaussian_blur_matches_reference():
    for sigma in (0.1, 0.7, 2.0):
        np.testing.assert_allclose(
            augment.gaussian_blur(jnp.asarray(IMAGE), sigma, 6), np_blur(IMAGE, sigma, 6), atol=1e-5
        )


def test_crop_boxes_match_torchvision_and_respect_scale_and_ratio():
    settings = augment.AugmentSettings()
    u = RNG.uniform(0, 1, (300, augment.crop_uniforms(settings))).astype(np.float32)
    boxes_of = jax.jit(jax.vmap(lambda v: augment.crop_box(v, 264, 264, settings)))
    boxes = np.asarray(boxes_of(jnp.asarray(u)))
    for ui, box in zip(u, boxes, strict=True):
        assert tuple(box) == np_crop_params(
            ui.astype(np.float64), 264, 264, (0.2, 1.0), (3 / 4, 4 / 3)
        )
    top, left, h, w = boxes.T
    assert (
        (top >= 0).all()
        and (left >= 0).all()
        and (top + h <= 264).all()
        and (left + w <= 264).all()
    )
    area = h * w / 264**2
    assert area.min() > 0.19 and area.max() <= 1.0 and area.min() < 0.3 and area.max() > 0.9
    aspect = w / h
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    # No try fits (aspect far outside a square image's reach): torchvision's centre-crop fallback.
    narrow = augment.AugmentSettings(crop_scale=(0.9, 1.0), crop_ratio=(10.0, 20.0))
    fallback = jax.jit(lambda v: augment.crop_box(v, 264, 264, narrow))(jnp.asarray(u[0]))
    assert tuple(np.asarray(fallback)) == np_crop_params(u[0], 264, 264, (0.9, 1.0), (10.0, 20.0))
    assert tuple(np.asarray(fallback)) == (119, 0, 26, 264)


def test_resized_crop_matches_pil_bilinear_of_the_crop():
    for size in (6, 16):  # down- (antialiased) and upsampling
        crop = jax.jit(lambda box, size=size: augment.resized_crop(jnp.asarray(IMAGE), box, size))
        for top, left, h, w in [(2, 1, 7, 9), (0, 0, 12, 10), (5, 3, 3, 4)]:
            got = crop(jnp.asarray([top, left, h, w]))
            want = np_pil_bilinear(IMAGE[top : top + h, left : left + w].astype(np.float64), size)
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_resized_crop_matches_pil_at_the_training_sizes():
    # The dense resize matrices at 264 -> 64 (downscaling, antialiased) and 264 -> 224.
    image = RNG.uniform(0.0, 1.0, (264, 264, 3)).astype(np.float32)
    settings = augment.AugmentSettings()
    u = RNG.uniform(0, 1, (2, augment.crop_uniforms(settings))).astype(np.float32)
    for size, ui in zip((64, 224), u, strict=True):
        top, left, h, w = np.asarray(augment.crop_box(jnp.asarray(ui), 264, 264, settings))
        got = jax.jit(lambda x, b, size=size: augment.resized_crop(x, b, size))(
            jnp.asarray(image), jnp.asarray([top, left, h, w])
        )
        want = np_pil_bilinear(image[top : top + h, left : left + w].astype(np.float64), size)
        # 3e-5: the filter centres are float32 (so were the gathered taps this replaced).
        np.testing.assert_allclose(got, want, atol=3e-5)


def test_augmented_crop_is_the_crop_of_the_augmented_image():
    # P(A(x)) with the blur and flip folded into the resize matrices = crop of augment_image(x).
    image = jnp.asarray(RNG.uniform(0.0, 1.0, (40, 36, 3)), jnp.float32)
    settings = augment.AugmentSettings(crop_size=16)
    folded = jax.jit(lambda u, b: augment.augmented_crop(u, image, b, settings))
    unfolded = jax.jit(
        lambda u, b: augment.resized_crop(augment.augment_image(u, image, settings), b, 16)
    )
    for apply_blur, apply_flip in ((0.1, 0.1), (0.1, 0.9), (0.9, 0.1), (0.9, 0.9)):
        u = RNG.uniform(0, 1, augment.AUGMENT_UNIFORMS).astype(np.float32)
        u[augment.JITTER_UNIFORMS + 2] = apply_blur
        u[augment.JITTER_UNIFORMS + 4] = apply_flip
        box = augment.crop_box(
            jnp.asarray(RNG.uniform(0, 1, augment.crop_uniforms(settings)), jnp.float32),
            40,
            36,
            settings,
        )
        np.testing.assert_allclose(folded(u, box), unfolded(u, box), atol=1e-5)


def test_normalisation_values():
    norm = Normalization.rgb()
    raw = jnp.asarray([[[129, 103, 88], [0, 2, 3], [64, 52, 45], [200, 1, 255]]], jnp.uint8)
    unit = np.asarray(norm.stretch(raw, jnp))[0]
    np.testing.assert_allclose(unit[0], 1.0)
    np.testing.assert_allclose(unit[1], 0.0)
    # SeCo: uint8((x - lo) / (hi - lo) * 255), truncated: 64 / 129 * 255 = 126.5 -> 126.
    np.testing.assert_allclose(unit[2] * 255, [126, 126, 126])
    np.testing.assert_allclose(unit[3], [1.0, 0.0, 1.0])
    standard = np.asarray(norm.standardize(jnp.asarray(unit), jnp))
    np.testing.assert_allclose(
        standard[0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6
    )


def small_settings(identity=False):
    if identity:  # no augmentation, full-image crops at the input size: views expose their sources
        never = {key: 0.0 for key in ("jitter_p", "grayscale_p", "blur_p", "flip_p")}
        return augment.AugmentSettings(
            crop_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **never
        )
    return augment.AugmentSettings(crop_size=16)


def test_views_take_the_right_acquisitions():
    images = jnp.asarray(RNG.integers(0, 256, (2, 3, 16, 16, 3)), jnp.uint8)
    norm = Normalization.rgb()
    expected = norm(images, jnp)
    settings = small_settings(identity=True)
    views = jax.jit(lambda k, x: augment.make_views(k, x, recipe="seco", settings=settings))(
        jax.random.key(0), images
    )
    for name, source in (("q", 0), ("k0", 1), ("k1", 2), ("k2", 0)):
        np.testing.assert_allclose(views[name], expected[:, source], atol=1e-5)


def test_make_views_jits_on_device_with_shapes_and_dtypes():
    settings = small_settings()
    images = jax.device_put(jnp.asarray(RNG.integers(0, 256, (4, 3, 24, 24, 3)), jnp.uint8))
    make = jax.jit(lambda key, x: augment.make_views(key, x, recipe="seco", settings=settings))
    key = jax.device_put(jax.random.key(1))
    assert "callback" not in make.lower(key, images).as_text()
    with jax.transfer_guard("disallow"):  # no host round trip inside
        views = make(key, images)
        again = make(key, images)
    assert sorted(views) == ["k0", "k1", "k2", "q"]
    for name, view in views.items():
        assert view.shape == (4, 16, 16, 3) and view.dtype == jnp.float32
        np.testing.assert_array_equal(view, again[name])
    assert not np.allclose(views["q"], views["k2"])  # same acquisition, different crop + A
    other = make(jax.random.key(2), images)
    assert not np.allclose(views["q"], other["q"])


def test_all_bands_groups_are_merged_to_twelve_bands():
    groups = {
        "bands_10m": jnp.full((2, 1, 12, 12, 4), 10, jnp.uint8),
        "bands_20m": jnp.full((2, 1, 6, 6, 6), 20, jnp.uint8),
        "bands_60m": jnp.full((2, 1, 2, 2, 2), 60, jnp.uint8),
    }
    merged = np.asarray(merge_band_groups(groups))
    assert merged.shape == (2, 1, 12, 12, 12)  # on the 10 m grid
    # layout.BANDS: B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12
    np.testing.assert_allclose(merged[0, 0, 5, 7], [60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 20, 20])
    norm = Normalization(
        bands=layout.BANDS, low=(0.0,) * 12, high=(255.0,) * 12, mean=(0.5,) * 12, std=(0.25,) * 12
    )
    settings = small_settings(identity=True)
    views = jax.jit(
        lambda k, x: augment.make_views(k, x, recipe="moco", settings=settings, normalization=norm)
    )(jax.random.key(0), groups)
    assert sorted(views) == ["k0", "q"]
    # MoCo: both views come from the one acquisition (12 px, resized to the 16 px crop).
    assert views["q"].shape == views["k0"].shape == (2, 16, 16, 12)
    np.testing.assert_allclose(views["q"], views["k0"], atol=1e-6)
    np.testing.assert_allclose(
        views["q"][0, 3, 3, :2], [(60 / 255 - 0.5) / 0.25, (10 / 255 - 0.5) / 0.25], atol=1e-5
    )
    with pytest.raises(ValueError, match="images have 12 bands but the normalisation has 3"):
        augment.make_views(jax.random.key(0), groups, recipe="moco", settings=small_settings())


# ----------------------------------------------------------------------------- dm-pix-free hue
# The hue rotation through HSV (for machines without dm-pix) equals dm-pix's, which training uses.


def sample_images():
    """uint8 levels in [0, 1] (ties between channels are common), grey, black and white pixels."""
    rng = np.random.default_rng(0)
    image = np.round(rng.uniform(0, 1, (32, 32, 3)) * 255) / 255
    image[0, :8] = rng.uniform(0, 1, (8, 1))  # grey: no hue
    image[1, :4], image[1, 4:8] = 0.0, 1.0
    image[2, :8, 0] = image[2, :8, 1]  # red = green
    image[3, :8, 1] = image[3, :8, 2]  # green = blue
    return jnp.asarray(image, jnp.float32)


@pytest.mark.parametrize("delta", [0.0, 0.1, -0.1, 0.25, -0.49, 0.5])
def test_hue_rotation_equals_dm_pix(delta):
    image = sample_images()
    np.testing.assert_allclose(
        augment.rotate_hue(image, delta), dm_pix.adjust_hue(image, delta), rtol=0, atol=2e-6
    )


def test_round_trip_and_known_colours():
    image = sample_images()
    planes = augment.rgb_to_hsv(image[..., 0], image[..., 1], image[..., 2])
    np.testing.assert_allclose(jnp.stack(augment.hsv_to_rgb(*planes), -1), image, atol=2e-6)
    # Pure red, green, blue sit at 0, 1/3 and 2/3 of a turn; a third of a turn maps red to green.
    primaries = jnp.eye(3, dtype=jnp.float32)
    hue, saturation, value = augment.rgb_to_hsv(primaries[:, 0], primaries[:, 1], primaries[:, 2])
    np.testing.assert_allclose(hue, [0.0, 1 / 3, 2 / 3], atol=1e-7)
    np.testing.assert_allclose((saturation, value), np.ones((2, 3)))
    np.testing.assert_allclose(
        augment.rotate_hue(primaries, 1 / 3), np.eye(3)[[1, 2, 0]], atol=1e-6
    )
