"""XMAG core: models, checkpoints, slides (readers, tissue, tiling), runtimes and their choice, the
pipeline, the model repository's manifest, synthetic slides, the slide result schema and errors.

The faces (xmag.cli, xmag.service, xmag.export, xmag.training, xmag.benchmarks) import the core;
the core imports none of them (import-linter's contracts in pyproject.toml keep it so).
"""

__version__ = "0.1.0"
