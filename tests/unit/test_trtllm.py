"""The trtllm-build command: every preset x quant format x GPU gives flags that exist in TensorRT-LLM's
flag table, NVIDIA's tuning advice is applied where it holds (and only there), and two realistic
commands match exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import assets, validate
from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.stages.engine import trtllm

PRESETS = compose.group_options("build")
FORMATS = ["none", "fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4"]
GPUS = {"h100": 90, "h200": 90, "b200": 100}
# what the builder accepts on each architecture (the rest is refused by validation: see rules.py)
VALID = {
    90: {"none", "fp8", "int4_awq", "w4a8_awq", "int8_sq"},
    100: {"none", "fp8", "nvfp4"},
}
CACHE = Path("/work/timing.cache")


def _argv(*overrides: str) -> list[str]:
    cfg = validate.load(list(overrides))
    return trtllm.build_argv(cfg, Path("/ckpt"), Path("/engine"), CACHE)


def _flags(argv: list[str]) -> dict[str, str | None]:
    table = trtllm.flag_table()
    flags: dict[str, str | None] = {}
    index = 1
    while index < len(argv):
        takes_value = not table[argv[index]]["type"].startswith("bool")
        flags[argv[index]] = argv[index + 1] if takes_value else None
        index += 2 if takes_value else 1
    return flags


@pytest.mark.parametrize(("target", "fmt"), [(t, f) for t, sm in GPUS.items() for f in FORMATS if f not in VALID[sm]])
def test_formats_the_builder_rejects_are_refused(target: str, fmt: str) -> None:
    with pytest.raises(ConfigError, match=r"not supported on Blackwell|needs Blackwell"):
        validate.load(["model=llama8b", f"quant={fmt}", f"target={target}"])


@pytest.mark.parametrize(("target", "fmt"), [(t, f) for t, sm in GPUS.items() for f in FORMATS if f in VALID[sm]])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_format_and_gpu_uses_only_real_flags_and_nvidias_defaults(
    target: str, preset: str, fmt: str
) -> None:
    sm = GPUS[target]
    model = "model=llama70b" if fmt not in ("int4_awq", "w4a8_awq") else "model=llama8b"
    argv = _argv(model, f"build={preset}", f"quant={fmt}", f"target={target}", "parallel.tp=2")
    assert argv[0] == "trtllm-build"
    assert trtllm.argv_problems(argv) == []
    flags = _flags(argv)
    low_precision = fmt in ("fp8", "nvfp4")
    assert ("--gemm_plugin" in flags) == (not low_precision)  # off for FP8/NVFP4, auto for 16-bit GEMMs
    assert flags["--multiple_profiles"] == "enable"  # "always enable" (every preset)
    assert flags["--reduce_fusion"] == "enable"  # tp=2
    assert flags["--workers"] == "2"  # both ranks build at once on an 8-GPU host
    fp8 = fmt in ("fp8", "w4a8_awq", "nvfp4")  # nvfp4 carries an FP8 KV cache by default
    assert flags["--use_fp8_context_fmha"] == ("enable" if fp8 else "disable")
    # user buffers exist for FP8 Llama with reduce fusion on Hopper only
    assert flags["--user_buffer"] == ("enable" if fmt == "fp8" and sm == 90 else "disable")
    # tp=2: reduce fusion is on, and the builder drops norm-quant fusion then, so it is not asked for
    assert flags["--norm_quant_fusion"] == "disable"
    low_latency = preset == "latency" and fmt == "fp8" and sm == 90  # the builder rejects them on SM 100
    assert ("--low_latency_gemm_plugin" in flags) == low_latency
    assert ("--gemm_swiglu_plugin" in flags) == low_latency
    if low_latency:
        assert flags["--low_latency_gemm_plugin"] == flags["--gemm_swiglu_plugin"] == "fp8"


def test_golden_llama70b_fp8_tp2_on_h100() -> None:
    argv = _argv("model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100")
    assert argv == [
        "trtllm-build", "--checkpoint_dir", "/ckpt", "--output_dir", "/engine",
        "--max_batch_size", "4096", "--max_input_len", "2048", "--max_seq_len", "4096", "--max_num_tokens", "12288",
        "--max_beam_width", "1", "--kv_cache_type", "paged", "--tokens_per_block", "32",
        "--use_paged_context_fmha", "enable", "--use_fp8_context_fmha", "enable",
        "--multiple_profiles", "enable", "--reduce_fusion", "enable", "--user_buffer", "enable",
        "--norm_quant_fusion", "disable", "--workers", "2",
        "--input_timing_cache", str(CACHE), "--output_timing_cache", str(CACHE),
    ]  # fmt: skip


def test_golden_llama8b_int4_awq_on_a100() -> None:
    argv = _argv("model=llama8b", "quant=int4_awq", "target=a100", "build=throughput", "build.workers=4")
    assert argv == [
        "trtllm-build",
        "--checkpoint_dir",
        "/ckpt",
        "--output_dir",
        "/engine",
        "--max_batch_size",
        "256",
        "--max_input_len",
        "2048",
        "--max_seq_len",
        "4096",
        "--max_num_tokens",
        "16384",
        "--max_beam_width",
        "1",
        "--kv_cache_type",
        "paged",
        "--tokens_per_block",
        "32",
        "--gemm_plugin",
        "auto",
        "--use_paged_context_fmha",
        "enable",
        "--use_fp8_context_fmha",
        "disable",
        "--multiple_profiles",
        "enable",
        "--reduce_fusion",
        "disable",
        "--user_buffer",
        "disable",
        "--norm_quant_fusion",
        "disable",
        "--workers",
        "1",
        "--input_timing_cache",
        str(CACHE),
        "--output_timing_cache",
        str(CACHE),
    ]  # fmt: skip  (workers is capped at the number of ranks: one here)


def test_tuning_switches_follow_the_model_the_gpu_and_the_user() -> None:
    # Ada has FP8 but no user-buffer kernel; a non-Llama model gets no Llama-only fusion
    assert _flags(_argv("model=llama70b", "quant=fp8", "parallel.tp=2", "target=l40s"))["--user_buffer"] == "disable"
    other = ["model=llama70b", "model.arch.architectures=[Qwen2ForCausalLM]", "quant=fp8", "parallel.tp=2"]
    assert _flags(_argv(*other, "target=h100"))["--user_buffer"] == "disable"
    assert _flags(_argv("model=llama8b", "quant=fp8", "target=h100"))["--user_buffer"] == "disable"  # tp=1
    # forced values win; workers stay within the ranks and the target's GPUs
    assert _flags(_argv("model=llama8b", "quant=nvfp4", "target=b200"))["--norm_quant_fusion"] == "enable"  # tp=1
    forced = _flags(_argv("model=llama8b", "quant=nvfp4", "target=b200", "build.norm_quant_fusion=false"))
    assert forced["--norm_quant_fusion"] == "disable"
    assert _flags(_argv("model=llama70b", "quant=fp8", "parallel.tp=4", "target=h100"))["--workers"] == "4"
    assert (
        _flags(_argv("model=llama70b", "quant=fp8", "parallel.tp=4", "target=h100", "build.workers=1"))["--workers"]
        == "1"
    )
    assert (
        _flags(_argv("model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100", "build.multiple_profiles=false"))[
            "--multiple_profiles"
        ]
        == "disable"
    )
    with pytest.raises(ConfigError, match=r"build\.user_buffer=true needs reduce fusion"):
        validate.load(["model=llama8b", "quant=fp8", "target=h100", "build.user_buffer=true"])


def test_supported_versions() -> None:
    assert trtllm.version_supported("1.1.0") and trtllm.version_supported("1.2.1")
    assert trtllm.version_supported("1.2.0rc8")
    assert not trtllm.version_supported("1.3.0") and not trtllm.version_supported("1.0.0")


def test_fp8_context_fmha_follows_the_gpu() -> None:
    assert (
        _flags(_argv("model=llama8b", "quant=int8_sq", "quant.kv_cache_dtype=fp8", "target=h100"))[
            "--use_fp8_context_fmha"
        ]
        == "enable"
    )
    assert _flags(_argv("model=llama8b", "quant=int8_sq", "target=h100"))["--use_fp8_context_fmha"] == "disable"


def test_extra_args_are_checked_against_the_table() -> None:
    argv = _argv("model=llama8b", "target=h100", "build.extra_args=[--strip_plan,--log_level,verbose]")
    assert argv[-3:] == ["--strip_plan", "--log_level", "verbose"] and trtllm.argv_problems(argv) == []
    with pytest.raises(ConfigError, match="unknown trtllm-build flag --no_such_flag"):
        validate.load(["build.extra_args=[--no_such_flag]"])
    with pytest.raises(ConfigError, match="choose one of"):
        validate.load(["build.extra_args=[--log_level,loud]"])
    with pytest.raises(ConfigError, match="use the matching build"):
        validate.load(["build.extra_args=[--max_batch_size,8]"])


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"exceeds build\.max_seq_len"):
        validate.load(["build.max_input_len=8192", "build.max_seq_len=4096"])
    with pytest.raises(ConfigError, match="8192-token context"):
        validate.load(["build.max_seq_len=16384", "build.max_input_len=1024"])


def test_packaged_flag_table_matches_the_shared_reference() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "reference" / "trtllm_build_flags.json"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    assert assets.TRTLLM_BUILD_FLAGS.read_text() == shared.read_text()
