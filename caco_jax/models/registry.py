"""The official pretrained encoders: what each is, before anything is downloaded.

Exactly the weights the official repository lists (`utkarshmall13/CACo`,
`src/utils/pretrained_checkpoints.py`, `saved_torch_ckpts`), served as `.pth` files of the
`nn.Sequential` query encoder from the project page's `checkpoints/` folder (`OFFICIAL_BASE_URL`,
the link in the official README). Each entry's `meta` says what a user needs to choose one and
cite it: bands, method, pretraining archive and epochs, input size, publication, licence and
source. `pretrained` downloads, verifies and converts them. No JAX here: `caco-jax --help` lists
them.
"""

from __future__ import annotations

import dataclasses

from caco_jax.data.normalization import Normalization
from caco_jax.runtime import errors

OFFICIAL_BASE_URL = "https://research.cs.cornell.edu/caco/checkpoints/"
# The official weights were pretrained on 224 px crops of SeCo-stretched RGB (B4, B3, B2).
OFFICIAL_IMAGE_SIZE = 224
ARCHIVES = {"100k": "CACo 100k images (geography)", "1m": "CACo 1M images (geography)"}
METHOD_NAMES = {"caco": "CACo", "teco": "TeCo", "seco": "SeCo", "moco": "MoCo v2"}
PUBLICATIONS = {
    "caco": "Mall, Hariharan, Bala. Change-Aware Sampling and Contrastive Learning for Satellite "
    "Images. CVPR 2023",
    "teco": "Mall, Hariharan, Bala, CVPR 2023 (TeCo: the paper's temporal-contrast baseline)",
    "seco": "Manas et al. Seasonal Contrast. ICCV 2021 (retrained by Mall et al., CVPR 2023)",
    "moco": "Chen et al. Improved Baselines with Momentum Contrastive Learning (MoCo v2), 2020 "
    "(trained by Mall et al., CVPR 2023)",
}
# The official repository's licence (its LICENSE file); the weights are served beside its code.
LICENCE = "MIT (utkarshmall13/CACo)"
SOURCE = "https://github.com/utkarshmall13/CACo (src/utils/pretrained_checkpoints.py)"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published encoder: its file, architecture, how and on what it was pretrained."""

    name: str
    file: str
    depth: int
    method: str
    data: str  # the pretraining archive
    epochs: int
    normalization: Normalization = dataclasses.field(default_factory=Normalization.rgb)
    image_size: int = OFFICIAL_IMAGE_SIZE
    sha256: str | None = None  # the official repository publishes none (recorded on first use)

    def url(self, base_url: str = OFFICIAL_BASE_URL) -> str:
        return base_url.rstrip("/") + "/" + self.file

    def meta(self, base_url: str = OFFICIAL_BASE_URL) -> dict:
        """What the encoder is, without downloading it."""
        return {
            "name": self.name,
            "architecture": f"ResNet-{self.depth}",
            "method": self.method,
            "bands": list(self.normalization.bands),
            "image_size": self.image_size,
            "pretraining_data": self.data,
            "epochs": self.epochs,
            "publication": PUBLICATIONS[self.method],
            "licence": LICENCE,
            "source": SOURCE,
            "url": self.url(base_url),
        }

    def metadata(self, base_url: str = OFFICIAL_BASE_URL) -> dict:
        """What the converted export records about its origin."""
        return {
            "pretrained_name": self.name,
            "method": self.method,
            "pretraining_data": self.data,
            "epochs": self.epochs,
            "url": self.url(base_url),
        }

    def describe(self) -> str:
        """One line: ``CACo, ResNet-18, RGB 224 px, CACo 100k images (geography), 1000 epochs``."""
        bands = "RGB" if self.normalization.is_rgb else ",".join(self.normalization.bands)
        return (
            f"{METHOD_NAMES[self.method]}, ResNet-{self.depth}, {bands} {self.image_size} px, "
            f"{self.data}, {self.epochs} epochs"
        )


def _official(depth: int, data: str, method: str, epochs: int) -> Checkpoint:
    return Checkpoint(
        name=f"r{depth}_{data}_{method}",
        file=f"resnet{depth}_{method}_geo_{data}_{epochs}.pth",
        depth=depth,
        method=method,
        data=ARCHIVES[data],
        epochs=epochs,
    )


# In the official file's order.
CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        _official(18, "100k", "seco", 1000),
        _official(18, "100k", "moco", 200),
        _official(18, "100k", "teco", 1000),
        _official(18, "100k", "caco", 1000),
        _official(18, "1m", "seco", 200),
        _official(18, "1m", "caco", 200),
        _official(50, "100k", "moco", 200),
        _official(50, "100k", "seco", 1000),
        _official(50, "100k", "caco", 1000),
        _official(50, "1m", "seco", 200),
        _official(50, "1m", "caco", 200),
    )
}


class UnknownEncoderError(errors.UserError, KeyError):
    """A name that is neither an official encoder nor an export path."""

    def __str__(self) -> str:  # KeyError's own quotes the message
        return str(self.args[0])


def get(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise UnknownEncoderError(
            f"{name!r} is neither an official encoder ({', '.join(CHECKPOINTS)}) "
            "nor the path of an encoder export"
        )
    return CHECKPOINTS[name]
