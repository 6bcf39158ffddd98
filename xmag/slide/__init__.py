"""Slide reading, tissue detection and tiling (synthetic slides are in `xmag.synthetic`)."""
