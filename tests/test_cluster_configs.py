"""The real-cluster configs under cluster/, checked offline: no cloud, no Kubernetes, no Ray cluster.

- cluster/aws.yaml goes through the Ray cluster launcher's own code up to the point where it would
  call AWS: ``prepare_config`` (merge with the AWS defaults, merge of the setup commands, Docker
  checks, per-type worker bounds) and ``validate_config`` (ray-schema.json plus its cross-field
  rules). What ``ray up`` does after that (resource autodetection from the EC2 API, IAM, subnets,
  key pairs, security groups) needs AWS credentials and is not run here.
- The KubeRay manifests (RayCluster, RayJob) are checked structurally by the functions below:
  neither Ray nor this repository ships the KubeRay CRD OpenAPI schemas, and
  ``kubectl apply --dry-run=server`` needs a cluster with the CRDs installed. The checks cover what
  matters to ambient-ray: token auth on every container from a Secret, GPU counts that match the
  node types, replica and resource bounds, and image / Ray versions that match the installed Ray.
Every family of checks has a negative test that feeds it a broken copy and expects a refusal.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"

RAY_VERSION = ray.__version__
SECRET = "ambient-ray-auth"  # the Kubernetes Secret holding the Ray token
SECRET_KEY = "auth_token"  # its key (KubeRay's authOptions convention)
SERVICE_ACCOUNT = "ambient-ray"  # the IRSA ServiceAccount

# The instance types the configs use: (vCPUs, GPUs).
INSTANCES = {
    "m6i.2xlarge": (8, 0),
    "m6i.8xlarge": (32, 0),
    "g6e.12xlarge": (48, 4),  # 4 x L40S
    "p4d.24xlarge": (96, 8),  # 8 x A100 40 GB
    "p5.48xlarge": (192, 8),  # 8 x H100
}

# What must never appear in any file under cluster/: a cloud key, a Ray token written out, a private key.
LEAKS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "inline Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9+/_.-]{8,}"),
    "Ray token as an env value": re.compile(r"name:\s*['\"]?RAY_AUTH_TOKEN['\"]?\s*,?\s*value\s*:"),
    "inline auth_token value": re.compile(r"^\s*auth_token\s*[:=]\s*\S", re.M),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
# ... and, in the real-cluster files (AWS, KubeRay, the runtime env), not even the name of a key
# variable: credentials come from instance profiles and IRSA only. (cluster/local.sh may export
# the throwaway key of its local S3 server, so it gets only the checks above.)
STRICT_LEAKS = {
    "AWS secret key variable": re.compile(r"aws_secret_access_key", re.I),
    "AWS key id variable": re.compile(r"aws_access_key_id", re.I),
    "AWS session token variable": re.compile(r"aws_session_token", re.I),
    "secret on a command line": re.compile(r"--from-literal"),
}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def real_cluster_files() -> list[Path]:
    return [AWS, RUNTIME_ENV, *sorted(p for p in KUBERAY.iterdir() if p.is_file())]


def leaks(text: str, strict: bool = True) -> list[str]:
    rules = {**LEAKS, **STRICT_LEAKS} if strict else LEAKS
    return [name for name, rx in rules.items() if rx.search(text)]


def torch_spec() -> list[str]:
    """The torch / torchvision pins of the Makefile (TORCH_SPEC), which the cluster images must use."""
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH_SPEC"
    return m.group(1).split()


# ------------------------------------------------------------------------------ quantities


_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity(q) -> float:
    """A Kubernetes resource quantity ("500m", "16Gi", "4") as a number."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(q).strip())
    assert m and m.group(2) in _SUFFIXES, f"not a Kubernetes quantity: {q!r}"
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


def test_quantity_parser():
    assert quantity("500m") == 0.5
    assert quantity("4") == 4 and quantity(8) == 8
    assert quantity("16Gi") == 16 * 2**30
    assert quantity("1G") == 1e9
    with pytest.raises(AssertionError):
        quantity("4 cores")


# ------------------------------------------------------------------------------ AWS (Ray cluster launcher)


@pytest.fixture(scope="module")
def aws() -> dict:
    return load_yaml(AWS)


def test_aws_config_passes_ray_launcher_validation(aws):
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)  # raises on any schema or cross-field error
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == set(aws["available_node_types"])


def _typo_top_level(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _typo_docker_key(c):
    c["docker"]["worker_imgae"] = "rayproject/ray"


def _negative_gpus(c):
    c["available_node_types"]["gpu_dit"]["resources"]["GPU"] = -8


def _no_resources(c):
    del c["available_node_types"]["gpu_edm2"]["resources"]


def _min_over_global_max(c):
    c["available_node_types"]["gpu_dit"]["min_workers"] = c["max_workers"] + 1
    c["available_node_types"]["gpu_dit"]["max_workers"] = c["max_workers"] + 1


def _unknown_head_type(c):
    c["head_node_type"] = "head_typo"


@pytest.mark.parametrize(
    "mutate, error",
    [
        (_typo_top_level, jsonschema.ValidationError),
        (_typo_docker_key, jsonschema.ValidationError),
        (_negative_gpus, jsonschema.ValidationError),
        (_no_resources, jsonschema.ValidationError),
        (_min_over_global_max, ValueError),
        (_unknown_head_type, ValueError),
    ],
    ids=[
        "typo-top-level-key",
        "typo-docker-key",
        "negative-gpus",
        "no-resources",
        "min-workers-over-max",
        "unknown-head-type",
    ],
)
def test_aws_validation_refuses_broken_copies(aws, mutate, error):
    broken = copy.deepcopy(aws)
    mutate(broken)
    with pytest.raises(error):
        validate_config(prepare_config(broken))


def test_aws_node_types_match_their_instances(aws):
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    for name in ("cpu", "gpu_edm2", "gpu_dit"):
        assert name in types, f"worker group {name} missing"
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must take no tasks or actors"
    assert head["resources"].get("GPU", 0) == 0, "the head must have no GPU"
    assert INSTANCES[head["node_config"]["InstanceType"]][1] == 0, "the head must be a CPU instance"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"

    for name, t in types.items():
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCES, f"{name}: add {itype} to INSTANCES (vCPUs, GPUs)"
        vcpus, gpus = INSTANCES[itype]
        assert t["resources"].get("GPU", 0) == gpus, f"{name}: GPU resource must equal the {gpus} GPUs of {itype}"
        assert 0 <= t["resources"].get("CPU", vcpus) <= vcpus, f"{name}: more CPUs than {itype} has"
        if name != aws["head_node_type"]:
            assert 0 <= t.get("min_workers", 0) <= t["max_workers"], f"{name}: min_workers > max_workers"
        arn = t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (
            f"{name}: no IAM instance profile"
        )
    assert types["gpu_edm2"]["resources"]["GPU"] >= 4
    assert types["gpu_dit"]["resources"]["GPU"] == 8
    assert sum(t.get("min_workers", 0) for t in types.values()) <= aws["max_workers"]

    # GPU nodes run the GPU image, the others a CPU image
    docker = aws["docker"]
    assert docker["image"].endswith("-gpu") and not docker["head_image"].endswith("-gpu")
    for name, t in types.items():
        if name == aws["head_node_type"]:
            continue
        image = t.get("docker", {}).get("worker_image", docker["image"])
        assert image.endswith("-gpu") == (t["resources"].get("GPU", 0) > 0), f"{name}: image {image} vs GPUs"


def test_aws_token_auth_project_install_and_environment(aws):
    setup = aws["setup_commands"] + aws["head_setup_commands"] + aws["worker_setup_commands"]
    starts = aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for cmd in ray_starts:
        assert "export RAY_AUTH_MODE=token" in cmd, f"start without token auth: {cmd}"
        assert ". ~/ambient-ray.env" in cmd, "the node environment (MLFLOW_TRACKING_URI) must reach the raylet"
    assert "--head" in aws["head_start_ray_commands"][-1]

    # the repository is mounted and installed (editable) on every node, with the Makefile's torch
    mounts = aws["file_mounts"]
    remote = next(r for r, local in mounts.items() if local in (".", "./"))
    i_install = next(i for i, c in enumerate(setup) if re.search(rf"pip install .*-e \"?{re.escape(remote)}\b", c))
    assert f'"ray[default,train,tune,data]=={RAY_VERSION}"' in setup[i_install], "pin the cluster's Ray"
    for pin in torch_spec():
        assert any(pin in c for c in setup), f"{pin} (Makefile TORCH_SPEC) not installed"

    # the token: fetched from Secrets Manager into ~/.ray/auth_token, after boto3 is installed
    i_token = next(i for i, c in enumerate(setup) if "~/.ray/auth_token" in c)
    assert "secretsmanager" in setup[i_token] and "umask 077" in setup[i_token]
    assert i_token > i_install, "the token fetch needs the project's boto3"
    for cmd in setup + starts + aws["initialization_commands"]:
        assert not re.search(r"RAY_AUTH_TOKEN\s*=", cmd), f"token set on a command line: {cmd}"

    # the node environment file: token mode for login shells, the MLflow server for the jobs
    env_cmd = next(c for c in setup if "> ~/ambient-ray.env" in c)
    assert "export RAY_AUTH_MODE=token" in env_cmd
    assert re.search(r"export MLFLOW_TRACKING_URI=https?://\S+", env_cmd)


# ------------------------------------------------------------------------------ no credentials anywhere


def test_no_credentials_in_cluster_files():
    files = cluster_files()
    real = real_cluster_files()
    assert {AWS, RUNTIME_ENV, KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "Dockerfile"} <= set(real)
    for path in files:
        found = leaks(path.read_text(), strict=path in real)
        assert not found, f"{path.relative_to(ROOT)}: {found}"
    for path in KUBERAY.glob("*.yaml"):
        kinds = {d.get("kind") for d in load_docs(path)}
        assert "Secret" not in kinds, f"{path.name}: Secrets are created out of band, never committed"


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
        "export AWS_SECRET_ACCESS_KEY=abc",
        "- name: RAY_AUTH_TOKEN\n  value: 0123456789abcdef",
        "RAY_AUTH_TOKEN=0123456789abcdef ray start --head",
        "stringData:\n  auth_token: 0123456789abcdef",
        "kubectl create secret generic x --from-literal=auth_token=abc",
    ],
)
def test_leak_scanner_flags_secrets(text):
    assert leaks(text)


def test_leak_scanner_passes_references():
    assert not leaks("- name: RAY_AUTH_TOKEN\n  valueFrom:\n    secretKeyRef: {name: s, key: auth_token}\n")
    assert not leaks("RAY_AUTH_TOKEN_PATH=~/.ray/auth_token ray job submit")


# ------------------------------------------------------------------------------ versions


def test_images_and_pins_match_installed_ray():
    tags = [m.group(1) for p in cluster_files() for m in re.finditer(r"rayproject/ray:([\w.-]+)", p.read_text())]
    assert tags, "no rayproject/ray image named"
    for tag in tags:
        assert tag.startswith(f"{RAY_VERSION}-"), f"rayproject/ray:{tag} is not Ray {RAY_VERSION}"
    for path in (AWS, KUBERAY / "Dockerfile"):
        pins = re.findall(r"ray\[[\w,]+\]==([\w.]+)", path.read_text())
        assert pins and set(pins) == {RAY_VERSION}, f"{path.name}: ray pinned to {pins}"
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
    assert f'ARG TORCH_SPEC="{" ".join(torch_spec())}"' in dockerfile
    assert re.search(r"pip install .*-e \"\.\[tune\]\"", dockerfile), "the image must install the project"


# ------------------------------------------------------------------------------ KubeRay


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_token_env(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    tok = env.get("RAY_AUTH_TOKEN")
    assert tok, f"{where}: RAY_AUTH_TOKEN missing"
    assert "value" not in tok, f"{where}: RAY_AUTH_TOKEN given as a literal"
    ref = tok.get("valueFrom", {}).get("secretKeyRef", {})
    assert ref == {"name": SECRET, "key": SECRET_KEY}, (
        f"{where}: RAY_AUTH_TOKEN must come from Secret {SECRET}/{SECRET_KEY}"
    )
    for name in env:
        assert not name.startswith("AWS_") or name in ("AWS_DEFAULT_REGION", "AWS_REGION"), (
            f"{where}: {name} (use IRSA)"
        )


def check_image(image: str, where: str) -> None:
    tag = image.rsplit(":", 1)[-1]
    m = re.search(r"ray(\d+\.\d+\.\d+)", tag)
    assert m and m.group(1) == RAY_VERSION, f"{where}: image {image} is not built on Ray {RAY_VERSION}"


def check_resources(res: dict, where: str) -> None:
    requests, limits = res.get("requests", {}), res.get("limits", {})
    assert "cpu" in limits and "memory" in limits, f"{where}: no cpu/memory limits"
    for key, req in requests.items():
        assert key in limits and quantity(req) <= quantity(limits[key]), f"{where}: request {key}={req} above its limit"


def check_cluster_spec(spec: dict, where: str) -> None:
    """The structural checks of one RayClusterSpec (a RayCluster's spec or a RayJob's rayClusterSpec)."""
    assert spec.get("rayVersion") == RAY_VERSION, f"{where}: rayVersion {spec.get('rayVersion')}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    assert spec.get("authOptions") == {"mode": "token", "secretName": SECRET}, f"{where}: authOptions"
    check_token_env(_env(spec.get("autoscalerOptions", {})), f"{where} autoscaler")
    check_resources(spec["autoscalerOptions"].get("resources", {}), f"{where} autoscaler")

    head = spec["headGroupSpec"]
    groups = [("head", head, None)] + [(g["groupName"], g, g) for g in spec["workerGroupSpecs"]]
    names = [name for name, _, _ in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate group names"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must take no tasks"
    assert any(g["groupName"].startswith("gpu") for g in spec["workerGroupSpecs"]), f"{where}: no GPU group"

    for name, group, worker in groups:
        at = f"{where} {name}"
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{at}: rayStartParams values must be strings"
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{at}: not on the IRSA ServiceAccount"
        containers = pod["containers"]
        for c in containers + pod.get("initContainers", []):
            check_token_env(_env(c), f"{at}/{c['name']}")
            check_image(c["image"], f"{at}/{c['name']}")
            check_resources(c.get("resources", {}), f"{at}/{c['name']}")
            assert "MLFLOW_TRACKING_URI" in _env(c), f"{at}/{c['name']}: no MLFLOW_TRACKING_URI"
        ray_c = containers[0]
        limits = ray_c["resources"]["limits"]
        gpus = int(quantity(limits.get("nvidia.com/gpu", 0)))
        if "num-gpus" in params:
            assert int(params["num-gpus"]) == gpus, f"{at}: num-gpus {params['num-gpus']} vs nvidia.com/gpu {gpus}"
        if "num-cpus" in params and name != "head":
            assert float(params["num-cpus"]) <= quantity(limits["cpu"]), f"{at}: num-cpus above the cpu limit"
        if worker is None:
            assert gpus == 0, f"{at}: the head must have no GPU"
            continue
        lo, n, hi = worker["minReplicas"], worker.get("replicas", worker["minReplicas"]), worker["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{at}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}"
        assert (gpus > 0) == name.startswith("gpu"), (
            f"{at}: GPU groups are the gpu-* groups and have nvidia.com/gpu limits"
        )
        itype = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
        assert itype in INSTANCES, f"{at}: pin the instance type (nodeSelector) and list it in INSTANCES"
        vcpus, node_gpus = INSTANCES[itype]
        assert gpus == node_gpus, f"{at}: {gpus} GPUs per pod on {itype} which has {node_gpus}"
        assert quantity(ray_c["resources"]["requests"]["cpu"]) < vcpus, f"{at}: cpu request does not fit {itype}"
        if gpus:
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
                f"{at}: no GPU taint toleration"
            )


@pytest.fixture(scope="module")
def raycluster() -> dict:
    docs = load_docs(KUBERAY / "raycluster.yaml")
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayCluster")]
    return docs[0]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = load_docs(KUBERAY / "rayjob.yaml")
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayJob")]
    return docs[0]


def test_raycluster_structure(raycluster):
    assert raycluster["metadata"]["name"]
    check_cluster_spec(raycluster["spec"], "RayCluster")
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert {"cpu", "gpu-edm2", "gpu-dit"} <= set(groups)
    assert groups["gpu-dit"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_rayjob_structure(rayjob):
    spec = rayjob["spec"]
    check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        for c in spec["submitterPodTemplate"]["spec"]["containers"]:
            check_token_env(_env(c), f"RayJob submitter/{c['name']}")
            check_image(c["image"], f"RayJob submitter/{c['name']}")
            check_resources(c.get("resources", {}), f"RayJob submitter/{c['name']}")

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"], argv
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    out = next(s.split("=", 1)[1] for s in sets if s.startswith("out="))
    assert config.startswith("s3://") and out.startswith("s3://"), "a RayJob has no local disk to read or write"


def test_rayjob_runtime_env_matches_cluster_runtime_env(rayjob):
    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    base = load_yaml(RUNTIME_ENV)
    assert isinstance(job_env, dict) and job_env.get("env_vars")
    assert job_env["env_vars"] == base["env_vars"], "the RayJob's env_vars must be those of cluster/runtime_env.yaml"
    assert "working_dir" not in job_env, "the code comes from the image"
    for env in (job_env, base):
        for name, value in env["env_vars"].items():
            assert not re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIALS?)(_|$)", name, re.I), (
                f"runtime env names a secret: {name}"
            )
            assert isinstance(value, str), f"{name}: runtime env values must be strings"


def test_rayjob_entrypoint_module_exists(rayjob):
    module = shlex.split(rayjob["spec"]["entrypoint"])[2]
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"the RayJob runs {module}, but {path.relative_to(ROOT)} does not exist"


def _literal_token(spec):
    spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "value": "0123456789abcdef"},
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
    ]


def _no_auth_mode(spec):
    c = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != "RAY_AUTH_MODE"]


def _gpu_count_off(spec):
    g = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-dit")
    g["rayStartParams"].pop("num-gpus")  # so that the instance-type check is the one that fires
    g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "4"
    g["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "4"


def _num_gpus_off(spec):
    next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-edm2")["rayStartParams"]["num-gpus"] = "8"


def _replicas_off(spec):
    spec["workerGroupSpecs"][0]["minReplicas"] = spec["workerGroupSpecs"][0]["maxReplicas"] + 1


def _request_over_limit(spec):
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "64Gi"


def _head_gpu(spec):
    res = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["nvidia.com/gpu"] = "1"


def _old_image(spec):
    c = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["image"] = c["image"].replace(f"ray{RAY_VERSION}", "ray2.9.0")


def _int_start_param(spec):
    next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu")["rayStartParams"]["num-cpus"] = 30


@pytest.mark.parametrize(
    "mutate",
    [
        _literal_token,
        _no_auth_mode,
        _gpu_count_off,
        _num_gpus_off,
        _replicas_off,
        _request_over_limit,
        _head_gpu,
        _old_image,
        _int_start_param,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_kuberay_checks_refuse_broken_copies(raycluster, mutate):
    spec = copy.deepcopy(raycluster["spec"])
    mutate(spec)
    with pytest.raises(AssertionError):
        check_cluster_spec(spec, "broken RayCluster")


def test_the_edm2_xxl_group_is_sized_by_the_planner(aws, raycluster):
    """jobs/configs/edm2_imagenet.yaml on cluster/aws.yaml's gpu_xxl group (and KubeRay's gpu-xxl): the planner,
    asked for that run's micro-batch and global batch on those GPUs, picks the config's ZeRO stage and
    checkpointing, on no more nodes than the group may scale to."""
    import yaml

    from ambient_ray.train.planner import PlanConfig, plan

    with open(ROOT / "jobs" / "configs" / "edm2_imagenet.yaml") as f:
        job = yaml.safe_load(f)
    group = aws["available_node_types"]["gpu_xxl"]
    gpus = group["resources"]["GPU"]
    assert group["node_config"]["InstanceType"] == "p5.48xlarge" and gpus == 8  # 8 x H100 80 GB
    k8s = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}["gpu-xxl"]
    assert int(k8s["rayStartParams"]["num-gpus"]) == gpus and k8s["maxReplicas"] == group["max_workers"]
    nodes = job["num_workers"] // gpus
    p = plan(
        PlanConfig(
            model=job["model"]["preset"],
            gpus=gpus,
            gpu_mem=80,
            batch=job["batch_size"],
            global_batch=job["num_workers"] * job["batch_size"],
            nodes=nodes,
            ema=job["ema"],
        )
    )
    assert p.choice is not None and nodes <= group["max_workers"]
    assert (p.choice.stage, p.choice.checkpoint) == (job["zero_stage"], job["model"]["checkpoint_blocks"])


def _group_comment(path: Path, name: str) -> str:
    """The layout comment of worker group ``name`` at the top of a cluster file: its ``#   name`` entry and the
    indented lines after it, joined."""
    lines, out = path.read_text().splitlines(), []
    for line in lines:
        if out and (not line.startswith("#  ") or re.match(r"#   \S", line)):
            break
        if out or re.match(rf"#   {re.escape(name)}\s", line):
            out.append(line.lstrip("#").strip())
    return " ".join(out)


def test_the_text_to_image_group_is_sized_by_the_planner(aws, raycluster):
    """cluster/aws.yaml's gpu_t2i group (and KubeRay's gpu-t2i) for microdit-xl-2 at 256² (32x32x4 latents), 75%
    patch masking and MicroDiT's global batch 2048: the planner fits one run on the group's nodes, and the figures
    the groups' comments quote (ZeRO stage, per-GPU GiB, accumulation) are the planner's."""
    from ambient_ray.train.planner import GIB, PlanConfig, plan

    group = aws["available_node_types"]["gpu_t2i"]
    gpus = group["resources"]["GPU"]
    assert group["node_config"]["InstanceType"] == "p5.48xlarge" and gpus == 8  # 8 x H100 80 GB
    k8s = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}["gpu-t2i"]
    assert int(k8s["rayStartParams"]["num-gpus"]) == gpus and k8s["maxReplicas"] == group["max_workers"]
    cfg = PlanConfig(
        model="microdit-xl-2", gpus=gpus, gpu_mem=80, batch=128, global_batch=2048, mask_ratio=0.75, resolution=32
    )
    p = plan(cfg)
    assert p.meta["model"]["in_channels"] == 4 and p.tokens == 64  # 256 latent patches, a quarter kept
    ch = p.choice
    assert ch is not None and ch.nodes <= group["max_workers"]
    accum = 2048 // (cfg.batch * gpus * ch.nodes)
    budget = cfg.gpu_mem * (1 - cfg.headroom)
    command = (
        "ambient-ray plan --model microdit-xl-2 --gpus 8 --gpu-mem 80 --batch 128 --global-batch 2048 --mask-ratio 0.75"
    )
    for path, name in ((AWS, "gpu_t2i"), (KUBERAY / "raycluster.yaml", "gpu-t2i")):
        text = _group_comment(path, name)
        assert command in text, f"{path.name} {name}: the plan command"
        assert f"ZeRO-{ch.stage}" in text and f"{ch.total / GIB:.1f} of {budget:.0f} GiB" in text, (path.name, text)
        assert ("no activation checkpointing" in text) != ch.checkpoint, (path.name, text)
        assert f"grad_accum{'=' if path == AWS else ' '}{accum}" in text, (path.name, text)
    assert f"{ch.nodes} node" in _group_comment(AWS, "gpu_t2i") and f"{ch.nodes} pod" in _group_comment(
        KUBERAY / "raycluster.yaml", "gpu-t2i"
    )
