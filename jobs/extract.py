"""Ray job entry point for the extract stage (the shards it reads reused when cached):

    python -m jobs.extract CONFIG [key.sub=value ...]

what `itr submit --stage extract` runs, and what a RayJob that runs one stage names; see jobs/run.py."""
import sys

from pipeline.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("extract"))
