"""Writes crd-fields.yaml, the allow-list of KubeRay fields that tests/unit/test_cluster_files.py checks the manifests
of this folder against, from KubeRay's CRDs (not vendored: they are 2 MB of YAML):

    python cluster/kuberay/crd_fields.py RAYCLUSTERS_CRD RAYJOBS_CRD v1.5.1 > cluster/kuberay/crd-fields.yaml

with the CRDs of ray-project/kuberay at that tag (ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
ray.io_rayjobs.yaml). Each field path (`a.b[].c`) maps to its type: object, array, string, integer, number, boolean,
int-or-string, map[T] (string keys, T values), any; an enum follows the type; a trailing ` *` means "deeper fields not
listed, not checked"; `PodTemplate` and `RayCluster.spec` refer to those sections. RayCluster fields go 3 levels below
`spec`, RayJob's 2; pod templates keep the pod fields a Ray pod uses (containers, volumes, scheduling) 4 levels deep.
"""
from __future__ import annotations

import sys

import yaml

POD_FIELDS = ("metadata", "spec.containers", "spec.volumes", "spec.tolerations", "spec.nodeSelector",
              "spec.affinity", "spec.serviceAccountName", "spec.imagePullSecrets", "spec.priorityClassName")
CONTAINER_FIELDS = ("name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
                    "volumeMounts", "lifecycle", "securityContext", "workingDir")


def field_type(schema: dict) -> str:
    """Returns the allow-list type of an OpenAPI v3 schema node."""
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind = schema.get("type") or "any"
    extra = schema.get("additionalProperties")
    if kind == "object" and "properties" not in schema:
        return f"map[{field_type(extra)}]" if isinstance(extra, dict) else "any"
    return f"{kind} {'|'.join(map(str, schema['enum']))}" if "enum" in schema else kind


def walk(schema: dict, path: str, out: dict, depth: int, max_depth: int, refs: dict) -> None:
    """Adds `path` and the fields below it to `out`, down to `max_depth` levels (array items do not count); a name
    in `refs` becomes a reference to that section instead."""
    name = path.rsplit(".", 1)[-1]
    if name in refs:
        out[path] = refs[name]
        return
    children = schema.get("properties") or {}
    items = schema.get("items") if schema.get("type") == "array" else None
    if depth >= max_depth and (children or items):
        out[path] = field_type(schema) + " *"
        return
    out[path] = field_type(schema)
    for key, child in children.items():
        walk(child, f"{path}.{key}", out, depth + 1, max_depth, refs)
    if items:
        walk(items, f"{path}[]", out, depth, max_depth, refs)


def pod_template(template: dict) -> dict:
    """Returns the PodTemplate section: the fields of POD_FIELDS (and CONTAINER_FIELDS of containers)."""
    out: dict = {}
    walk(template, "template", out, 0, 4, {})
    keep = {}
    for path, kind in out.items():
        rel = path.removeprefix("template.")
        if rel in ("template", "spec") or not rel.startswith(POD_FIELDS):
            keep.update({rel: kind} if rel == "spec" else {})
            continue
        if rel.startswith("spec.containers[]."):
            if rel.removeprefix("spec.containers[].").split(".")[0].split("[")[0] not in CONTAINER_FIELDS:
                continue
        if rel.startswith("spec.volumes[].") and rel.count(".") > 2:
            continue  # one level per volume source
        if rel.startswith("spec.volumes[].") and kind == "object":
            kind = "object *"
        keep[rel] = kind
    return keep


def spec_of(crd_file: str) -> dict:
    crd = yaml.safe_load(open(crd_file))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def main(clusters_crd: str, jobs_crd: str, tag: str) -> None:
    cluster, job = spec_of(clusters_crd), spec_of(jobs_crd)
    sections = {"RayCluster": {}, "RayJob": {}}
    walk(cluster, "spec", sections["RayCluster"], 0, 3, {"template": "PodTemplate"})
    walk(job, "spec", sections["RayJob"], 0, 2, {"template": "PodTemplate", "submitterPodTemplate": "PodTemplate",
                                                 "rayClusterSpec": "RayCluster.spec"})
    sections["PodTemplate"] = pod_template(cluster["properties"]["headGroupSpec"]["properties"]["template"])
    print(f"# KubeRay {tag} ray.io/v1 fields (from ray-operator/config/crd/bases/ray.io_rayclusters.yaml and "
          "ray.io_rayjobs.yaml),\n# written by cluster/kuberay/crd_fields.py: see its docstring for the format.")
    print(f"kuberay: {tag}")
    for name, fields in sections.items():
        print(f"{name}:")
        for path, kind in fields.items():
            print(f"  {path}: {kind}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
