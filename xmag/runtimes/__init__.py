"""Encoder and head runtimes behind one interface each, and the choice of encoder backend by measuring.

The pipeline and the service only see `TileEncoderRuntime.encode(uint8 NHWC)
-> float32 (B, D)` and `SlideHeadsRuntime.predict(features) -> {task:
TaskOutput}`. An encoder runs on one of four backends:

- torch (`TorchTileEncoder`): fp32 or bf16 autocast on the CPU; fp32, fp16
  or bf16 autocast on a CUDA GPU; from the repository's torch weights;
- onnxruntime (`OnnxTileEncoder`): the fp32 ONNX graph on the CPU or on
  onnxruntime's TensorRT/CUDA providers, or the int8 graph on the CPU;
- TensorRT (`TensorRTTileEncoder`): the FP16 `.plan` the export stage builds,
  on the GPU and TensorRT release it was built for;
- Triton (`TritonTileEncoder`): the exported repository served by an NVIDIA
  Triton Inference Server, called over gRPC, so that many service replicas
  can share a pool of GPUs. Only by explicit choice.

One idea per module; import each name from the module that defines it:

- `protocols`: `TileEncoderRuntime`, `SlideHeadsRuntime`, `TaskOutput`, the
  tile check, and `EncoderBackendUnavailableError`, which backends raise too;
- `staging`: the pinned host buffer both GPU backends copy tiles through;
- `torch_backend`: `TorchTileEncoder`, `TorchSlideHeads`;
- `onnxruntime_backend`: `OnnxTileEncoder`, `OnnxSlideHeads`;
- `tensorrt_backend`: `TensorRTTileEncoder`, and TensorRT in the core (its
  import check, engine loading, dtypes and errors), which the export stage uses too;
- `triton_backend`: `TritonTileEncoder`, `TritonEndpoint`, `EncoderRemoteError`;
- `hardware`: what this machine can run (`detect_hardware`, `plan_runs_on`);
- `selection`: `select_encoder_runtime`, which measures the candidates and
  chooses, and `runtimes_from_repository` / `heads_from_repository`.

The tensor contract every backend holds to is `xmag.contract`; the backend and
precision words are `xmag.vocabulary`.
"""
