r"""Pretraining (task ``pretrain``): CACo, TeCo, SeCo or MoCo v2 on the prepared records.

  python run.py --config configs/caco_r18_100k.py --config.data.archive=/data/caco \
    --workdir runs/r18

Reads the TFDS records of `<workdir>/tfds` (or ``config.data.data_dir``), trains with one jitted
`jax.shard_map` step over a 1-D ``('data',)`` mesh of every device of every host
(`caco_jax.step`), and writes into the workdir:

  checkpoints/<step>/   Orbax: the whole TrainState, the input position and the config
  encoder/              the query encoder alone (`models.export.save_encoder`), for evaluators
  metrics.jsonl, tensorboard/   loss, accuracy per subspace, lr, changed fraction, samples/s,
                        step time
  change/               per epoch (CACo): histogram PNGs of d_lt, d_st and r by label; labels.csv

A run resumes from the newest checkpoint in the workdir, continuing exactly where it stopped (same
parameters as an uninterrupted run). It also resumes on another number of hosts or devices (see
`caco_jax.checkpointing`): the input stream is the same, the numbers too with ``sync`` BatchNorm
(with ``per_device`` or ``shuffle`` the BatchNorm batches depend on the device count). SIGTERM
saves a checkpoint and stops.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from caco_jax import augment, modes
from caco_jax import change as change_lib
from caco_jax import step as step_lib
from caco_jax.data import item_sampler, pipeline
from caco_jax.data import normalization as normalization_lib
from caco_jax.metrics_writer import MetricsWriter
from caco_jax.train_state import (
    COMPUTE_DTYPES,
    Model,
    TrainState,
    build_model,
    learning_rate_schedule,
    make_optimizer,
)

if TYPE_CHECKING:
    import ml_collections

# Orbax (caco_jax.checkpointing) is imported where a run saves or restores: `setup` builds the
# compiled step on machines that have only JAX, Flax and Optax (benchmarks/device_check.py).


class NonFiniteLossError(FloatingPointError):
    """The loss or the parameters became NaN or Inf; the run stops, no bad state is saved."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run is made of, independent of the workdir (tests and benchmarks build it too)."""

    mode: modes.Mode
    model: Model
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    total_steps: int
    train_step: object  # jit(shard_map(step)): (state, global batch) -> (state, metrics)
    initial_state: TrainState  # on the host, not yet placed


def _make_views_fn(config, mode_name: str, normalization, num_views: int, dtype):
    """(key, images [n, V, H, W, C], item_ids [n]) -> views [num_views, n, h, w, c].

    Each item's augmentation key is folded from the step key and its item id, so the views of an
    item do not depend on how the batch is split across devices (N devices = 1 device on the same
    batch).
    """
    names = ("q", *(f"k{v}" for v in range(num_views - 1)))

    def one_item(key, images):
        views = augment.make_views(
            key,
            jax.tree.map(lambda x: x[None], images),
            mode=mode_name,
            config=config,
            normalization=normalization,
            dtype=dtype,
        )
        return jnp.stack([views[name][0] for name in names])

    def make_views(key, images, item_ids):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, item_ids)
        return jnp.swapaxes(jax.vmap(one_item)(keys, images), 0, 1)

    return make_views


def num_change_items(mode: modes.Mode, num_locations: int) -> int:
    """Size of the per-item change arrays: 2 items per location for CACo, none otherwise."""
    return 2 * num_locations if mode.tracks_change else 0


def setup(config, num_locations: int, *, normalization=None, mesh=None) -> Setup:
    """Builds the model, optimizer, initial state and the jitted step for ``num_locations``."""
    mode = modes.get(config.method.mode)
    mesh = mesh or step_lib.data_mesh()
    batch_size = config.train.batch_size
    num_devices = mesh.devices.size
    per_location = item_sampler.layout(mode.name).items_per_location
    if batch_size % (num_devices * per_location):
        raise ValueError(
            f"config.train.batch_size: {batch_size} must be a multiple of "
            f"{num_devices * per_location} ({num_devices} devices x {per_location} items per "
            "location) so that every device holds whole locations"
        )
    steps_per_epoch = pipeline.steps_per_epoch(num_locations, mode.name, batch_size)
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    query_axis, key_axis = step_lib.bn_axes(config.train.bn_mode)
    normalization = normalization or normalization_lib.Normalization.rgb()
    model, params, stats = build_model(
        config.model.depth,
        mode.num_subspaces,
        config.model.embedding_dim,
        seed=config.seed,
        compute_dtype=config.model.compute_dtype,
        query_bn_axis=query_axis,
        key_bn_axis=key_axis,
        in_channels=len(normalization.mean),
    )
    schedule = learning_rate_schedule(
        base_learning_rate=config.train.base_learning_rate,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        milestones=config.train.milestones,
    )
    optimizer = make_optimizer(
        learning_rate=schedule,
        momentum=config.train.sgd_momentum,
        weight_decay=config.train.weight_decay,
    )
    root_key = jax.random.PRNGKey(config.seed)
    queue_key, step_key = jax.random.split(jax.random.fold_in(root_key, 1))
    queue, pointer = mode.init_queue(
        queue_key, mode.num_subspaces, config.method.num_negatives, config.model.embedding_dim
    )
    num_items = num_change_items(mode, num_locations)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=step_key,
        query_params=params,
        query_stats=stats,
        key_params=jax.tree.map(
            jnp.copy, params
        ),  # the key side starts as a copy of the query side
        key_stats=jax.tree.map(jnp.copy, stats),
        opt_state=optimizer.init(params),
        queue={"keys": queue, "pointer": pointer},
        change={
            "running": change_lib.init_running_change(num_items),
            "labels": jnp.zeros((num_items,), bool),  # epoch 0: nothing changed
        },
        all_finite=jnp.ones((), bool),
    )
    settings = step_lib.StepSettings(
        temperature=config.method.temperature,
        key_momentum=config.method.key_momentum,
        bn_mode=config.train.bn_mode,
        change_beta=config.change.beta,
        change_use_ema=config.change.use_ema,
        change_epsilon=config.change.epsilon,
    )
    make_views = _make_views_fn(
        config,
        mode.name,
        normalization,
        1 + mode.num_subspaces,
        COMPUTE_DTYPES[config.model.compute_dtype],
    )
    per_device = step_lib.make_per_device_step(
        model, mode, optimizer, schedule, settings, make_views
    )
    return Setup(
        mode=mode,
        model=model,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        train_step=step_lib.make_train_step(mesh, per_device),
        initial_state=state,
    )


def replicate(tree, mesh):
    """A replicated copy of ``tree`` on the mesh (a copy: the step donates its input state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()), may_alias=False)


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows -> one array per field sharded along the rows over all hosts' devices."""
    rows = NamedSharding(mesh, P(step_lib.AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(rows, np.asarray(x)), local_batch
    )


def abstract_state(state: TrainState, mesh) -> TrainState:
    """The restore target: shapes and dtypes of ``state``, replicated over the current mesh."""
    from caco_jax import checkpointing

    replicated = NamedSharding(mesh, P())
    shapes = jax.eval_shape(lambda s: s, state)
    return checkpointing.abstract_target(shapes, jax.tree.map(lambda _: replicated, shapes))


def fit_labels(config, state: TrainState, epoch: int, workdir: str, mesh, location_ids=None):
    """Epoch end (CACo): next epoch's labels from the running ratios, histogram, fraction."""
    running = jax.device_get(state.change["running"])
    labels = change_lib.fit_change_labels(
        running.values,
        running.seen,
        seed=config.seed + epoch,
        granularity="location" if config.change.per_location else "item",
        statistic=config.change.statistic,
    )
    fraction = float(labels[running.seen].mean()) if running.seen.any() else 0.0
    if jax.process_index() == 0:
        folder = os.path.join(workdir, "change")
        seen = running.seen
        change_lib.save_change_histograms(
            os.path.join(folder, f"histogram_epoch={epoch:03d}.png"),
            running.values[seen, change_lib.LONG_TERM],
            running.values[seen, change_lib.SHORT_TERM],
            running.values[seen, change_lib.RATIO],
            labels[seen],
            epoch,
        )
        write_labels_csv(os.path.join(folder, "labels.csv"), running, labels, location_ids)
    state = state.replace(change={**state.change, "labels": replicate(jnp.asarray(labels), mesh)})
    return state, fraction


def write_labels_csv(path, running, labels, location_ids=None) -> None:
    """One row per item: id, location index and id, window, seen, d_lt, d_st, r, changed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "item_id",
                "location_index",
                "location_id",
                "window",
                "seen",
                "d_lt",
                "d_st",
                "r",
                "changed",
            ]
        )
        for item in range(labels.shape[0]):
            location = item // 2
            name = location_ids[location] if location_ids is not None else ""
            d_lt, d_st, r = running.values[item]
            writer.writerow(
                [
                    item,
                    location,
                    name,
                    item % 2,
                    int(running.seen[item]),
                    d_lt,
                    d_st,
                    r,
                    int(labels[item]),
                ]
            )


def _epoch_metrics(metrics: dict) -> dict:
    """The step metrics averaged per epoch: the loss and the accuracy per subspace."""
    return {k: v for k, v in metrics.items() if k == "loss" or k.startswith("accuracy/")}


def _host_metrics(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    source: Sequence,
    *,
    arrays_fn=None,
    normalization=None,
    location_ids=None,
    mesh=None,
) -> dict:
    """Pretrains on ``source`` (random-access records, `data.records`); resumes if it can."""
    from caco_jax import checkpointing

    run = setup(config, len(source), normalization=normalization, mesh=mesh)
    mesh, mode = run.mesh, run.mode
    batch_size = config.train.batch_size
    state = replicate(run.initial_state, mesh)
    checkpoints = checkpointing.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
    )
    resumed_from, restored = checkpoints.restore_latest(abstract_state(state, mesh))
    if resumed_from is not None:
        state = restored
        print(f"resumed from checkpoint step {resumed_from}", flush=True)
    start_step = int(jax.device_get(state.step))
    stream = stream_settings(config, len(source))
    iterator = input_iterator(
        config,
        source,
        start_batch=resume_position(checkpoints, resumed_from, start_step, stream),
        arrays_fn=arrays_fn,
    )
    last_good = resumed_from

    writer = MetricsWriter(workdir)
    progress = _progress_bar(config, start_step, run.total_steps)
    window_start, window_steps = time.perf_counter(), 0
    first_metrics = last_metrics = None
    stopped_early = False
    # Per-epoch means of the loss and accuracies, summed on the device (no host sync per step).
    epoch_sums, epoch_steps, epochs = None, 0, []

    def check_finite(step):
        if not bool(jax.device_get(state.all_finite)):
            checkpoints.wait()
            kept = (
                f"The last good checkpoint is step {last_good} in {checkpoints.directory}"
                if last_good is not None
                else "No checkpoint was written"
            )
            raise NonFiniteLossError(
                f"the loss or the parameters became NaN or Inf at or before step {step}; "
                f"stopping. {kept} (lower the learning rate or use float32 compute, then rerun)."
            )

    try:
        with checkpointing.PreemptionGuard(checkpoints) as guard:
            for step in range(start_step, run.total_steps):
                batch = global_batch(next(iterator), mesh)
                state, metrics = run.train_step(state, batch)
                done = step + 1
                window_steps += 1
                tracked = _epoch_metrics(metrics)
                epoch_sums = (
                    tracked if epoch_sums is None else jax.tree.map(jnp.add, epoch_sums, tracked)
                )
                epoch_steps += 1
                if done % config.logging.every_steps == 0 or done == run.total_steps:
                    scalars = _host_metrics(metrics)
                    if not np.isfinite(scalars["loss"]):
                        check_finite(done)
                    elapsed = time.perf_counter() - window_start
                    scalars["step_time_s"] = elapsed / window_steps
                    scalars["samples_per_s"] = batch_size * window_steps / elapsed
                    writer.write(done, scalars)
                    window_start, window_steps = time.perf_counter(), 0
                    first_metrics = first_metrics or scalars
                    last_metrics = scalars
                    progress.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
                if done % run.steps_per_epoch == 0:
                    epoch = done // run.steps_per_epoch - 1
                    means = {k: v / epoch_steps for k, v in _host_metrics(epoch_sums).items()}
                    writer.write(done, {f"epoch/{k}": v for k, v in means.items()})
                    # The raw loss grows while real keys replace the random initial queue; only
                    # epochs that start with a full queue are comparable.
                    full = (done - epoch_steps) * batch_size >= config.method.num_negatives
                    epochs.append({"epoch": epoch + 1, "queue_full": full, **means})
                    epoch_sums, epoch_steps = None, 0
                    if mode.tracks_change:
                        state, fraction = fit_labels(
                            config, state, epoch, workdir, mesh, location_ids
                        )
                        writer.write(done, {"change/changed_fraction": fraction})
                stop = guard.should_stop(done)
                if checkpoints.due(done) or done == run.total_steps or stop:
                    check_finite(done)
                    position = pipeline.position(done, **stream)  # one global batch per step
                    checkpoints.save(done, state, data_position=position, config=config)
                    last_good = done
                    if config.checkpoint.export_encoder_every_checkpoint:
                        export_encoder(config, run, state, workdir, done)
                progress.update(1)
                if stop:
                    stopped_early = done < run.total_steps
                    break
    finally:
        progress.close()
        checkpoints.close()
        writer.close()

    final_step = int(jax.device_get(state.step))
    encoder_dir = export_encoder(config, run, state, workdir, final_step)
    results = {
        "mode": mode.name,
        "steps": final_step,
        "resumed_from": resumed_from,
        "stopped_early": stopped_early,
        "steps_per_epoch": run.steps_per_epoch,
        "devices": int(mesh.devices.size),
        "encoder": encoder_dir,
        "first_loss": first_metrics and first_metrics["loss"],
        "final_loss": last_metrics and last_metrics["loss"],
        "epochs": epochs,  # per completed epoch: mean loss and accuracies, queue_full
    }
    if mode.tracks_change:
        labels = np.asarray(jax.device_get(state.change["labels"]))
        results["changed_fraction"] = float(labels.mean()) if labels.size else 0.0
    _print_summary(results, last_metrics)
    return results


def stream_settings(config, num_locations: int) -> dict:
    """What fixes the order of the global batches (`data.pipeline.STREAM_SETTINGS`)."""
    return {
        "mode": config.method.mode,
        "global_batch_size": config.train.batch_size,
        "seed": config.seed,
        "num_locations": num_locations,
    }


def input_iterator(
    config, source, *, start_batch: int, arrays_fn=None, process_index=None, process_count=None
):
    """This process's rows of every global batch from ``start_batch`` on.

    The process defaults to this host's `jax.process_index()` of `jax.process_count()`; tests
    simulate several hosts by passing them.
    """
    return pipeline.make_pipeline(
        config,
        source,
        mode=config.method.mode,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        arrays_fn=arrays_fn,
        start_batch=start_batch,
    )


def resume_position(checkpoints, step, state_step: int, stream: dict) -> int:
    """The first global batch to read: 0 for a new run, else the checkpoint's saved position.

    The position is independent of the number of processes, so a run resumes on any host count.
    """
    if step is None:
        return 0
    saved = checkpoints.restore_data_position(step)
    if saved is None:  # a checkpoint saved without it: the loop reads one global batch per step
        return state_step
    return pipeline.resume_batch(saved, **stream)


def export_encoder(config, run: Setup, state: TrainState, workdir: str, step: int) -> str:
    """Writes the query encoder alone (params and BatchNorm statistics) to ``<workdir>/encoder``."""
    from caco_jax.models import export

    params, stats = jax.device_get((state.query_params, state.query_stats))
    encoder = run.model.encoder(params, stats)
    directory = os.path.join(os.path.abspath(workdir), "encoder")
    metadata = {
        "source": "caco_jax pretrain",
        "method": run.mode.name,
        "step": int(step),
        "bn_mode": config.train.bn_mode,
        "builder_config": config.data.builder_config,
    }
    export.save_encoder(directory, encoder, metadata, overwrite=True)
    return directory


def _progress_bar(config, start: int, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=not (config.logging.progress_bar and jax.process_index() == 0),
    )


def _print_summary(results: dict, last_metrics) -> None:
    if jax.process_index() != 0:
        return
    lines = [
        f"pretrain {results['mode']}: {results['steps']} steps on {results['devices']} device(s)"
    ]
    if results["first_loss"] is not None:
        lines.append(f"  loss {results['first_loss']:.4f} -> {results['final_loss']:.4f}")
    if last_metrics:
        accuracies = [
            f"{v:.2f}" for k, v in sorted(last_metrics.items()) if k.startswith("accuracy/")
        ]
        lines.append(f"  accuracy per subspace {', '.join(accuracies)}")
        lines.append(f"  {last_metrics['samples_per_s']:.1f} samples/s")
    if "changed_fraction" in results:
        lines.append(f"  labelled changed: {100 * results['changed_fraction']:.1f}% of items")
    lines.extend(_epoch_lines(results["epochs"]))
    lines.append(f"  encoder: {results['encoder']}")
    print("\n".join(lines), flush=True)


def _epoch_lines(epochs: list[dict]) -> list[str]:
    """One line per epoch, then the first against the last epoch that ran with a full queue."""

    def describe(record):
        accuracies = [f"{v:.2f}" for k, v in sorted(record.items()) if k.startswith("accuracy/")]
        return f"loss {record['loss']:.3f}, accuracy per subspace {' '.join(accuracies)}"

    lines = ["  per epoch (means over its steps; * = the queue held only real keys throughout):"]
    for record in epochs:
        mark = "*" if record["queue_full"] else " "
        lines.append(f"    epoch {record['epoch']:3d}{mark} {describe(record)}")
    full = [record for record in epochs if record["queue_full"]]
    if len(full) >= 2:
        lines.append(
            f"  full-queue epochs {full[0]['epoch']} -> {full[-1]['epoch']}: "
            f"{describe(full[0])} -> {describe(full[-1])}"
        )
    return lines if epochs else []


def run_task(config, workdir: str) -> dict:
    """Task ``pretrain``: trains on the records in the workdir or ``config.data.data_dir``."""
    from caco_jax.data import records

    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    source = records.open_records(
        data_dir, builder_config=config.data.builder_config, split="train"
    )
    location_ids = [records.location_arrays(source[i])["location_id"] for i in range(len(source))]
    results = train(
        config,
        workdir,
        source,
        normalization=normalization_lib.for_records(
            config.data.builder_config, source, num_locations=config.input.stats_locations
        ),
        location_ids=location_ids,
    )
    agreement = ground_truth_agreement(config, workdir)
    if agreement and jax.process_index() == 0:
        print(
            f"  change labels vs the synthetic ground truth ({agreement['change_locations']} "
            f"locations): agreement {agreement['change_agreement']:.2f} (chance "
            f"{agreement['change_agreement_chance']:.2f}); P(r of a changed location > r of an "
            f"unchanged one) {agreement['change_ratio_auc']:.2f} (chance 0.50)",
            flush=True,
        )
    results.update(agreement)
    return results


def ground_truth_agreement(config, workdir: str) -> dict:
    """For the synthetic archive: how well the final change labels match its ground truth.

    A location counts as labelled changed when either of its items is; its ratio r is the mean over
    its seen items. Returns the agreement of the labels, the agreement a labelling independent of
    the truth with the same changed rate would have (chance), and the probability that a changed
    location has a higher r than an unchanged one (ROC AUC, threshold-free; chance 0.5). Returns {}
    when no ground truth is known (a real archive) or the mode keeps no labels.
    """
    from caco_jax.data import synthetic

    labels_csv = os.path.join(workdir, "change", "labels.csv")
    folder = config.synthetic.output or os.path.join(workdir, "synthetic_archive")
    truth_csv = os.path.join(folder, synthetic.ground_truth_name(synthetic.DEFAULT_NAME))
    if not (os.path.exists(labels_csv) and os.path.exists(truth_csv)):
        return {}
    truth = {row.location_id: row.changed for row in synthetic.read_ground_truth(truth_csv)}
    predicted: dict[str, bool] = {}
    ratios: dict[str, list[float]] = {}
    with open(labels_csv) as f:
        for row in csv.DictReader(f):
            name = row["location_id"]
            predicted[name] = predicted.get(name, False) or row["changed"] == "1"
            if row["seen"] == "1":
                ratios.setdefault(name, []).append(float(row["r"]))
    common = sorted(set(truth) & set(ratios))
    if not common:
        return {}
    truth_array = np.array([truth[k] for k in common])
    predicted_array = np.array([predicted[k] for k in common])
    agreement = float(np.mean(truth_array == predicted_array))
    rate, prior = predicted_array.mean(), truth_array.mean()
    chance = float(rate * prior + (1 - rate) * (1 - prior))
    return {
        "change_agreement": agreement,
        "change_agreement_chance": chance,
        "change_ratio_auc": ratio_auc(np.array([np.mean(ratios[k]) for k in common]), truth_array),
        "change_locations": len(common),
    }


def ratio_auc(ratios: np.ndarray, changed: np.ndarray) -> float:
    """P(ratio of a changed location > that of an unchanged one), ties half; NaN without both."""
    higher = ratios[changed][:, None] - ratios[~changed][None, :]
    if not higher.size:
        return float("nan")
    return float(np.mean((higher > 0) + 0.5 * (higher == 0)))
