"""run.py stops on bad flags and config values before any work, naming the culprit."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, workdir):
    return subprocess.run(
        [sys.executable, "run.py", "--config", "configs/demo.py", "--workdir", str(workdir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--config.train.batch_size=-3",), "config.train.batch_size"),
        (("--config.tasks=('synthesize', 'nope')",), "config.tasks"),
        (("--config.data.builder_config=rgbn",), "config.data.builder_config"),
        (("--config.train.bogus=1",), "'bogus'"),
        (("--no_such_flag",), "no_such_flag"),
    ],
)
def test_bad_values_fail_before_any_work_with_a_message_naming_them(tmp_path, args, named):
    workdir = tmp_path / "w"
    result = run(*args, workdir=workdir)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing was started


def test_workdir_naming_an_existing_file_is_a_one_line_error(tmp_path):
    workdir = tmp_path / "results.txt"
    workdir.write_text("not a folder")
    result = run(workdir=workdir)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"run.py: --workdir {workdir} is a file; expected a folder (existing or new)"
    )
    assert workdir.read_text() == "not a folder"
