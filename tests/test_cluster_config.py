"""The deployment files, checked offline: cluster.yaml (Ray's launcher), Dockerfile, configs/cluster.yaml,
k8s/rayjob.yaml (KubeRay), and the README commands that use them.

Nothing here starts a cloud machine. cluster.yaml is checked by Ray's own launcher code
(`prepare_config` then `validate_config`, the steps `ray up` takes before it calls AWS; private API,
which is why Ray is pinned), the RayJob by the OpenAPI schema of KubeRay v1.7.0's own RayJob CRD
(vendored in k8s/crd/) with unknown keys refused, and the search configs by the same resource checks the search makes on a
live cluster (tuning.cluster). Seconds in all.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "cluster.yaml"
RAYJOB = REPO / "k8s" / "rayjob.yaml"
RAYJOB_CRD = REPO / "k8s" / "crd" / "ray.io_rayjobs-v1.7.0.yaml"
DEPLOY_FILES = [LAUNCHER, RAYJOB, REPO / "Dockerfile", REPO / "configs" / "cluster.yaml"]
PLACEHOLDER = re.compile(r"<([A-Z_]+)>")
IMAGE_TAG = "{ray}-py311-gpu"  # the official image's tag: Ray version, Python 3.11 (the pins'), GPU
# EC2's shapes of the instance types cluster.yaml uses (vCPUs, GPUs): a node type may not offer more.
EC2_SHAPES = {"m5.xlarge": (4, 0), "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4)}


def ray_version() -> str:
    import ray

    return ray.__version__


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does with the file before it talks to AWS: fill in the provider's defaults,
    then validate against ray/autoscaler/ray-schema.json and Ray's own cross-checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def search_configs() -> list[Path]:
    """The shipped configs that are search configs (a `tune` section)."""
    return sorted(p for p in (REPO / "configs").glob("*.yaml") if "tune" in (yaml.safe_load(p.read_text()) or {}))


# --- cluster.yaml: Ray's own validation -------------------------------------------------------------

def test_launcher_passes_rays_own_validation():
    prepared = ray_validate(launcher())
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert all(t["min_workers"] == 0 for t in types.values())  # nothing runs (or costs) until needed


def _unknown_top_level_key(c):
    c["max_worker"] = 3


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu-1x-a10g"]["max_worker"] = 3


def _head_type_not_a_node_type(c):
    c["head_node_type"] = "ray.head.default"


def _fractional_resources(c):
    c["available_node_types"]["gpu-1x-a10g"]["resources"]["GPU"] = 0.5


def _negative_resources(c):
    c["available_node_types"]["head"]["resources"]["CPU"] = -1


def _min_workers_above_max(c):
    c["available_node_types"]["gpu-1x-a10g"]["min_workers"] = 20


@pytest.mark.parametrize("breaks, message", [
    (_unknown_top_level_key, "Additional properties are not allowed .'max_worker' was unexpected"),
    (_unknown_node_type_key, "Additional properties are not allowed .'max_worker' was unexpected"),
    (_head_type_not_a_node_type, "must be one of `available_node_types`"),
    (_fractional_resources, "0.5 is not of type 'integer'"),
    (_negative_resources, "-1 is less than the minimum of 0"),
    (_min_workers_above_max, "smaller than the sum of `min_workers`"),
])
def test_rays_validation_refuses_broken_copies(breaks, message):
    config = launcher()
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        ray_validate(config)


def test_what_rays_schema_does_not_check():
    """Ray's schema lets any key through inside `provider` and a node's `node_config` (they go to the
    cloud's API as they are): a misspelling there fails only at `ray up`. Written down here so that a
    Ray that starts checking them is noticed."""
    config = launcher()
    config["provider"]["regoin"] = "us-west-2"
    config["available_node_types"]["gpu-1x-a10g"]["node_config"]["InstanceTyp"] = "g5.xlarge"
    ray_validate(config)


# --- cluster.yaml: what this project needs of it --------------------------------------------------

def test_head_never_runs_trials():
    config = launcher()
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_worker_types_are_gpu_machines_within_their_ec2_shape():
    types = launcher()["available_node_types"]
    workers = {name: t for name, t in types.items() if name != "head"}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    for name, node_type in types.items():
        vcpus, gpus = EC2_SHAPES[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"].get("CPU", 0) <= vcpus and node_type["resources"].get("GPU", 0) == gpus, name


def test_workers_wait_for_the_gpu_driver_and_get_an_instance_profile():
    types = launcher()["available_node_types"]
    for name, node_type in types.items():
        assert "IamInstanceProfile" in node_type["node_config"], name  # the launcher gives none to workers
        if name != "head":
            first = node_type["initialization_commands"][0]  # a node type's list replaces the top-level one
            assert "nvidia-smi" in first and "timeout" in first, name


def test_spot_variant_beside_the_on_demand_type():
    types = launcher()["available_node_types"]
    on_demand, spot = types["gpu-1x-a10g"], types["gpu-1x-a10g-spot"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    assert spot["resources"] == on_demand["resources"]
    assert spot["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]
    assert spot["max_workers"] == 0 < on_demand["max_workers"]  # opt-in, see the README's "Spot"


def test_ray_ports_stay_private_and_idle_workers_go():
    config = launcher()
    assert "security_group" not in config["provider"]  # Ray's own: SSH in, and traffic between nodes
    assert config["provider"]["cache_stopped_nodes"] is False  # `ray down` leaves no stopped disks
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_images_are_the_pinned_ray():
    tag = IMAGE_TAG.format(ray=ray_version())
    assert f"ray=={ray_version()}" in (REPO / "constraints.txt").read_text().splitlines()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [f"rayproject/ray:{tag}"]
    assert f"assert ray.__version__ == '{ray_version()}'" in dockerfile
    assert launcher()["docker"]["image"] == f"<REGISTRY>/boneage-tune:{tag}"
    job = rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version()
    images = {c["image"] for c in _containers(job)}
    assert images == {f"<REGISTRY>/boneage-tune:{tag}"}


def test_no_credentials_and_every_placeholder_explained():
    readme = (REPO / "README.md").read_text()
    for path in DEPLOY_FILES:
        text = path.read_text()
        assert not re.search(r"\b\d{12}\b", text), f"{path.name}: an AWS account id"
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an access key"
        assert "aws_secret_access_key" not in text.lower(), f"{path.name}: a secret key"
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{path.name}: a URL with a password"
        for name in set(PLACEHOLDER.findall(text)) - {"LIKE_THIS"}:  # LIKE_THIS: the notation itself
            assert f"| `<{name}>` |" in readme, f"{path.name}: <{name}> is not in the README's table"
            assert f'-e "s|<{name}>|' in readme, f"{path.name}: the README's sed does not fill <{name}>"


# --- the search config on these machines -----------------------------------------------------------

def k8s_node_types(job: dict) -> dict:
    """{group: {"CPU": n, "GPU": m}} from the RayJob's worker groups, as Ray in those pods sees them."""
    types = {}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        types[group["groupName"]] = {"CPU": int(limits["cpu"]), "GPU": int(limits.get("nvidia.com/gpu", 0))}
    return types


def cluster_shapes():
    from tuning import cluster

    return {"cluster.yaml": cluster.type_shapes(cluster.launcher_node_types(LAUNCHER)),
            "k8s/rayjob.yaml": cluster.type_shapes(k8s_node_types(rayjob()))}


@pytest.mark.parametrize("config", search_configs(), ids=lambda p: p.name)
def test_each_search_configs_trial_and_retrain_fit(config):
    """Before any trial starts, the search refuses a trial that no node type can hold and a retrain
    that no single node can; every shipped search config passes that on both clusters."""
    from tuning import cluster
    from tuning.config import load_search_config

    cfg = load_search_config(config)
    for where, shapes in cluster_shapes().items():
        cluster.check_fits(cfg, shapes)
        trial = cfg.tune.resources
        assert any(s.gpus >= 1 and s.cpus >= trial.cpu and s.gpus >= trial.gpu for s in shapes), where
        gpus, cpus = cluster.retrain_resources(cfg, shapes)
        assert any(s.gpus >= gpus and s.cpus >= cpus for s in shapes), where


def test_cluster_config_runs_one_trial_per_small_gpu_node():
    from tuning import cluster
    from tuning.config import load_search_config

    cfg = load_search_config(REPO / "configs" / "cluster.yaml")
    trial = cfg.tune.resources
    assert trial.gpu == 1
    for where, shapes in cluster_shapes().items():
        small = [s for s in shapes if s.gpus == 1]
        assert small and all(trial.cpu <= s.cpus for s in small), where  # 6 CPUs would never fit a g5.xlarge
        assert cluster.retrain_resources(cfg, shapes)[0] == 4, where
    greedy = load_search_config(REPO / "configs" / "cluster.yaml", ["tune.resources.cpu=6", "tune.retrain_gpus=8"])
    with pytest.raises(Exception, match="retrain_gpus 8"):
        cluster.check_fits(greedy, cluster_shapes()["cluster.yaml"])
    assert not any(s.cpus >= 6 for s in cluster_shapes()["cluster.yaml"] if s.gpus == 1)


def test_cluster_config_points_at_what_the_nodes_have():
    from tuning.config import load_search_config

    cfg = load_search_config(REPO / "configs" / "cluster.yaml")
    assert cfg.tune.storage_path == "s3://<BUCKET>/experiments" and cfg.tune.optuna_storage is None
    # the data: where cluster.yaml's setup commands and the RayJob's init containers stage it
    config = launcher()
    assert f"mv {cfg.data.root}.partial {cfg.data.root};" in config["worker_setup_commands"][0]
    assert f"{cfg.data.root}/boneage-training-dataset.csv; }}" in config["head_setup_commands"][0]
    # the weights: the file Keras downloads for Xception without its top (its source, read as text:
    # importing Keras takes seconds), in the Keras cache the Dockerfile fills
    keras_home = re.search(r"^ENV KERAS_HOME=(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert cfg.model.weights.startswith(f"{keras_home}/models/")
    xception = Path(importlib.util.find_spec("keras").origin).parent / "src" / "applications" / "xception.py"
    assert re.search(rf'"{re.escape(Path(cfg.model.weights).name)}",\s*WEIGHTS_PATH_NO_TOP', xception.read_text())


def test_staging_copies_the_data_once(tmp_path):
    """cluster.yaml's own staging commands, run with a local folder for S3 and tmp_path for /data:
    a worker gets the whole folder (through a temporary name), the head only the label CSV, and a
    node that has them skips the copy. The RayJob's init containers run the same commands."""
    config, job = launcher(), rayjob()
    worker, head = config["worker_setup_commands"][0], config["head_setup_commands"][0]
    spec = job["spec"]["rayClusterSpec"]
    assert [c["command"] for c in spec["headGroupSpec"]["template"]["spec"]["initContainers"]] == [["bash", "-c", head]]
    for group in spec["workerGroupSpecs"]:
        assert [c["command"] for c in group["template"]["spec"]["initContainers"]] == [["bash", "-c", worker]]
    source = tmp_path / "bucket" / "rsna-bone-age"
    (source / "boneage-training-dataset").mkdir(parents=True)
    (source / "boneage-training-dataset.csv").write_text("id,boneage,male\n1,120,True\n")
    (source / "boneage-training-dataset" / "1.png").write_bytes(b"\x89PNG fake")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}

    def run(command, node):
        local = command.replace("s3://<BUCKET>/rsna-bone-age", source.as_uri()).replace("/data", str(tmp_path / node))
        subprocess.run(["bash", "-c", local], check=True, env=env, timeout=60)
        return tmp_path / node / "rsna-bone-age"

    staged = run(worker, "worker")
    assert (staged / "boneage-training-dataset" / "1.png").read_bytes() == b"\x89PNG fake"
    labels_only = run(head, "head")
    assert sorted(p.name for p in labels_only.iterdir()) == ["boneage-training-dataset.csv"]
    assert not list(tmp_path.glob("*/*.partial")) and not list(tmp_path.glob("*/*/*.partial"))
    (source / "boneage-training-dataset.csv").write_text("changed")
    run(worker, "worker"), run(head, "head")
    assert "changed" not in (staged / "boneage-training-dataset.csv").read_text()
    assert "changed" not in (labels_only / "boneage-training-dataset.csv").read_text()


# --- k8s/rayjob.yaml ----------------------------------------------------------------------------------

def _groups(job):
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]] + spec["workerGroupSpecs"]


def _containers(job):
    return [c for g in _groups(job) for key in ("containers", "initContainers")
            for c in g["template"]["spec"].get(key, [])]


def strict(schema: dict) -> dict:
    """A CRD's structural schema with unknown keys refused. The API server accepts them and
    silently prunes them (a misspelt `maxReplica` would vanish and the group stay unbounded), so
    every object that lists its properties, and does not preserve unknown fields, gets
    additionalProperties: false; free-form maps (labels, rayStartParams) keep theirs."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


@functools.cache
def rayjob_schema() -> dict:
    crd = yaml.load(RAYJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "rayjobs.ray.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def rayjob_errors(job) -> list[str]:
    validator = jsonschema.Draft7Validator(rayjob_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]


def test_rayjob_matches_kuberays_crd():
    jsonschema.Draft7Validator.check_schema(rayjob_schema())
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob_errors(job) == []
    assert "v1.7.0" in RAYJOB_CRD.read_text()[:400] and "1.7.0" in (REPO / "README.md").read_text()


def _misspelt_max_replicas(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 8


def _replicas_as_text(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"


def _unknown_container_key(job):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}


def _group_without_name(job):
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


def _bad_quantity(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["memory"] = "12 GB"


@pytest.mark.parametrize("breaks, message", [
    (_misspelt_max_replicas, "'maxReplica' was unexpected"),
    (_replicas_as_text, "'8' is not of type 'integer'"),
    (_unknown_container_key, "'resource' was unexpected"),
    (_group_without_name, "'groupName' is a required property"),
    (_bad_quantity, "'12 GB' does not match"),
])
def test_kuberays_crd_refuses_broken_copies(breaks, message):
    """The CRD as the API server applies it would take `maxReplica` and drop it; strict, it refuses it."""
    job = rayjob()
    breaks(job)
    errors = rayjob_errors(job)
    assert any(message in e for e in errors), errors


def test_rayjob_layout():
    job = rayjob()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and job["spec"]["shutdownAfterJobFinishes"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"] and int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"] and "dshm" in shm
        assert group["minReplicas"] == 0 < group["maxReplicas"]


def test_rayjob_tells_the_head_its_worker_groups():
    """The head cannot read KubeRay's worker groups; BONEAGE_NODE_TYPES must say what they are."""
    job = rayjob()
    (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert json.loads(env["BONEAGE_NODE_TYPES"]) == k8s_node_types(job)


# --- the commands, as written, against the real CLI ---------------------------------------------------

def search_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m tuning.search` command of the README's cluster sections, and the RayJob's."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Running on AWS")
    section = readme[start:readme.index("\n## ", readme.index("## Running on Kubernetes"))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m tuning.search" in line:
                commands.append(("README", shlex.split(line.split("python -m tuning.search", 1)[1])))
    entrypoint = rayjob()["spec"]["entrypoint"]
    commands.append(("k8s/rayjob.yaml", shlex.split(entrypoint.split("python -m tuning.search", 1)[1])))
    return commands


def test_documented_commands_parse_with_the_real_cli(monkeypatch):
    from tuning import search

    commands = search_commands()
    assert len(commands) >= 3  # the submission, the resumption, the RayJob
    calls = []
    monkeypatch.setattr(search, "search", lambda cfg, name, address=None, resume=False: calls.append(
        (cfg, name, address, resume)))
    for where, argv in commands:
        argv = [a.replace("/home/ray/boneage-tune/", f"{REPO}/") for a in argv]  # the image's checkout
        assert search.main(argv) == 0, (where, argv)
    assert all(address == "auto" for _, _, address, _ in calls)
    assert {name for _, name, _, _ in calls} == {"boneage-aws-1", "boneage-k8s-1"}
    assert any(resume for _, _, _, resume in calls)
    assert all(cfg.tune.storage_path.startswith("s3://") for cfg, _, _, _ in calls)
