"""The official diagnostic of a CACo run, written by process 0 at each epoch end: histograms of the
running d_lt, d_st and r by label (``change/histogram_epoch=NNN.png``, also to TensorBoard) and
``change/labels.csv`` (one row per item: its location, window, running d_lt, d_st, r and label).
The labels themselves are fitted by `change.epoch_end_labels`, on every process."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import jax
import numpy as np

from caco_jax.pretrain import change as change_lib
from caco_jax.runtime import storage
from caco_jax.runtime.metrics_writer import MetricsWriter

LABEL_COLUMNS = (
    "item_id",
    "location_index",
    "location_id",
    "lat",
    "lon",
    "window",
    "seen",
    "d_lt",
    "d_st",
    "r",
    "changed",
)
# A location's id and centre; read only when first needed (the records hold them).
Locations = Callable[[], list[tuple[str, float, float]]]


class ChangeReport:
    """Writes the histograms and ``labels.csv`` into ``folder`` (process 0 only)."""

    def __init__(self, folder, writer: MetricsWriter, locations: Locations | None = None):
        self.folder = storage.path(folder)
        self.writer = writer
        self._locations = locations
        self._location_table = None
        self.primary = jax.process_index() == 0

    def write(self, running, labels: np.ndarray, epoch: int, step: int) -> None:
        """The diagnostic of epoch ``epoch``: the running values after it and the labels fitted
        from them (for epoch ``epoch + 1``)."""
        if not self.primary:
            return
        seen = np.asarray(running.seen, bool)
        path = self.folder / f"histogram_epoch={epoch:03d}.png"
        save_change_histograms(
            path,
            running.values[seen, change_lib.LONG_TERM],
            running.values[seen, change_lib.SHORT_TERM],
            running.values[seen, change_lib.RATIO],
            labels[seen],
            epoch,
        )
        self.writer.write_image(step, "change/histograms", path)
        self._write_labels(running, labels)

    def _write_labels(self, running, labels) -> None:
        if self._location_table is None and self._locations is not None:
            self._location_table = self._locations()
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(LABEL_COLUMNS)
        for item in range(labels.shape[0]):
            location = item // 2
            name, lat, lon = (
                self._location_table[location] if self._location_table else ("", "", "")
            )
            d_lt, d_st, r = running.values[item]
            seen = int(running.seen[item])
            changed = int(labels[item])
            window = item % 2
            writer.writerow([item, location, name, lat, lon, window, seen, d_lt, d_st, r, changed])
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "labels.csv").write_text(rows.getvalue())


def save_change_histograms(path, d_lt, d_st, r, labels, epoch: int) -> float:
    """Writes the official diagnostic (histograms of d_lt, d_st and r split by label) as a PNG.

    Pass the seen items' running values and labels. Values beyond the plotted range (2 for
    distances, 8 for r, the official axes) are counted in the last bin. Returns the fraction
    labelled changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = np.asarray(labels, bool)
    fraction = float(labels.mean()) if labels.size else 0.0
    figure = Figure(figsize=(9, 9))
    FigureCanvasAgg(figure)
    panels = (
        ("Long-term distance d_lt", d_lt, 2.0, 0.02),
        ("Short-term distance d_st", d_st, 2.0, 0.02),
        ("Running ratio r", r, 8.0, 0.05),
    )
    for row, (title, data, top, width) in enumerate(panels, start=1):
        axes = figure.add_subplot(3, 1, row)
        data = np.clip(np.asarray(data, np.float64), 0.0, top)
        bins = np.arange(0.0, top + width, width)
        # One filled outline per histogram instead of a rectangle per bin: the same picture as
        # the official bars, drawn in a fraction of the time (100-160 bins per panel).
        for selected, name in ((~labels, "unchanged"), (labels, "changed")):
            axes.hist(
                data[selected],
                bins=bins,
                histtype="stepfilled",
                alpha=0.5,
                label=f"{name} ({np.sum(selected)})",
            )
        axes.set_title(title)
        axes.legend()
    figure.suptitle(f"epoch {epoch}: {100 * fraction:.1f}% of {labels.size} seen items changed")
    figure.tight_layout()
    storage.write_png(figure, path)
    return fraction
