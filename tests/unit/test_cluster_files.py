"""Deployment files stay well-formed: scripts parse, YAML manifests load, the RayJob runs our CLI."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parents[2] / "cluster"


@pytest.mark.parametrize("script", sorted(CLUSTER.glob("local/*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("manifest", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_manifests_load(manifest):
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs


def test_rayjob_runs_the_pipeline_cli():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert "pipeline.cli run" in job["spec"]["entrypoint"]
