"""Ray job entry points, one per stage: `python -m jobs.<stage> CONFIG [key.sub=value ...]` with stage one of run,
synth, shard, extract, train, eval (see `pipeline.submit.job_main`, cluster/ and docs/cluster.md)."""
