"""Executes the notebooks with nbclient against a workdir's tracking store.

    python notebooks/run.py                                    both notebooks on work/demo, outputs written back
    python notebooks/run.py --workdir /tmp/w --experiment itr-tiny --out /tmp/executed lineage.ipynb

The notebooks read $ITR_WORKDIR, $MLFLOW_TRACKING_URI and $ITR_EXPERIMENT; this sets them for the kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("lineage.ipynb", "results.ipynb")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the block (the kernel is started inside it and inherits them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(notebook: str | Path, workdir: str | Path, experiment: str, tracking_uri: str | None = None,
            out: str | Path | None = None, timeout: int = 300):
    """Runs every cell of `notebook` in a fresh kernel (working directory: notebooks/) against `workdir`'s store
    (or `tracking_uri`); writes the executed notebook to `out` when given; returns it. Raises
    nbclient.exceptions.CellExecutionError naming the failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(notebook), as_version=4)
    workdir = Path(workdir).resolve()
    env = {"ITR_WORKDIR": str(workdir), "ITR_EXPERIMENT": experiment,
           "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{workdir}/mlflow.db", "PYTHONWARNINGS": "ignore"}
    with environment(env):
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
        client.execute()  # the kernel listens on 127.0.0.1 (jupyter_client's default)
    if out is not None:
        for cell in nb.cells:  # the outputs say what ran, not how long or when
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, str(out))
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS))
    parser.add_argument("--workdir", default=str(HERE.parent / "work" / "demo"))
    parser.add_argument("--experiment", default="itr-demo")
    parser.add_argument("--out", help="folder for the executed notebooks (default: write them back in place)")
    args = parser.parse_args(argv)
    for name in args.notebooks:
        path = HERE / name if not Path(name).exists() else Path(name)
        target = Path(args.out) / path.name if args.out else path
        execute(path, args.workdir, args.experiment, out=target)
        print(f"executed {path.name} -> {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
