r"""A rehearsal of the 1M-archive path at 5,000 locations: prepare, memory, start-up, input.

  python benchmarks/rehearsal.py --workdir /tmp/caco_rehearsal --sizes 500 5000 --workers 1 2 \
    [--baseline_tree /tmp/old_checkout] [--keep] [--report /tmp/caco_rehearsal.md]

Never part of CI: at 5,000 locations it writes ~8 GB and ran about an hour on 2 shared cores.

1. Archives (cached in --workdir): --base_locations synthetic locations rendered once
   (`synthetic.write_archive`, folder form), then for each of --sizes an archive of that many
   locations in the 1M archive's form (one tar.gz stream cut into `_part0..3`), made by
   replicating the base locations with their own ids and coordinates (rehearsal_archive.py).
2. For each size and each tree (this checkout, then --baseline_tree if given), each in its own
   process through benchmarks/rehearsal_probe.py or run.py (the exact command is recorded):
   - prepare with each of --workers decode processes (the most first: its records serve the next
     two measurements): wall time, locations/s, CPU seconds of the parent and of the workers,
     peak memory (RSS of the parent, of the largest worker, and the peak of the whole process
     tree's RSS and PSS, sampled every 0.5 s with psutil);
   - pretrain start-up: `run.py` with `configs/pretrain.py:caco,r18,1m`, a tiny network and one
     step, timed from process start to the first metrics line (written when step 1 has finished);
   - the input pipeline: items/s over --batches batches, bytes read per item (`rchar`, page cache
     included, and `read_bytes` from the disk), the records' bytes per location, and the time of
     `records.location_table`, which the change report calls after epoch 1 (1.0.0 reads every
     record, 2.0.0 the side index).
3. Prints the figures as markdown tables with the machine, the load averages and the commands,
   writes them to --report (and the raw figures to the same name with .json), and removes the
   archives and records unless --keep (the logs of every command stay in --workdir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import rehearsal_archive  # a sibling module of this script

PROBE = os.path.join(HERE, "rehearsal_probe.py")
MIB = 2**20
_PEAKS = ("parent_peak_rss_mib", "largest_child_peak_rss_mib", "tree_peak_pss_mib")
# Pretraining start-up: the paper's 1M config with a network small enough for a CPU.
STARTUP_OVERRIDES = (
    "--config.tasks=('pretrain',)",
    "--config.model.width=8",
    "--config.augment.crop_size=32",
    "--config.train.batch_size=16",
    "--config.method.num_negatives=64",
    "--config.train.max_steps=1",
    "--config.logging.progress_bar=False",
)


class TreeSampler:
    """Peak memory and CPU time of a process and its descendants, sampled every 0.5 s."""

    def __init__(self, pid: int):
        import psutil

        self._root = psutil.Process(pid)
        self.parent_rss = self.child_rss = self.tree_rss = self.tree_pss = 0
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds, last seen
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            self._sample()
            if self._done.wait(0.5):
                return

    def _sample(self):
        import psutil

        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for process in processes:
            try:
                memory = process.memory_full_info()
                times = process.cpu_times()
            except psutil.Error:
                continue
            rss += memory.rss
            pss += memory.pss
            self.cpu[process.pid] = times.user + times.system
            if process.pid == self._root.pid:
                self.parent_rss = max(self.parent_rss, memory.rss)
            else:
                self.child_rss = max(self.child_rss, memory.rss)
        self.tree_rss, self.tree_pss = max(self.tree_rss, rss), max(self.tree_pss, pss)

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        root = self._root.pid
        return dict(
            parent_peak_rss_mib=self.parent_rss / MIB,
            largest_child_peak_rss_mib=self.child_rss / MIB,
            tree_peak_rss_mib=self.tree_rss / MIB,
            tree_peak_pss_mib=self.tree_pss / MIB,
            parent_cpu_s=self.cpu.get(root, 0.0),
            children_cpu_s=sum(t for pid, t in self.cpu.items() if pid != root),
        )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def run_measured(command: list[str], tree: str, log: str, wait_for: str | None = None) -> dict:
    """Runs `command` in the checkout `tree`, sampling its process tree; returns wall time,
    memory, CPU, loads, the RESULT line it printed, and when `wait_for` (a file) first appeared.
    Fails with the log's tail if the command fails.

    The command runs in `tree` with `tree` on PYTHONPATH: processes it starts (the builder's
    forkserver workers) then import that checkout's caco_jax too, not the one beside this script."""
    load_before = load()
    start = time.perf_counter()
    with open(log, "w") as output:
        # A session of its own: an interrupted rehearsal stops the command and all its workers.
        process = subprocess.Popen(
            command,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": tree},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler = TreeSampler(process.pid)
        appeared = None
        try:
            while process.poll() is None:
                if wait_for and appeared is None and os.path.exists(wait_for):
                    appeared = time.perf_counter() - start
                time.sleep(0.05)
            wall = time.perf_counter() - start
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
        finally:
            figures = sampler.stop()
    with open(log) as f:
        text = f.read()
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{text[-3000:]}")
    result = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    return dict(
        command=f"cd {tree} && PYTHONPATH={tree} {shlex.join(command)}",
        wall_s=wall,
        first_file_s=appeared,
        load_before=load_before,
        load_after=load(),
        **figures,
        **result,
    )


def base_archive(workdir: str, num_locations: int) -> tuple[str, dict]:
    """The rendered locations the archives replicate (written once, then reused)."""
    from caco_jax.sources import synthetic

    folder = os.path.join(workdir, f"base_{num_locations}")
    figures_path = os.path.join(folder, "base.json")  # written after the archive is complete
    if not os.path.exists(figures_path):
        start = time.perf_counter()
        synthetic.write_archive(
            folder, num_locations=num_locations, num_workers=os.cpu_count() or 1, overwrite=True
        )
        with open(figures_path, "w") as f:
            json.dump({"wall_s": time.perf_counter() - start, "load_after": load()}, f)
    with open(figures_path) as f:
        return os.path.join(folder, synthetic.DEFAULT_NAME), json.load(f)


def replicated_archive(workdir: str, base_root: str, num_locations: int) -> tuple[str, dict]:
    """The archive of `num_locations` replicated locations (made once, then reused)."""
    folder = os.path.join(workdir, f"archive_{num_locations}")
    done = os.path.join(folder, "COMPLETE")
    if not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        start, cpu = time.perf_counter(), time.process_time()
        rehearsal_archive.write_replicated_archive(base_root, folder, num_locations=num_locations)
        figures = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
        with open(done, "w") as f:
            json.dump(figures, f)
    with open(done) as f:
        figures = json.load(f)
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if "_part" in n)
    return folder, {**figures, "bytes": size, "locations": num_locations}


def measure_prepare(args, label: str, tree: str, size: int, archive: str, workers: int) -> dict:
    """Prepares `archive` into a fresh records folder; returns the figures and that folder."""
    records_dir = os.path.join(args.workdir, f"records_{label}_{size}_{workers}")
    shutil.rmtree(records_dir, ignore_errors=True)
    command = [sys.executable, PROBE, "prepare", "--tree", tree, "--archive", archive]
    command += ["--data_dir", records_dir, "--num_workers", str(workers)]
    log = os.path.join(args.workdir, f"prepare_{label}_{size}_{workers}.log")
    row = run_measured(command, tree, log)
    row.update(kind="prepare", tree=label, size=size, workers=workers, records_dir=records_dir)
    print(
        f"prepare {label} {size} locations, {workers} workers: {row['wall_s']:.1f} s, "
        f"{row['locations'] / row['seconds']:.1f} locations/s, parent peak "
        f"{row['parent_peak_rss_mib']:.0f} MiB, load {row['load_after']}",
        flush=True,
    )
    return row


def measure_tree(args, label: str, tree: str, size: int, archive: str, results: list) -> None:
    """Prepare with the most workers first, start-up and input on those records, then prepare
    with the other worker counts (their records are deleted at once)."""
    first, *others = sorted(args.workers, reverse=True)
    results.append(measure_prepare(args, label, tree, size, archive, first))
    records_dir = results[-1]["records_dir"]

    workdir = os.path.join(args.workdir, f"pretrain_{label}_{size}")
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "run.py", "--config", "configs/pretrain.py:caco,r18,1m"]
    command += ["--workdir", workdir, f"--config.data.data_dir={records_dir}"]
    command += STARTUP_OVERRIDES
    log = os.path.join(args.workdir, f"startup_{label}_{size}.log")
    row = run_measured(command, tree, log, wait_for=os.path.join(workdir, "metrics.jsonl"))
    row.update(kind="startup", tree=label, size=size)
    results.append(row)
    print(
        f"start-up {label} {size}: first step done at {row['first_file_s']:.1f} s, "
        f"process {row['wall_s']:.1f} s",
        flush=True,
    )
    shutil.rmtree(workdir, ignore_errors=True)

    command = [sys.executable, PROBE, "pipeline", "--tree", tree, "--data_dir", records_dir]
    command += ["--batches", str(args.batches), "--batch", str(args.batch)]
    log = os.path.join(args.workdir, f"pipeline_{label}_{size}.log")
    row = run_measured(command, tree, log)
    row.update(kind="pipeline", tree=label, size=size)
    results.append(row)
    print(
        f"pipeline {label} {size}: {row['items'] / row['seconds']:.1f} items/s, "
        f"{row['rchar'] / row['items'] / MIB:.3f} MiB read per item; location table "
        f"{row['location_table_seconds']:.1f} s",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(records_dir)
    for workers in others:
        results.append(measure_prepare(args, label, tree, size, archive, workers))
        if not args.keep:
            shutil.rmtree(results[-1]["records_dir"])


def machine() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"


def report(args, archives: dict, base: dict, results: list, started: str, uptimes: list) -> str:
    lines = [
        f"Rehearsal {started} - {datetime.datetime.now(datetime.UTC):%H:%M} UTC. Machine: "
        f"{machine()}. `uptime` during the run: " + "; ".join(uptimes) + ".",
        "",
        f"Base: {args.base_locations} rendered locations ({json.dumps(base)}).",
        "",
        "| archive | parts MiB | MiB per location | replication wall s (CPU s) |",
        "|---|---|---|---|",
    ]
    for size, figures in archives.items():
        lines.append(
            f"| {size} locations | {figures['bytes'] / MIB:.0f} | "
            f"{figures['bytes'] / MIB / size:.3f} | "
            f"{figures['wall_s']:.1f} ({figures['cpu_s']:.1f}) |"
        )
    prepares = [r for r in results if r["kind"] == "prepare"]
    lines += [
        "",
        "| tree | locations | workers | prepare wall s | locations/s | parent CPU ms / location | "
        "workers CPU ms / location | parent peak RSS MiB | largest worker peak RSS MiB | "
        "tree peak RSS / PSS MiB | records MiB per location | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in prepares:
        lines.append(
            f"| {r['tree']} | {r['locations']} | {r['workers']} | {r['seconds']:.1f} | "
            f"{r['locations'] / r['seconds']:.1f} | "
            f"{r['parent_cpu_s'] / r['locations'] * 1e3:.1f} | "
            f"{r['children_cpu_s'] / r['locations'] * 1e3:.1f} | "
            f"{r['parent_peak_rss_mib']:.0f} | {r['largest_child_peak_rss_mib']:.0f} | "
            f"{r['tree_peak_rss_mib']:.0f} / {r['tree_peak_pss_mib']:.0f} | "
            f"{r['dataset_bytes'] / MIB / r['locations']:.3f} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    lines += ["", "Ratios (same run):"]
    for label in dict.fromkeys(r["tree"] for r in prepares):
        mine = [r for r in prepares if r["tree"] == label]
        for size in args.sizes:
            by_workers = {r["workers"]: r for r in mine if r["size"] == size}
            low, high = min(by_workers, default=0), max(by_workers, default=0)
            if low != high:
                lines.append(
                    f"- {label}, {size} locations: prepare speed-up {high} vs {low} workers "
                    f"{by_workers[low]['seconds'] / by_workers[high]['seconds']:.2f}x"
                )
        small, large = min(args.sizes), max(args.sizes)
        if small != large:
            for workers in args.workers:
                pair = {r["size"]: r for r in mine if r["workers"] == workers}
                if small not in pair or large not in pair:
                    continue
                ratios = {key: pair[large][key] / pair[small][key] for key in _PEAKS}
                extra = large - small  # CPU per location without the fixed start-up costs
                parent = (pair[large]["parent_cpu_s"] - pair[small]["parent_cpu_s"]) / extra
                children = (pair[large]["children_cpu_s"] - pair[small]["children_cpu_s"]) / extra
                lines.append(
                    f"- {label}, {workers} workers: peak RSS {large} / {small} locations: parent "
                    f"{ratios['parent_peak_rss_mib']:.2f}x, largest worker "
                    f"{ratios['largest_child_peak_rss_mib']:.2f}x, tree PSS "
                    f"{ratios['tree_peak_pss_mib']:.2f}x; CPU per extra location: parent "
                    f"{parent * 1e3:.1f} ms, workers {children * 1e3:.1f} ms"
                )
    lines += [
        "",
        "| tree | locations | first step finished s (from process start) | process wall s | "
        "peak RSS MiB | load before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["kind"] == "startup":
            lines.append(
                f"| {r['tree']} | {r['size']} | {r['first_file_s']:.1f} | {r['wall_s']:.1f} | "
                f"{r['tree_peak_rss_mib']:.0f} | {r['load_before']} -> {r['load_after']} |"
            )
    lines += [
        "",
        "| tree | locations | items/s | items per CPU-s | MiB read per item (rchar) | MiB from "
        "disk per item | `open_records` s | `location_table` s (ms per location) | "
        "load before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["kind"] == "pipeline":
            lines.append(
                f"| {r['tree']} | {r['locations']} | {r['items'] / r['seconds']:.1f} | "
                f"{r['items'] / r['cpu_seconds']:.1f} | {r['rchar'] / r['items'] / MIB:.3f} | "
                f"{r['read_bytes'] / r['items'] / MIB:.3f} | {r['open_seconds']:.2f} | "
                f"{r['location_table_seconds']:.1f} "
                f"({r['location_table_seconds'] / r['locations'] * 1e3:.2f}) | "
                f"{r['load_before']} -> {r['load_after']} |"
            )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['kind']} {r['tree']} {r['size']}: `{r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    # SIGTERM, and SIGINT also where a background shell ignored it, stop the run cleanly: the
    # measured command is stopped, the report of what was measured written, the data removed.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/caco_rehearsal")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--base_locations", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    parser.add_argument("--batch", type=int, default=16, help="items per pipeline batch")
    parser.add_argument("--baseline_tree", default="", help="another checkout, measured alike")
    parser.add_argument("--keep", action="store_true", help="keep archives and records")
    parser.add_argument("--report", default="/tmp/caco_rehearsal.md")
    args = parser.parse_args()
    if min(args.sizes) < rehearsal_archive.NUM_PARTS or min(args.workers) < 1:
        parser.error(f"--sizes must be >= {rehearsal_archive.NUM_PARTS}, --workers >= 1")
    if args.baseline_tree and not os.path.exists(os.path.join(args.baseline_tree, "run.py")):
        parser.error(f"--baseline_tree {args.baseline_tree}: no run.py there (not a checkout)")
    args.sizes, args.workers = sorted(set(args.sizes)), sorted(set(args.workers))
    os.makedirs(args.workdir, exist_ok=True)
    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    uptimes = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    trees = [("current", ROOT)]
    if args.baseline_tree:
        trees.append(("baseline", os.path.abspath(args.baseline_tree)))

    base_root, base = base_archive(args.workdir, args.base_locations)
    archives, results = {}, []
    try:
        for size in args.sizes:
            folder, archives[size] = replicated_archive(args.workdir, base_root, size)
            print(f"archive of {size} locations: {json.dumps(archives[size])}", flush=True)
            for label, tree in trees:
                measure_tree(args, label, tree, size, folder, results)
                uptimes.append(
                    subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                )
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        text = report(args, archives, base, results, started, uptimes)
        with open(args.report, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.report)[0] + ".json", "w") as f:
            json.dump(dict(archives=archives, base=base, results=results, uptime=uptimes), f)
        print(text)
        if not args.keep:  # archives and records; the logs stay
            for entry in os.scandir(args.workdir):
                if entry.is_dir():
                    shutil.rmtree(entry.path, ignore_errors=True)


if __name__ == "__main__":
    main()
