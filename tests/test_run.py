"""The command line stops on bad flags, overrides and config values before any work, naming the
culprit: in-process through `main.parse_flags` and `config.resolve`, and once as a user runs it."""

import os
import subprocess
import sys

import pytest
from absl import flags

from caco_jax import config as config_lib
from caco_jax import main
from caco_jax.settings import SettingsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_tasks(*args):
    raise AssertionError("no task may run in these tests")


@pytest.fixture
def parse(monkeypatch):
    """`main.parse_flags` on run.py's arguments (demo config); the flags are reset afterwards, and
    `main` must stop before running any task."""
    monkeypatch.setattr(main, "_run_tasks", no_tasks)

    def parse_args(*args, workdir=None):
        workdir_args = ("--workdir", str(workdir)) if workdir else ()
        argv = ["run.py", "--config", "configs/demo.py", *workdir_args, *args]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags defines the overrides from it
        return main.parse_flags(argv)

    old_cwd = os.getcwd()
    os.chdir(ROOT)  # the config path is relative to the checkout
    try:
        yield parse_args
    finally:
        os.chdir(old_cwd)
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--config.train.batch_size=-3",), r"config\.train\.batch_size: must be >= 2"),
        (
            ("--config.tasks=('synthesize', 'nope')",),
            r"config\.tasks: unknown task\(s\) \['nope'\]",
        ),
        (("--config.data.builder_config=rgbn",), r"config\.data\.builder_config"),
        (("--config.train.milestones=(1, 50)",), r"config\.train\.milestones"),
        (("--config.method.name=simclr",), r"config\.method\.name"),
    ],
)
def test_bad_config_values_name_their_key(parse, args, named):
    parse(*args)
    with pytest.raises(SettingsError, match=named):
        config_lib.resolve(main._CONFIG.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--config.train.batchsize=8",),
            "--config.train.batchsize: the config has no key 'batchsize' (did you mean "
            "config.train.batch_size?)",
        ),
        (
            ("--config.trian.batch_size=8",),
            "--config.trian.batch_size: the config has no key 'trian' (did you mean "
            "config.train.batch_size?)",
        ),
        (("--config.train.bogus=1",), "--config.train.bogus: the config has no key 'bogus'"),
        (("--no_such_flag",), "Unknown command line flag 'no_such_flag'"),
    ],
)
def test_bad_flags_are_one_line(parse, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        parse(*args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run.py: {message}") and err.count("\n") == 1, err


def test_a_config_file_that_is_not_there_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(main, "_run_tasks", no_tasks)
    argv = ["run.py", "--config", "configs/no_such_config.py"]
    monkeypatch.setattr(sys, "argv", argv)
    old_cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main.parse_flags(argv)
        with pytest.raises(SystemExit) as stop:
            main._main_reporting_errors(["run.py"])
    finally:
        os.chdir(old_cwd)
        flags.FLAGS.unparse_flags()
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "run.py: --config configs/no_such_config.py: the config file does not load ([Errno 2] "
        "No such file or directory: 'configs/no_such_config.py')\n"
    )


def test_bad_settings_and_a_file_for_a_workdir_are_one_line_and_status_2(parse, tmp_path, capsys):
    """What `run.py` prints: `main` raises, and its wrapper turns an expected error into one line
    on stderr (absl used to print run.py's docstring first) and exit status 2."""
    parse("--config.logging.every_steps=0", workdir=tmp_path / "w")
    with pytest.raises(SystemExit) as stop:
        main._main_reporting_errors(["run.py"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "run.py: config.logging.every_steps: must be >= 1\n"
    flags.FLAGS.unparse_flags()
    workdir = tmp_path / "results.txt"
    workdir.write_text("not a folder")
    parse(workdir=workdir)
    with pytest.raises(SystemExit) as stop:
        main._main_reporting_errors(["run.py"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"run.py: --workdir {workdir} is a file; expected a folder (existing or new)\n"
    )
    assert workdir.read_text() == "not a folder"


def test_run_py_stops_on_a_bad_value_before_any_work(tmp_path):
    workdir = tmp_path / "w"
    result = subprocess.run(
        [sys.executable, "run.py", "--config", "configs/demo.py", "--workdir", str(workdir),
         "--config.train.batch_size=-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "run.py: config.train.batch_size: must be >= 2\n"
    assert not workdir.exists()  # nothing was started


def test_configs_resolve_by_name_and_by_path(parse, monkeypatch):
    from caco_jax import config_files

    packaged = config_files.PACKAGED
    assert config_files.resolve_path("demo") == os.path.join(packaged, "demo.py")
    assert config_files.resolve_path("pretrain:moco,r50,1m") == (
        os.path.join(packaged, "pretrain.py") + ":moco,r50,1m"
    )
    assert config_files.resolve_path("configs/demo.py") == "configs/demo.py"
    assert config_files.resolve_path("nothing_of_that_name") == "nothing_of_that_name"
    # The packaged configs are the top-level configs/ folder's files.
    assert os.path.samefile(packaged, os.path.join(ROOT, "configs"))
    monkeypatch.setattr(sys, "argv", ["run.py", "--config", "pretrain:moco,r50,1m"])
    main.parse_flags(main.with_config_path(sys.argv))
    settings = config_lib.resolve(main._CONFIG.value)
    assert (settings.method.name, settings.model.depth) == ("moco", 50)


def test_help_lists_every_config_task_and_official_encoder():
    from caco_jax import config_files, tasks
    from caco_jax.models import registry

    text = config_files.usage("caco-jax")
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    configs = {name.split("[")[0] for name in listed}
    assert set(config_files.names()) <= configs
    assert set(tasks.TASKS) <= listed and set(registry.CHECKPOINTS) <= listed
    assert "pretrain[:caco,r18,100k]" in listed
    assert all(task.summary for task in tasks.TASKS.values())


def test_print_config_prints_the_resolved_values_and_runs_nothing(parse, tmp_path, capsys):
    import json

    # An override no other test of this module uses: absl defines each override's flag once.
    parse("--config.train.max_steps=7", "--print_config", workdir=tmp_path / "w")
    main.main(["run.py"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7 and printed["tasks"][0] == "synthesize"
    assert printed["augment"]["crop_size"] == 64  # configs/demo.py's own value
    assert not (tmp_path / "w").exists()
