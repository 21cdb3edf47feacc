"""The demo's evaluation (task `eval_land_cover`): a linear probe of land cover on the synthetic
archive, so that a run on a laptop shows whether pretraining beats a random encoder.

The synthetic archive (`sources.synthetic`) knows each location's dominant land cover in its early
window. The probe takes every early-window acquisition of the prepared records, splits the
locations in seeded halves, caches the encoder's features of the pretraining input (SeCo's stretch
and ImageNet mean/std, at the size the encoder trained on) and trains a linear head on them
(`heads`, SeCo's linear protocol).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from caco_jax.data import dataset
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import heads, protocol
from caco_jax.runtime import inference, progress
from caco_jax.sources import synthetic


@dataclasses.dataclass(frozen=True)
class LandCoverSettings(heads.HeadSettings):
    """`config.land_cover`: the head's training and the probe's input size."""

    SECTION = "land_cover"
    image_size: int = 64  # the demo sets the size the encoder trained on (augment.crop_size)

    def validate(self) -> None:
        super().validate()
        self.require(
            self.image_size >= 32, "image_size", "must be >= 32 (a ResNet divides it by 32)"
        )


def load_synthetic_land_cover(data: dataset.DataSettings, workdir):
    """(images uint8 [M, 264, 264, 3], labels [M], location index [M]): the early-window
    acquisitions of every location of the prepared synthetic records, labelled with the location's
    dominant land cover (the synthetic ground truth describes the early window; changed locations
    may differ later)."""
    truth_path = synthetic.ground_truth_path(data.archive_dir(workdir))
    if not os.path.exists(truth_path):
        raise FileNotFoundError(f"config.data.archive: no {truth_path} (run the synthesize task)")
    land_cover = {
        row.location_id: row.land_cover for row in synthetic.read_ground_truth(truth_path)
    }
    source = dataset.open_records(data.records_dir(workdir), builder_config="rgb", split="train")
    images, labels, locations = [], [], []
    for i in progress.trange(len(source), desc="land cover", leave=False):
        arrays = source[i]
        if arrays["location_id"] not in land_cover:
            raise ValueError(
                f"location {arrays['location_id']!r} of the records is not in {truth_path}"
            )
        early = arrays["pixels"][arrays["window"] == 0]
        images.append(early)
        labels += [land_cover[arrays["location_id"]]] * early.shape[0]
        locations += [i] * early.shape[0]
    return np.concatenate(images), np.asarray(labels), np.asarray(locations)


@functools.cache
def pretraining_input(image_size: int):
    """The pretraining input (`Normalization.rgb`: SeCo's stretch, ImageNet mean/std), resized
    to ``image_size``: the demo probes the encoder on the inputs it was trained on."""
    norm = Normalization.rgb()

    def preprocess(images):
        x = norm.stretch(images, jnp)
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
        return norm.standardize(x, jnp)

    return preprocess


@dataclasses.dataclass
class LandCover:
    """The early-window acquisitions of the synthetic archive, split by location."""

    images: np.ndarray  # uint8 [M, 264, 264, 3]
    labels: np.ndarray  # [M]
    train: np.ndarray  # indices
    test: np.ndarray


class LandCoverEvaluation(protocol.Evaluation):
    """The demo's land-cover probe for every encoder row (`protocol.run`)."""

    task = "eval_land_cover"
    columns = ("top1", "train_top1")

    def __init__(self, settings, workdir):
        super().__init__(settings)
        self.workdir = workdir

    def dataset_key(self, encoder) -> str:
        if not encoder.input.is_rgb:
            raise ValueError(
                f"it takes bands {list(encoder.input.bands)}; the synthetic records hold the "
                "pretraining input, RGB (B4, B3, B2)"
            )
        return "rgb"

    def load(self, key: str) -> LandCover:
        images, labels, locations = load_synthetic_land_cover(self.settings.data, self.workdir)
        num_locations = int(locations.max()) + 1
        # The synthetic archive has no fixed split: seeded halves of its locations.
        order = np.random.default_rng(self.settings.seed).permutation(num_locations)
        in_train = np.isin(locations, order[: num_locations // 2])
        return LandCover(images, labels, np.flatnonzero(in_train), np.flatnonzero(~in_train))

    def evaluate(self, encoder, data: LandCover) -> dict:
        settings, shared = self.settings.land_cover, self.settings.eval
        preprocess = pretraining_input(settings.image_size)
        features = [
            inference.extract_features(
                encoder.model,
                lambda i, subset=subset: data.images[subset[i]],
                subset.size,
                preprocess=preprocess,
                batch_size=shared.extract_batch_size,
                description=f"{encoder.name} features",
            )
            for subset in (data.train, data.test)
        ]
        return heads.probe_top1(
            (features[0], data.labels[data.train]),
            (features[1], data.labels[data.test]),
            num_classes=len(synthetic.LAND_COVER_CLASSES),
            settings=settings,
            seed=self.settings.seed,
            description=f"{encoder.name} probe",
        )

    def describe(self, data: LandCover) -> dict:
        test_labels = data.labels[data.test]
        return {
            "train_images": int(data.train.size),
            "test_images": int(data.test.size),
            "classes": len(synthetic.LAND_COVER_CLASSES),
            "chance_top1": float(np.max(np.bincount(test_labels)) / test_labels.size),
            "settings": self.settings.land_cover.to_dict(),
        }


def run_task(settings, workdir) -> dict:
    """Task `eval_land_cover`: a linear probe of land cover on the synthetic archive, locations
    split in halves (seeded), so the demo shows whether pretraining beats a random encoder."""
    return protocol.run(LandCoverEvaluation(settings, workdir), workdir)
