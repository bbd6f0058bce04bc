"""Ray job entry point for the whole pipeline: `ray job submit --working-dir . -- python -m jobs.run CONFIG`.

Inside a submitted job the driver gets RAY_ADDRESS from Ray, so `itr` joins the cluster instead of starting
a local one. One stage alone: `python -m pipeline.cli STAGE CONFIG`.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
