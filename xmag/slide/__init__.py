"""Slide reading, tissue detection, tiling and synthetic slides."""
