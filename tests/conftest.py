"""Test-wide settings: 8 simulated CPU devices, so multi-device code is tested without a GPU;
compilation made cheap, since compiling (not running) the tiny test networks is most of the suite;
and the tier of every test (CONTRIBUTING.md), so that `pytest -m unit` is a one-minute loop.

- XLA's CPU backend compiles without LLVM's optimisation passes (`COMPILE_FLAGS`): the training
  step and the model initialiser compile in about half the CPU time, and a tiny network runs a few
  times slower, which the tests do not notice. Results differ from the default build only by
  floating-point contraction (about 1e-7 relative); every comparison in the suite is between runs
  made with the same flags, or against references with tolerances.
- One persistent compilation cache serves the whole session: the pytest-xdist workers and the
  processes they start (run.py, the multi-host workers, the notebook kernel) inherit it through
  the environment, so a program compiled once is loaded from disk by every later test and process
  that builds the same one. A size limit turns on JAX's file lock around each read and write,
  which makes the cache safe for concurrent processes.
"""

import atexit
import os
import shutil
import tempfile

COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Set by the process that starts the session (pytest, or pytest-xdist's controller) before its
# workers start; they inherit it. A cache directory set by the user is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="caco_jax_test_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))  # enables the file lock
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402

# The tiers. unit: pure functions, small jitted ops, settings, file formats: no subprocess, no
# compile of a whole step, no prepared dataset of more than a few locations. system: anything that
# starts a Python process, a notebook kernel, a storage emulator or several JAX processes.
# integration: the rest (in-process records, the training step and loop, checkpoints, whole
# evaluations). A module not listed is integration; listed modules may name exceptions.
UNIT = (
    "test_architecture.py",
    "test_archive.py",
    "test_augment.py",
    "test_change.py",
    "test_dynamicearthnet.py",
    "test_errors.py",
    "test_evaluators.py",
    "test_export_input.py",
    "test_location_index.py",
    "test_locks.py",
    "test_metrics.py",
    "test_objectives.py",
    "test_packaging.py",
    "test_progress.py",
    "test_queue.py",
    "test_rehearsal.py",
    "test_run.py",
    "test_sampling.py",
    "test_sentinel2.py",
    "test_shard_writer.py",
    "test_synthetic_scoring.py",
)
SYSTEM = (
    "test_cloud_workdir.py",
    "test_end_to_end.py",
    "test_launchers.py",
    "test_notebook.py",
    "test_rerun.py",
    "test_storage.py",
    "test_workers.py",
)
EXCEPTIONS = {
    "test_builder.py::test_importing_caco_jax_registers_the_builder_and_stays_light": "system",
    "test_device_check.py::test_smoke_run_writes_every_row_without_the_data_and_checkpoint_packages": (  # noqa: E501
        "system"
    ),
    "test_dynamicearthnet.py::test_frozen_and_finetuned_segmentation_of_every_encoder_row": (
        "integration"
    ),
    "test_evaluators.py::test_decoder_gives_one_logit_per_pixel_and_zero_differences_for_equal_images": (  # noqa: E501
        "integration"
    ),
    "test_evaluators.py::test_land_cover_probe_on_the_synthetic_archive": "integration",
    "test_evaluators.py::test_every_evaluation_runs_through_run_py_without_tensorflow": "system",
    "test_evaluators.py::test_all_bands_evaluations_with_a_seeded_split_and_fine_tuning": (
        "integration"
    ),
    "test_online_evals.py::test_knn_scores_match_a_direct_numpy_computation": "unit",
    "test_online_evals.py::test_change_distances_are_mean_distances_across_and_within_windows": (
        "unit"
    ),
    "test_online_evals.py::test_eval_settings_round_trip_and_errors_name_the_evaluator_and_key": (
        "unit"
    ),
    "test_online_evals.py::test_evaluators_run_at_their_epochs_or_steps_and_always_at_the_last_step": (  # noqa: E501
        "unit"
    ),
    "test_online_evals.py::test_resuming_drops_the_eval_lines_written_after_the_checkpoint": "unit",
    "test_online_evals.py::test_a_missing_download_names_the_evaluators_key_before_any_work": (
        "unit"
    ),
    "test_multihost.py::test_two_processes_prepare_once_stop_together_resume_and_a_lost_one_stops_the_other": (  # noqa: E501
        "system"
    ),
    "test_multihost.py::test_the_peer_watch_names_a_process_that_died_and_not_one_that_finished": (
        "system"
    ),
    "test_multihost.py::test_embeddings_and_change_maps_split_over_two_processes_equal_one_process": (  # noqa: E501
        "system"
    ),
    "test_multihost.py::test_evaluations_during_pretraining_gather_features_over_two_processes": (
        "system"
    ),
    "test_packaging.py::test_the_installed_package_runs_without_the_checkout": "system",
    "test_run.py::test_run_py_stops_on_a_bad_value_before_any_work": "system",
    "test_sampling.py::test_task_writes_csv_geojson_and_map": "integration",
    "test_dynamicearthnet.py::test_the_encoder_input_is_unit_reflectance_or_the_exports_and_must_be_rgb": (  # noqa: E501
        "integration"
    ),
    "test_evaluators.py::test_fit_trains_what_the_protocol_says_and_compiles_once_per_protocol": (
        "integration"
    ),
    "test_evaluators.py::test_the_runner_checks_every_row_first_and_writes_each_row_when_it_finishes": (  # noqa: E501
        "integration"
    ),
    "test_evaluators.py::test_the_imagenet_row_reads_its_own_export_and_input": "integration",
    "test_evaluators.py::test_the_random_row_copies_the_checkpoint_architecture": "integration",
    "test_storage.py::test_local_paths_become_absolute_and_urls_stay_as_they_are": "unit",
    "test_change_map.py::test_the_threshold_splits_two_groups_and_labels_are_monotone_in_the_ratio": (  # noqa: E501
        "unit"
    ),
    "test_change_map.py::test_scene_settings_are_checked_before_any_work": "unit",
    "test_storage.py::test_preparing_records_into_a_bucket_stops_before_any_work_naming_the_fix": (
        "unit"
    ),
}
TIERS = ("unit", "integration", "system")


def tier(item) -> str:
    module = item.path.name
    named = EXCEPTIONS.get(f"{module}::{item.originalname}")
    if named:
        return named
    return "unit" if module in UNIT else "system" if module in SYSTEM else "integration"


def pytest_ignore_collect(collection_path, config):
    """`-m unit` does not import the modules without a unit test (torch, a notebook kernel, ...):
    collecting is a good part of the unit tier's minute."""
    if config.option.markexpr != "unit" or not collection_path.name.startswith("test_"):
        return None
    module = collection_path.name
    has_unit = module in UNIT or any(
        name.startswith(f"{module}::") and named == "unit" for name, named in EXCEPTIONS.items()
    )
    return None if has_unit else True


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))


def pytest_configure(config):
    for name in TIERS:
        config.addinivalue_line("markers", f"{name}: the {name} tier (tests/conftest.py)")


@pytest.fixture
def one_device(monkeypatch):
    """Code that builds the default mesh (`runtime.mesh.data_mesh()`, `local_mesh()`) gets the
    first device only: for tests of a whole evaluation, whose multi-device paths have tests of
    their own, and which run several times faster on one simulated device than split over eight."""
    import jax

    from caco_jax.runtime import mesh

    data_mesh = mesh.data_mesh
    monkeypatch.setattr(
        mesh, "data_mesh", lambda devices=None: data_mesh(devices or jax.devices()[:1])
    )
    monkeypatch.setattr(mesh, "local_mesh", lambda: data_mesh(jax.devices()[:1]))
