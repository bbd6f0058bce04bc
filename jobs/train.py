"""Ray job entry point for the train stage (the stages it needs reused when cached):

    python -m jobs.train CONFIG [key.sub=value ...]

what `itr submit --stage train` runs, and what a RayJob that runs one stage names; see jobs/run.py."""
import sys

from pipeline.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
