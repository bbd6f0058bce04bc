"""`itr submit`: the pipeline, or one stage of it, as a Ray job on a running cluster; and the job's side of it.

Client side, over Ray's job API (`JobSubmissionClient`, the dashboard's HTTP port), token authentication kept on:

    itr submit CONFIG [key.sub=value ...] [--stage STAGE] [--address URL] [--no-wait]
    itr submit --logs JOB          follow a job's output until it ends; the exit status follows the job
    itr submit --stop JOB          stop a job and wait until it has stopped

The config is loaded and checked here, before anything is uploaded. The job runs `python -m jobs.<stage> CONFIG
[overrides]` (`jobs/`, one entry point per stage) with the project folder as its working_dir (without `.git`,
`.venv`, `work/`, and the data root or workdir when they lie inside it), and with `MLFLOW_TRACKING_URI` and the
absolute workdir (`ITR_WORKDIR`) in its runtime env, so the driver on the head and every worker use the same
tracking store and shared folder. `itr submit` prints the job id and, unless `--no-wait`, streams the job's output;
its exit status is the driver's (0 done, 1 the run failed, 2 bad configuration or input), 130 for a stopped job.

Job side (`job_main`, what `python -m jobs.<stage>` runs, whoever submitted it: `itr submit`, `ray job submit`, a
KubeRay RayJob): applies `ITR_WORKDIR`, tags every MLflow run the driver opens with `ray.job_id` (the submission
id), then runs `itr STAGE`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, load_config

STAGES = ("run", "synth", "shard", "extract", "train", "eval")  # `python -m jobs.<stage>`
EXCLUDES = [".git", "/.venv/", "/work/", "/runs/", "/build/", "__pycache__/", "*.pyc", ".pytest_cache/",
            "*.egg-info/", ".ipynb_checkpoints/"]  # gitignore syntax, relative to the working_dir
WORKDIR_ENV = "ITR_WORKDIR"  # the job's absolute workdir, applied as `workdir=` before the command line's overrides
JOB_TAG = "ray.job_id"  # MLflow tag: the Ray job (submission id) that ran the run
RUN_CONTEXT_ENV = "MLFLOW_RUN_CONTEXT"  # MLflow: JSON tags added to every run the process creates
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a submitted job's driver: runtime env + metadata
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STOP_SECONDS = 120  # how long `--stop` waits for the job to end


@dataclass
class JobRequest:
    """What `itr submit` sends: the entry point command line and the runtime env."""

    entrypoint: str
    runtime_env: dict


# ---------------------------------------------------------------- client side
def project_root(cwd: Path | None = None) -> Path:
    """Returns the folder uploaded as the job's working_dir: the current folder when it holds the project
    (`jobs/` and `pipeline/`), else the folder of the installed `pipeline` package's project (editable install).
    Raises ConfigError when neither holds `jobs/`."""
    import pipeline

    candidates = [Path.cwd() if cwd is None else cwd, Path(pipeline.__file__).resolve().parents[1]]
    for folder in candidates:
        if (folder / "jobs" / "__init__.py").is_file() and (folder / "pipeline" / "__init__.py").is_file():
            return folder.resolve()
    raise ConfigError("itr submit: run it from the project folder (the one holding jobs/ and pipeline/): it is "
                      "uploaded as the job's working_dir")


def _inside(path: Path, root: Path) -> str | None:
    """Returns `path` relative to `root` as a gitignore pattern anchored at the root, or None when outside."""
    try:
        rel = path.resolve().relative_to(root)
    except ValueError:
        return None
    return f"/{rel.as_posix()}/" if rel.parts else None


def build_request(config: str, overrides: list[str], stage: str, root: Path) -> JobRequest:
    """Returns the job for `itr submit CONFIG overrides --stage STAGE` from project folder `root`. Raises ConfigError
    for a bad config, a relative workdir (it would land in the job's temporary copy of the project, a different
    folder on every node) or a config file outside `root` (it would not be uploaded)."""
    if stage not in STAGES:
        raise ConfigError(f"itr submit: unknown stage {stage!r} (known: {', '.join(STAGES)})")
    cfg = load_config(config, overrides)
    if not Path(cfg.workdir).expanduser().is_absolute():
        raise ConfigError(f"itr submit: workdir must be an absolute path on storage that every node mounts at the "
                          f"same place, got {cfg.workdir!r}: add workdir=/shared/path")
    config_path = Path(config).resolve()
    try:
        config_rel = config_path.relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(f"itr submit: the config {config} lies outside the project folder {root}, which is what "
                          "the job gets: copy it under jobs/configs/") from None
    excludes = list(EXCLUDES)
    for path in (cfg.workdir_path, cfg.data_root):  # outputs and datasets stay out of the upload
        if isinstance(path, Path) and (pattern := _inside(path, root)) and pattern not in excludes:
            excludes.append(pattern)
    env = {"MLFLOW_TRACKING_URI": cfg.tracking_uri, WORKDIR_ENV: str(cfg.workdir_path), "PYTHONUNBUFFERED": "1"}
    args = [o for o in overrides if not o.startswith("workdir=")]  # the workdir travels as ITR_WORKDIR
    entrypoint = shlex.join(["python", "-m", f"jobs.{stage}", config_rel, *args])
    return JobRequest(entrypoint, {"working_dir": str(root), "excludes": excludes, "env_vars": env})


def job_client(address: str | None):
    """Returns a `JobSubmissionClient` for the dashboard at `address` (else $RAY_ADDRESS, else 127.0.0.1:8265), with
    token authentication on unless RAY_AUTH_MODE says otherwise (the token comes from $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def exit_status(info) -> int:
    """Returns `itr submit`'s exit status for a finished job (`JobDetails`): 0 succeeded; the driver's exit status
    when it failed (1 when Ray has none); 130 stopped."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return 130
    code = info.driver_exit_code
    return code if isinstance(code, int) and code > 0 else 1


def follow(client, job_id: str, out=None) -> int:
    """Streams the job's output to `out` (stdout) until it ends; returns `exit_status` of the job."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    info = wait_until_done(client, job_id, deadline_seconds=None)
    status = str(getattr(info.status, "value", info.status))
    print(f"itr: job {job_id} {status.lower()}" + (f": {info.message}" if status != "SUCCEEDED" and info.message
                                                   else ""), file=sys.stderr)
    return exit_status(info)


def wait_until_done(client, job_id: str, deadline_seconds: float | None):
    """Returns the job's `JobDetails` once its status is final (or, with a deadline, when it passes)."""
    end = None if deadline_seconds is None else time.monotonic() + deadline_seconds
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or (end is not None and time.monotonic() > end):
            return info
        time.sleep(0.5)


def submit(request: JobRequest, address: str | None, wait: bool) -> int:
    """Submits the job, prints its id, then follows it unless `wait` is False; returns the exit status."""
    client = job_client(address)
    job_id = client.submit_job(entrypoint=request.entrypoint, runtime_env=request.runtime_env)
    print(f"itr: submitted job {job_id}: {request.entrypoint}", file=sys.stderr, flush=True)
    print(job_id, flush=True)
    if not wait:
        print(f"itr: follow it with `itr submit --logs {job_id}`, stop it with `itr submit --stop {job_id}`",
              file=sys.stderr)
        return 0
    return _following(client, job_id)


def _following(client, job_id: str) -> int:
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nitr: stopped following; job {job_id} keeps running (`itr submit --logs {job_id}` to follow it, "
              f"`itr submit --stop {job_id}` to stop it)", file=sys.stderr)
        return 130


def stop(job_id: str, address: str | None) -> int:
    """Asks Ray to stop the job and waits until it has ended; returns 0 once it has, 1 otherwise."""
    client = job_client(address)
    client.stop_job(job_id)
    info = wait_until_done(client, job_id, STOP_SECONDS)
    status = str(getattr(info.status, "value", info.status))
    print(f"itr: job {job_id} {status.lower()}", file=sys.stderr)
    return 0 if info.status.is_terminal() else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `itr submit`'s arguments to its sub-command parser."""
    parser.add_argument("config", nargs="?", help="experiment YAML inside the project folder (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides; workdir= must be absolute (shared storage)")
    parser.add_argument("--stage", choices=STAGES, default="run",
                        help="run this stage (and what it needs upstream) instead of the whole chain")
    parser.add_argument("--address", help="the cluster's dashboard URL (default: $RAY_ADDRESS, else "
                                           f"{DEFAULT_ADDRESS})")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--logs", metavar="JOB", help="follow job JOB's output until it ends")
    which.add_argument("--stop", metavar="JOB", help="stop job JOB")


def run_command(args: argparse.Namespace) -> int:
    """Runs `itr submit` for parsed arguments; returns the exit status (2 for a bad config or command line)."""
    try:
        if args.logs or args.stop:
            if args.config:
                raise ConfigError("itr submit: --logs and --stop take a job id, not a config")
            if args.stop:
                return stop(args.stop, args.address)
            return _following(job_client(args.address), args.logs)
        if not args.config:
            raise ConfigError("itr submit: give a config (itr submit CONFIG [key.sub=value ...]), --logs JOB or "
                              "--stop JOB")
        request = build_request(args.config, args.overrides, args.stage, project_root())
    except (ConfigError, FileNotFoundError) as err:
        print(f"itr: error: {err}", file=sys.stderr)
        return 2
    return submit(request, args.address, wait=not args.no_wait)


# ---------------------------------------------------------------- job side
def submission_id(environ: dict | None = None) -> str | None:
    """Returns the submission id of the Ray job this process is the driver of (from the job config Ray hands the
    driver), or None outside a submitted job."""
    raw = (os.environ if environ is None else environ).get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


def tag_runs_with_job(job_id: str, environ: dict | None = None) -> None:
    """Adds {`ray.job_id`: job_id} to the tags MLflow puts on every run this process creates ($MLFLOW_RUN_CONTEXT,
    merged with tags already there): the parent run of the pipeline and each stage run."""
    environ = os.environ if environ is None else environ
    tags = json.loads(environ.get(RUN_CONTEXT_ENV) or "{}")
    environ[RUN_CONTEXT_ENV] = json.dumps({**tags, JOB_TAG: job_id})


def job_argv(stage: str, argv: list[str], environ: dict | None = None) -> list[str]:
    """Returns the `itr` command line of job entry point `jobs.<stage>` called with `argv` (CONFIG [overrides]):
    `$ITR_WORKDIR`, when set, comes first among the overrides, so one given on the command line still wins."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    workdir = (os.environ if environ is None else environ).get(WORKDIR_ENV)
    if workdir and argv:
        argv = [argv[0], f"workdir={workdir}", *argv[1:]]
    return [stage, *argv]


def job_main(stage: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m jobs.<stage> CONFIG [key.sub=value ...]`; returns `itr`'s exit status."""
    from pipeline.cli import main

    command = job_argv(stage, list(sys.argv[1:] if argv is None else argv))
    if job_id := submission_id():
        tag_runs_with_job(job_id)
        print(f"[itr] Ray job {job_id}: every MLflow run of it is tagged {JOB_TAG}={job_id}", file=sys.stderr,
              flush=True)
    return main(command)
