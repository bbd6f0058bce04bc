"""Ray job entry point for the synthetic dataset alone:

    python -m jobs.synth CONFIG [key.sub=value ...]

what `itr submit --stage synth` runs, and what a RayJob that runs one stage names; see jobs/run.py."""
import sys

from pipeline.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("synth"))
