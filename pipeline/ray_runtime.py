"""Ray at the edge: join a configured cluster, or start a local one sized to the machine and shut it
down cleanly, also on Ctrl-C and SIGTERM."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
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
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


def cluster_cpus() -> int:
    """Returns the number of CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
