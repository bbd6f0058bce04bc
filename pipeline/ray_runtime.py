"""Ray at the edge: join a configured cluster, or start a local one sized to the machine and shut it
down cleanly, also on Ctrl-C and SIGTERM."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Iterator

from pipeline.config import RayConfig


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Yields with Ray initialised. Reuses an already initialised Ray (tests, a submitted job's driver
    that called ray.init), else joins `ray.address` / $RAY_ADDRESS, else starts a local Ray."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, runtime_env=address_env(address), **kwargs)
    else:
        # The dashboard (bound to loopback) serves the state API that Ray Train's placement-group cleaner uses.
        context = ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=True,
                           dashboard_host="127.0.0.1", dashboard_port=free_port(), **kwargs)
        print(f"[itr] local Ray started; dashboard: http://{context.dashboard_url}", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


def address_env(address: str, environ: dict | None = None) -> dict | None:
    """Returns the runtime env that tells the job's tasks and actors which cluster they belong to ({"env_vars":
    {"RAY_ADDRESS": address}}) when `address` is a GCS host:port, else None. Without it, Ray Train's
    placement-group cleaner (an actor that looks the cluster up itself) fails with "Found multiple active Ray
    instances" whenever another Ray runs on the same machine. None as well when the submitted job's runtime env
    already sets RAY_ADDRESS (Ray refuses to merge two values of one variable)."""
    if "://" in address or ":" not in address:  # "auto", "local", ray://...
        return None
    job = json.loads((os.environ if environ is None else environ).get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def reachable_resources() -> dict[str, float]:
    """Returns what the connected cluster can reach, by resource name: the larger of what its nodes have now and
    what its autoscaler may start (node types x max workers, from the cluster config the autoscaler publishes in
    the GCS; none on a fixed cluster). An autoscaled cluster that starts with no GPU worker thus reaches the GPUs
    of its GPU node type. The autoscaler's part comes from the call Ray Train and Ray Data make for the same
    purpose (`ray._private.state`, no public API); when it fails, only what is there now counts."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        scalable = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an internal API: any failure means "no autoscaler information"
        scalable = {}
    return {k: max(now.get(k, 0.0), float(scalable.get(k, 0))) for k in set(now) | set(scalable)}


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_cpus() -> int:
    """Returns the number of CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
