"""A real Prometheus (Debian's) scrapes a real service with the project's scrape config, and every
PromQL expression of the Grafana dashboard is evaluated through Prometheus's HTTP API."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from service_support import running_service, service_settings

from xmag.service.demo import free_loopback_port
from xmag.service.metrics import GpuCollector
from xmag.service.rest import create_app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "xmag.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
# The test scrapes every second and looks back a minute, so a few slides give every rate two samples.
TEST_SCRAPE_INTERVAL = "1s"
TEST_RATE_WINDOW = "1m"


def debian_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `make test` installs Debian's prometheus package (make deploy-tools)")
    return path


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's variables replaced as Grafana would at 'All'."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"].replace("$__rate_interval", TEST_RATE_WINDOW).replace("$instance", ".*")
            found.append((panel["title"], expression))
    return found


def reads_a_gpu(expression: str) -> bool:
    """Whether the expression has data only where NVML sees a GPU (xmag_gpu_devices is there on every box)."""
    return "xmag_gpu_" in expression and "xmag_gpu_devices" not in expression


@contextlib.contextmanager
def running_prometheus(config_path: Path, data_dir: Path) -> Iterator[str]:
    """Debian's prometheus on a free loopback port; yields its base URL once ready; stops it."""
    port = free_loopback_port()
    log_path = data_dir / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                debian_tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus was not ready within 30 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(prometheus_url: str, expression: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expression}: {body}"
    return body["data"]["result"]


def wait_for_target_up(prometheus_url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if query(prometheus_url, 'up{job="xmag"} == 1'):
            return
        time.sleep(0.2)
    targets = httpx.get(f"{prometheus_url}/api/v1/targets").json()
    pytest.fail(f"prometheus never scraped the service: {targets}")


@pytest.fixture(scope="module")
def scraped(lesion_model, tmp_path_factory):
    """A service with slides classified (and some refused) while Prometheus scraped it; yields Prometheus's URL."""
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[lesion_model.slides_dir],
        read_batch_size=8,
    )
    work_dir = tmp_path_factory.mktemp("prometheus")
    with running_service(create_app(settings)) as service_url:
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        for job in config["scrape_configs"]:
            job["scrape_interval"] = TEST_SCRAPE_INTERVAL
            job["scrape_timeout"] = TEST_SCRAPE_INTERVAL
        xmag_job = next(job for job in config["scrape_configs"] if job["job_name"] == "xmag")
        xmag_job["static_configs"] = [{"targets": [service_url.removeprefix("http://")]}]
        config_path = work_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        check = subprocess.run(
            [debian_tool("promtool"), "check", "config", str(config_path)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

        with running_prometheus(config_path, work_dir) as prometheus_url:
            wait_for_target_up(prometheus_url)
            slides = [lesion_model.normal_slide.path, lesion_model.lesion_slide.path] * 2
            for slide_path in slides:
                response = httpx.post(f"{service_url}/v1/classify", json={"slide_path": str(slide_path)}, timeout=120)
                assert response.status_code == 200, response.text
            # Failures, so that the error panels have series: a missing slide (a failed slide) and a refused path.
            assert httpx.post(f"{service_url}/v1/classify", json={"slide_path": "missing.svs"}).status_code == 404
            assert httpx.post(f"{service_url}/v1/classify", json={"slide_path": "/etc/passwd"}).status_code == 403
            time.sleep(3)  # a few more scrapes after the last slide
            yield prometheus_url


def test_the_project_scrape_config_passes_promtool():
    check = subprocess.run(
        [debian_tool("promtool"), "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_uses_the_provisioned_data_source():
    provisioned_uids = {source["uid"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used_uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    used_uids |= {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]}
    used_uids |= {variable["datasource"]["uid"] for variable in dashboard["templating"]["list"]}
    assert used_uids == provisioned_uids == {"xmag-prometheus"}
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


@pytest.mark.parametrize("title, expression", [item for item in dashboard_expressions() if not reads_a_gpu(item[1])])
def test_every_dashboard_expression_returns_data(scraped, title, expression):
    samples = query(scraped, expression)
    assert samples, f"panel {title!r}: no data for {expression}"
    values = [float(sample["value"][1]) for sample in samples]
    assert all(math.isfinite(value) for value in values), f"panel {title!r}: {expression} gave {values}"


def test_the_replica_variable_lists_the_service(scraped):
    response = httpx.get(f"{scraped}/api/v1/label/instance/values", params={"match[]": "xmag_ready"})
    assert len(response.json()["data"]) == 1


def test_gpu_panels(scraped):
    gpu_expressions = [item for item in dashboard_expressions() if reads_a_gpu(item[1])]
    assert len(gpu_expressions) == 3
    visible_gpus = float(query(scraped, "sum(xmag_gpu_devices)")[0]["value"][1])
    for title, expression in gpu_expressions:
        samples = query(scraped, expression)
        if visible_gpus:
            assert samples, f"panel {title!r}: no data for {expression}"
        else:
            assert samples == [], f"panel {title!r}: data without a GPU: {samples}"
    if not visible_gpus:
        pytest.skip(
            f"no NVIDIA GPU here ({GpuCollector().unavailable_reason}): the GPU panels were checked to be "
            "empty, not to return data"
        )
