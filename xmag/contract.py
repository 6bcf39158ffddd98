"""The tile encoder's tensor contract, written once: what every backend, the export and Triton agree on.

The encoder takes one input, `tiles`: uint8 RGB tiles, NHWC, of shape
(B, S, S, 3) with a dynamic batch B; normalisation is inside the graph. It
gives one output, `embedding`: float32 class-token embeddings of shape (B, D).
The ONNX graphs (export/onnx_export.py), the TensorRT engines
(export/tensorrt_build.py), the Triton configs (export/triton_config.py), the
manifest's defaults (xmag/model_repo.py) and the runtimes (xmag/runtimes/) all
read these names from here.
"""

from __future__ import annotations

import numpy as np

# The encoder's interface, shared by every backend (see docs/DESIGN.md, "Conventions").
TILES_INPUT = "tiles"
EMBEDDING_OUTPUT = "embedding"
TILES_LAYOUT = "uint8 RGB NHWC"
TILES_DTYPE = np.dtype(np.uint8)
EMBEDDING_DTYPE = np.dtype(np.float32)
# The tile size of the XMAG student at 5x, and the one the Triton configs describe.
TILE_SIZE_PX = 224

# Triton's names of the data types of the exported encoder's tensors (export/triton_config.py writes
# TYPE_UINT8 tiles in, TYPE_FP32 embeddings out; model metadata names them without the TYPE_ prefix).
TRITON_TILES_DATATYPE = "UINT8"
TRITON_EMBEDDING_DATATYPE = "FP32"
# The same in config.pbtxt's data_type.
TRITON_TILES_CONFIG_TYPE = f"TYPE_{TRITON_TILES_DATATYPE}"
TRITON_EMBEDDING_CONFIG_TYPE = f"TYPE_{TRITON_EMBEDDING_DATATYPE}"
