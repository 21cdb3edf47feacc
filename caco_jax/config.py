"""The configuration schema shared by every config in `configs/`, and its validation.

A config is an `ml_collections.ConfigDict` whose top-level `tasks` lists what `run.py` does, in
order (see `caco_jax.tasks`). Each section below belongs to one stage of the data flow.
`validate` checks the values before any work starts, so that a bad value fails at once with a
message naming it.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults reproduce the official CACo code (SPEC sections 2 and 3)."""
    c = ml_collections.ConfigDict()
    c.tasks = ()  # e.g. ("synthesize", "prepare", "pretrain", "linear_probe")
    c.seed = 0

    # The embedded synthetic archive (caco_jax/data/synthetic.py).
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_locations = 64
    c.synthetic.change_fraction = 0.3
    c.synthetic.seed = 0
    c.synthetic.output = ""  # folder the archive is written to; "" = <workdir>/synthetic_archive
    c.synthetic.form = "folder"  # or "tar.gz" (like caco10k.tar.gz), "parts" (like the 1M set)

    # Archive -> records (caco_jax/data/builder.py).
    c.data = ml_collections.ConfigDict()
    c.data.archive = ""  # folder holding the tar.gz, the *_part* files or an extracted archive
    c.data.data_dir = ""  # TFDS data_dir of the prepared records; "" = <workdir>/tfds
    c.data.builder_config = "rgb"  # "rgb" or "all_bands"
    c.data.max_skip_fraction = 0.05  # the build fails when more locations than this are skipped
    c.data.num_workers = 0  # decode processes; 0 = one per core
    # Multi-host runs (caco_jax/multihost.py): how long processes other than 0 wait for the records
    # process 0 prepares before giving up with an error.
    c.data.wait_seconds = 6 * 3600.0

    # The encoders (caco_jax/models/).
    c.model = ml_collections.ConfigDict()
    c.model.depth = 18  # ResNet-18 or ResNet-50
    c.model.embedding_dim = 128  # output width of each projection head
    c.model.compute_dtype = "float32"  # "bfloat16": mixed precision, float32 params/statistics

    # The contrastive method (caco_jax/modes.py, objectives.py).
    c.method = ml_collections.ConfigDict()
    c.method.mode = "caco"  # "caco", "teco", "seco" or "moco"
    c.method.num_negatives = 16384  # queue length K per subspace
    c.method.temperature = 0.07
    c.method.key_momentum = 0.999  # EMA of the key encoder and heads

    # The change estimate (caco_jax/change.py); used by mode "caco" only.
    c.change = ml_collections.ConfigDict()
    c.change.beta = 0.8  # running value r = beta r + (1 - beta) R; the first visit takes R
    c.change.use_ema = True  # False: r = the latest R (paper ablation)
    c.change.statistic = "ratio"  # "ratio" d_lt / (d_st + eps), or "long_term" d_lt (ablation)
    c.change.per_location = False  # True: one decision per location (paper ablation)
    c.change.epsilon = 1e-4

    # Pretraining (caco_jax/train.py).
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global, in items; CACo/TeCo batches hold both windows of a location
    c.train.epochs = 200
    c.train.milestones = (120, 160)  # epochs at which the learning rate is multiplied by 0.1
    c.train.base_learning_rate = 0.03  # for a batch of 256; scaled linearly with the batch size
    c.train.sgd_momentum = 0.9
    c.train.weight_decay = 1e-4  # added to the gradient (torch SGD), query encoder and heads only
    c.train.bn_mode = "per_device"  # "per_device" (official, 1 GPU), "sync" or "shuffle" (keys)
    c.train.max_steps = 0  # > 0 stops early (smoke runs); 0 = epochs x steps per epoch

    # Host input pipeline (caco_jax/data/pipeline.py, item_sampler.py).
    c.input = ml_collections.ConfigDict()
    c.input.acquisition_draws = "official"  # or "distinct": 3 distinct acquisitions in every mode
    c.input.num_workers = 0  # grain worker processes; 0 = read in the training process
    c.input.num_threads = 2  # reader threads per process (each assembles whole batches)
    c.input.prefetch_batches = 4  # batches buffered per process
    c.input.stats_locations = 64  # all_bands: locations the per-band statistics are computed from

    # On-device augmentation (caco_jax/augment.py); defaults = the official torchvision pipeline.
    c.augment = ml_collections.ConfigDict()
    c.augment.crop_size = 224
    c.augment.crop_scale = (0.2, 1.0)
    c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.augment.crop_attempts = 10
    c.augment.jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    c.augment.jitter_p = 0.8
    c.augment.grayscale_p = 0.2
    c.augment.blur_p = 0.5
    c.augment.blur_sigma = (0.1, 2.0)
    c.augment.flip_p = 0.5

    # Orbax checkpoints (caco_jax/checkpointing.py) under <workdir>/checkpoints.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # and always at the end of the run
    c.checkpoint.keep = 3  # the newest N are kept
    c.checkpoint.export_encoder_every_checkpoint = False  # export <workdir>/encoder at each save

    # Metrics (caco_jax/metrics_writer.py): TensorBoard events + metrics.jsonl in <workdir>.
    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 50
    c.logging.progress_bar = True

    # Change-aware location sampling (caco_jax/sampling/, task sample_locations; SPEC section 5).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_locations = 1000
    c.sampling.num_cities = 10000  # the paper picks among the 10,000 most populous cities
    c.sampling.sigma_km = 5.0  # per-axis std of the Gaussian around a city; SeCo's baseline: 50
    c.sampling.reject_sea = True  # redraw points in the sea (GLOBE land mask); SeCo: False
    c.sampling.region = ()  # (west, south, east, north) degrees; () = the whole world
    c.sampling.min_spacing_km = 0.0  # > 0 keeps locations apart; 3.74 = no two patches overlap
    c.sampling.max_draws_per_city = 100  # then the slot draws another city (islands, crowding)
    c.sampling.seed = 0
    c.sampling.output = ""  # folder of locations.csv/.geojson/.png; "" = <workdir>/locations

    # Sentinel-2 downloader (caco_jax/download/, task download; needs earthengine-api).
    c.download = ml_collections.ConfigDict()
    c.download.locations = ""  # locations CSV; "" = <sampling output>/locations.csv
    c.download.output = ""  # the archive folder; "" = <workdir>/archive/clean_custom_geography
    c.download.collection = "COPERNICUS/S2_SR_HARMONIZED"  # Earth Engine surface reflectance
    # Two windows [start, end) about 4 years apart, each at most a year (ISO dates).
    c.download.windows = (("2019-01-01", "2020-01-01"), ("2023-01-01", "2024-01-01"))
    c.download.acquisitions_per_window = 5
    c.download.min_acquisitions_per_window = 3  # fewer and the location is reported as failed
    c.download.max_scene_cloud = 10.0  # CLOUDY_PIXEL_PERCENTAGE of the whole scene (SeCo: 10)
    c.download.max_patch_cloud_fraction = 0.0  # cloudy pixels allowed in the patch
    # Per-pixel clouds: "scl" (L2A scene classes: shadow, cloud, cirrus) or SeCo's "qa60" (empty in
    # scenes processed between January 2022 and February 2024).
    c.download.cloud_mask = "scl"
    c.download.num_workers = 8  # locations in flight = concurrent Earth Engine requests
    c.download.max_retries = 5  # per request, on transient errors (quota, timeouts, 5xx)
    c.download.retry_base_seconds = 2.0  # backoff 2, 4, 8, ... seconds, with jitter
    c.download.preview = True  # also write SeCo's RGB preview <product_id>.tif beside each folder
    c.download.project = ""  # Google Cloud project for ee.Initialize; "" = your default

    # Downstream evaluation (caco_jax/evaluators/; tasks eval_eurosat, eval_bigearthnet, eval_oscd,
    # linear_probe). Defaults = the EuroSAT linear probe; configs/eval_*.py set each protocol.
    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""  # encoder export to evaluate; "" = <workdir>/encoder
    c.eval.random_baseline = True  # also evaluate a randomly initialised encoder (a table row)
    c.eval.imagenet_checkpoint = ""  # export of converted ImageNet weights: adds an "imagenet" row
    c.eval.data_dir = ""  # TFDS data_dir of eurosat/bigearthnet/oscd; "" = ~/tensorflow_datasets
    c.eval.split_dir = ""  # SeCo's split files, BigEarthNet's cloud/snow lists; "" = seeded split
    c.eval.oscd_dir = ""  # the downloaded Onera archive, to build TFDS oscd when not prepared yet
    c.eval.epochs = 100
    c.eval.batch_size = 32
    c.eval.learning_rate = 1e-3  # Adam
    c.eval.milestones = (60, 80)  # epochs at which the learning rate is multiplied by 0.1
    c.eval.dropout = 0.0  # before the linear head (BigEarthNet: 0.2)
    c.eval.image_size = 64  # BigEarthNet: 128; linear_probe (demo): the size the encoder trained on
    c.eval.update_bn_stats = False  # EuroSAT: refresh BN statistics on the train set (official)
    c.eval.train_fraction = 1.0  # BigEarthNet: fraction of the training labels (0.1 or 1.0)
    c.eval.finetune = False  # BigEarthNet: also train the encoder
    c.eval.finetune_learning_rate = 1e-5  # BigEarthNet fine-tuning (SeCo's default)
    c.eval.weight_decay = 1e-4  # OSCD: L2 term of torch's Adam
    c.eval.lr_decay = 0.95  # OSCD: learning rate x this per epoch
    c.eval.tile_size = 96  # OSCD
    c.eval.extract_batch_size = 256  # images per encoder pass when caching features
    c.eval.seed = 0

    # Official PyTorch weights -> encoder export (caco_jax/convert.py, task convert_weights).
    c.convert = ml_collections.ConfigDict()
    c.convert.source = ""  # .pth / .ckpt file: CACo/SeCo/MoCo query encoder or torchvision ResNet
    c.convert.output = ""  # export folder; "" = <workdir>/encoder
    c.convert.depth = 0  # 0 = inferred from the keys; else checked against them
    c.convert.allow_pickle = False  # True: also read what torch.load(weights_only=True) refuses
    c.convert.overwrite = False  # replace an existing export

    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key."""
    from caco_jax import tasks

    unknown = [t for t in config.tasks if t not in tasks.TASKS]
    if unknown:
        raise ConfigError(f"config.tasks: unknown task(s) {unknown}; known: {sorted(tasks.TASKS)}")
    _check(config.synthetic.num_locations >= 2, "synthetic.num_locations", "must be >= 2")
    _check(0.0 <= config.synthetic.change_fraction <= 1.0, "synthetic.change_fraction", "in [0, 1]")
    _check(
        config.synthetic.form in ("folder", "tar.gz", "parts"),
        "synthetic.form",
        "must be 'folder', 'tar.gz' or 'parts'",
    )
    _check(
        config.data.builder_config in ("rgb", "all_bands"),
        "data.builder_config",
        "must be 'rgb' or 'all_bands'",
    )
    _check(0.0 <= config.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", "in [0, 1]")
    _check(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(config.data.wait_seconds > 0, "data.wait_seconds", "must be > 0")
    _check(
        "prepare" not in config.tasks or "://" not in config.data.data_dir,
        "data.data_dir",
        "prepare writes the records as local files: a local folder or a mounted bucket "
        "(gcsfuse), not a URL (see docs/running.md)",
    )
    _validate_training(config)
    _validate_input(config.input, config.augment)
    _validate_sampling(config.sampling)
    _validate_download(config.download)
    _validate_eval(config.eval)
    _validate_convert(config)


# The methods of caco_jax/modes.py (listed here so that validating a config never imports JAX).
METHOD_MODES = ("caco", "teco", "seco", "moco")


def _validate_training(config: ml_collections.ConfigDict) -> None:
    _check(config.model.depth in (18, 50), "model.depth", "must be 18 or 50")
    _check(config.model.embedding_dim >= 1, "model.embedding_dim", "must be >= 1")
    _check(
        config.model.compute_dtype in ("float32", "bfloat16"),
        "model.compute_dtype",
        "must be 'float32' or 'bfloat16'",
    )
    _check(config.method.mode in METHOD_MODES, "method.mode", f"must be one of {METHOD_MODES}")
    _check(config.method.num_negatives >= 2, "method.num_negatives", "must be >= 2")
    _check(
        config.method.num_negatives % 2 == 0,
        "method.num_negatives",
        "must be even (the queue holds one half per time window)",
    )
    _check(config.method.temperature > 0, "method.temperature", "must be > 0")
    _check(0.0 <= config.method.key_momentum < 1.0, "method.key_momentum", "in [0, 1)")
    _check(0.0 <= config.change.beta < 1.0, "change.beta", "in [0, 1)")
    _check(
        config.change.statistic in ("ratio", "long_term"),
        "change.statistic",
        "must be 'ratio' or 'long_term'",
    )
    _check(config.change.epsilon > 0, "change.epsilon", "must be > 0")
    train = config.train
    _check(train.batch_size >= 2, "train.batch_size", "must be >= 2")
    _check(
        train.batch_size % 2 == 0,
        "train.batch_size",
        "must be even (both windows of a location sit in one batch)",
    )
    _check(train.epochs >= 1, "train.epochs", "must be >= 1")
    _check(
        all(0 < m < train.epochs for m in train.milestones)
        and list(train.milestones) == sorted(set(train.milestones)),
        "train.milestones",
        f"must be increasing epochs in (0, train.epochs={train.epochs})",
    )
    _check(train.base_learning_rate > 0, "train.base_learning_rate", "must be > 0")
    _check(0.0 <= train.sgd_momentum < 1.0, "train.sgd_momentum", "in [0, 1)")
    _check(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(
        train.bn_mode in ("per_device", "sync", "shuffle"),
        "train.bn_mode",
        "must be 'per_device', 'sync' or 'shuffle'",
    )
    _check(train.max_steps >= 0, "train.max_steps", "must be >= 0")
    _check(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _check(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(config.logging.every_steps >= 1, "logging.every_steps", "must be >= 1")


def _validate_input(i: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    _check(
        i.acquisition_draws in ("official", "distinct"),
        "input.acquisition_draws",
        "must be 'official' or 'distinct'",
    )
    _check(i.num_workers >= 0, "input.num_workers", "must be >= 0")
    _check(i.num_threads >= 0, "input.num_threads", "must be >= 0")
    _check(i.prefetch_batches >= 1, "input.prefetch_batches", "must be >= 1")
    _check(i.stats_locations >= 1, "input.stats_locations", "must be >= 1")
    _check(a.crop_size >= 1, "augment.crop_size", "must be >= 1")
    _check(
        len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
        "augment.crop_scale",
        "must be (low, high) with 0 < low <= high <= 1",
    )
    _check(
        len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1],
        "augment.crop_ratio",
        "must be (low, high) with 0 < low <= high",
    )
    _check(a.crop_attempts >= 1, "augment.crop_attempts", "must be >= 1")
    _check(
        len(a.jitter) == 4 and all(v >= 0 for v in a.jitter) and a.jitter[3] <= 0.5,
        "augment.jitter",
        "must be 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5)",
    )
    for key in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
        _check(0.0 <= a[key] <= 1.0, f"augment.{key}", "in [0, 1]")
    _check(
        len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1],
        "augment.blur_sigma",
        "must be (low, high) with 0 < low <= high",
    )


def _validate_sampling(s: ml_collections.ConfigDict) -> None:
    _check(s.num_locations >= 1, "sampling.num_locations", "must be >= 1")
    _check(s.num_cities >= 1, "sampling.num_cities", "must be >= 1")
    _check(s.sigma_km > 0, "sampling.sigma_km", "must be > 0")
    _check(s.min_spacing_km >= 0, "sampling.min_spacing_km", "must be >= 0")
    _check(s.max_draws_per_city >= 1, "sampling.max_draws_per_city", "must be >= 1")
    region = tuple(s.region)
    _check(
        not region
        or (
            len(region) == 4
            and -180 <= region[0] <= 180
            and -180 <= region[2] <= 180
            and -90 <= region[1] < region[3] <= 90
        ),
        "sampling.region",
        "must be () or (west, south, east, north) in degrees with south < north "
        "(west > east crosses the antimeridian)",
    )


def _validate_download(d: ml_collections.ConfigDict) -> None:
    import datetime

    try:
        windows = [tuple(datetime.date.fromisoformat(x) for x in w) for w in d.windows]
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.download.windows: must be ISO date pairs: {error}") from None
    _check(
        len(windows) == 2 and all(len(w) == 2 for w in windows),
        "download.windows",
        "must be two (start, end) pairs: the early and the late window",
    )
    _check(
        all(0 < (end - start).days <= 366 for start, end in windows),
        "download.windows",
        "each window must have start < end and span at most one year",
    )
    _check(windows[0][1] <= windows[1][0], "download.windows", "the early window must end first")
    _check(d.acquisitions_per_window >= 1, "download.acquisitions_per_window", "must be >= 1")
    _check(
        1 <= d.min_acquisitions_per_window <= d.acquisitions_per_window,
        "download.min_acquisitions_per_window",
        "must be in [1, download.acquisitions_per_window]",
    )
    _check(0 <= d.max_scene_cloud <= 100, "download.max_scene_cloud", "in [0, 100]")
    _check(0 <= d.max_patch_cloud_fraction <= 1, "download.max_patch_cloud_fraction", "in [0, 1]")
    _check(d.cloud_mask in ("scl", "qa60"), "download.cloud_mask", "must be 'scl' or 'qa60'")
    _check(d.num_workers >= 1, "download.num_workers", "must be >= 1")
    _check(d.max_retries >= 0, "download.max_retries", "must be >= 0")
    _check(d.retry_base_seconds >= 0, "download.retry_base_seconds", "must be >= 0")
    _check(bool(d.collection), "download.collection", "must name an Earth Engine collection")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    _check(e.epochs >= 1, "eval.epochs", "must be >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(e.learning_rate > 0, "eval.learning_rate", "must be > 0")
    _check(
        all(0 < m < e.epochs for m in e.milestones)
        and list(e.milestones) == sorted(set(e.milestones)),
        "eval.milestones",
        f"must be increasing epochs in (0, eval.epochs={e.epochs})",
    )
    _check(0.0 <= e.dropout < 1.0, "eval.dropout", "in [0, 1)")
    _check(e.image_size >= 32, "eval.image_size", "must be >= 32 (a ResNet divides it by 32)")
    _check(0.0 < e.train_fraction <= 1.0, "eval.train_fraction", "in (0, 1]")
    _check(e.finetune_learning_rate > 0, "eval.finetune_learning_rate", "must be > 0")
    _check(e.weight_decay >= 0, "eval.weight_decay", "must be >= 0")
    _check(0.0 < e.lr_decay <= 1.0, "eval.lr_decay", "in (0, 1]")
    _check(
        e.tile_size >= 32 and e.tile_size % 32 == 0,
        "eval.tile_size",
        "must be a multiple of 32 (the decoder undoes the encoder's 5 halvings)",
    )
    _check(e.extract_batch_size >= 1, "eval.extract_batch_size", "must be >= 1")


def _validate_convert(config: ml_collections.ConfigDict) -> None:
    _check(
        config.convert.depth in (0, 18, 34, 50, 101, 152),
        "convert.depth",
        "0 (infer) or a ResNet depth",
    )
    _check(
        "convert_weights" not in config.tasks or bool(config.convert.source),
        "convert.source",
        "the convert_weights task needs a .pth/.ckpt file",
    )


def _check(ok: bool, key: str, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {requirement}")
