"""`itr submit` without a cluster: the job it builds (entry point, working_dir excludes, runtime env), its exit
status, the job side (workdir from the runtime env, every MLflow run tagged with the job id), and the pieces of the
cluster path that are plain functions (extract pool bounds, the workers' RAY_ADDRESS)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError
from pipeline.submit import (
    JOB_TAG,
    STAGES,
    build_request,
    exit_status,
    job_argv,
    project_root,
    submission_id,
    tag_runs_with_job,
)

ROOT = Path(__file__).parents[2]


def test_request_runs_the_stage_entry_point_with_workdir_and_tracking_in_the_runtime_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    request = build_request("jobs/configs/tiny.yaml", [f"workdir={tmp_path / 'w'}", "features.batch_size=32"],
                            "extract", ROOT)
    assert request.entrypoint == "python -m jobs.extract jobs/configs/tiny.yaml features.batch_size=32"
    env = request.runtime_env
    assert env["working_dir"] == str(ROOT)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "ITR_WORKDIR": str(tmp_path / "w"),
                               "PYTHONUNBUFFERED": "1"}
    assert {".git", "/.venv/", "/work/"} <= set(env["excludes"])


def test_request_defaults_to_the_sqlite_store_in_the_shared_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    request = build_request("jobs/configs/tiny.yaml", [f"workdir={tmp_path}"], "run", ROOT)
    assert request.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert request.entrypoint == "python -m jobs.run jobs/configs/tiny.yaml"


@pytest.mark.parametrize("overrides, message", [
    ([], "workdir must be an absolute path"),  # tiny.yaml's workdir is relative
    (["workdir=/tmp/w", "train.nope=1"], "nope"),
])
def test_request_refuses_what_cannot_run_on_a_cluster(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_request("jobs/configs/tiny.yaml", overrides, "run", ROOT)


def test_request_refuses_a_config_outside_the_uploaded_folder(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("workdir: /tmp/w\n")
    with pytest.raises(ConfigError, match="outside the project folder"):
        build_request(str(config), [], "run", ROOT)
    with pytest.raises(ConfigError, match="unknown stage"):
        build_request("jobs/configs/tiny.yaml", ["workdir=/tmp/w"], "deploy", ROOT)


def _project(root: Path) -> Path:
    """A project folder with the files a working_dir upload must and must not carry."""
    for name in ("jobs/__init__.py", "jobs/run.py", "jobs/configs/tiny.yaml", "pipeline/__init__.py",
                 "pipeline/work/keep.py", ".git/HEAD", ".venv/bin/python", "work/cluster/mlflow.db",
                 "datasets/coco/images/a.jpg", "pipeline/__pycache__/x.pyc"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / "jobs/configs/tiny.yaml").write_text((ROOT / "jobs/configs/tiny.yaml").read_text())
    return root


def test_upload_leaves_out_git_venv_outputs_and_data_inside_the_project(tmp_path):
    """The excludes, applied by Ray's own packaging: a nested folder that merely shares a name stays in."""
    from ray._private.runtime_env.packaging import create_package

    root = _project(tmp_path / "proj")
    assert project_root(root) == root.resolve()
    request = build_request(str(root / "jobs/configs/tiny.yaml"),
                            [f"workdir={root / 'work/cluster'}", f"data.root={root / 'datasets/coco'}"], "run", root)
    assert "/datasets/coco/" in request.runtime_env["excludes"]
    target = tmp_path / "pkg.zip"
    create_package(str(root), target, include_gitignore=True, excludes=request.runtime_env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist()}
    assert {"jobs/run.py", "jobs/configs/tiny.yaml", "pipeline/__init__.py", "pipeline/work/keep.py"} <= names
    assert not [n for n in names if n.split("/")[0] in (".git", ".venv", "work", "datasets") or n.endswith(".pyc")]


@pytest.mark.parametrize("status, code, want", [
    ("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("FAILED", -9, 1), ("STOPPED", None, 130)])
def test_exit_status_follows_the_job(status, code, want):
    assert exit_status(SimpleNamespace(status=status, driver_exit_code=code)) == want


def test_job_side_puts_the_runtime_env_workdir_first_so_the_command_line_wins():
    env = {"ITR_WORKDIR": "/shared/itr"}
    assert job_argv("train", ["c.yaml", "train.epochs=3"], env) == ["train", "c.yaml", "workdir=/shared/itr",
                                                                      "train.epochs=3"]
    assert job_argv("run", ["c.yaml", "workdir=/other"], env)[-1] == "workdir=/other"
    assert job_argv("run", ["c.yaml"], {}) == ["run", "c.yaml"]
    with pytest.raises(ValueError, match="unknown stage"):
        job_argv("deploy", ["c.yaml"], env)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_its_job_entry_point(stage):
    source = (ROOT / "jobs" / f"{stage}.py").read_text()
    assert f'job_main("{stage}")' in source and f"python -m jobs.{stage} CONFIG" in source


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """(tracking URI, experiment id) of one sqlite MLflow store for this module's tests."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    return mlflow.get_tracking_uri(), mlflow.create_experiment("submit", artifact_location=(folder / "a").as_uri())


def test_every_mlflow_run_of_the_job_carries_its_id(mlflow_db, monkeypatch):
    """The submission id Ray hands the driver becomes a tag of every run the process opens (MLflow's run context)."""
    import mlflow

    uri, experiment = mlflow_db
    job_config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "x"}}
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config), "MLFLOW_RUN_CONTEXT": json.dumps({"team": "a"})}
    assert submission_id(env) == "raysubmit_abc" and submission_id({}) is None
    tag_runs_with_job("raysubmit_abc", env)
    assert json.loads(env["MLFLOW_RUN_CONTEXT"]) == {"team": "a", JOB_TAG: "raysubmit_abc"}

    monkeypatch.setenv("MLFLOW_RUN_CONTEXT", env["MLFLOW_RUN_CONTEXT"])
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment) as parent:
        with mlflow.start_run(experiment_id=experiment, nested=True) as child:
            pass
    client = mlflow.tracking.MlflowClient()
    for run in (parent, child):
        assert client.get_run(run.info.run_id).data.tags[JOB_TAG] == "raysubmit_abc"


def test_training_shorter_than_a_sampling_interval_still_logs_system_metrics(mlflow_db, monkeypatch):
    """Rank 0's system metrics through MLflow's public API: a run that ends before the first interval has passed
    still gets a sample (training waits for it), and the run stays RUNNING: the driver owns its status."""
    import mlflow

    from pipeline.train.loop import finish_system_metrics, start_system_metrics

    uri, experiment = mlflow_db
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "")  # restored after the test
    client = mlflow.tracking.MlflowClient(uri)
    run_id = client.create_run(experiment).info.run_id
    start_system_metrics(uri, run_id, 1.0)
    finish_system_metrics(client, run_id, 1.0)  # at once: no sampling interval has passed yet
    run = client.get_run(run_id)
    assert "system/cpu_utilization_percentage" in run.data.metrics and run.info.status == "RUNNING"
    assert mlflow.active_run() is None


def test_cli_submit_refuses_bad_command_lines(capsys):
    from pipeline.cli import main

    assert main(["submit"]) == 2
    assert "give a config" in capsys.readouterr().err
    assert main(["submit", "jobs/configs/tiny.yaml", "--logs", "raysubmit_x"]) == 2
    assert main(["submit", "jobs/configs/tiny.yaml"]) == 2
    assert "workdir must be an absolute path" in capsys.readouterr().err


@pytest.mark.parametrize("now, reachable, shards, config, bounds", [
    (2, 2, 5, (0, 0), (2, 2)),  # a fixed cluster: as many as fit, from the start
    (1, 8, 20, (0, 0), (1, 8)),  # autoscaled GPU nodes: start with what is there, grow to what can come
    (1, 8, 3, (0, 0), (1, 3)),  # never more actors than shards
    (4, 4, 10, (2, 6), (2, 6)),  # features.min_actors / max_actors
    (4, 4, 10, (8, 6), (6, 6)),  # min above max: max wins
])
def test_extract_pool_bounds(now, reachable, shards, config, bounds):
    from pipeline.features.extract import pool_bounds

    assert pool_bounds(now, reachable, shards, *config) == bounds


def test_workers_are_told_their_cluster_address():
    from pipeline.ray_runtime import address_env

    assert address_env("127.0.0.1:26380", {}) == {"env_vars": {"RAY_ADDRESS": "127.0.0.1:26380"}}
    assert address_env("auto", {}) is None and address_env("ray://host:10001", {}) is None
    job = {"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.1:6379"}}}
    assert address_env("10.0.0.1:6379", {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}) is None
