"""Wall and CPU time of the test suite on this tree against a baseline commit, side by side.

Both trees run the same pytest selection one after the other on this machine, with this Python
(the baseline is checked out into a temporary git worktree, removed afterwards). CPU time is the
user + system time of pytest and every process it started (xdist workers, run.py subprocesses),
read from `resource.getrusage(RUSAGE_CHILDREN)`; on a machine shared with other work it is the
steadier figure, and the suite is CPU-bound at 2 workers on 2 cores.

    python benchmarks/suite_time.py --baseline 03bde3a -- tests/test_train.py
    python benchmarks/suite_time.py --baseline 03bde3a --tests-of ebbe044 -- tests/test_a.py ...

Everything after `--` goes to pytest (test files, -k, --durations=0, ...); `--output PREFIX` keeps
each run's pytest output. `--tests-of COMMIT` runs, in both trees, only the test functions of the
named files that already existed at COMMIT: the suite "as it was" then, without the tests added
since.
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_show(commit: str, path: str) -> str:
    """``path`` as it was at ``commit`` ("" if it did not exist)."""
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True)
    return shown.stdout.decode()


def test_names(source: str) -> set[str]:
    """Names of the module-level test functions in a test file's source."""
    return set(re.findall(r"^def (test_\w+)", source, flags=re.MULTILINE))


def run_pytest(tree: str, workers: int, pytest_args: list[str], output: str = "") -> dict:
    """Runs pytest in ``tree``; returns wall and CPU seconds and pytest's summary line (pytest's
    whole output also goes to the file ``output``, if given)."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), *pytest_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if output:
        with open(output, "w") as f:
            f.write(done.stdout + done.stderr)
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    if done.returncode != 0:
        raise SystemExit(
            f"pytest failed in {tree} (exit {done.returncode}):\n{done.stdout[-3000:]}"
        )
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "summary": summary[-1].strip("= ") if summary else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (-n)")
    parser.add_argument("--tests-of", help="run only test functions that existed at this commit")
    parser.add_argument(
        "--output", help="write each run's pytest output to <output>.baseline / <output>.this"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: files and options for pytest")
    args = parser.parse_args()

    pytest_args = list(args.pytest_args)
    if args.tests_of:
        for path in [a for a in args.pytest_args if a.endswith(".py")]:
            with open(os.path.join(ROOT, path)) as f:
                present = test_names(f.read()) | test_names(git_show(args.baseline, path))
            for name in sorted(present - test_names(git_show(args.tests_of, path))):
                pytest_args += ["--deselect", f"{path}::{name}"]

    baseline_tree = tempfile.mkdtemp(prefix="caco_jax_baseline_")
    subprocess.run(
        ["git", "worktree", "add", "--detach", baseline_tree, args.baseline],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        results = {
            f"baseline {args.baseline}": run_pytest(
                baseline_tree,
                args.workers,
                pytest_args,
                f"{args.output}.baseline" if args.output else "",
            ),
            "this tree": run_pytest(
                ROOT, args.workers, pytest_args, f"{args.output}.this" if args.output else ""
            ),
        }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", baseline_tree], cwd=ROOT)
        shutil.rmtree(baseline_tree, ignore_errors=True)

    print(f"{'tree':<22} {'wall s':>8} {'CPU s':>8}  pytest")
    for name, result in results.items():
        print(f"{name:<22} {result['wall_s']:8.1f} {result['cpu_s']:8.1f}  {result['summary']}")
    base, this = results.values()
    print(
        f"baseline / this tree: wall {base['wall_s'] / this['wall_s']:.2f}x, "
        f"CPU {base['cpu_s'] / this['cpu_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
