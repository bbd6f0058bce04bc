"""Deployment files stay well-formed: scripts parse; the KubeRay manifests use only fields of the KubeRay CRDs, with
their types (a vendored allow-list, cluster/kuberay/crd-fields.yaml); the cluster-launcher YAML passes Ray's own
schema and runs the project's image instead of installing it at each `ray up`; the jobs run our entry points."""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parents[2] / "cluster"
FIELDS = yaml.safe_load((CLUSTER / "kuberay" / "crd-fields.yaml").read_text())
KINDS = {"RayCluster", "RayJob"}
IMAGE = "ghcr.io/YOUR_ORG/itr-pipeline:0.1.0"  # the image of cluster/docker/Dockerfile, in every config


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _type_ok(value, kind: str) -> bool:
    base = kind.split()[0]
    if base.startswith("map["):
        return isinstance(value, dict) and all(_type_ok(v, base[4:-1]) for v in value.values())
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "int-or-string": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
              "any": lambda v: True}
    if not checks[base](value):
        return False
    enum = kind.split()[1] if len(kind.split()) > 1 and kind.split()[1] != "*" else None
    return enum is None or str(value) in enum.split("|")


def field_errors(value, path: str, section: str) -> list[str]:
    """Returns what is wrong with `value` at field `path` of allow-list `section`: unknown fields, wrong types."""
    fields = FIELDS[section]
    if path not in fields:
        return [f"{section}.{path}: not a field of KubeRay {FIELDS['kuberay']} (or not in crd-fields.yaml)"]
    kind = fields[path]
    if kind == "PodTemplate":
        return [e for k, v in value.items() for e in field_errors(v, k, "PodTemplate")]
    if kind == "RayCluster.spec":
        return field_errors(value, "spec", "RayCluster")
    if not _type_ok(value, kind):
        return [f"{section}.{path}: {value!r} is not {kind}"]
    if kind.endswith(" *") or kind.startswith("map["):
        return []
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in field_errors(v, f"{path}.{k}", section)]
    if isinstance(value, list):
        return [e for v in value for e in field_errors(v, f"{path}[]", section)]
    return []


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
            if p.name != "crd-fields.yaml" for d in _docs(p) if d.get("kind") in KINDS]


@pytest.mark.parametrize("script", sorted(CLUSTER.glob("local/*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("manifest", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_manifests_load(manifest):
    assert _docs(manifest)


@pytest.mark.parametrize("name, doc", kuberay_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_manifests_use_only_crd_fields(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert field_errors(doc["spec"], "spec", doc["kind"]) == []
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["authOptions"] == {"mode": "token"} and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    assert {c["image"] for p in pods for c in p["spec"]["containers"]} == {IMAGE}


def test_the_allow_list_catches_a_misspelt_or_mistyped_field():
    job = next(d for n, d in kuberay_docs() if d["kind"] == "RayJob")
    spec = dict(job["spec"], shutdownAfterJobFinish=True, backoffLimit="0")
    errors = field_errors(spec, "spec", "RayJob")
    assert any("spec.shutdownAfterJobFinish: not a field" in e for e in errors)
    assert any("spec.backoffLimit: '0' is not integer" in e for e in errors)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = dict(worker["template"]["spec"]["containers"][0], resource={"limits": {}})
    bad = dict(worker, template={"spec": {"containers": [container]}})
    assert field_errors(bad, "spec.workerGroupSpecs[]", "RayCluster") == [
        "PodTemplate.spec.containers[].resource: not a field of KubeRay v1.5.1 (or not in crd-fields.yaml)"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayjob-extract.yaml"])
def test_rayjobs_run_a_job_entry_point_on_the_shared_workdir(name):
    job = next(d for d in _docs(CLUSTER / "kuberay" / name) if d["kind"] == "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "-m"] and command[2].startswith("jobs.")
    assert (CLUSTER.parent / (command[2].replace(".", "/") + ".py")).is_file()
    assert (CLUSTER.parent / command[3]).is_file()  # the config, in the uploaded project
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["ITR_WORKDIR"].startswith("/mnt/shared/")
    assert {".git", "/work/"} <= set(env["excludes"])


def test_cluster_launcher_config_passes_rays_schema_and_runs_the_project_image():
    import jsonschema
    import ray.autoscaler

    config = _docs(CLUSTER / "ray-cluster.yaml")[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"] == IMAGE
    setup = ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
    commands = [c for key in setup for c in config.get(key) or []]
    assert not [c for c in commands if "pip install" in c]  # the image holds the project and its dependencies
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
