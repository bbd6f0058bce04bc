"""Free loopback ports for tests that start servers in other processes."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def free_ports(*blocks: int) -> list[int]:
    """The first port of each of `blocks` free consecutive ports (no two blocks overlapping), between Ray's worker
    range 10002-19999 and the kernel's ephemeral range. Never a port the kernel handed out: the ephemeral range is
    where every outgoing connection (of the session's own Ray, of MLflow) takes its local port, so such a port can be
    taken again between this choice and start.sh's check (CI once failed on exactly that)."""
    low, high = 20000, _ephemeral_low()
    rng = random.Random()
    taken: set[int] = set()
    firsts: list[int] = []
    for size in blocks:
        while True:
            block = range(b := rng.randrange(low, high - size), b + size)
            if taken.isdisjoint(block) and all(map(_bindable, block)):
                break
        taken.update(block)
        firsts.append(block[0])
    return firsts


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """start.sh's own check: the port binds on 127.0.0.1 and on every address."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True
