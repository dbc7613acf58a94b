"""quantize: ModelOpt calibration and TensorRT-LLM export (``stage``), ModelOpt presets
(``recipes``), calibration text (``calib_data``), device placement (``placement``), quality scoring
(``quality``) and per-phase costs (``costs``)."""
