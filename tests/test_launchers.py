"""scripts/tpu_pod.sh runs the same run.py command on every worker, flags intact.

A stand-in `gcloud` on PATH records its arguments and runs the remote command with bash in a fake
worker home, where `.venv/bin/python` prints the arguments it receives.
"""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$GCLOUD_LOG"
for argument in "$@"; do
  case "$argument" in
    --command=*) HOME="$WORKER_HOME" bash -c "${argument#--command=}" ;;
  esac
done
"""

FAKE_PYTHON = """#!/usr/bin/env bash
printf 'arg:%s\\n' "$@"
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_tpu_pod_launcher_runs_run_py_with_multihost_on_all_workers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    venv = tmp_path / "home" / "caco_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    executable(venv / "python", FAKE_PYTHON)
    log = tmp_path / "gcloud.log"
    flags = [
        "--config",
        "configs/caco_r50_1m.py",
        "--workdir",
        "/mnt/shared/runs/a b",
        "--config.tasks=('prepare', 'pretrain')",
    ]
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "tpu_pod.sh"), "my-tpu", "us-east5-a", *flags],
        env={
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "GCLOUD_LOG": str(log),
            "WORKER_HOME": str(tmp_path / "home"),
            "CACO_JAX_INSTALL": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text()
    assert calls.count("compute tpus tpu-vm") == 1  # no install: a single ssh
    assert calls.startswith("compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --worker=all")
    received = [line[len("arg:") :] for line in result.stdout.splitlines()]
    assert received == ["run.py", "--multihost", *flags]


def test_tpu_pod_launcher_without_flags_prints_its_usage(tmp_path):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "tpu_pod.sh"), "my-tpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage:")
