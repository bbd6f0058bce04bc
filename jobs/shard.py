"""Ray job entry point for the shard stage (after synth for the synthetic set):

    python -m jobs.shard CONFIG [key.sub=value ...]

what `itr submit --stage shard` runs, and what a RayJob that runs one stage names; see jobs/run.py."""
import sys

from pipeline.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("shard"))
