"""Regenerate k8s-v1.31.0.json: the Kubernetes core types that the KubeRay CRDs embed.

KubeRay's RayCluster and RayJob CRDs inline Kubernetes' own PodTemplateSpec (and a few other core
types) into their openAPIV3Schema. We ship those types, in their strict form (unknown fields
rejected, as `kubectl apply --validate=strict` and server-side field validation do), taken from the
JSON schemas that the `kubernetes-validate` package on PyPI ships (Apache-2.0; generated from the
Kubernetes OpenAPI spec):

    pip install kubernetes-validate==1.37.0
    python cluster/kuberay/schemas/extract_k8s_schema.py

Only the types reachable from ROOTS are kept, descriptions are dropped, and `Quantity` gets the
grammar the API server enforces (k8s.io/apimachinery/pkg/api/resource: an integer, or a decimal or
exponent number with an optional binary/decimal SI suffix), because the packaged schema accepts any
string there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S_VERSION = "1.31.0"
OUT = HERE / f"k8s-v{K8S_VERSION}.json"
SCHEMA_ID = f"https://metarl.invalid/schemas/k8s-v{K8S_VERSION}.json"

ROOTS = (
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.networking.v1.IngressTLS",
    "io.k8s.api.networking.v1.NetworkPolicyIngressRule",
    "io.k8s.api.networking.v1.NetworkPolicyEgressRule",
)
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
QUANTITY_SCHEMA = {
    "anyOf": [
        {"type": "integer"},
        {"type": "string",
         "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"},
    ]
}
REF = re.compile(r'"#/\$defs/([^"]+)"')


def default_definitions() -> Path:
    spec = importlib.util.find_spec("kubernetes_validate")  # located, not imported: only its data is used
    if spec is None or spec.origin is None:
        raise SystemExit("pip install kubernetes-validate==1.37.0 first, or pass --definitions")
    return (Path(spec.origin).parent / "kubernetes-json-schema"
            / f"v{K8S_VERSION}-local-strict" / "_definitions.json")


def closure(defs: dict, roots: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(REF.findall(json.dumps(defs[name])))
    return sorted(seen)


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--definitions", type=Path, help="a kubernetes-validate _definitions.json (default: the installed one)")
    args = p.parse_args()
    src = json.loads((args.definitions or default_definitions()).read_text())
    defs = src["$defs"]
    kept = {name: strip_descriptions(defs[name]) for name in closure(defs, ROOTS)}
    kept[QUANTITY] = QUANTITY_SCHEMA
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "$comment": (f"Kubernetes v{K8S_VERSION} core types (strict) from the kubernetes-validate package, "
                     "trimmed by cluster/kuberay/schemas/extract_k8s_schema.py; do not edit by hand."),
        "$defs": kept,
    }
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(HERE.parent.parent.parent)}: {len(kept)} types")


if __name__ == "__main__":
    main()
