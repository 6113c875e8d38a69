"""cluster/: the launcher YAMLs pass Ray's own schema and `ray up` checks, the KubeRay manifests have the
structure the operator needs, and the commands and config keys the docs cite exist. No Ray is started."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from sarlang_ray.config import WorkflowConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
SCHEMA_PATH = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
SCHEMA = json.loads(Path(SCHEMA_PATH).read_text())

# What each machine type has, so declared resources can be checked against it: (vCPUs, GPUs, Ray's
# accelerator_type of the GPU). A new machine type in a launcher YAML needs its row here.
MACHINES = {
    "m7i.2xlarge": (8, 0, None),
    "m7i.4xlarge": (16, 0, None),
    "g5.2xlarge": (8, 1, "A10G"),
    "g5.12xlarge": (48, 4, "A10G"),
    "p4d.24xlarge": (96, 8, "A100"),
    "n2-standard-8": (8, 0, None),
    "n2-standard-16": (16, 0, None),
    "g2-standard-8": (8, 1, "L4"),
    "a2-highgpu-8g": (96, 8, "A100"),
}
GCP_ACCELERATORS = {"nvidia-l4": "L4", "nvidia-tesla-a100": "A100"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def machine_type(node_type: dict) -> str:
    node_config = node_type["node_config"]
    return node_config.get("InstanceType") or node_config["machineType"]


def workers(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


# ---- cluster launcher YAMLs (ray up) ----


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_ray_schema(name):
    jsonschema.validate(load(name), SCHEMA)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_ray_up_checks(name):
    """What `ray up` does before it calls the cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(name)))


BREAKAGES = {
    "misspelled top-level key": lambda c: c.update(max_worker=c.pop("max_workers")),
    "fractional GPU resource": lambda c: c["available_node_types"]["gpu_annotate"]["resources"].update(
        GPU=0.5
    ),
    "node type without node_config": lambda c: c["available_node_types"]["cpu_tile"].pop("node_config"),
    "unknown node type field": lambda c: c["available_node_types"]["cpu_tile"].update(min_worker=0),
    "negative max_workers": lambda c: c.update(max_workers=-1),
    "start commands not a list": lambda c: c.update(head_start_ray_commands="ray start --head"),
}


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_schema_rejects_a_broken_copy(name, breakage):
    """The schema check bites: each of these edits makes the YAML invalid."""
    broken = copy.deepcopy(load(name))
    BREAKAGES[breakage](broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_scales_from_zero_within_limits(name):
    cfg = load(name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no task lands on it"
    assert head.get("max_workers", 0) == 0
    types = workers(cfg)
    assert {"cpu_tile", "gpu_annotate", "gpu_train"} <= set(types)
    for type_name, t in types.items():
        assert t.get("min_workers") == 0, f"{type_name}: min_workers must be 0 (autoscale from zero)"
        assert t.get("max_workers", 0) >= 1, f"{type_name}: max_workers must be set"
    total = sum(t["max_workers"] for t in types.values())
    assert total <= cfg["max_workers"], f"per-type max_workers add up to {total} > {cfg['max_workers']}"
    assert cfg["upscaling_speed"] > 0 and cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_declared_resources_match_the_machines(name):
    cfg = load(name)
    for type_name, t in cfg["available_node_types"].items():
        machine = machine_type(t)
        assert machine in MACHINES, f"{type_name}: add {machine} (vCPUs, GPUs, accelerator) to MACHINES"
        vcpus, gpus, accelerator = MACHINES[machine]
        res = t["resources"]
        assert res.get("CPU", 0) <= vcpus, f"{type_name}: declares more CPUs than {machine} has"
        assert res.get("GPU", 0) == gpus, f"{type_name}: {machine} has {gpus} GPUs, not {res.get('GPU', 0)}"
        accel = {k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")}
        assert accel == ({accelerator} if accelerator else set()), f"{type_name}: accelerator_type {accel}"
        for acc in t["node_config"].get("guestAccelerators", []):  # GCP: the list must agree too
            assert GCP_ACCELERATORS[acc["acceleratorType"]] == accelerator
            assert acc["acceleratorCount"] == gpus
        if gpus and "machineType" in t["node_config"]:  # GCP GPU VMs cannot live-migrate
            assert t["node_config"].get("scheduling", {}).get("onHostMaintenance") == "TERMINATE", type_name
    gpu_types = [n for n, t in workers(cfg).items() if t["resources"].get("GPU", 0) > 0]
    assert sorted(gpu_types) == ["gpu_annotate", "gpu_train"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_project_and_disables_usage_stats(name):
    cfg = load(name)
    ray_major_minor = ".".join(ray.__version__.split(".")[:2])
    images = [cfg["docker"]["image"], cfg["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in cfg["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray_major_minor}."), f"{image} is not Ray {ray_major_minor}"
    # the repository is mounted and installed on every node (head, default workers, per-type overrides)
    assert cfg["file_mounts"] == {"~/sarlang-ray": "."}
    assert {".git", ".venv", "runs"} <= set(cfg["rsync_exclude"])
    lists = [cfg["head_setup_commands"], cfg["worker_setup_commands"]]
    lists += [t["worker_setup_commands"] for t in workers(cfg).values() if "worker_setup_commands" in t]
    for commands in lists:
        assert any("pip install" in c and "-e ~/sarlang-ray" in c for c in commands)
    for t_name, t in workers(cfg).items():  # GPU nodes get CUDA torch, CPU nodes the CPU build
        commands = t.get("worker_setup_commands", cfg["worker_setup_commands"])
        torch_line = next(c for c in commands if "torch==" in c)
        assert ("whl/cpu" in torch_line) == (t["resources"].get("GPU", 0) == 0), t_name
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_USAGE_STATS_ENABLED=0" in c for c in starts)


def all_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return {str(k).lower() for k in node} | {k for v in node.values() for k in all_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in all_keys(v)}
    return set()


@pytest.mark.parametrize("name", [*LAUNCHERS, "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_no_credentials_in_cluster_files(name):
    """Credentials come from the standard chains (laptop) and instance profiles / service accounts (nodes)."""
    text = (CLUSTER / name).read_text()
    keys = all_keys(yaml.safe_load(text))
    forbidden = {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "ssh_private_key",
        "gcp_credentials",
        "credentials",
        "secretaccesskey",
        "api_key",
    }
    assert not keys & forbidden, f"{name} sets {sorted(keys & forbidden)}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{name} holds an AWS access key id"
    assert "PRIVATE KEY-----" not in text, f"{name} holds a private key"


# ---- KubeRay manifests (no CRD schema offline: check the structure the operator relies on) ----


def kuberay_problems(spec: dict) -> list[str]:
    """What is wrong with a RayCluster spec (also the rayClusterSpec of a RayJob); empty when fine."""
    problems = []
    ray_major_minor = ".".join(ray.__version__.split(".")[:2])
    version = str(spec.get("rayVersion", ""))
    if ".".join(version.split(".")[:2]) != ray_major_minor:
        problems.append(f"rayVersion {version!r} is not the installed Ray {ray.__version__}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec") or {}
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams.num-cpus must be "0" (a string)')
    containers = list(head.get("template", {}).get("spec", {}).get("containers", []))
    if not containers:
        problems.append("headGroupSpec has no containers")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no workerGroupSpecs")
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names) or None in names:
        problems.append(f"groupName missing or repeated: {names}")
    gpu_groups = 0
    for g in groups:
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        if not (all(isinstance(x, int) for x in (lo, n, hi)) and 0 == lo <= n <= hi and hi >= 1):
            problems.append(f"{g.get('groupName')}: need minReplicas 0 <= replicas <= maxReplicas (>= 1)")
        if "rayStartParams" not in g:
            problems.append(f"{g.get('groupName')}: rayStartParams is required (may be empty)")
        pod = g.get("template", {}).get("spec", {})
        group_containers = pod.get("containers", [])
        containers += group_containers
        gpus = [
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in group_containers
        ]
        if any(gpus):
            gpu_groups += 1
            if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                problems.append(f"{g.get('groupName')}: GPU pods need the nvidia.com/gpu toleration")
    if not gpu_groups:
        problems.append("no worker group whose container limits include nvidia.com/gpu")
    for c in containers:
        if version not in c.get("image", ""):
            problems.append(f"image {c.get('image')!r} does not carry rayVersion {version}")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if env.get("RAY_USAGE_STATS_ENABLED") != "0":
            problems.append(f'{c.get("name")}: RAY_USAGE_STATS_ENABLED must be "0"')
    return problems


def test_raycluster_structure():
    doc = load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert kuberay_problems(doc["spec"]) == []


def test_rayjob_structure():
    doc = load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert kuberay_problems(spec["rayClusterSpec"]) == []
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert {".git", ".venv", "runs"} <= set(runtime_env["excludes"])


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s["workerGroupSpecs"][0].update(minReplicas=1),
        lambda s: s["workerGroupSpecs"][0].update(replicas=99),
        lambda s: s.update(rayVersion="2.9.3"),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda s: [
            c["resources"]["limits"].pop("nvidia.com/gpu", None)
            for g in s["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        ],
    ],
)
def test_kuberay_check_rejects_a_broken_copy(breakage):
    spec = copy.deepcopy(load("kuberay-raycluster.yaml")["spec"])
    breakage(spec)
    assert kuberay_problems(spec)


# ---- the commands and config keys that the manifests and docs cite ----


def check_sarlang_command(command: str) -> None:
    """`sarlang run WORKFLOW key=value ...`: the workflow exists and the overrides load (keys and types)."""
    args = shlex.split(command)
    assert args[:2] == ["sarlang", "run"], command
    workflow = REPO / args[2]
    assert workflow.is_file() and workflow.parent == REPO / "workflows", f"{args[2]} is not in workflows/"
    # the docs' placeholder bucket is refused as it is (test_presets_refuse_the_placeholder_bucket): a user's
    # works
    load_config(str(workflow), [a.replace("YOUR_BUCKET", "my-bucket") for a in args[3:]])


@pytest.mark.parametrize("preset", ["qwen2vl-2b.yaml", "qwen25vl-7b.yaml", "llava15-7b.yaml"])
def test_presets_refuse_the_placeholder_bucket_until_it_is_set(preset):
    """GPU presets run on clusters, where a local run_dir would scatter shards over the nodes' disks."""
    from sarlang_ray.config import ConfigError

    with pytest.raises(ConfigError, match="placeholder bucket"):
        load_config(str(REPO / "workflows" / preset))
    assert (
        load_config(str(REPO / "workflows" / preset), ["run.run_dir=s3://my-bucket/runs/x"]).run.run_dir
        == "s3://my-bucket/runs/x"
    )


def test_rayjob_entrypoint_runs_an_existing_workflow():
    check_sarlang_command(load("kuberay-rayjob.yaml")["spec"]["entrypoint"])


def documented_job_commands(text: str) -> list[str]:
    """The entrypoints (after `--`) of every `ray job submit` in the text, continuation lines joined."""
    text = text.replace("\\\n", " ")
    return [
        line.split(" -- ", 1)[1].strip()
        for line in text.splitlines()
        if "ray job submit" in line and " -- " in line
    ]


@pytest.mark.parametrize("doc", ["cluster/README.md", "docs/scaling.md"])
def test_documented_job_commands_load(doc):
    commands = documented_job_commands((REPO / doc).read_text())
    assert commands, f"{doc} shows no `ray job submit ... -- sarlang run ...`"
    for command in commands:
        check_sarlang_command(command)


def config_has(dotted: str) -> bool:
    node: object = WorkflowConfig()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


SECTIONS = "|".join(f.name for f in dataclasses.fields(WorkflowConfig))
KEY = re.compile(rf"^({SECTIONS})\.([a-z_][a-z0-9_.]*?)(=.*)?$")


@pytest.mark.parametrize("doc", ["cluster/README.md", "docs/scaling.md"])
def test_documented_config_keys_exist(doc):
    text = (REPO / doc).read_text()
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)
    keys = set()
    for span in spans:
        for token in span.split():
            match = KEY.match(token.strip("'\",;()"))
            if match and not re.search(r"(^|\.)(py|yaml|md|json|txt)$", match.group(2)):  # file names
                keys.add(f"{match.group(1)}.{match.group(2)}")
    assert keys, f"{doc} cites no config keys"
    missing = sorted(k for k in keys if not config_has(k))
    assert not missing, f"{doc} cites keys that sarlang_ray/config.py does not have: {missing}"


def test_key_check_bites():
    assert config_has("tile.concurrency") and config_has("annotate.hf.model")
    assert not config_has("tile.num_gpu") and not config_has("annotate.concurency")
