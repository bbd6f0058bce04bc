"""The pipeline on a real multi-node Ray cluster on this machine, as docs/cluster.md walks a user through it:
`cluster/local/start.sh` (a head and two worker nodes of 1 CPU, each node its own process group and temp dir, token
authentication on, free loopback ports), an MLflow tracking server on 127.0.0.1 (sqlite and artifact root in the
temp dir), `itr submit` of the tiny pipeline, `itr submit --logs`; then a worker node lost (SIGKILL of its raylet's
process group) while training runs and while extraction runs; `cluster/local/stop.sh` at the end.

Nothing here waits on a duration: every wait is for an observable state (a file, a process, a job status) under a
generous deadline, so a loaded machine only makes it slower.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
CONFIG = "jobs/configs/tiny.yaml"
# 17 shards of 20 samples: enough shards in flight on every node to lose one mid-extraction; small feature batches
# keep each shard busy for a while
OVERRIDES = ["shard.shard_size=20", "features.batch_size=8", "train.system_metrics_seconds=0.5",
             "tracking.experiment=itr-cluster"]
DEADLINE = 600  # seconds for any one thing to happen on a loaded machine


@dataclass
class LocalCluster:
    temp: Path  # the cluster's temp dir (worker node i: <temp>/n<i>), its state file, the token, the MLflow store
    env: dict  # the environment of every client command: token auth, the token file, the dashboard address
    gcs: str
    dashboard: str
    mlflow: str

    def alive_nodes(self) -> list[dict]:
        """Returns the nodes the cluster's state API lists as ALIVE (node_id, is_head_node, ...)."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def logs(self) -> str:
        """Returns the last lines of every node's raylet and agent logs (for a failure message)."""
        parts = []
        for pattern in ("raylet.out", "raylet.err", "dashboard_agent.log", "runtime_env_agent.log"):
            for path in sorted(self.temp.glob(f"**/session_latest/logs/{pattern}")):
                tail = path.read_text(errors="replace").splitlines()[-8:]
                parts.append(f"== {path.relative_to(self.temp)}\n" + "\n".join(line[:300] for line in tail))
        return "\n".join(parts)

    def node_groups(self) -> dict[str, int]:
        """Returns {node name (head, worker1, ...): process group} as start.sh recorded them."""
        lines = (self.temp / "itr-cluster.state").read_text().splitlines()
        return {p[1]: int(p[2]) for p in (line.split() for line in lines) if p[:1] == ["node"]}

    def raylets(self) -> dict[int, dict]:
        """Returns {raylet pid: {"group", "node_id"}} of this cluster's live raylets."""
        out = {}
        for pid, pgid, args in _processes():
            if "raylet/raylet" in args and f"={self.temp}" in args:
                node_id = next(a.split("=", 1)[1] for a in args.split() if a.startswith("--node_id="))
                out[pid] = {"group": pgid, "node_id": node_id}
        return out

    def nodes_of(self, title: str) -> dict[str, int]:
        """Returns {node name: number of live processes titled `title`} (Ray workers are children of their raylet)."""
        raylets, names = self.raylets(), {g: n for n, g in self.node_groups().items()}
        parents = {pid: ppid for pid, ppid in _parents()}
        counts: dict[str, int] = {}
        for pid, _, args in _processes():
            if args.startswith(f"ray::{title}") and parents.get(pid) in raylets:
                name = names.get(raylets[parents[pid]]["group"], "?")
                counts[name] = counts.get(name, 0) + 1
        return counts

    def kill_node(self, name: str) -> str:
        """SIGKILLs the process group of node `name` (its raylet and agents: the machine is gone); returns the node
        id it had."""
        group = self.node_groups()[name]
        (node_id,) = [r["node_id"] for r in self.raylets().values() if r["group"] == group]
        os.killpg(group, signal.SIGKILL)
        return node_id


def _processes() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    return [(int(p[0]), int(p[1]), p[2] if len(p) > 2 else "") for p in (line.split(None, 2) for line in
                                                                         out.splitlines())]


def _parents() -> list[tuple[int, int]]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    return [(int(a), int(b)) for a, b in (line.split() for line in out.splitlines())]


def wait_for(what: str, check, deadline: float = DEADLINE, every: float = 0.2):
    """Returns check()'s first truthy value, polling every `every` s; fails the test after `deadline` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {deadline} s waiting for {what}")


def itr(cluster: LocalCluster, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    """Runs `itr ARGS` from the project folder as a user would, with the cluster's environment."""
    command = [str(BIN / "itr")] if (BIN / "itr").exists() else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run(command + list(args), cwd=ROOT, env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def submit(cluster: LocalCluster, workdir: Path, *extra: str, wait: bool = True
           ) -> tuple[str, subprocess.CompletedProcess]:
    """`itr submit` of the tiny config with the test's overrides; returns (job id: the first line it prints, the
    finished command)."""
    done = itr(cluster, "submit", CONFIG, f"workdir={workdir}", *OVERRIDES, *extra, *([] if wait else ["--no-wait"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines()[0], done


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _mlflow_server(temp: Path, port: int) -> subprocess.Popen:
    log = open(temp / "mlflow-server.log", "w")
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{temp}/mlflow.db",
         "--artifacts-destination", str(temp / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=temp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes started by cluster/local/start.sh, an MLflow server; both stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="itrc-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    token = temp / "token"
    token.write_text(secrets.token_hex(32))  # the cluster's own token: ~/.ray stays untouched
    gcs, dash, client, mlflow_port, agent = free_ports(1, 1, 1, 1, 12)  # 4 agent ports per node
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_ADDRESS=f"http://127.0.0.1:{dash}",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}", PATH=f"{BIN}:{env.get('PATH', '')}")
    nodes = dict(env, ITR_RAY_WORKERS="2", ITR_RAY_TEMP_DIR=str(temp), ITR_RAY_PORT=str(gcs),
                 ITR_RAY_DASHBOARD_PORT=str(dash), ITR_RAY_CLIENT_PORT=str(client), ITR_RAY_AGENT_PORT=str(agent),
                 ITR_RAY_OBJECT_STORE="200000000", ITR_RAY_STOP_GRACE="5",
                 # the extract pool starts shards once its actors are up, so that every node's actor takes some
                 # (else, on a loaded machine, the first actor up may do all 17 tiny shards alone)
                 RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="600")
    server = _mlflow_server(temp, mlflow_port)
    local = LocalCluster(temp, env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}")
    try:
        started = subprocess.run([str(ROOT / "cluster/local/start.sh")], env=nodes, capture_output=True, text=True,
                                 timeout=2 * DEADLINE)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:] + local.logs()
        assert f"{BIN}/itr submit {CONFIG} workdir=" in started.stdout  # it prints the docs' next command
        wait_for("3 live nodes", lambda: len(local.alive_nodes()) == 3, every=1)
        wait_for("the MLflow server", lambda: _http_ok(f"{local.mlflow}/health"))
        yield local
    finally:
        stopped = subprocess.run([str(ROOT / "cluster/local/stop.sh")], env=nodes, capture_output=True, text=True,
                                 timeout=DEADLINE)
        _stop_group(server)
        assert stopped.returncode == 0, stopped.stderr
        assert not local.raylets()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> tuple[Path, str]:
    """(workdir, job id) of the tiny pipeline submitted to the cluster and left to finish: the uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    job_id, done = submit(cluster, workdir)
    assert f"itr: job {job_id} succeeded" in done.stderr
    return workdir, job_id


def _client(cluster: LocalCluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster.mlflow)


def _runs(cluster: LocalCluster, job_id: str) -> dict[str, list]:
    """Returns the tracking server's runs of a job, by `itr.stage`."""
    client = _client(cluster)
    experiment = client.get_experiment_by_name("itr-cluster").experiment_id
    by_stage: dict[str, list] = {}
    for run in client.search_runs([experiment], f"tags.`ray.job_id` = '{job_id}'"):
        by_stage.setdefault(run.data.tags["itr.stage"], []).append(run)
    return by_stage


def _store(workdir: Path) -> tuple[Path, pd.DataFrame]:
    from pipeline.features import store

    (store_dir,) = (workdir / "features" / "synthetic").iterdir()
    return store_dir, store.read_manifest(store_dir)


def test_submitted_pipeline_runs_on_every_node_and_tracks_to_the_server(cluster, reference):
    workdir, job_id = reference
    runs = _runs(cluster, job_id)
    assert {"pipeline", "synth", "shard", "extract", "train", "eval"} <= set(runs)
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values())
    parent = runs["pipeline"][0].info.run_id
    assert all(r[0].data.tags["mlflow.parentRunId"] == parent for s, r in runs.items() if s != "pipeline")
    # extract actors on every node: the store manifest records each shard's node
    _, manifest = _store(workdir)
    assert len(manifest) == 17 and manifest["node_id"].nunique() == 3
    # train workers on two nodes (1 CPU each): the train run's tags record each rank's node
    tags = runs["train"][0].data.tags
    assert tags["ray.node_id.rank0"] != tags["ray.node_id.rank1"]
    assert {tags["ray.node_id.rank0"], tags["ray.node_id.rank1"]} <= set(manifest["node_id"])
    assert "system/cpu_utilization_percentage" in runs["train"][0].data.metrics
    (metrics,) = (workdir / "eval").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["rsum"] > 0
    artifacts = {a.path for a in _client(cluster).list_artifacts(runs["eval"][0].info.run_id)}
    assert "metrics.json" in artifacts  # through the server's artifact root


def test_lost_node_while_training_resumes_from_checkpoint_on_the_remaining_nodes(cluster, reference):
    """A worker node running a train worker is killed after the first checkpoint: Ray Train restarts the group on
    the nodes that remain, from the last checkpoint; every epoch is reported and the queues stay identical."""
    workdir, _ = reference
    epochs = 8
    before = set((workdir / "ray_results").glob("*"))
    job_id, _ = submit(cluster, workdir, f"train.epochs={epochs}", "train.max_failures=3", "--stage", "train",
                       wait=False)
    run_dir = wait_for("the new training run's first checkpoint", lambda: next(
        (d for d in set((workdir / "ray_results").glob("*")) - before if list(d.glob("checkpoint_*"))), None))
    training = cluster.nodes_of("RayTrainWorker")
    victim = next(n for n in sorted(training) if n != "head")
    assert len(list(run_dir.glob("checkpoint_*"))) < epochs, "training ended before the node was lost"
    lost = cluster.kill_node(victim)

    followed = itr(cluster, "submit", "--logs", job_id)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    (train,) = _runs(cluster, job_id)["train"]
    client = _client(cluster)
    assert {m.step for m in client.get_metric_history(train.info.run_id, "val_rsum")} == set(range(epochs))
    sync = client.get_metric_history(train.info.run_id, "queue_sync_error")
    assert {m.step for m in sync} == set(range(epochs)) and all(m.value == 0.0 for m in sync)  # identical queues
    ranks = {train.data.tags["ray.node_id.rank0"], train.data.tags["ray.node_id.rank1"]}
    assert len(ranks) == 2 and lost not in ranks  # the restarted group runs on the nodes that remain


def test_lost_node_while_extracting_ends_with_the_store_of_an_uninterrupted_run(cluster, reference, tmp_path):
    """A worker node is killed while its extract actor has shards to do: the job succeeds, and the feature store
    holds the same rows and the same bytes per shard as the uninterrupted run's, nothing twice, nothing left over."""
    from pipeline.features import store

    ref_dir, ref = _store(reference[0])
    workdir = tmp_path / "w"
    job_id, _ = submit(cluster, workdir, "--stage", "extract", wait=False)

    def committed() -> int:
        manifests = list(workdir.glob("features/synthetic/*/manifest.parquet"))
        return len(store.read_manifest(manifests[0].parent)) if manifests else 0

    def extracting_on_a_worker() -> str | None:
        workers = [n for n in cluster.nodes_of("MapWorker(MapBatches(ShardFeatureWriter))") if n != "head"]
        done = committed()
        if done >= len(ref):
            pytest.fail("extraction ended before a worker node could be lost while extracting")
        return workers[0] if workers and done >= 1 else None

    victim = wait_for("shards committed while a worker node extracts", extracting_on_a_worker, every=0.05)
    done_before = committed()
    cluster.kill_node(victim)
    assert done_before < len(ref), "extraction ended before the node was lost"

    followed = itr(cluster, "submit", "--logs", job_id)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    store_dir, manifest = _store(workdir)
    assert store_dir.name == ref_dir.name
    assert sorted(manifest["shard"]) == sorted(ref["shard"]) and manifest["shard"].is_unique
    files = {p.relative_to(store_dir).as_posix() for p in store_dir.glob("*/*") if p.is_file()}
    assert files == set(manifest["images_file"]) | set(manifest["captions_file"])  # nothing half-written left
    for column in ("images_file", "captions_file"):
        for name in manifest[column]:
            assert (store_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name
    runs = _runs(cluster, job_id)
    assert {"pipeline", "synth", "shard", "extract"} <= set(runs) and "train" not in runs
