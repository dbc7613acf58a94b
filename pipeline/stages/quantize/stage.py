"""quantize: NVIDIA ModelOpt post-training quantization, exported for the chosen TensorRT-LLM backend.

Reads: the fetched checkpoint; ``quant.*``, ``parallel.tp|pp``, ``model.dtype``, ``backend``.
Writes: ``checkpoint/``: for ``backend=tensorrt`` a TensorRT-LLM checkpoint (config.json and
rank{N}.safetensors, N < tp*pp, the input of trtllm-build); for ``backend=pytorch`` ModelOpt's
unified Hugging Face checkpoint (config.json, hf_quant_config.json when quantized, safetensors and
the tokenizer: what the PyTorch backend loads, with parallelism chosen when it is served), and
``quality.json`` (held-out perplexity, KL divergence and top-1 agreement against the unquantized
model) and ``stage.log``.
Results: the quality metrics and, per phase (load, calibration, export, evaluation), wall time and
peak resident memory.

``quant=none`` goes through the same exporter, unquantized. The model is loaded once: baseline
log-probabilities are taken before quantizing, so the comparison needs no second copy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pipeline.artifacts import CHECKPOINT, QUALITY_JSON, TOKENIZER
from pipeline.assets import HELDOUT_TEXT
from pipeline.config.schema import Backend, PipelineConfig, QuantFormat, to_dict
from pipeline.errors import StageError
from pipeline.resources import measured
from pipeline.sizing import calibration, memory
from pipeline.stages.quantize import calib_data, placement, quality, recipes
from pipeline.workspace import StageWorkspace, require_space

NAME = "quantize"
VERSION = 2  # 2: weight-level faithfulness
TOOLS = ("nvidia-modelopt", "torch", "transformers")

log = logging.getLogger(__name__)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    calib = calibration.calibration_sizes(cfg)
    quant = to_dict(cfg.quant)
    quant["calib"] = {
        "dataset": calib.dataset,
        "num_samples": calib.num_samples,
        "max_length": calib.max_length,
        "batch_size": calib.batch_size,
    }
    if cfg.quant.format is QuantFormat.none:
        quant["calib"] = None  # nothing is calibrated, so calibration settings must not force a redo
    if cfg.backend is Backend.pytorch:  # one unsharded checkpoint: tp and pp are chosen when it is served
        return {"quant": quant, "backend": str(cfg.backend), "dtype": str(cfg.model.dtype)}
    return {"quant": quant, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dtype": str(cfg.model.dtype)}


def preflight(cfg: PipelineConfig) -> list[str]:
    """Environment checks before any stage runs (config checks live in pipeline.validate)."""
    if problem := memory.quantize_memory_problem(cfg):
        return [problem]
    if cfg.quant.format is QuantFormat.none or calibration.calibration_sizes(cfg).dataset != "cnn_dailymail":
        return []
    if importlib.util.find_spec("datasets") is None:
        return [
            "calibrating on cnn_dailymail needs the `datasets` package (pip install datasets): or set "
            "quant.calib.dataset=builtin or a .txt/.jsonl file"
        ]
    return []


def _calibrate(model: Any, batches: list[Any], cfg: PipelineConfig) -> Any:
    import modelopt.torch.quantization as mtq
    import torch
    from tqdm import tqdm

    device = placement.input_device(model)
    passes = 0

    def forward_loop(m: Any) -> None:  # ModelOpt calls it once per calibration pass (AWQ: several)
        nonlocal passes
        passes += 1
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"calibration pass {passes}", unit="batch"):
                m(batch.to(device))

    log.info("quantizing to %s with ModelOpt (%s)", cfg.quant.format, recipes.MODELOPT_PRESET[cfg.quant.format])
    return mtq.quantize(model, recipes.modelopt_config(cfg.quant), forward_loop)


def _export(model: Any, cfg: PipelineConfig, out: Path) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint

    if cfg.backend is Backend.pytorch:
        log.info("exporting ModelOpt's unified Hugging Face checkpoint (%s) to %s", cfg.model.dtype, out)
        placement.undispatch(model)
        with torch.no_grad():
            # quantized from the weights calibration saw (float32 on a CPU), as ModelOpt's fake
            # quantizers did, then the rest cast to model.dtype
            export_hf_checkpoint(model, dtype=model.dtype, export_dir=out)
        _cast_float32_weights(out, getattr(torch, str(cfg.model.dtype)))
        return
    decoder = recipes.decoder_type(getattr(model.config, "architectures", None))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    log.info("exporting a TensorRT-LLM checkpoint (%s, tp=%d, pp=%d, %s) to %s", decoder, tp, pp, cfg.model.dtype, out)
    placement.undispatch(model)
    with torch.no_grad():
        export_tensorrt_llm_checkpoint(
            model,
            decoder,
            getattr(torch, str(cfg.model.dtype)),
            out,
            inference_tensor_parallel=tp,
            inference_pipeline_parallel=pp,
        )


def _cast_float32_weights(folder: Path, dtype: Any) -> None:
    """The unified export writes unquantized weights, and config.json's ``dtype``, in the model's
    own dtype, float32 for a model calibrated on the CPU, whatever ``dtype`` it is given (the
    PyTorch backend would then load the model in float32): both are set to model.dtype here, as the
    TensorRT-LLM export does. Weight and activation scales (float32 by design) keep their names
    and dtype, and quantized weights are not float32."""
    import torch
    from safetensors.torch import load_file, save_file

    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    config_file.write_text(json.dumps(config, indent=2) + "\n")

    for file in sorted(folder.glob("*.safetensors")):
        file.chmod(0o644)  # the export writes them owner-only: a server running as another user reads them
        tensors = load_file(str(file))
        names = (".weight", ".bias", ".pre_quant_scale")  # AWQ's input scales travel in the model's dtype too
        cast = [k for k, v in tensors.items() if v.dtype == torch.float32 and k.endswith(names)]
        if not cast:
            continue
        log.info("casting %d float32 weights of %s to %s", len(cast), file.name, dtype)
        for key in cast:
            tensors[key] = tensors[key].to(dtype)
        partial = file.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        partial.chmod(0o644)
        partial.replace(file)


def _check_faithfulness(cfg: PipelineConfig) -> bool:
    """The reference runtime runs in float32 on the CPU: affordable for small models only."""
    return cfg.model.arch.approx_params is None or calibration.is_small(cfg.model.arch)


def _faithfulness(
    folder: Path, modelopt_model: Any, batches: list[Any], baseline: list[Any], score_modelopt: bool
) -> dict[str, Any]:
    """Run the exported checkpoint with the reference runtime and compare it with ModelOpt's
    quantized model (is the export faithful?) and with the source model (what does the deployed
    model lose?).

    ModelOpt's TensorRT-LLM export shares one scale between fused layers (q/k/v, gate/up) and
    updates the model in place, so ``modelopt_model`` is taken after the export. Its unified export
    instead folds AWQ's pre-quant scales of q/k/v and gate/up into the norm before them (one scale
    per norm, the weights requantized to it): those layers hold other, equivalent weights and are
    compared through the logits only. Logits of two FP8/INT8 models drift apart from tiny weight
    differences (activation rounding amplifies them), so the weight-level comparison is the sharp
    test and the logit comparison the practical one.
    """
    from pipeline.runtime.checkpoint import CheckpointError, load_model  # torch: imported when needed

    log.info("checking the export: reference runtime vs ModelOpt's model and the source model")
    try:
        reference = load_model(folder)
    except CheckpointError as error:
        raise StageError(f"the exported checkpoint cannot be checked: {error}") from error
    exported = quality.log_probs(reference, batches, vocab=baseline[0].shape[-1])
    result: dict[str, Any] = {
        "vs_source": quality.agreement(baseline, exported),
        "kv_cache_simulated": False,  # the reference runtime keeps K/V unquantized
    }
    if score_modelopt:  # ModelOpt's quantizers cannot run here (NVFP4 on a CPU)
        folded = _folded_pre_quant_scales(folder, modelopt_model)
        result["weights_vs_modelopt"] = _weight_agreement(modelopt_model, reference, skip=folded)
        result["vs_modelopt"] = quality.agreement(quality.log_probs(modelopt_model, batches), exported)
    return result


def _folded_pre_quant_scales(folder: Path, modelopt_model: Any) -> set[str]:
    """Layers with an AWQ pre-quant scale that a unified checkpoint does not carry (folded into
    the norm before them by the export)."""
    from safetensors import safe_open

    from pipeline.runtime.checkpoint import is_unified

    if not is_unified(folder):
        return set()
    stored: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            stored |= set(handle.keys())
    return {
        name
        for name, module in modelopt_model.named_modules()
        if getattr(getattr(module, "input_quantizer", None), "_pre_quant_scale", None) is not None
        and f"{name}.pre_quant_scale" not in stored
    }


def _weight_agreement(modelopt_model: Any, reference: Any, skip: Collection[str] = ()) -> dict[str, Any]:
    """Compare every quantized weight as ModelOpt's fake quantizer sees it with the weight the
    reference runtime dequantized from the export (but the ``skip`` layers)."""
    import torch

    ours = reference.state_dict()
    equal = total = layers = 0
    max_diff = 0.0
    with torch.no_grad():
        for name, module in modelopt_model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not quantizer.is_enabled or f"{name}.weight" not in ours or name in skip:
                continue
            expected = quantizer(module.weight).float().cpu()
            diff = (expected - ours[f"{name}.weight"]).abs()
            equal += int((diff <= 1e-5 * expected.abs().max()).sum())
            total += diff.numel()
            max_diff = max(max_diff, float(diff.max()))
            layers += 1
    return {
        "layers": layers,
        "equal_fraction": equal / total if total else 1.0,
        "max_abs_diff": max_diff,
        "folded_into_norms": len(skip),  # compared through the logits only
    }


def _can_score(cfg: PipelineConfig, model: Any) -> bool:
    """ModelOpt's NVFP4 fake-quant kernel (dynamic block scales) exists only for CUDA."""
    return cfg.quant.format is not QuantFormat.nvfp4 or placement.input_device(model).type == "cuda"


def check_unified_export(folder: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """The unified checkpoint must hold weights and say, in hf_quant_config.json, the format asked
    for (no such file: unquantized). Returns its ``quantization`` section."""
    problems = []
    if not list(folder.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    quant_file = folder / "hf_quant_config.json"
    actual = json.loads(quant_file.read_text()).get("quantization", {}) if quant_file.is_file() else {}
    for key, value in recipes.expected_quantization(cfg.quant).items():
        if actual.get(key) != value:
            problems.append(f"hf_quant_config.json says {key}={actual.get(key)!r}, expected {value!r}")
    if problems:
        raise StageError(f"ModelOpt's unified export is not what was asked for: {'; '.join(problems)}")
    return actual


def check_export(folder: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """The exported checkpoint must have the mapping and quantization asked for, one rank file per
    rank and nothing else: later stages trust it. Returns its ``quantization`` section."""
    if cfg.backend is Backend.pytorch:
        return check_unified_export(folder, cfg)
    config = json.loads((folder / "config.json").read_text())
    tp, pp, world_size = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.world_size
    mapping = config.get("mapping", {})
    problems = []
    if (mapping.get("world_size"), mapping.get("tp_size"), mapping.get("pp_size")) != (world_size, tp, pp):
        problems.append(f"mapping {mapping} is not tp={tp} pp={pp}")
    ranks = sorted(p.name for p in folder.glob("rank*.safetensors"))
    if ranks != sorted(f"rank{n}.safetensors" for n in range(world_size)):
        problems.append(f"rank files {ranks} for world size {world_size}")
    actual = config.get("quantization", {})
    for key, value in recipes.expected_quantization(cfg.quant).items():
        if actual.get(key) != value:
            problems.append(f"quantization.{key} is {actual.get(key)!r}, expected {value!r}")
    if problems:
        raise StageError(f"ModelOpt's export is not what was asked for: {'; '.join(problems)}")
    return dict(actual)


def _datasets(cfg: PipelineConfig, calib: list[Any], heldout: list[Any]) -> list[dict[str, Any]]:
    """The text this stage read: the calibration set (quantized formats) and the held-out text
    the quality report scored."""
    found = []
    if calib:
        dataset = calibration.calibration_sizes(cfg).dataset
        found.append(calib_data.described("calibration", dataset, calib_data.source_of(dataset), calib))
    if heldout:
        source = f"pipeline/data/{HELDOUT_TEXT.name}"
        found.append(calib_data.described("evaluation", HELDOUT_TEXT.name, source, heldout))
    return found


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    costs: dict[str, Any] = {}
    source = ws.input("fetch") / CHECKPOINT
    require_space(ws.out, memory.checkpoint_bytes(cfg), "the quantized checkpoint")  # before minutes of work
    # Calibration text first: a dataset that cannot be read fails before the weights are loaded.
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    calib_batches = []
    if cfg.quant.format is not QuantFormat.none:
        calib_batches = calib_data.calibration_batches(tokenizer, calibration.calibration_sizes(cfg))
    with measured(costs, "load"):
        model = placement.load_model(source, str(cfg.model.dtype), cfg.model.trust_remote_code)
    eval_batches = calib_data.heldout_batches(tokenizer, cfg.quant.eval_tokens) if cfg.quant.eval_tokens else []
    with measured(costs, "evaluation_baseline"):
        baseline = quality.log_probs(model, eval_batches)
    if cfg.quant.format is not QuantFormat.none:
        with measured(costs, "calibration"):
            model = _calibrate(model, calib_batches, cfg)
    report: dict[str, Any] = {
        "format": str(cfg.quant.format),
        "heldout": HELDOUT_TEXT.name,
        "kv_cache_dtype": cfg.quant.kv_cache_dtype and str(cfg.quant.kv_cache_dtype),
    }
    quantized_model = cfg.quant.format is not QuantFormat.none  # none: the model is still the source
    if not _can_score(cfg, model):
        report["skipped"] = "NVFP4 inference needs a CUDA GPU; ModelOpt's quantized model is not scored here"
    elif not quantized_model:
        report.update(quality.compare(eval_batches, baseline, baseline))
    else:
        with measured(costs, "evaluation_quantized"):
            quantized = quality.log_probs(model, eval_batches)
        report.update(quality.compare(eval_batches, baseline, quantized))

    faithfulness = bool(eval_batches) and _check_faithfulness(cfg)
    with measured(costs, "export"):
        # the unified export leaves the model's layers holding packed quantized weights it can no
        # longer run: a small model that is checked afterwards is exported from a copy
        unrunnable = cfg.backend is Backend.pytorch and quantized_model and faithfulness
        _export(copy.deepcopy(model) if unrunnable else model, cfg, ws.out / CHECKPOINT)
    quantization = check_export(ws.out / CHECKPOINT, cfg)
    if faithfulness:
        with measured(costs, "faithfulness"):
            score_modelopt = quantized_model and _can_score(cfg, model)
            report["faithfulness"] = _faithfulness(
                ws.out / CHECKPOINT, model, eval_batches, baseline, score_modelopt=score_modelopt
            )
    del model
    log.info("quality: %s", {k: v for k, v in report.items() if k != "heldout"})
    (ws.out / QUALITY_JSON).write_text(json.dumps(report, indent=2) + "\n")
    tokenizer.save_pretrained(ws.out / TOKENIZER)  # later stages (Triton preprocessing) need it
    if cfg.backend is Backend.pytorch:  # the PyTorch backend reads the tokenizer from the checkpoint
        tokenizer.save_pretrained(ws.out / CHECKPOINT)
    return {
        "quality": report,
        "costs": costs,
        "datasets": _datasets(cfg, calib_batches, eval_batches),
        "quant_algo": quantization.get("quant_algo"),
        "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo"),
        "format": "unified_hf" if cfg.backend is Backend.pytorch else "tensorrt_llm",
        # the checkpoint's ranks (a unified checkpoint is split when it is served)
        "world_size": cfg.parallel.world_size if cfg.backend is Backend.tensorrt else None,
    }
