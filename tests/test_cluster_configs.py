"""The cluster configs, checked offline the way their own tools check them.

- cluster/ray-cluster.yaml goes through the installed Ray's launcher code: `prepare_config` (merges
  the provider defaults, as `ray up` does) and `validate_config` (ray/autoscaler/ray-schema.json plus
  Ray's own cross-field checks).
- cluster/kuberay/*.yaml are validated against the RayCluster / RayJob / PVC schemas shipped in
  cluster/kuberay/schemas (see cluster/README.md for where they come from).
- Broken variants of each must fail, so that a passing check means something.
- The Ray version of the Dockerfile's base image, of every image tag and of rayVersion must be
  pyproject's `ray[...]==` pin; the resources must fit configs/atari12.yaml with the learner on
  the GPU node; /dev/shm must hold each node's object store.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from metarl.core import config as config_mod

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
IMAGE_WORKDIR = "/home/ray/metarl"  # where the Dockerfile puts the repository


def _load_validate_module():
    spec = importlib.util.spec_from_file_location("kuberay_validate", KUBERAY / "schemas" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kv = _load_validate_module()


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([0-9][0-9a-z.]*)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once with ==, found {pins} in {deps}"
    return pins[0]


def quantity_bytes(q) -> float:
    """Kubernetes memory quantity ('10Gi', '500M', 1024) or Docker size ('10g') in bytes."""
    m = re.fullmatch(r"([0-9.]+)([KMGTP]i?|[kmgtp])?b?", str(q))
    assert m, f"unparsable size {q!r}"
    unit = (m.group(2) or "")
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]  # Docker's k/m/g are binary
    return float(m.group(1)) * scale


def cpu_quantity(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


@pytest.fixture(scope="module")
def atari12() -> config_mod.Config:
    return config_mod.validate(config_mod.load(REPO / "configs" / "atari12.yaml"))


def atari12_cpus(cfg: config_mod.Config) -> tuple[float, float]:
    """(CPUs the task workers reserve, CPUs the learner reserves) when nothing has to be shrunk."""
    return cfg.num_workers * cfg.ray.cpus_per_worker, 1.0


# ==========================================================================================
# Ray cluster launcher


@pytest.fixture()
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_launcher_check(cfg: dict) -> dict:
    """What `ray up` does before talking to the cloud: fill in defaults, then validate."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written, before defaults are merged in
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_rays_own_preparation_and_validation(launcher):
    prepared = ray_launcher_check(launcher)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head.gpu", "worker.cpu"}
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["docker"]["image"] == launcher["docker"]["image"]


@pytest.mark.parametrize("breakage, error, match", [
    (lambda c: c["available_node_types"]["head.gpu"]["resources"].update(GPU=0.5), jsonschema.ValidationError,
     "0.5 is not of type 'integer'"),
    (lambda c: c.__setitem__("worker_node_types", {}), jsonschema.ValidationError, "'worker_node_types' was unexpected"),
    (lambda c: c["docker"].__setitem__("shm_size", "10g"), jsonschema.ValidationError, "'shm_size' was unexpected"),
    (lambda c: c["available_node_types"]["worker.cpu"].pop("node_config"), jsonschema.ValidationError,
     "'node_config' is a required property"),
    (lambda c: c.__setitem__("head_node_type", "head.cpu"), ValueError, "head_node_type"),
    (lambda c: c["available_node_types"]["worker.cpu"].__setitem__("min_workers", 3), ValueError, "max_workers"),
], ids=["fractional-gpu", "unknown-key", "docker-option-typo", "no-node-config", "unknown-head-type",
        "min-workers-above-max"])
def test_launcher_check_rejects_broken_configs(launcher, breakage, error, match):
    breakage(launcher)
    with pytest.raises(error, match=re.escape(match)):
        ray_launcher_check(launcher)


def test_launcher_learner_lands_on_the_gpu_head_and_task_workers_fit(launcher, atari12):
    nodes, head = launcher["available_node_types"], launcher["head_node_type"]
    assert nodes[head]["resources"].get("GPU", 0) >= 1, "the head must carry the GPU (learner_gpus: auto)"
    workers = {name: t for name, t in nodes.items() if name != head}
    assert all(t["resources"].get("GPU", 0) == 0 for t in workers.values()), "only the head has a GPU"
    assert atari12.ray.learner_gpus in ("auto", "1")
    worker_cpus, learner_cpus = atari12_cpus(atari12)
    spare_on_head = nodes[head]["resources"]["CPU"] - learner_cpus
    assert spare_on_head >= 0
    # all task workers fit on the nodes that exist from the start (no waiting for autoscaling)
    at_start = sum(t["min_workers"] * t["resources"]["CPU"] for t in workers.values()) + spare_on_head
    assert at_start >= worker_cpus, (at_start, worker_cpus)
    assert sum(t["min_workers"] for t in workers.values()) <= launcher["max_workers"]


def _flag(commands: list[str], name: str) -> str:
    found = [m.group(1) for c in commands for m in re.finditer(rf"{name}[= ](\S+)", c)]
    assert len(found) == 1, f"expected one {name} in {commands}"
    return found[0]


def test_launcher_shm_holds_each_nodes_object_store(launcher):
    d = launcher["docker"]
    for run_options, start in ((d["head_run_options"], launcher["head_start_ray_commands"]),
                               (d["worker_run_options"], launcher["worker_start_ray_commands"])):
        shm = quantity_bytes(_flag(run_options, "--shm-size"))
        store = float(_flag(start, "--object-store-memory"))
        assert store < shm, f"object store {store:g} B does not fit /dev/shm {shm:g} B"


def test_launcher_nodes_share_a_token_and_enable_token_auth(launcher):
    remote_dir = next(iter(launcher["file_mounts"]))
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
        assert f"RAY_AUTH_TOKEN_PATH={remote_dir}/auth_token" in start


# ==========================================================================================
# KubeRay


def manifest(name: str) -> dict:
    docs = list(kv.documents(KUBERAY / name))
    assert len(docs) == 1
    return docs[0]


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": manifest("raycluster.yaml")["spec"],
            "rayjob.yaml": manifest("rayjob.yaml")["spec"]["rayClusterSpec"]}


def test_shipped_schemas_are_valid_json_schema():
    for doc in kv.schemas().values():
        jsonschema.Draft202012Validator.check_schema(doc)


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_match_their_schemas(path):
    docs = list(kv.documents(path))
    assert docs
    for doc in docs:
        assert kv.errors(doc) == [], f"{path.name}: {doc['kind']}"


def _head(spec):
    return spec["headGroupSpec"]


def _container(group):
    return group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("file, breakage, where", [
    ("raycluster.yaml", lambda d: _head(d["spec"])["rayStartParams"].__setitem__("num-cpus", 2),
     "spec.headGroupSpec.rayStartParams.num-cpus"),
    ("raycluster.yaml", lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"].pop("workerGroupSpecs")),
     "'workerGroupSpec' was unexpected"),
    ("raycluster.yaml", lambda d: _container(_head(d["spec"]))["resources"]["limits"].__setitem__("memory", "48 GB"),
     "spec.headGroupSpec.template.spec.containers.0.resources.limits.memory"),
    ("raycluster.yaml", lambda d: _container(d["spec"]["workerGroupSpecs"][0]).pop("name"),
     "'name' is a required property"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"]
     .__setitem__("sizeLimt", "5Gi"), "'sizeLimt' was unexpected"),
    ("raycluster.yaml", lambda d: d["spec"]["authOptions"].__setitem__("mode", "on"), "spec.authOptions.mode"),
    ("raycluster.yaml", lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"), "no schema for ray.io/v1alpha1"),
    ("raycluster.yaml", lambda d: d["metadata"].pop("name"), "'name' is a required property"),
    ("rayjob.yaml", lambda d: d["spec"].__setitem__("submissionMode", "Http"), "spec.submissionMode"),
    ("rayjob.yaml", lambda d: d["spec"].__setitem__("deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}),
     "spec.deletionStrategy"),
    ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "'headGroupSpec' is a required"),
    ("runs-pvc.yaml", lambda d: d["spec"]["resources"]["requests"].__setitem__("storage", "fifty"),
     "spec.resources.requests.storage"),
], ids=["int-start-param", "field-typo", "bad-quantity", "container-without-name", "pod-field-typo",
        "auth-mode", "old-api-version", "no-name", "submission-mode", "half-legacy-deletion", "no-head",
        "pvc-size"])
def test_broken_manifests_fail_validation(file, breakage, where):
    doc = manifest(file)
    assert kv.errors(doc) == []
    breakage(doc)
    errs = kv.errors(doc)
    assert errs and any(where in e for e in errs), errs


@pytest.mark.parametrize("name, spec", cluster_specs().items(), ids=list(cluster_specs()))
def test_kuberay_gpu_only_on_the_head_which_hosts_the_learner(name, spec):
    head = _container(_head(spec))["resources"]
    assert int(head["limits"]["nvidia.com/gpu"]) >= 1 and head["requests"]["nvidia.com/gpu"] == head["limits"]["nvidia.com/gpu"]
    for group in spec["workerGroupSpecs"]:
        res = _container(group)["resources"]
        assert "nvidia.com/gpu" not in res.get("limits", {}) and "nvidia.com/gpu" not in res.get("requests", {})
    assert float(_head(spec)["rayStartParams"]["num-cpus"]) >= 1.0, "room for the learner's CPU"


@pytest.mark.parametrize("name, spec", cluster_specs().items(), ids=list(cluster_specs()))
def test_kuberay_task_workers_fit_atari12(name, spec, atari12):
    worker_cpus, learner_cpus = atari12_cpus(atari12)
    spare_on_head = float(_head(spec)["rayStartParams"]["num-cpus"]) - learner_cpus
    at_start = spare_on_head + sum(
        g["minReplicas"] * cpu_quantity(g["rayStartParams"].get("num-cpus", _container(g)["resources"]["limits"]["cpu"]))
        for g in spec["workerGroupSpecs"])
    assert at_start >= worker_cpus, (at_start, worker_cpus)


@pytest.mark.parametrize("name, spec", cluster_specs().items(), ids=list(cluster_specs()))
def test_kuberay_shm_holds_each_groups_object_store(name, spec):
    for group in [_head(spec), *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        mount = next(m for m in _container(group)["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        shm = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        assert float(group["rayStartParams"]["object-store-memory"]) < shm
        assert shm < quantity_bytes(_container(group)["resources"]["limits"]["memory"]), "tmpfs counts as pod memory"


def test_rayjob_cluster_is_the_raycluster():
    """One cluster shape: the RayJob's cluster must not drift from raycluster.yaml."""
    specs = cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"]


def test_rayjob_entrypoint_runs_a_repo_config_into_the_runs_volume():
    job = manifest("rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["metarl", "run"]
    config_path = argv[argv.index("--config") + 1]
    assert config_path.startswith(IMAGE_WORKDIR + "/")
    local = REPO / config_path[len(IMAGE_WORKDIR) + 1:]
    config_mod.validate(config_mod.load(local))  # exists in the repo (so in the image) and is valid
    assert local.parent.name == "configs" and "COPY --chown=ray:users configs ./configs" in (REPO / "Dockerfile").read_text()
    head = job["rayClusterSpec"]["headGroupSpec"]
    runs = next(m for m in _container(head)["volumeMounts"] if argv[argv.index("--out") + 1].startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == runs["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == manifest("runs-pvc.yaml")["metadata"]["name"]
    # the CLI parses the entrypoint's flags
    from metarl.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.config == config_path and not args.resume


# ==========================================================================================
# one Ray version everywhere


def test_dockerfile_base_image_is_rays_gpu_image_at_the_pinned_version():
    pin = ray_pin()
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{pin}-py311-gpu"], froms
    assert f"ray.__version__ == '{pin}'" in text  # the build itself fails on a mismatch
    assert re.search(r"^WORKDIR\s+" + re.escape(IMAGE_WORKDIR) + r"\s*$", text, flags=re.M)


def test_every_cluster_image_and_ray_version_matches_the_pin():
    pin = ray_pin()
    images = [yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]]
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == pin, name
        groups = [_head(spec), *spec["workerGroupSpecs"]]
        images += [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(i.rsplit(":", 1)[1] == f"ray{pin}-py311-gpu" for i in images), images
    assert len(set(images)) == 1, "one image for every node and both cluster kinds"
