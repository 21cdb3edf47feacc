"""What the training loop measures between log lines and over epochs, and the run's summary."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


class Throughput:
    """Steps and wall time since the last reading."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._start, self._steps = time.perf_counter(), 0
        self.last: dict[str, float] = {}  # the latest reading

    def tick(self) -> None:
        self._steps += 1

    def read(self) -> dict[str, float]:
        """Step time and samples per second since the last reading; starts a new window."""
        elapsed = time.perf_counter() - self._start
        scalars = {
            "step_time_s": elapsed / self._steps,
            "samples_per_s": self.batch_size * self._steps / elapsed,
        }
        self._start, self._steps = time.perf_counter(), 0
        self.last = scalars
        return scalars


class EpochMeans:
    """Per-epoch means of the loss and the accuracy per subspace, summed on the device (no host
    synchronisation per step)."""

    def __init__(self):
        self._sums, self.steps = None, 0

    def add(self, metrics: dict) -> None:
        tracked = {k: v for k, v in metrics.items() if k == "loss" or k.startswith("accuracy/")}
        self._sums = tracked if self._sums is None else jax.tree.map(jnp.add, self._sums, tracked)
        self.steps += 1

    def pop(self) -> dict[str, float]:
        """The means since the last `pop`; starts a new epoch."""
        means = {k: float(v) / self.steps for k, v in jax.device_get(self._sums).items()}
        self._sums, self.steps = None, 0
        return means


def host_scalars(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def summary_lines(results: dict) -> list[str]:
    """The run in a few lines: the epoch table, then its first and last full-queue epochs, and the
    evaluations run during pretraining (`pretrain.evals`) beside the loss of their epoch.

    The loss of an epoch that started while the queue still held random initial keys is not
    comparable with later ones (it rises as real keys replace them), so the headline compares the
    first and the last epoch whose queue held only real keys.
    """

    def describe(record):
        accuracies = [f"{v:.2f}" for k, v in sorted(record.items()) if k.startswith("accuracy/")]
        return f"loss {record['loss']:.3f}, accuracy per subspace {' '.join(accuracies)}"

    epochs = results["epochs"]
    speed = results.get("samples_per_s")
    lines = [
        f"pretrain {results['method']}: {results['steps']} steps on {results['devices']} "
        "device(s), " + (f"{speed:.1f} samples/s" if speed is not None else "no step run now")
    ]
    full = [record for record in epochs if record["queue_full"]]
    if len(full) >= 2:
        lines.append(
            f"  full-queue epochs {full[0]['epoch']} -> {full[-1]['epoch']}: "
            f"{describe(full[0])} -> {describe(full[-1])}"
        )
    if "changed_fraction" in results:
        lines.append(f"  labelled changed: {100 * results['changed_fraction']:.1f}% of items")
    evals = results.get("evals", {})
    for name, entry in evals.items():
        lines.append(f"  {eval_line(name, entry)}")
    if epochs:
        lines.append("  per epoch (means over its steps; * = the queue held only real keys):")
    for record in epochs:
        mark = "*" if record["queue_full"] else " "
        at_epoch = [
            f"{name} {point[entry['metric']]:.3f}"
            for name, entry in evals.items()
            for point in entry["history"]
            if point["epoch"] == record["epoch"]
        ]
        beside = f"; {', '.join(at_epoch)}" if at_epoch else ""
        lines.append(f"    epoch {record['epoch']:3d}{mark} {describe(record)}{beside}")
    lines.append(f"  encoder: {results['encoder']}")
    return lines


def eval_line(name: str, entry: dict) -> str:
    """One evaluator: its metric from the first to the last evaluation, and what it cost."""
    history, metric = entry["history"], entry["metric"]
    head = f"eval {name} ({entry['type']} on {entry['dataset']}): {metric}"
    if not history:
        return f"{head}: not run"
    first, last = history[0], history[-1]
    curve = f"{first[metric]:.3f} (epoch {first['epoch']:g})"
    if len(history) > 1:
        curve += f" -> {last[metric]:.3f} (epoch {last['epoch']:g})"
    return (
        f"{head} {curve}; {len(history)} evaluations, {entry['seconds']:.1f} s "
        f"({100 * entry['fraction_of_pretraining']:.1f}% of the pretraining time)"
    )
