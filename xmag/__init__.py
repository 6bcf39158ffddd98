"""XMAG core: models, checkpoints, slide reading, tissue detection and tiling.

Imported by training/, export/ and service/; imports none of them.
"""

__version__ = "0.1.0"
