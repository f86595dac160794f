"""Validate KubeRay manifests offline against the schemas in this folder.

    python cluster/kuberay/schemas/validate.py cluster/kuberay/*.yaml

Every YAML document is checked against the schema of its apiVersion/kind: RayCluster and RayJob
(ray.io/v1, ray.io_v1.yaml) and PersistentVolumeClaim (v1, from k8s-v1.31.0.json). A kind without a
schema here is an error, not a pass. Needs pyyaml and jsonschema >= 4.18 (with `referencing`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
RAY_SCHEMA = HERE / "ray.io_v1.yaml"
K8S_SCHEMA = HERE / "k8s-v1.31.0.json"

KINDS = {
    ("ray.io/v1", "RayCluster"): (RAY_SCHEMA, "RayCluster"),
    ("ray.io/v1", "RayJob"): (RAY_SCHEMA, "RayJob"),
    ("v1", "PersistentVolumeClaim"): (K8S_SCHEMA, "io.k8s.api.core.v1.PersistentVolumeClaim"),
}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())


def schemas() -> dict[Path, dict[str, Any]]:
    return {p: _load(p) for p in (RAY_SCHEMA, K8S_SCHEMA)}


def validator(api_version: str, kind: str) -> Draft202012Validator:
    """A validator for one kind; refs between the two schema files resolve locally, never online."""
    if (api_version, kind) not in KINDS:
        known = ", ".join(f"{a}/{k}" for a, k in KINDS)
        raise KeyError(f"no schema for {api_version}/{kind}; this folder has {known}")
    docs = schemas()
    registry = Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs.values())
    path, name = KINDS[(api_version, kind)]
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{docs[path]['$id']}#/$defs/{name}"}
    return Draft202012Validator(root, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one manifest, as 'path: message' lines (empty when valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["<root>: a manifest needs apiVersion and kind"]
    try:
        v = validator(doc["apiVersion"], doc["kind"])
    except KeyError as e:
        return [f"<root>: {e.args[0]}"]
    found = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def documents(path: Path) -> Iterator[dict[str, Any]]:
    yield from (d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def main(argv: list[str]) -> int:
    bad = 0
    for name in argv:
        for doc in documents(Path(name)):
            what = f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            errs = errors(doc)
            bad += bool(errs)
            print(f"{what}: " + ("ok" if not errs else "INVALID\n  " + "\n  ".join(errs)))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
