"""Ray job entry points: `python -m jobs.run CONFIG [key.sub=value ...]` (see cluster/ and docs/cluster.md)."""
