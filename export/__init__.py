"""Export stage: checkpoints to ONNX, TensorRT FP16 and a verified model repository."""
