"""Ray at the edge: join a configured cluster, or start a local one sized to the machine and shut it
down cleanly, also on Ctrl-C and SIGTERM."""
from __future__ import annotations

import contextlib
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
        ray.init(address=address, **kwargs)
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


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_cpus() -> int:
    """Returns the number of CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
