"""The benchmark harness (`xmag bench`): XMAG at 5x against UNI2-h at 20x, slides per minute, on CPU and GPU."""
