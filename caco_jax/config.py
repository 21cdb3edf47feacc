"""The configuration schema shared by every config in `configs/`, and its validation.

A config is an `ml_collections.ConfigDict` whose top-level ``tasks`` lists what `run.py` does, in
order (see `caco_jax.tasks`), and ``seed`` fixes every random choice. `for_tasks` builds one with
just the sections its tasks read, each with the defaults below (which reproduce the official
code); a config file then sets only what differs. `validate` checks every value before any work
starts, so that a bad value fails at once with a message naming it.
"""

from __future__ import annotations

import ml_collections

from caco_jax import methods


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _synthetic() -> ml_collections.ConfigDict:
    """The embedded synthetic archive (caco_jax/data/synthetic/), written to ``data.archive``."""
    c = ml_collections.ConfigDict()
    c.num_locations = 64
    c.change_fraction = 0.3
    c.form = "folder"  # or "tar.gz" (like caco10k.tar.gz), "parts" (like the 1M set)
    return c


def _data() -> ml_collections.ConfigDict:
    """Archive -> records (caco_jax/data/builder.py)."""
    c = ml_collections.ConfigDict()
    # Folder holding the tar.gz, the *_part* files or an extracted archive; "" = the synthetic
    # archive, <workdir>/synthetic_archive.
    c.archive = ""
    c.data_dir = ""  # TFDS data_dir of the prepared records; "" = <workdir>/tfds
    c.builder_config = "rgb"  # "rgb" or "all_bands"
    c.max_skip_fraction = 0.05  # the build fails when more locations than this are skipped
    c.num_workers = 0  # processes writing the records (and a synthetic archive); 0 = per core
    # Multi-host runs (caco_jax/multihost.py): how long processes other than 0 wait for the records
    # process 0 prepares before giving up with an error.
    c.wait_seconds = 6 * 3600.0
    return c


def _model() -> ml_collections.ConfigDict:
    """The encoders (caco_jax/models/)."""
    c = ml_collections.ConfigDict()
    c.depth = 18  # ResNet-18 or ResNet-50 (10: one block per stage, for tests and smoke runs)
    c.width = 64  # channels of the first stage (torchvision: 64); smaller for tiny test networks
    c.embedding_dim = 128  # output width of each projection head
    c.compute_dtype = "float32"  # "bfloat16": mixed precision, float32 params/statistics
    return c


def _method() -> ml_collections.ConfigDict:
    """The contrastive method (caco_jax/methods.py, objectives.py)."""
    c = ml_collections.ConfigDict()
    c.name = "caco"  # one of methods.NAMES: "caco", "teco", "seco" or "moco"
    c.num_negatives = 16384  # queue length K per subspace
    c.temperature = 0.07
    c.key_momentum = 0.999  # EMA of the key encoder and heads
    return c


def _change() -> ml_collections.ConfigDict:
    """The change estimate (caco_jax/change.py); read by method "caco" only."""
    c = ml_collections.ConfigDict()
    c.beta = 0.8  # running value r = beta r + (1 - beta) R; the first visit takes R
    c.use_ema = True  # False: r = the latest R (paper ablation)
    c.statistic = "ratio"  # "ratio" d_lt / (d_st + eps), or "long_term" d_lt (ablation)
    c.per_location = False  # True: one decision per location (paper ablation)
    c.epsilon = 1e-4
    return c


def _train() -> ml_collections.ConfigDict:
    """Pretraining (caco_jax/train.py)."""
    c = ml_collections.ConfigDict()
    c.batch_size = 256  # global, in items; CACo/TeCo batches hold both windows of a location
    c.epochs = 200
    c.milestones = (120, 160)  # epochs at which the learning rate is multiplied by 0.1
    c.base_learning_rate = 0.03  # for a batch of 256; scaled linearly with the batch size
    c.sgd_momentum = 0.9
    c.weight_decay = 1e-4  # added to the gradient (torch SGD), query encoder and heads only
    c.bn_mode = (
        "per_device"  # methods.BN_MODES: "per_device" (official, 1 GPU), "sync", "shuffle" (keys)
    )
    c.max_steps = 0  # > 0 stops early (smoke runs); 0 = epochs x steps per epoch
    return c


def _input() -> ml_collections.ConfigDict:
    """Host input pipeline (caco_jax/data/pipeline.py, item_sampler.py)."""
    c = ml_collections.ConfigDict()
    c.acquisition_draws = "official"  # or "distinct": 3 distinct acquisitions in every mode
    c.num_workers = 0  # grain worker processes; 0 = read in the training process
    c.num_threads = 2  # reader threads per process (each assembles whole batches)
    c.prefetch_batches = 4  # batches buffered per process
    c.stats_locations = 64  # all_bands: locations the per-band statistics come from (64: stored
    # at prepare time, normalization.STATS_LOCATIONS; another number reads them at start-up)
    return c


def _augment() -> ml_collections.ConfigDict:
    """On-device augmentation (caco_jax/augment.py); defaults: the official torchvision
    pipeline."""
    c = ml_collections.ConfigDict()
    c.crop_size = 224
    c.crop_scale = (0.2, 1.0)
    c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.crop_attempts = 10
    c.jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    c.jitter_p = 0.8
    c.grayscale_p = 0.2
    c.blur_p = 0.5
    c.blur_sigma = (0.1, 2.0)
    c.flip_p = 0.5
    return c


def _checkpoint() -> ml_collections.ConfigDict:
    """Orbax checkpoints (caco_jax/checkpointing.py) under <workdir>/checkpoints."""
    c = ml_collections.ConfigDict()
    c.every_steps = 1000  # and always at the end of the run
    c.keep = 3  # the newest N are kept
    c.export_encoder_every_checkpoint = False  # export <workdir>/encoder at each save
    return c


def _logging() -> ml_collections.ConfigDict:
    """Metrics (caco_jax/metrics_writer.py): TensorBoard events + metrics.jsonl in <workdir>."""
    c = ml_collections.ConfigDict()
    c.every_steps = 50
    c.progress_bar = True
    return c


def _sampling() -> ml_collections.ConfigDict:
    """Change-aware location sampling (caco_jax/sampling/, task sample_locations)."""
    c = ml_collections.ConfigDict()
    c.num_locations = 1000
    c.num_cities = 10000  # the paper picks among the 10,000 most populous cities
    c.sigma_km = 5.0  # per-axis std of the Gaussian around a city; SeCo's baseline: 50
    c.reject_sea = True  # redraw points in the sea (GLOBE land mask); SeCo: False
    c.region = ()  # (west, south, east, north) degrees; () = the whole world
    c.min_spacing_km = 0.0  # > 0 keeps locations apart; 3.74 = no two patches overlap
    c.max_draws_per_city = 100  # then the slot draws another city (islands, crowding)
    c.output = ""  # folder of locations.csv/.geojson/.png; "" = <workdir>/locations
    return c


def _download() -> ml_collections.ConfigDict:
    """Sentinel-2 downloader (caco_jax/download/, task download; needs earthengine-api)."""
    c = ml_collections.ConfigDict()
    c.locations = ""  # locations CSV; "" = <sampling output>/locations.csv
    c.output = ""  # the archive folder; "" = <workdir>/archive/clean_custom_geography
    c.collection = "COPERNICUS/S2_SR_HARMONIZED"  # Earth Engine surface reflectance
    # Two windows [start, end) about 4 years apart, each at most a year (ISO dates).
    c.windows = (("2019-01-01", "2020-01-01"), ("2023-01-01", "2024-01-01"))
    c.acquisitions_per_window = 5
    c.min_acquisitions_per_window = 3  # fewer and the location is reported as failed
    c.max_scene_cloud = 10.0  # CLOUDY_PIXEL_PERCENTAGE of the whole scene (SeCo: 10)
    c.max_patch_cloud_fraction = 0.0  # cloudy pixels allowed in the patch
    # Per-pixel clouds: "scl" (L2A scene classes: shadow, cloud, cirrus) or SeCo's "qa60" (empty in
    # scenes processed between January 2022 and February 2024).
    c.cloud_mask = "scl"
    c.concurrent_requests = 8  # locations in flight = concurrent Earth Engine requests
    c.max_retries = 5  # per request, on transient errors (quota, timeouts, 5xx)
    c.retry_base_seconds = 2.0  # backoff 2, 4, 8, ... seconds, with jitter
    c.preview = True  # also write SeCo's RGB preview <product_id>.tif beside each folder
    c.project = ""  # Google Cloud project for ee.Initialize; "" = your default
    return c


def _eval() -> ml_collections.ConfigDict:
    """Downstream evaluation (caco_jax/evaluators/; the eval_* and linear_probe tasks).

    Defaults: the EuroSAT linear probe; configs/eval_*.py set what their protocol changes.
    """
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # encoder export to evaluate; "" = <workdir>/encoder
    c.random_baseline = True  # also evaluate a randomly initialised encoder (a table row)
    c.imagenet_checkpoint = ""  # export of converted ImageNet weights: adds an "imagenet" row
    c.data_dir = ""  # TFDS data_dir of the prepared records; "" = ~/tensorflow_datasets
    # Datasets as downloaded (docs/evaluation.md): the folder holding the download (zip, tar.gz or
    # extracted) and the published split lists; records are built from it on first use.
    c.manual_dir = ""
    c.download_lists = False  # fetch missing split lists from their published addresses
    c.seeded_split = False  # a seeded 60/20 split instead of the lists (flagged in metrics)
    c.prepare_workers = 0  # BigEarthNet: processes decoding GeoTIFFs; 0 = one per core
    c.epochs = 100
    c.batch_size = 32
    c.learning_rate = 1e-3  # Adam
    c.milestones = (60, 80)  # epochs at which the learning rate is multiplied by 0.1
    c.dropout = 0.0  # before the linear head (BigEarthNet: 0.2)
    c.image_size = 64  # BigEarthNet: 128; linear_probe (demo): the size the encoder trained on
    # EuroSAT: "official" trains the head with the encoder in train mode (per-batch BatchNorm
    # statistics, running ones drifting to EuroSAT, as Lightning ran CACo's main_eurosat.py);
    # "cached" trains on features cached once in eval mode (fast).
    c.probe = "official"
    c.update_bn_stats = False  # cached probe: refresh BN statistics on the train set first
    c.train_fraction = 1.0  # BigEarthNet: fraction of the training labels (0.1 or 1.0)
    c.finetune = False  # BigEarthNet, DynamicEarthNet: also train the encoder
    c.finetune_learning_rate = 1e-5  # the encoder's learning rate when fine-tuning (SeCo's)
    c.weight_decay = 1e-4  # OSCD, DynamicEarthNet: L2 term of torch's Adam
    c.lr_decay = 0.95  # OSCD, DynamicEarthNet: learning rate x this per epoch
    c.tile_size = 96  # OSCD (DynamicEarthNet: 256)
    # OSCD: the encoder's BatchNorm while the decoder trains: "train" (SeCo's main_oscd.py: its
    # encoder is only left out of the optimiser) or "eval" (statistics frozen).
    c.oscd_encoder_bn = "train"
    c.extract_batch_size = 256  # images per encoder pass when caching features
    return c


def _convert() -> ml_collections.ConfigDict:
    """Official PyTorch weights -> encoder export (caco_jax/convert.py, task convert_weights)."""
    c = ml_collections.ConfigDict()
    c.source = ""  # .pth / .ckpt file: CACo/SeCo/MoCo query encoder or torchvision ResNet
    c.output = ""  # export folder; "" = <workdir>/encoder
    c.depth = 0  # 0 = inferred from the keys; else checked against them
    c.allow_pickle = False  # True: also read what torch.load(weights_only=True) refuses
    c.overwrite = False  # replace an existing export
    return c


def _pretrained() -> ml_collections.ConfigDict:
    """Official pretrained encoders by name (caco_jax/pretrained.py, task pretrained) and their
    torchvision-layout PyTorch export (caco_jax/torch_export.py)."""
    c = ml_collections.ConfigDict()
    c.name = ""  # an official name (caco_jax.pretrained.CHECKPOINTS) or an export path
    c.cache_dir = ""  # "" = $CACO_JAX_CACHE or ~/.cache/caco_jax
    c.base_url = "https://research.cs.cornell.edu/caco/checkpoints/"
    c.output = ""  # export folder of an official encoder; "" = <workdir>/encoder
    c.torch_output = ""  # also write a .pth / .safetensors torchvision state dict
    c.overwrite = False
    return c


def _embed() -> ml_collections.ConfigDict:
    """Embeddings of Sentinel-2 images (caco_jax/embed.py, task embed)."""
    c = ml_collections.ConfigDict()
    c.kind = "geotiff"  # geotiff (a file or folder), archive (CACo), records (prepared)
    c.source = ""  # the GeoTIFF(s), archive, or records data_dir
    c.builder_config = "rgb"  # records: rgb or all_bands
    c.encoder = ""  # an official name or an export path; "" = <workdir>/encoder
    c.output = ""  # file stem; "" = <workdir>/embeddings (.npz and .parquet)
    c.bands = ()  # band order of multi-band GeoTIFFs without band descriptions
    c.scale = "auto"  # raw -> archive uint8: auto (by dtype), uint8, reflectance_10000
    c.dn_offset = 0.0  # subtracted from uint16 DNs (1000 for L1C/L2A baseline >= 04.00)
    c.tile_stride = 0  # GeoTIFF tiles' stride in pixels; 0 = the tile size
    c.batch_size = 64
    c.overwrite = False
    return c


def _change_map() -> ml_collections.ConfigDict:
    """Change maps from an encoder alone (caco_jax/change_map.py, task change_map); the mixture
    that labels the ratios is seeded by ``config.seed``."""
    c = ml_collections.ConfigDict()
    # archive (CACo, any form), records (prepared), or pretraining (a CACo run's own estimate)
    c.kind = "archive"
    c.source = ""  # the archive, the records data_dir, or the run's workdir ("" = this workdir)
    c.builder_config = "rgb"  # records: rgb or all_bands
    c.encoder = ""  # an official name or an export path; "" = <workdir>/encoder
    c.output = ""  # folder; "" = <workdir>/change_map
    c.batch_size = 64
    c.land_mask = True  # draw land under the map (global-land-mask, ~1 GB while drawing)
    c.overwrite = False
    return c


SECTIONS = {
    "synthetic": _synthetic,
    "data": _data,
    "model": _model,
    "method": _method,
    "change": _change,
    "train": _train,
    "input": _input,
    "augment": _augment,
    "checkpoint": _checkpoint,
    "logging": _logging,
    "sampling": _sampling,
    "download": _download,
    "eval": _eval,
    "convert": _convert,
    "pretrained": _pretrained,
    "embed": _embed,
    "change_map": _change_map,
}


def for_tasks(*tasks: str) -> ml_collections.ConfigDict:
    """A config for ``tasks`` (in order) holding only the sections they read, with defaults."""
    from caco_jax import tasks as tasks_lib

    c = ml_collections.ConfigDict()
    c.tasks = tuple(tasks)
    c.seed = 0  # every random choice: synthetic archive, sampling, training, evaluation
    needed = {name for task in tasks for name in tasks_lib.get_sections(task)}
    for name, make in SECTIONS.items():
        if name in needed:
            c[name] = make()
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key: a task without a section it reads, or a bad
    value in a section."""
    from caco_jax import tasks

    unknown = [t for t in config.tasks if t not in tasks.TASKS]
    if unknown:
        raise ConfigError(f"config.tasks: unknown task(s) {unknown}; known: {sorted(tasks.TASKS)}")
    for task in config.tasks:
        missing = [name for name in tasks.get_sections(task) if name not in config]
        if missing:
            raise ConfigError(
                f"config.tasks: task {task!r} reads config sections {missing}, which this config "
                "lacks (build it with config.for_tasks)"
            )
    validators = {
        "synthetic": _validate_synthetic,
        "data": _validate_data,
        "model": _validate_model,
        "method": _validate_method,
        "change": _validate_change,
        "train": _validate_train,
        "input": _validate_input,
        "augment": _validate_augment,
        "checkpoint": _validate_checkpoint,
        "logging": _validate_logging,
        "sampling": _validate_sampling,
        "download": _validate_download,
        "eval": _validate_eval,
        "convert": _validate_convert,
        "pretrained": _validate_pretrained,
        "embed": _validate_embed,
        "change_map": _validate_change_map,
    }
    for name, check in validators.items():
        if name in config:
            check(config[name])
    _check(  # reading prepared records from a bucket works; writing them does not
        "prepare" not in config.tasks or "://" not in config.data.data_dir,
        "data.data_dir",
        "prepare writes the records as local files: a local folder or a mounted bucket "
        "(gcsfuse), not a URL (see docs/running.md)",
    )
    _check(
        "synthesize" not in config.tasks or "://" not in config.data.archive,
        "data.archive",
        "synthesize writes the archive as local files: a local folder or a mounted bucket "
        "(gcsfuse), not a URL (see docs/running.md)",
    )
    _check(  # the section also serves embed and change_map, which need no name
        "pretrained" not in config.tasks or bool(config.pretrained.name),
        "pretrained.name",
        "the pretrained task needs an official name (e.g. r18_100k_caco) or an export path",
    )


def _validate_synthetic(s: ml_collections.ConfigDict) -> None:
    _check(s.num_locations >= 2, "synthetic.num_locations", "must be >= 2")
    _check(0.0 <= s.change_fraction <= 1.0, "synthetic.change_fraction", "in [0, 1]")
    _check(
        s.form in ("folder", "tar.gz", "parts"),
        "synthetic.form",
        "must be 'folder', 'tar.gz' or 'parts'",
    )


def _validate_data(d: ml_collections.ConfigDict) -> None:
    _check(
        d.builder_config in ("rgb", "all_bands"),
        "data.builder_config",
        "must be 'rgb' or 'all_bands'",
    )
    _check(0.0 <= d.max_skip_fraction <= 1.0, "data.max_skip_fraction", "in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.wait_seconds > 0, "data.wait_seconds", "must be > 0")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    _check(m.depth in (10, 18, 50), "model.depth", "must be 18 or 50 (or 10, a test network)")
    _check(m.width >= 1, "model.width", "must be >= 1")
    _check(m.embedding_dim >= 1, "model.embedding_dim", "must be >= 1")
    _check(
        m.compute_dtype in methods.COMPUTE_DTYPES,
        "model.compute_dtype",
        f"one of {methods.COMPUTE_DTYPES}",
    )


def _validate_method(m: ml_collections.ConfigDict) -> None:
    _check(m.name in methods.NAMES, "method.name", f"must be one of {methods.NAMES}")
    _check(m.num_negatives >= 2, "method.num_negatives", "must be >= 2")
    _check(
        m.num_negatives % 2 == 0,
        "method.num_negatives",
        "must be even (the queue holds one half per time window)",
    )
    _check(m.temperature > 0, "method.temperature", "must be > 0")
    _check(0.0 <= m.key_momentum < 1.0, "method.key_momentum", "in [0, 1)")


def _validate_change(c: ml_collections.ConfigDict) -> None:
    _check(0.0 <= c.beta < 1.0, "change.beta", "in [0, 1)")
    _check(
        c.statistic in ("ratio", "long_term"),
        "change.statistic",
        "must be 'ratio' or 'long_term'",
    )
    _check(c.epsilon > 0, "change.epsilon", "must be > 0")


def _validate_train(train: ml_collections.ConfigDict) -> None:
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
    _check(train.bn_mode in methods.BN_MODES, "train.bn_mode", f"one of {methods.BN_MODES}")
    _check(train.max_steps >= 0, "train.max_steps", "must be >= 0")


def _validate_checkpoint(c: ml_collections.ConfigDict) -> None:
    _check(c.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _check(c.keep >= 1, "checkpoint.keep", "must be >= 1")


def _validate_logging(c: ml_collections.ConfigDict) -> None:
    _check(c.every_steps >= 1, "logging.every_steps", "must be >= 1")


def _validate_input(i: ml_collections.ConfigDict) -> None:
    _check(
        i.acquisition_draws in ("official", "distinct"),
        "input.acquisition_draws",
        "must be 'official' or 'distinct'",
    )
    _check(i.num_workers >= 0, "input.num_workers", "must be >= 0")
    _check(i.num_threads >= 0, "input.num_threads", "must be >= 0")
    _check(i.prefetch_batches >= 1, "input.prefetch_batches", "must be >= 1")
    _check(i.stats_locations >= 1, "input.stats_locations", "must be >= 1")


def _validate_augment(a: ml_collections.ConfigDict) -> None:
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
    _check(d.concurrent_requests >= 1, "download.concurrent_requests", "must be >= 1")
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
    _check(e.probe in ("official", "cached"), "eval.probe", "must be 'official' or 'cached'")
    _check(
        e.probe == "cached" or not e.update_bn_stats,
        "eval.update_bn_stats",
        "refreshes the statistics for eval.probe='cached' only (the official probe drifts them)",
    )
    _check(e.oscd_encoder_bn in ("train", "eval"), "eval.oscd_encoder_bn", "'train' or 'eval'")
    _check(e.prepare_workers >= 0, "eval.prepare_workers", "must be >= 0 (0 = one per core)")


def _validate_convert(c: ml_collections.ConfigDict) -> None:
    _check(c.depth in (0, 18, 34, 50, 101, 152), "convert.depth", "0 (infer) or a ResNet depth")
    _check(bool(c.source), "convert.source", "the convert_weights task needs a .pth/.ckpt file")


def _validate_pretrained(p: ml_collections.ConfigDict) -> None:
    _check(
        "://" not in p.cache_dir,
        "pretrained.cache_dir",
        "the download cache is a local folder (downloads resume from partial files), not a URL",
    )
    _check(
        "://" not in p.torch_output,
        "pretrained.torch_output",
        "the torch weights are written as a local file, not a URL",
    )
    _check(
        p.torch_output == "" or p.torch_output.endswith((".pth", ".safetensors")),
        "pretrained.torch_output",
        "must end in .pth or .safetensors",
    )


def _validate_embed(e: ml_collections.ConfigDict) -> None:
    _check(e.kind in ("geotiff", "archive", "records"), "embed.kind", "geotiff, archive or records")
    _check(bool(e.source), "embed.source", "the embed task needs it")
    _check(e.builder_config in ("rgb", "all_bands"), "embed.builder_config", "rgb or all_bands")
    _check(
        e.scale in ("auto", "uint8", "reflectance_10000"),
        "embed.scale",
        "auto, uint8 or reflectance_10000",
    )
    _check(e.dn_offset >= 0, "embed.dn_offset", "must be >= 0")
    _check(e.tile_stride >= 0, "embed.tile_stride", "must be >= 0 (0 = the tile size)")
    _check(e.batch_size >= 1, "embed.batch_size", "must be >= 1")


def _validate_change_map(m: ml_collections.ConfigDict) -> None:
    _check(
        m.kind in ("archive", "records", "pretraining"),
        "change_map.kind",
        "archive, records or pretraining",
    )
    _check(
        bool(m.source) or m.kind == "pretraining",
        "change_map.source",
        "the change_map task needs an archive or records",
    )
    _check(
        m.builder_config in ("rgb", "all_bands"), "change_map.builder_config", "rgb or all_bands"
    )
    _check(m.batch_size >= 1, "change_map.batch_size", "must be >= 1")


def _check(ok: bool, key: str, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {requirement}")
