"""The gRPC face over real channels on loopback: the same engine and results as REST."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_support import LESION_TASK, held_service_app, metric_value, running_service, service_settings
from test_errors import damage_tiles
from typer.testing import CliRunner

from xmag.cli import app as cli_app
from xmag.service.grpc_api import classifier_pb2 as pb
from xmag.service.grpc_api import classifier_pb2_grpc as pb_grpc
from xmag.service.rest import create_app

API_KEY = "grpc-test-key-0123456789"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(lesion_model):
    """(REST base URL, gRPC target) of one service on the lesion model."""
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[lesion_model.slides_dir],
        max_batch_size=64,
        read_batch_size=8,
        max_batch_wait_ms=20,
        max_concurrent_slides=4,
    )
    app = create_app(settings)
    with running_service(app) as base_url:
        yield base_url, f"127.0.0.1:{app.state.grpc_port}"


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served[1]) as channel:
        yield pb_grpc.SlideClassifierStub(channel)


def request_for(path, **fields) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(slide_path=str(path), **fields)


def test_the_same_slide_gives_the_same_result_over_rest_and_every_rpc(served, stub, lesion_model):
    path = lesion_model.lesion_slide.path
    rest = httpx.post(
        f"{served[0]}/v1/classify", json={"slide_path": str(path), "return_attention": True}, timeout=120
    ).json()
    unary = stub.Classify(request_for(path, return_attention=True), timeout=120)
    streamed = list(stub.ClassifyStream(request_for(path, return_attention=True), timeout=120))[-1].result
    many = list(
        stub.ClassifyMany(
            iter([pb.ClassifyManyRequest(correlation_id="one", request=request_for(path, return_attention=True))]),
            timeout=120,
        )
    )
    assert [answer.correlation_id for answer in many] == ["one"]
    coords = np.asarray(rest["attention"]["level0_coords"])
    weights = np.asarray(rest["attention"]["weights"][LESION_TASK])
    for result in (unary, streamed, many[0].result):
        assert result.slide.tile_count == rest["slide"]["tile_count"] == len(coords)
        assert (result.slide.width_px, result.slide.read_level) == (
            rest["slide"]["width_px"],
            rest["slide"]["read_level"],
        )
        assert result.model.manifest_sha256 == rest["model"]["manifest_sha256"] and result.model.kind == "trained"
        prediction = result.predictions[LESION_TASK]
        assert prediction.label == rest["predictions"][LESION_TASK]["label"] == "lesion"
        for name, probability in rest["predictions"][LESION_TASK]["probabilities"].items():
            assert prediction.probabilities[name] == pytest.approx(probability, abs=1e-4)
        np.testing.assert_array_equal(np.asarray(result.tiles.level0_xy).reshape(-1, 2), coords)
        assert result.tiles.tile_size_level0_px == rest["attention"]["tile_size_level0_px"]
        np.testing.assert_allclose(np.asarray(prediction.attention), weights, atol=1e-4)
        assert result.timings_s.total > 0
    # Without return_attention the result carries no tiles and no weights.
    plain = stub.Classify(request_for(path), timeout=120)
    assert not plain.tiles.level0_xy and not plain.predictions[LESION_TASK].attention


def test_classify_stream_reports_progress_then_the_result(stub, lesion_model):
    events = list(stub.ClassifyStream(request_for(lesion_model.normal_slide.path), timeout=120))
    progress = [event.progress for event in events[:-1]]
    assert all(event.HasField("progress") for event in events[:-1]) and events[-1].HasField("result")
    total = events[-1].result.slide.tile_count
    stages = [p.stage for p in progress]
    assert stages[:2] == [pb.Progress.OPENED, pb.Progress.TILES_PLANNED] and stages[-1] == pb.Progress.HEADS_DONE
    encoded = [p.tiles_done for p in progress if p.stage == pb.Progress.TILES_ENCODED]
    assert encoded == sorted(encoded) and encoded[-1] == total and len(encoded) == -(-total // 8)
    assert progress[1].tiles_total == total


def test_classify_many_answers_every_slide_and_keeps_the_stream_open(stub, lesion_model, tmp_path):
    damaged = lesion_model.slides_dir / "grpc_damaged.svs"
    damage_tiles(lesion_model.normal_slide.path, damaged, page_index=2, first_tile=0, keep_bytes=0)
    outside = tmp_path / "outside.svs"
    shutil.copy(lesion_model.normal_slide.path, outside)
    expected_labels = {}
    items = []
    for index in range(8):
        slide = lesion_model.lesion_slide if index % 2 else lesion_model.normal_slide
        expected_labels[f"good-{index}"] = "lesion" if index % 2 else "normal"
        items.append(pb.ClassifyManyRequest(correlation_id=f"good-{index}", request=request_for(slide.path)))
    items.insert(3, pb.ClassifyManyRequest(correlation_id="corrupt", request=request_for(damaged)))
    items.insert(7, pb.ClassifyManyRequest(correlation_id="outside", request=request_for(outside)))

    answers = list(stub.ClassifyMany(iter(items), timeout=300))  # raises if the stream ended with an error
    by_id = {answer.correlation_id: answer for answer in answers}
    assert len(answers) == 10 and set(by_id) == set(expected_labels) | {"corrupt", "outside"}
    for correlation_id, label in expected_labels.items():
        assert by_id[correlation_id].result.predictions[LESION_TASK].label == label
    corrupt, forbidden = by_id["corrupt"].error, by_id["outside"].error
    assert (corrupt.grpc_status, corrupt.code) == ("INVALID_ARGUMENT", "corrupt_slide")
    assert corrupt.grpc_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (forbidden.grpc_status, forbidden.code) == ("PERMISSION_DENIED", "slide_path_forbidden")
    assert "outside the directories this service may read" in forbidden.message


def test_error_statuses_carry_the_rest_messages(served, stub, lesion_model):
    def failure(request) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(request, timeout=60)
        return raised.value

    def rest_message(body) -> str:
        return httpx.post(f"{served[0]}/v1/classify", json=body, timeout=60).json()["error"]["message"]

    missing = failure(request_for(lesion_model.slides_dir / "nope.svs"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert missing.details() == rest_message({"slide_path": str(lesion_model.slides_dir / "nope.svs")})
    assert dict(missing.trailing_metadata())["xmag-error-code"] == "slide_not_found"

    forbidden = failure(request_for("/etc/hosts"))
    assert forbidden.code() == grpc.StatusCode.PERMISSION_DENIED
    assert forbidden.details() == rest_message({"slide_path": "/etc/hosts"})

    unknown_task = failure(request_for(lesion_model.normal_slide.path, tasks=["grade"]))
    assert (
        unknown_task.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "unknown task(s) ['grade']" in unknown_task.details()
    )

    bad_mpp = failure(request_for(lesion_model.normal_slide.path, mpp=-1))
    assert bad_mpp.code() == grpc.StatusCode.INVALID_ARGUMENT and "mpp must be in" in bad_mpp.details()

    (lesion_model.slides_dir / "grpc_notes.svs").write_text("not a slide")
    not_a_slide = failure(request_for(lesion_model.slides_dir / "grpc_notes.svs"))
    assert not_a_slide.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(not_a_slide.trailing_metadata())["xmag-error-code"] == "not_a_slide"

    # The explicit message size limit (4 MiB by default) refuses an oversized request.
    too_big = failure(request_for("x" * (5 * 1024 * 1024)))
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_list_models(stub):
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert models.model.name == "tiny_lesion" and models.model.kind == "trained"
    assert [(task.name, list(task.class_names)) for task in models.tasks] == [(LESION_TASK, ["normal", "lesion"])]
    assert models.tile_size_px == 224 and models.target_mpp == 2.0


def test_health_and_reflection_answer(served):
    with grpc.insecure_channel(served[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xmag.v1.SlideClassifier"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflected = ProtoReflectionDescriptorDatabase(channel)
        assert "xmag.v1.SlideClassifier" in reflected.get_services()
        described = reflected.FindFileContainingSymbol("xmag.v1.ClassifyManyRequest")
        assert described.name == "xmag/v1/classifier.proto" and described.package == "xmag.v1"


def test_grpc_requests_share_the_rest_metrics(served, stub, lesion_model):
    stub.Classify(request_for(lesion_model.normal_slide.path), timeout=120)
    text = httpx.get(f"{served[0]}/metrics").text
    assert 'xmag_requests_total{endpoint="Classify",protocol="grpc",status="OK"}' in text
    assert 'protocol="rest"' in text and metric_value(text, "xmag_slides_total", 'outcome="ok"') >= 1


def test_cancelling_a_stream_frees_its_work(lesion_model):
    app, held = held_service_app(lesion_model, max_concurrent_slides=1)
    with running_service(app) as base_url, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        stub = pb_grpc.SlideClassifierStub(channel)

        def metrics() -> str:
            return httpx.get(f"{base_url}/metrics").text

        def wait_for(name: str, value: float) -> float:
            deadline = time.monotonic() + 5
            while metric_value(metrics(), name) != value:
                assert time.monotonic() < deadline, f"{name} did not return to {value} promptly"
                time.sleep(0.05)
            return 5 - (deadline - time.monotonic())

        held.gate.clear()
        running = stub.ClassifyStream(request_for(lesion_model.lesion_slide.path), timeout=120)
        stages = []
        for event in running:  # read until the slide is mid-encode
            stages.append(event.progress.stage)
            if event.progress.stage == pb.Progress.TILES_PLANNED:
                break
        queued = stub.ClassifyStream(request_for(lesion_model.normal_slide.path), timeout=120)
        wait_for("xmag_queue_depth", 1)
        queued.cancel()
        queue_freed_s = wait_for("xmag_queue_depth", 0)
        running.cancel()
        inflight_freed_s = wait_for("xmag_inflight_slides", 0)
        wait_for("xmag_scheduler_pending_tiles", 0)
        print(f"freed after cancel: queued slide {queue_freed_s:.2f} s, running slide {inflight_freed_s:.2f} s")
        held.gate.set()
        assert metric_value(metrics(), "xmag_slides_total", 'outcome="cancelled"') == 2
        assert stages == [pb.Progress.OPENED, pb.Progress.TILES_PLANNED]
        # The engine carries on with the next slide.
        assert stub.Classify(request_for(lesion_model.normal_slide.path), timeout=120).slide.tile_count > 0


def test_an_expired_deadline_is_deadline_exceeded_and_frees_the_slide(lesion_model):
    app, held = held_service_app(lesion_model, max_concurrent_slides=1)
    with running_service(app) as base_url, grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        stub = pb_grpc.SlideClassifierStub(channel)
        held.gate.clear()
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(request_for(lesion_model.normal_slide.path), timeout=1.0)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while metric_value(httpx.get(f"{base_url}/metrics").text, "xmag_inflight_slides") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held.gate.set()
        assert stub.Classify(request_for(lesion_model.normal_slide.path), timeout=120).slide.tile_count > 0


def test_a_slide_over_the_tile_cap_is_resource_exhausted(lesion_model):
    app, _ = held_service_app(lesion_model, max_tiles_per_slide=5)
    with running_service(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.SlideClassifierStub(channel).Classify(request_for(lesion_model.normal_slide.path), timeout=60)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cap of 5 tiles per slide" in raised.value.details()


def test_a_missing_or_wrong_api_key_is_unauthenticated(lesion_model):
    app, _ = held_service_app(lesion_model, api_keys=[API_KEY])
    with running_service(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        stub = pb_grpc.SlideClassifierStub(channel)
        request = request_for(lesion_model.normal_slide.path)
        calls = {
            "Classify": lambda metadata: stub.Classify(request, metadata=metadata, timeout=60),
            "ClassifyStream": lambda metadata: list(stub.ClassifyStream(request, metadata=metadata, timeout=60)),
            "ClassifyMany": lambda metadata: list(
                stub.ClassifyMany(
                    iter([pb.ClassifyManyRequest(correlation_id="a", request=request)]), metadata=metadata, timeout=60
                )
            ),
            "ListModels": lambda metadata: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=60),
        }
        for name, call in calls.items():
            for metadata in (None, (("authorization", "Bearer wrong-key-0123456789"),), (("authorization", API_KEY),)):
                with pytest.raises(grpc.RpcError) as raised:
                    call(metadata)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert "authorization: Bearer <key>" in raised.value.details()
            call((("authorization", f"Bearer {API_KEY}"),))
        # Health checking needs no key: probes carry no slide data.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_lis_client_streams_a_folder(served, lesion_model, tmp_path):
    folder = tmp_path / "incoming"
    (folder / "case-7").mkdir(parents=True)
    shutil.copy(lesion_model.lesion_slide.path, folder / "case-7" / "a.svs")
    shutil.copy(lesion_model.normal_slide.path, folder / "b.svs")
    (folder / "notes.txt").write_text("not a slide, not sent")
    # The service reads slides only under its roots; the client maps its folder to where the server sees it.
    server_view = lesion_model.slides_dir / "lis_incoming"
    shutil.copytree(folder, server_view)
    damage_tiles(lesion_model.normal_slide.path, folder / "c.svs", page_index=2, keep_bytes=0)
    damage_tiles(lesion_model.normal_slide.path, server_view / "c.svs", page_index=2, keep_bytes=0)

    result = CliRunner().invoke(
        cli_app,
        [
            "lis-client",
            str(folder),
            "--target",
            served[1],
            "--out",
            str(tmp_path / "results"),
            "--server-folder",
            str(server_view),
        ],
    )
    assert result.exit_code == 1, result.output  # one slide failed
    assert "2 classified, 1 failed" in result.output and "failed: c.svs" in result.output
    written = sorted(path.name for path in (tmp_path / "results").iterdir())
    assert written == ["b.svs.json", "c.svs.json", "case-7__a.svs.json"]
    import json

    lesion = json.loads((tmp_path / "results/case-7__a.svs.json").read_text())
    assert lesion["status"] == "ok" and lesion["correlation_id"] == "case-7/a.svs"
    assert lesion["result"]["predictions"][LESION_TASK]["label"] == "lesion"
    corrupt = json.loads((tmp_path / "results/c.svs.json").read_text())
    assert corrupt["status"] == "error" and corrupt["error"]["code"] == "corrupt_slide"


def test_lis_client_reports_an_unreachable_service(tmp_path, lesion_model):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(lesion_model.normal_slide.path, folder / "b.svs")
    result = CliRunner().invoke(
        cli_app, ["lis-client", str(folder), "--target", "127.0.0.1:9", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "ended with UNAVAILABLE" in result.output


def test_the_generated_grpc_code_is_current():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto/generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
