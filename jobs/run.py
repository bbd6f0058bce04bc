"""Ray job entry point for the whole pipeline: `python -m jobs.run CONFIG [key.sub=value ...]` (what `itr submit`
runs; `ray job submit --working-dir . -- python -m jobs.run CONFIG` and KubeRay RayJobs run it too).

Inside a submitted job the driver gets RAY_ADDRESS from Ray, so `itr` joins the cluster instead of starting a local
one; `$ITR_WORKDIR` sets the workdir and every MLflow run is tagged with the job id (`pipeline.submit.job_main`).
"""
import sys

from pipeline.submit import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
