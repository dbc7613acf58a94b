"""The pipeline: stages in the order they run. Later stages are appended here.

Each stage module has ``NAME``, ``VERSION``, ``TOOLS``, ``depends_on(cfg)`` (the slice of config
that determines its output), ``run(cfg, ws)`` (does the work, returns results) and optionally
``verify(cfg, folder)`` (checks that hold for cached results too). See ``pipeline.runner.Stage``.
"""

from pipeline.runner import Stage
from pipeline.stages import benchmark, engine, fetch, quantize, triton_repo

STAGES: tuple[Stage, ...] = (fetch, quantize, engine, triton_repo, benchmark)  # type: ignore[assignment]
