"""The Triton backend: the exported encoder served by an NVIDIA Triton Inference Server, called over gRPC.

tritonclient is imported only inside the methods that use it, so this module
imports where it is not installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from xmag.contract import (
    EMBEDDING_DTYPE,
    EMBEDDING_OUTPUT,
    TILES_INPUT,
    TRITON_EMBEDDING_DATATYPE,
    TRITON_TILES_DATATYPE,
)
from xmag.errors import RetryLaterError
from xmag.runtimes.protocols import EncoderBackendUnavailableError, check_tiles

# gRPC channel options of the Triton client. No message size limit: a batch of 256 tiles is 38 MB (tritonclient's
# own default too, which these replace). A short reconnect backoff: gRPC's grows to 120 s while a server is down,
# and every slide fails at once until the channel reconnects, so a restarted Triton is tried again within 2 s.
_TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# How often the readiness wait asks Triton again, and the longest it waits for one answer.
_TRITON_POLL_S = 0.25
_TRITON_PROBE_TIMEOUT_S = 2.0


class EncoderRemoteError(RetryLaterError):
    """A remote encoder (a Triton Inference Server) failed, timed out or went away during a call.

    The slide fails, not the service: the server may come back, so callers are
    told to retry after `retry_after_s`.
    """

    code = "encoder_unavailable"


@dataclass(frozen=True)
class TritonEndpoint:
    """Where the `triton` backend finds the encoder: a Triton server's gRPC endpoint and the model's name there."""

    url: str  # "host:port"
    model_name: str | None = None  # None: the repository's fp32 ONNX encoder, by its name in the manifest
    timeout_s: float = 30.0  # for each inference call
    ready_timeout_s: float = 120.0  # for the server to be live with the model ready, at start


class TritonTileEncoder:
    """The exported encoder served by an NVIDIA Triton Inference Server, called over gRPC.

    At construction it waits up to `ready_timeout_s` (default: `timeout_s`) for
    the server at `url` ("host:port" of Triton's gRPC endpoint) to be live and
    `model_name` to be ready, then checks the model's tensors are those `xmag export` writes
    (uint8 NHWC tiles in, float32 embeddings out, batched); it raises
    EncoderBackendUnavailableError naming the url and the model otherwise.
    `encode` splits batches larger than the model's max_batch_size into
    requests Triton accepts; a request that fails or takes longer than
    `timeout_s` raises EncoderRemoteError. An instance serves one thread at a
    time (the service's encoder stage is one thread); `close` ends its channel.
    """

    backend = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        tile_size_px: int,
        embed_dim: int,
        *,
        precision: str = "fp32",
        input_name: str = TILES_INPUT,
        output_name: str = EMBEDDING_OUTPUT,
        timeout_s: float = 30.0,
        ready_timeout_s: float | None = None,
    ):
        try:
            from tritonclient.grpc import InferenceServerClient
        except ModuleNotFoundError as error:
            raise EncoderBackendUnavailableError(
                f"the triton backend needs tritonclient ({error}), which the [serve] extra installs: "
                "pip install 'xmag[serve]'"
            ) from error

        self.url = url
        self.model_name = model_name
        self.precision = precision
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        self.input_name = input_name
        self.output_name = output_name
        self.timeout_s = timeout_s
        self.description = f"triton {precision} ({model_name} at {url})"
        self._client = InferenceServerClient(url, channel_args=_TRITON_CHANNEL_ARGS)
        try:
            self._wait_until_ready(timeout_s if ready_timeout_s is None else ready_timeout_s)
            # Not named max_batch_size: the engine would cap its batches at that, and here they are split instead.
            self.triton_max_batch_size = self._check_model_interface()
        except BaseException:
            self._client.close()
            raise

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, D) float32, in requests of at most the model's max_batch_size, one after another."""
        check_tiles(tiles, self.tile_size_px)
        step = self.triton_max_batch_size
        parts = [self._infer(tiles[start : start + step]) for start in range(0, len(tiles), step)]
        if not parts:
            return np.empty((0, self.embed_dim), EMBEDDING_DTYPE)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        """Close the gRPC channel; later calls fail."""
        self._client.close()

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        request = InferInput(self.input_name, list(tiles.shape), TRITON_TILES_DATATYPE)
        request.set_data_from_numpy(np.ascontiguousarray(tiles))
        try:
            result = self._client.infer(
                self.model_name,
                [request],
                outputs=[InferRequestedOutput(self.output_name)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            raise EncoderRemoteError(
                f"Triton at {self.url} did not encode {len(tiles)} tiles with model {self.model_name!r} "
                f"(limit {self.timeout_s:g} s): {error}"
            ) from error
        embeddings = result.as_numpy(self.output_name)
        if embeddings is None or embeddings.shape != (len(tiles), self.embed_dim):
            shape = None if embeddings is None else embeddings.shape
            raise EncoderRemoteError(
                f"Triton at {self.url} answered {len(tiles)} tiles with {self.output_name!r} of shape {shape} "
                f"from model {self.model_name!r}, expected {(len(tiles), self.embed_dim)}"
            )
        return embeddings

    def _wait_until_ready(self, ready_timeout_s: float) -> None:
        """Return once the server is live and the model ready; EncoderBackendUnavailableError at the deadline."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + ready_timeout_s
        live, last_error = False, ""
        while True:
            wait_s = max(0.01, min(_TRITON_PROBE_TIMEOUT_S, deadline - time.monotonic()))
            try:
                live = self._client.is_server_live(client_timeout=wait_s)
                if live and self._client.is_model_ready(self.model_name, client_timeout=wait_s):
                    return
            except InferenceServerException as error:
                last_error = str(error)
            if time.monotonic() + _TRITON_POLL_S > deadline:
                break
            time.sleep(_TRITON_POLL_S)
        if not live:
            raise EncoderBackendUnavailableError(
                f"no Triton Inference Server answered at {self.url} within {ready_timeout_s:g} s"
                f"{f' ({last_error})' if last_error else ''}; triton_url must be host:port of Triton's gRPC "
                f"endpoint (8001 by default), and the server must be up"
            )
        raise EncoderBackendUnavailableError(
            f"Triton at {self.url} is live, but model {self.model_name!r} was not ready within "
            f"{ready_timeout_s:g} s: {self._model_state()}"
        )

    def _model_state(self) -> str:
        """What Triton's repository index says of the model, for an error message."""
        from tritonclient.utils import InferenceServerException

        try:
            index = self._client.get_model_repository_index(client_timeout=_TRITON_PROBE_TIMEOUT_S).models
        except InferenceServerException as error:
            return f"its model index could not be read ({error})"
        states = [
            f"{model.state or 'not loaded'}{f' ({model.reason})' if model.reason else ''}"
            for model in index
            if model.name == self.model_name
        ]
        if not states:
            return f"the server has no such model; it has {sorted({model.name for model in index})}"
        return "; ".join(states)

    def _check_model_interface(self) -> int:
        """The model's max_batch_size, once its tensors are those the export writes; EncoderBackendUnavailableError if not."""
        from tritonclient.utils import InferenceServerException

        try:
            metadata = self._client.get_model_metadata(self.model_name, client_timeout=self.timeout_s)
            config = self._client.get_model_config(self.model_name, client_timeout=self.timeout_s).config
        except InferenceServerException as error:
            raise EncoderBackendUnavailableError(
                f"Triton at {self.url} did not describe model {self.model_name!r}: {error}"
            ) from error
        # With batching on, Triton reports the batch dimension as -1 in front of the configured dims.
        expected = (
            [(self.input_name, TRITON_TILES_DATATYPE, [-1, self.tile_size_px, self.tile_size_px, 3])],
            [(self.output_name, TRITON_EMBEDDING_DATATYPE, [-1, self.embed_dim])],
        )
        found = (
            [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in metadata.inputs],
            [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in metadata.outputs],
        )
        if found != expected or config.max_batch_size < 1:
            raise EncoderBackendUnavailableError(
                f"model {self.model_name!r} at Triton {self.url} is not this repository's tile encoder: it takes "
                f"{_describe_tensors(found[0])} and gives {_describe_tensors(found[1])} with max_batch_size "
                f"{config.max_batch_size}; `xmag export` writes {_describe_tensors(expected[0])} in, "
                f"{_describe_tensors(expected[1])} out, batched (max_batch_size >= 1)"
            )
        return config.max_batch_size


def _describe_tensors(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name!r} {datatype} {shape}" for name, datatype, shape in tensors) or "nothing"
