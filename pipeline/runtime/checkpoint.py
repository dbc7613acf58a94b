"""TensorRT-LLM checkpoint, or ModelOpt's unified Hugging Face checkpoint -> a transformers model,
the CPU target's stand-in for an engine (or for the PyTorch backend).

A TensorRT-LLM checkpoint (its config.json has a ``mapping``): reads ``config.json`` and
``rank{N}.safetensors`` (rank = pp_rank * tp + tp_rank), dequantizes each rank's tensors with that
rank's own scales (FP8 per-tensor; INT4-AWQ packed nibbles with per-group scales; INT8 SmoothQuant
per-channel; NVFP4 E2M1 blocks with FP8 block scales), merges tensor-parallel shards (fused q/k/v
split by heads, KV heads replicated when tp exceeds them, column- and row-parallel layers,
vocab-sharded embedding and lm_head), orders pipeline stages, and loads the result into
transformers' own Llama code. Quantized activations are simulated with forward pre-hooks on each
linear layer (AWQ / SmoothQuant pre-quant scales, FP8 or INT8 per-tensor activation scales), so the
model computes what the engine would, up to kernel rounding.

A unified checkpoint (``export_hf_checkpoint``: Hugging Face names and config.json, the format in
``hf_quant_config.json``, scales beside each weight as ``weight_scale``, ``weight_scale_2``,
``input_scale`` and ``pre_quant_scale``; what TensorRT-LLM's PyTorch backend loads) holds the same
quantized tensors unsharded, and is dequantized the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """The checkpoint is not one this runtime can execute (it stays free of pipeline imports so
    that Triton's python model can carry it)."""


# E2M1 (FP4) code -> value; bit 3 is the sign.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_MAX = 448.0
INT4_ALGOS = ("W4A16_AWQ", "W4A8_AWQ")
FP8_ACTIVATION_ALGOS = ("FP8", "W4A8_AWQ")
# TensorRT-LLM layer names -> Hugging Face Llama names. TensorRT-LLM's gated MLP applies the
# activation to `fc`, so fc is gate_proj and `gate` is up_proj.
COLUMN = {"mlp.fc": "mlp.gate_proj", "mlp.gate": "mlp.up_proj"}
ROW = {"attention.dense": "self_attn.o_proj", "mlp.proj": "mlp.down_proj"}
NORMS = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}


@dataclass
class ActivationQuant:
    """What a linear layer does to its input before the matmul in the engine."""

    pre_quant_scale: torch.Tensor | None = None
    scale: float | None = None
    kind: str | None = None  # "fp8" | "int8"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.scale is None:
            return x
        if self.kind == "fp8":
            q = (x / self.scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return q.to(x.dtype) * self.scale
        return (x / self.scale).round().clamp(-128, 127) * self.scale


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt packs two signed 4-bit values per byte along the output dimension: row 2j in the low
    nibble, row 2j+1 in the high nibble. [out/2, in] bytes -> [out, in] integers in -8..7."""
    raw = packed.view(torch.uint8).to(torch.int16)
    low, high = raw & 0x0F, (raw >> 4) & 0x0F
    values = torch.stack([low, high], dim=1).reshape(-1, packed.shape[-1])
    return torch.where(values > 7, values - 16, values)


def unpack_fp4_cols(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 packs two E2M1 codes per byte along the input dimension, low nibble first."""
    raw = packed.view(torch.uint8).to(torch.long)
    codes = torch.stack([raw & 0x0F, (raw >> 4) & 0x0F], dim=-1).reshape(packed.shape[0], -1)
    return FP4_VALUES[codes]


@dataclass(frozen=True)
class ScaleNames:
    """What a format calls the tensors stored beside a quantized weight."""

    weight: str
    weight_2: str
    activation: str
    pre_quant: str


TRTLLM_SCALES = ScaleNames(
    "weights_scaling_factor", "weights_scaling_factor_2", "activation_scaling_factor", "prequant_scaling_factor"
)
UNIFIED_SCALES = ScaleNames("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
UNIFIED_KV_SCALES = ("k_scale", "v_scale")  # the KV cache's FP8 scales: the reference runtime keeps K/V unquantized


def dequantize(
    tensors: dict[str, torch.Tensor], prefix: str, algo: str | None, names: ScaleNames = TRTLLM_SCALES
) -> tuple[torch.Tensor, ActivationQuant]:
    """The float32 weight of one rank's linear layer and how its input is quantized."""
    weight = tensors[f"{prefix}.weight"]
    scale = tensors.get(f"{prefix}.{names.weight}")
    scale2 = tensors.get(f"{prefix}.{names.weight_2}")
    act_scale = tensors.get(f"{prefix}.{names.activation}")
    pqs = tensors.get(f"{prefix}.{names.pre_quant}")
    if scale is None:  # not quantized (e.g. lm_head, or quant=none)
        return weight.float(), ActivationQuant()
    if algo == "FP8":
        w = weight.float() * scale.float()
    elif algo == "W8A8_SQ_PER_CHANNEL":
        w = weight.float() * scale.float()[:, None]
    elif algo in INT4_ALGOS:
        ints = unpack_int4_rows(weight).float()
        group = ints.shape[1] // scale.shape[1]
        w = ints * scale.float().repeat_interleave(group, dim=1)
        if scale2 is not None:
            # W4A8: the group scales give the weight itself, which the kernel holds in FP8 with the
            # per-tensor second scale, so it is rounded as the kernel sees it (ModelOpt's fake
            # quantizer does the same: INT4 groups, then FP8 per tensor)
            w = (w / scale2.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale2.float()
    elif algo == "NVFP4":
        values = unpack_fp4_cols(weight)
        group = values.shape[1] // scale.shape[1]
        w = values * scale.float().repeat_interleave(group, dim=1) * (scale2.float() if scale2 is not None else 1.0)
    else:
        raise CheckpointError(f"the reference runtime cannot read quant_algo {algo}")
    kind = "fp8" if algo in FP8_ACTIVATION_ALGOS else ("int8" if algo == "W8A8_SQ_PER_CHANNEL" else None)
    act = ActivationQuant(
        pre_quant_scale=pqs.float() if pqs is not None else None,
        scale=float(act_scale.float().max()) if act_scale is not None and kind else None,
        kind=kind,
    )
    return w, act


def _split_qkv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    return torch.split(w, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=0)


@dataclass
class Checkpoint:
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    activations: dict[str, ActivationQuant]  # HF linear name -> input quantization
    unified: bool = False  # config is a Hugging Face config.json (else TensorRT-LLM's)


def is_unified(folder: Path) -> bool:
    """ModelOpt's unified Hugging Face export, as opposed to a TensorRT-LLM checkpoint (which maps ranks)."""
    return "mapping" not in json.loads((folder / "config.json").read_text())


def read(folder: Path) -> Checkpoint:
    if is_unified(folder):
        return read_unified(folder)
    config = json.loads((folder / "config.json").read_text())
    mapping = config["mapping"]
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    algo = (config.get("quantization") or {}).get("quant_algo")
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    heads_r, kv_r = heads // tp, max(1, kv // tp)
    ranks = [[load_file(str(folder / f"rank{p * tp + t}.safetensors")) for t in range(tp)] for p in range(pp)]

    state: dict[str, torch.Tensor] = {}
    acts: dict[str, ActivationQuant] = {}
    layer_offset = 0
    for stage in ranks:
        local = sorted({int(k.split(".")[2]) for k in stage[0] if k.startswith("transformer.layers.")})
        for i in local:
            src, dst = f"transformer.layers.{i}", f"model.layers.{layer_offset + i}"
            for trt, hf in NORMS.items():
                state[f"{dst}.{hf}.weight"] = stage[0][f"{src}.{trt}.weight"].float()
            parts = [dequantize(r, f"{src}.attention.qkv", algo) for r in stage]
            q, k, v = zip(*(_split_qkv(w, heads_r, kv_r, hd) for w, _ in parts), strict=True)
            # with tp > kv heads each KV head is replicated on tp/kv consecutive ranks: keep one copy
            keep = range(0, tp, max(1, tp // kv)) if tp > kv else range(tp)
            state[f"{dst}.self_attn.q_proj.weight"] = torch.cat(q)
            state[f"{dst}.self_attn.k_proj.weight"] = torch.cat([k[r] for r in keep])
            state[f"{dst}.self_attn.v_proj.weight"] = torch.cat([v[r] for r in keep])
            for name in ("q_proj", "k_proj", "v_proj"):
                acts[f"{dst}.self_attn.{name}"] = parts[0][1]
            for trt, hf in COLUMN.items():
                parts = [dequantize(r, f"{src}.{trt}", algo) for r in stage]
                state[f"{dst}.{hf}.weight"] = torch.cat([w for w, _ in parts])
                acts[f"{dst}.{hf}"] = parts[0][1]
            for trt, hf in ROW.items():
                parts = [dequantize(r, f"{src}.{trt}", algo) for r in stage]
                state[f"{dst}.{hf}.weight"] = torch.cat([w for w, _ in parts], dim=1)
                act = parts[0][1]
                if act.pre_quant_scale is not None:  # row-parallel: each rank scales its input slice
                    act.pre_quant_scale = torch.cat([a.pre_quant_scale for _, a in parts])  # type: ignore[misc]
                acts[f"{dst}.{hf}"] = act
        layer_offset += len(local)

    vocab = config["vocab_size"]
    first, last = ranks[0], ranks[-1]
    embed = [r["transformer.vocab_embedding.weight"] for r in first]
    sharded = config.get("use_parallel_embedding") and tp > 1
    state["model.embed_tokens.weight"] = (torch.cat(embed) if sharded else embed[0]).float()[:vocab]
    state["model.norm.weight"] = last[0]["transformer.ln_f.weight"].float()
    heads_out = [dequantize(r, "lm_head", algo)[0] for r in last]
    state["lm_head.weight"] = torch.cat(heads_out)[:vocab]
    if layer_offset != config["num_hidden_layers"]:
        raise CheckpointError(
            f"{folder}: found {layer_offset} layers across pipeline stages, expected {config['num_hidden_layers']}"
        )
    return Checkpoint(config, state, acts)


def read_unified(folder: Path) -> Checkpoint:
    """A unified Hugging Face checkpoint: every weight dequantized with the scales stored beside it."""
    config = json.loads((folder / "config.json").read_text())
    quant_file = folder / "hf_quant_config.json"
    quantization = json.loads(quant_file.read_text()).get("quantization", {}) if quant_file.is_file() else {}
    algo = quantization.get("quant_algo")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    side = {f".{name}" for name in (*vars(UNIFIED_SCALES).values(), *UNIFIED_KV_SCALES)}
    state: dict[str, torch.Tensor] = {}
    acts: dict[str, ActivationQuant] = {}
    for key in tensors:
        if key.endswith(".weight"):
            prefix = key.removesuffix(".weight")
            state[key], act = dequantize(tensors, prefix, algo, UNIFIED_SCALES)
            if act.pre_quant_scale is not None or act.scale is not None:
                acts[prefix] = act
        elif not key.endswith(tuple(side)):
            state[key] = tensors[key].float()  # biases and other plain tensors
    if "lm_head.weight" not in state and config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the export drops a tied copy
    return Checkpoint(config, state, acts, unified=True)


def unified_hf_config(config: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    architectures = config.get("architectures") or []
    if not any(name in ("LlamaForCausalLM", "MistralForCausalLM") for name in architectures):
        raise CheckpointError(f"the reference runtime runs Llama-family checkpoints, not {architectures}")
    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "architectures", "model_type")}
    return LlamaConfig(**{**fields, "tie_word_embeddings": False})  # lm_head is loaded on its own


def hf_config(config: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    if config.get("architecture") not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise CheckpointError(f"the reference runtime runs Llama-family checkpoints, not {config.get('architecture')}")
    rope = config.get("rotary_scaling")
    if rope and "type" in rope and "rope_type" not in rope:
        rope = {**rope, "rope_type": rope["type"]}
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_size"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["norm_epsilon"],
        rope_theta=config.get("rotary_base", 10000.0),
        rope_scaling=rope,
        hidden_act=config.get("hidden_act", "silu"),
        attention_bias=bool(config.get("bias")),
        mlp_bias=bool(config.get("bias")),
        tie_word_embeddings=False,
    )


def load_model(folder: Path, simulate_activations: bool = True) -> Any:
    """The checkpoint as a float32 ``LlamaForCausalLM`` in eval mode."""
    from transformers import LlamaForCausalLM

    checkpoint = read(folder)
    config = unified_hf_config(checkpoint.config) if checkpoint.unified else hf_config(checkpoint.config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(checkpoint.state_dict, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # built on meta: rebuild its buffers
    if simulate_activations:
        for name, act in checkpoint.activations.items():
            if act.pre_quant_scale is not None or act.scale is not None:
                model.get_submodule(name).register_forward_pre_hook(lambda _m, args, a=act: (a.apply(args[0]),))
    return model.float().eval()
