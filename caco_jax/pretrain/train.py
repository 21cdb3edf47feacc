r"""Pretraining (task ``pretrain``): CACo, TeCo, SeCo or MoCo v2 on the prepared records.

  python run.py --config configs/pretrain.py:caco,r18,100k --config.data.archive=/data/caco \
    --workdir runs/caco_r18_100k

Reads the records under ``config.data.data_dir`` (default ``<workdir>/tfds``), trains with one
jitted `jax.shard_map` step over the ``('data',)`` mesh of every device of every host (`step`), and
writes into the workdir (a local folder or a cloud URL; `runtime.workdir`):

  checkpoints/<step>/   Orbax: the whole TrainState, the input position and the config
  encoder/              the query encoder alone, with its input normalisation, for evaluators
  metrics.jsonl, tensorboard/   loss, accuracy per subspace, lr, changed fraction, samples/s
  change/               CACo, per epoch: histograms of d_lt, d_st and r by label; labels.csv

A run resumes from the newest checkpoint in the workdir exactly where it stopped, also on another
number of hosts or devices (`runtime.checkpointing`), once its settings are those the checkpoint
was trained with (`resume`); a run that is complete says so and trains nothing. SIGTERM saves a
checkpoint and stops.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from caco_jax import methods
from caco_jax.data import pipeline
from caco_jax.data.normalization import Normalization
from caco_jax.pretrain import augment, evals, meters, resume
from caco_jax.pretrain import change as change_lib
from caco_jax.pretrain import queue as queue_lib
from caco_jax.pretrain import step as step_lib
from caco_jax.pretrain.state import (
    Model,
    TrainState,
    build_model,
    initial_state,
    learning_rate_schedule,
    make_optimizer,
)
from caco_jax.runtime import errors, multihost, progress
from caco_jax.runtime import mesh as mesh_lib
from caco_jax.runtime.metrics_writer import MetricsWriter
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section


@dataclasses.dataclass(frozen=True)
class TrainSettings(Section):
    """`config.train`: the optimiser and schedule of the official code (SGD, lr 0.03 per 256)."""

    SECTION = "train"
    batch_size: int = 256  # global, in items; CACo/TeCo batches hold both windows of a location
    epochs: int = 200
    milestones: tuple[int, ...] = (120, 160)  # epochs at which the learning rate is x0.1
    base_learning_rate: float = 0.03  # for a batch of 256; scaled linearly with the batch size
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4  # added to the gradient (torch SGD), query encoder and heads only
    # How BatchNorm batches are formed over devices (`methods.BN_MODES`): "per_device" (the
    # official run, one GPU), "sync" or "shuffle" (MoCo's shuffle-BN of the keys)
    bn_mode: str = "per_device"
    max_steps: int = 0  # > 0 stops early (smoke runs); 0 = epochs x steps per epoch
    # Resume even though settings that change the training differ from the checkpoint's; the
    # change is recorded in metrics.jsonl and the checkpoints (`resume`).
    allow_config_change: bool = False

    def validate(self) -> None:
        self.require(self.batch_size >= 2, "batch_size", "must be >= 2")
        self.require(
            self.batch_size % 2 == 0,
            "batch_size",
            "must be even (both windows of a location sit in one batch)",
        )
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(
            all(0 < m < self.epochs for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones)),
            "milestones",
            f"must be increasing epochs in (0, train.epochs={self.epochs})",
        )
        self.require(self.base_learning_rate > 0, "base_learning_rate", "must be > 0")
        self.require(0.0 <= self.sgd_momentum < 1.0, "sgd_momentum", "in [0, 1)")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.bn_mode in methods.BN_MODES, "bn_mode", f"one of {methods.BN_MODES}")
        self.require(self.max_steps >= 0, "max_steps", "must be >= 0")


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """The loss or the parameters became NaN or Inf; the run stops, no bad state is saved."""


# ----------------------------------------------------------------------------------------------
# Setup: model, optimiser, initial state and the compiled step, independent of the workdir.


@dataclasses.dataclass(frozen=True)
class Setup:
    method: methods.Method
    model: Model
    mesh: jax.sharding.Mesh
    stream: pipeline.Stream
    normalization: Normalization
    total_steps: int
    train_step: object  # jit(shard_map(step)): (state, global batch) -> (state, metrics)
    initial_state: TrainState  # on the host, not yet placed


def setup(
    settings, num_locations: int, *, num_acquisitions: int = 0, normalization=None, mesh=None
) -> Setup:
    """Builds the model, optimiser, initial state and the jitted step for ``num_locations``
    (holding ``num_acquisitions``: needed when the method's epoch is over acquisitions).

    ``settings`` holds the ``seed`` and the sections ``model``, ``method``, ``change``, ``train``
    and ``augment`` (`settings.Settings`)."""
    method = methods.get(settings.method.name)
    train, model_settings = settings.train, settings.model
    mesh = mesh or mesh_lib.data_mesh()
    batch_size = train.batch_size
    if batch_size % (mesh.devices.size * method.items_per_location):
        raise ValueError(
            f"config.train.batch_size: {batch_size} must be a multiple of "
            f"{mesh.devices.size * method.items_per_location} ({mesh.devices.size} devices x "
            f"{method.items_per_location} items per location) so that every device holds whole "
            "locations"
        )
    stream = pipeline.Stream.of(method, batch_size, settings.seed, num_locations, num_acquisitions)
    total_steps = train.epochs * stream.steps_per_epoch
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)

    normalization = normalization or Normalization.rgb()
    model, params, stats = build_model(
        model_settings.depth,
        method.num_subspaces,
        model_settings.embedding_dim,
        seed=settings.seed,
        compute_dtype=model_settings.compute_dtype,
        bn_axis=step_lib.bn_axis(train.bn_mode),
        in_channels=normalization.num_bands,
        width=model_settings.width,
    )
    schedule = learning_rate_schedule(
        base_learning_rate=train.base_learning_rate,
        batch_size=batch_size,
        steps_per_epoch=stream.steps_per_epoch,
        milestones=train.milestones,
    )
    optimizer = make_optimizer(
        learning_rate=schedule, momentum=train.sgd_momentum, weight_decay=train.weight_decay
    )
    queue_key, step_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(settings.seed), 1))
    queue, pointer = queue_lib.QUEUES[method.queue].init(
        queue_key,
        method.num_subspaces,
        settings.method.num_negatives,
        model_settings.embedding_dim,
    )
    num_items = 2 * num_locations if method.tracks_change else 0
    state = initial_state(step_key, params, stats, optimizer, (queue, pointer), num_items)
    make_views = augment.item_keyed_views(
        settings.augment, method, normalization, jnp.dtype(model_settings.compute_dtype)
    )
    per_device = step_lib.make_per_device_step(
        model,
        method,
        optimizer,
        schedule,
        make_views,
        contrast=settings.method,
        change=settings.change,
        bn_mode=train.bn_mode,
    )
    return Setup(
        method=method,
        model=model,
        mesh=mesh,
        stream=stream,
        normalization=normalization,
        total_steps=total_steps,
        train_step=step_lib.make_train_step(mesh, per_device),
        initial_state=state,
    )


# ----------------------------------------------------------------------------------------------
# The loop.


def train(settings, workdir, source, *, normalization=None, locations=None, mesh=None):
    """Pretrains on ``source`` (the locations, `data.records.Records`) into ``workdir``; resumes if
    it can. ``settings`` holds the sections of `tasks.PRETRAIN_SECTIONS` (`settings.Settings`).

    ``locations()`` gives each record's (location_id, lat, lon) for the change labels' CSV.
    """
    # The loop's I/O (Orbax, etils.epath, grain) is imported here, so that `setup` alone runs on a
    # bare accelerator image (benchmarks/device_check.py).
    from caco_jax.pretrain.change_report import ChangeReport
    from caco_jax.runtime import checkpointing, storage

    run = setup(
        settings,
        len(source),
        num_acquisitions=int(source.acquisition_counts().sum()),
        normalization=normalization,
        mesh=mesh,
    )
    workdir = Workdir.of(workdir)  # a local folder or a bucket URL
    evaluations = evals.Evaluations(settings, workdir, run, source)  # config.evals, data loaded
    checkpoints = checkpointing.Checkpointer(
        storage.path(workdir.checkpoints),
        every_steps=settings.checkpoint.every_steps,
        keep=settings.checkpoint.keep,
    )
    state, resumed_from, start_batch, changes, history = _initial_or_restored(
        settings, run, checkpoints
    )
    batches = pipeline.make_pipeline(  # this process's rows of every global batch
        settings.input,
        source,
        run.stream,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_batch=start_batch,
    )
    writer = MetricsWriter(workdir)
    if changes:  # accepted: on record beside the metrics and in every later checkpoint
        writer.write_record(resumed_from, {"config_change": history[-1]["changes"]})
    report = ChangeReport(workdir.change, writer, locations) if run.method.tracks_change else None
    evaluations.start(writer, resumed_from)
    throughput = meters.Throughput(settings.train.batch_size)
    epoch_means, epochs = meters.EpochMeans(), []
    steps_per_epoch, last_good = run.stream.steps_per_epoch, resumed_from
    start_step = int(jax.device_get(state.step))
    if start_step >= run.total_steps and jax.process_index() == 0:
        print(
            f"pretrain: complete at checkpoint step {start_step} (the run asks for "
            f"{run.total_steps} steps): nothing to train",
            flush=True,
        )
    bar = progress.bar(
        total=run.total_steps,
        initial=start_step,
        desc="pretrain",
        unit="step",
        enabled=settings.logging.progress_bar and jax.process_index() == 0,
    )
    try:
        with checkpointing.QuietSaveFailures(), checkpointing.PreemptionGuard(checkpoints) as guard:
            for step in range(start_step, run.total_steps):
                state, metrics = run.train_step(
                    state, mesh_lib.global_batch(next(batches), run.mesh)
                )
                done = step + 1
                throughput.tick()
                epoch_means.add(metrics)
                if done % settings.logging.every_steps == 0 or done == run.total_steps:
                    scalars = {**meters.host_scalars(metrics), **throughput.read()}
                    if not math.isfinite(scalars["loss"]):
                        _check_finite(state, done, checkpoints, last_good)
                    writer.write(done, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
                if done % steps_per_epoch == 0:
                    epochs.append(_epoch_record(settings, done, run, epoch_means, writer))
                    if run.method.tracks_change:
                        state = _next_change_labels(settings, run, state, report, done, writer)
                stop = guard.should_stop(done)
                # A stopped run's evaluations are rerun where the resumed run gets to; a stop at the
                # last step still evaluates, since no resumed run will reach a later step.
                if not stop or done == run.total_steps:
                    evaluations.run_due(done, state)
                if checkpoints.due(done) or done == run.total_steps or stop:
                    _check_finite(state, done, checkpoints, last_good)
                    position = pipeline.Position(done, run.stream)  # one global batch per step
                    checkpoints.save(
                        done,
                        state,
                        data_position=position.to_json(),
                        config=resume.checkpoint_config(settings, history),
                    )
                    writer.flush()  # metrics.jsonl holds every line up to the checkpoint
                    last_good = done
                    if settings.checkpoint.export_encoder_every_checkpoint:
                        export_encoder(settings, run, state, workdir, done)
                bar.update(1)
                if stop:
                    break
            checkpoints.wait()  # a failure of the last save is met here, inside the quiet block
    except Exception as error:
        if jax.process_count() > 1:  # exits before the checkpoint in flight is waited for
            multihost.stop_if_peer_lost(error)
        raise
    finally:
        bar.close()
        checkpoints.close()
        writer.close()

    final_step = int(jax.device_get(state.step))
    results = {
        "method": run.method.name,
        "steps": final_step,
        "resumed_from": resumed_from,
        "stopped_early": final_step < run.total_steps,
        "steps_per_epoch": steps_per_epoch,
        "devices": int(run.mesh.devices.size),
        "samples_per_s": throughput.last.get("samples_per_s"),  # None: no step ran
        "encoder": str(_exported_encoder(settings, run, state, workdir, final_step)),
        "epochs": epochs,  # per completed epoch: mean loss and accuracies, queue_full
    }
    if run.method.tracks_change:
        labels = jax.device_get(state.change["labels"])
        results["changed_fraction"] = float(labels.mean()) if labels.size else 0.0
    results.update(evaluations.finish(epochs))
    if jax.process_index() == 0:
        print("\n".join(meters.summary_lines(results)), flush=True)
    return results


def _initial_or_restored(settings, run: Setup, checkpoints):
    """(state, checkpoint step or None, first global batch, accepted setting changes, the history
    of accepted changes) of the newest checkpoint that restores (`Checkpointer.restore_latest`
    moves damaged ones aside) once its settings allow it (`resume.check`), else the initial ones.
    """
    from caco_jax.runtime import checkpointing

    state = mesh_lib.replicate(run.initial_state, run.mesh)
    target = checkpointing.replicated_target(state, run.mesh)
    steps = checkpoints.all_steps()
    if steps:  # a change of settings is refused before any checkpoint is read (or moved aside)
        newest = max(steps)
        resume.check(
            checkpoints.restore_config(newest), settings, step=newest, where=checkpoints.directory
        )
    try:
        step, restored = checkpoints.restore_latest(target)
    except checkpointing.StateMismatchError as error:
        changes = resume.compare(checkpoints.restore_config(error.step), settings)
        raise resume.state_changed(
            error, changes, allowed=settings.train.allow_config_change
        ) from None
    if step is None:
        return state, None, 0, [], []
    saved_config = checkpoints.restore_config(step)
    changes, note = resume.check(saved_config, settings, step=step, where=checkpoints.directory)
    position = pipeline.Position.from_json(checkpoints.restore_data_position(step))
    try:
        start_batch = position.start_batch(run.stream)
    except ValueError as error:
        raise resume.position_changed(error, changes, step=step) from None
    history = resume.history(saved_config)
    if changes:
        history.append(resume.record(changes, step))
    if jax.process_index() == 0:
        print(f"resumed from checkpoint step {step}" + (f"; {note}" if note else ""), flush=True)
    return restored, step, start_batch, changes, history


def _epoch_record(settings, done: int, run: Setup, epoch_means, writer) -> dict:
    """The epoch's mean loss and accuracies (epochs counted from 1), written and returned."""
    # An epoch is comparable with later ones only if the random initial queue was already full of
    # real keys when it started (the loss rises while they replace it).
    started = done - epoch_means.steps
    full = started * settings.train.batch_size >= settings.method.num_negatives
    epoch = done // run.stream.steps_per_epoch
    means = epoch_means.pop()
    writer.write(done, {f"epoch/{k}": v for k, v in means.items()})
    return {"epoch": epoch, "queue_full": full, **means}


def _next_change_labels(settings, run: Setup, state, report, done: int, writer):
    """CACo's epoch end: the next epoch's change labels into the state, and the report."""
    epoch = done // run.stream.steps_per_epoch - 1
    running = jax.device_get(state.change["running"])
    labels, fraction = change_lib.epoch_end_labels(
        running, settings.change, seed=settings.seed + epoch
    )
    report.write(running, labels, epoch, done)
    writer.write(done, {"change/changed_fraction": fraction})
    labels = mesh_lib.replicate(jnp.asarray(labels), run.mesh)
    return state.replace(change={**state.change, "labels": labels})


def _check_finite(state, step: int, checkpoints, last_good) -> None:
    if bool(jax.device_get(state.all_finite)):
        return
    checkpoints.wait()
    kept = (
        f"The last good checkpoint is step {last_good} in {checkpoints.directory}"
        if last_good is not None
        else "No checkpoint was written"
    )
    raise NonFiniteLossError(
        f"the loss or the parameters became NaN or Inf at or before step {step}; stopping. "
        f"{kept} (lower the learning rate or use float32 compute, then rerun)."
    )


def _exported_encoder(settings, run: Setup, state: TrainState, workdir, step: int):
    """The encoder export of ``step``: written, unless the workdir holds it already (a rerun of a
    complete run)."""
    from caco_jax.models import export
    from caco_jax.runtime import storage

    directory = storage.path(Workdir.of(workdir).encoder)
    try:
        written = export.read_metadata(directory)
    except (OSError, ValueError):  # missing, incomplete or damaged: written again
        written = None
    if written and written.get("step") == step and written.get("method") == run.method.name:
        return directory
    return export_encoder(settings, run, state, workdir, step)


def export_encoder(settings, run: Setup, state: TrainState, workdir, step: int):
    """Writes the query encoder alone, with its input normalisation, to ``<workdir>/encoder``."""
    from caco_jax.data import normalization as normalization_lib
    from caco_jax.models import export
    from caco_jax.runtime import storage

    params, stats = jax.device_get((state.query_params, state.query_stats))
    metadata = {
        "source": "caco_jax pretrain",
        "method": run.method.name,
        "step": int(step),
        "bn_mode": settings.train.bn_mode,
        "builder_config": settings.data.builder_config,
        "image_size": settings.augment.crop_size,
        normalization_lib.EXPORT_KEY: run.normalization.to_json(),
    }
    directory = storage.path(Workdir.of(workdir).encoder)
    export.save_encoder(directory, run.model.encoder(params, stats), metadata, overwrite=True)
    return directory


def run_task(settings, workdir) -> dict:
    """Task ``pretrain``: trains on the records in ``config.data.data_dir`` (or the workdir's)."""
    from caco_jax.data import dataset, normalization, records
    from caco_jax.runtime import locks

    data = settings.data
    if jax.process_count() > 1:  # every process must read the same records
        dataset.check_same_dataset(data, workdir)
    source = dataset.open_records(data.records_dir(workdir), builder_config=data.builder_config)
    # One run writes into a workdir at a time (`run.py` holds this lock already; from Python, the
    # task takes it); process 0 holds it for all the processes of a run.
    lock = locks.workdir_lock(workdir) if jax.process_index() == 0 else locks.NO_LOCK
    with lock:
        return train(
            settings,
            workdir,
            source,
            normalization=normalization.for_records(
                data.builder_config, source, num_locations=settings.input.stats_locations
            ),
            locations=lambda: records.location_table(source),
        )
