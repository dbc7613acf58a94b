"""The pipeline's stages in the order they run, one folder each: ``stage.py`` is the stage (the
contract in ``pipeline.workspace.Stage``), the other modules are its helpers. Stages read each
other's output through ``pipeline.artifacts`` names and never import each other.
"""

from pipeline.stages.benchmark import stage as benchmark_stage
from pipeline.stages.engine import stage as engine_stage
from pipeline.stages.evaluate import stage as eval_stage
from pipeline.stages.fetch import stage as fetch_stage
from pipeline.stages.quantize import stage as quantize_stage
from pipeline.stages.triton_repo import stage as triton_repo_stage
from pipeline.workspace import Stage

STAGES: tuple[Stage, ...] = (fetch_stage, quantize_stage, engine_stage, triton_repo_stage, eval_stage, benchmark_stage)  # type: ignore[assignment]
