"""A lab-information-system client: stream a folder of slides through ClassifyMany, one JSON result per slide.

This is the template an LIS integrator starts from (`xmag lis-client`). It
sends every slide of a folder on one bidirectional stream with its relative
path as the correlation id, and writes each answer, result or error, as it
arrives (completion order). Files are written whole (temporary file, then
rename), so an interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from xmag.service.errors import LisClientError
from xmag.service.grpc_api import classifier_pb2 as pb
from xmag.service.grpc_api import classifier_pb2_grpc as pb_grpc
from xmag.service.grpc_messages import result_document
from xmag.slide.listing import SLIDE_SUFFIXES, find_slide_files

# Formats OpenSlide reads; other files in the folder are left alone.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class StreamSummary:
    classified: list[str] = field(default_factory=list)  # correlation ids (relative paths)
    failed: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def find_slides(folder: Path) -> list[Path]:
    """Slide files under `folder` (recursively), sorted, as paths relative to it."""
    try:
        return find_slide_files(folder)
    except NotADirectoryError as error:
        raise LisClientError(str(error)) from None


def result_file_name(relative_path: Path) -> str:
    """One flat file name per slide: 'case1/a.svs' -> 'case1__a.svs.json'."""
    return "__".join(relative_path.parts) + ".json"


def classify_folder(
    target: str,
    folder: Path,
    output_dir: Path,
    *,
    server_folder: str | None = None,
    api_key: str | None = None,
    tasks: list[str] | None = None,
    return_attention: bool = False,
    timeout_s: float | None = None,
    on_answer: Callable[[pb.ClassifyManyResponse], None] | None = None,
) -> StreamSummary:
    """Stream every slide of `folder` to the service at `target` and write one JSON per slide to `output_dir`.

    `server_folder` is where the service sees `folder` (the same path by
    default, e.g. one share mounted alike on both machines).
    """
    slides = find_slides(folder)
    if not slides:
        raise LisClientError(f"no slide files ({', '.join(sorted(SLIDE_SUFFIXES))}) under {folder}")
    server_root = Path(server_folder) if server_folder else folder.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def requests() -> Iterator[pb.ClassifyManyRequest]:
        for relative in slides:
            request = pb.ClassifyRequest(
                slide_path=str(server_root / relative), tasks=tasks or [], return_attention=return_attention
            )
            if timeout_s is not None:
                request.timeout_s = timeout_s
            yield pb.ClassifyManyRequest(correlation_id=relative.as_posix(), request=request)

    summary = StreamSummary()
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.SlideClassifierStub(channel)
        try:
            for answer in stub.ClassifyMany(requests(), metadata=metadata, wait_for_ready=False):
                relative = Path(answer.correlation_id)
                # A classified slide's "result" is the slide result schema, as REST answers and `xmag classify` writes.
                document: dict = {"correlation_id": answer.correlation_id}
                if answer.HasField("result"):
                    document |= {"status": "ok", "result": result_document(answer.result).model_dump(mode="json")}
                else:
                    error = json_format.MessageToDict(answer.error, preserving_proto_field_name=True)
                    document |= {"status": "error", "error": error}
                summary.written.append(_write_whole(output_dir / result_file_name(relative), document))
                (summary.classified if answer.HasField("result") else summary.failed).append(answer.correlation_id)
                if on_answer is not None:
                    on_answer(answer)
        except grpc.RpcError as error:
            raise LisClientError(
                f"the stream to {target} ended with {error.code().name}: {error.details()} "
                f"({len(summary.written)} of {len(slides)} slides answered before)"
            ) from None
    missing = {relative.as_posix() for relative in slides} - set(summary.classified) - set(summary.failed)
    if missing:
        raise LisClientError(
            f"the service closed the stream without answering {len(missing)} slide(s), e.g. {sorted(missing)[0]}"
        )
    return summary


def _write_whole(path: Path, document: dict) -> Path:
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")
    os.replace(partial, path)
    return path
