"""The trtllm-build command: every preset x quant format gives flags that exist in TensorRT-LLM
1.2's flag table, NVIDIA's advice is applied, and two realistic commands match exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config, trtllm
from pipeline.errors import ConfigError

PRESETS = config.group_options("build")
FORMATS = ["none", "fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4"]
TARGETS = {"none": "h100", "fp8": "h100", "int4_awq": "a100", "w4a8_awq": "h100", "int8_sq": "a100", "nvfp4": "b200"}


def _argv(*overrides: str) -> list[str]:
    cfg = config.load(list(overrides))
    return trtllm.build_argv(cfg, Path("/ckpt"), Path("/engine"), Path("/work/timing.cache"))


def _flags(argv: list[str]) -> dict[str, str | None]:
    table = trtllm.flag_table()
    flags: dict[str, str | None] = {}
    index = 1
    while index < len(argv):
        takes_value = not table[argv[index]]["type"].startswith("bool")
        flags[argv[index]] = argv[index + 1] if takes_value else None
        index += 2 if takes_value else 1
    return flags


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_format_uses_only_real_flags(preset: str, fmt: str) -> None:
    model = "model=llama70b" if fmt not in ("int4_awq", "w4a8_awq") else "model=llama8b"
    argv = _argv(model, f"build={preset}", f"quant={fmt}", f"target={TARGETS[fmt]}", "parallel.tp=2")
    assert argv[0] == "trtllm-build"
    assert trtllm.argv_problems(argv) == []
    flags = _flags(argv)
    low_precision = fmt in ("fp8", "nvfp4")
    assert ("--gemm_plugin" in flags) == (not low_precision)  # off for FP8/NVFP4, auto for 16-bit GEMMs
    assert flags["--reduce_fusion"] == "enable"  # tp=2
    fp8 = fmt in ("fp8", "w4a8_awq")
    assert flags["--use_fp8_context_fmha"] == ("enable" if fp8 else "disable")


def test_golden_llama70b_fp8_tp2_on_h100() -> None:
    argv = _argv("model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100")
    assert argv == [
        "trtllm-build", "--checkpoint_dir", "/ckpt", "--output_dir", "/engine",
        "--max_batch_size", "64", "--max_input_len", "2048", "--max_seq_len", "4096", "--max_num_tokens", "8192",
        "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable", "--use_fp8_context_fmha", "enable",
        "--multiple_profiles", "disable", "--reduce_fusion", "enable", "--workers", "1",
        "--input_timing_cache", "/work/timing.cache", "--output_timing_cache", "/work/timing.cache",
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
        "--kv_cache_type",
        "paged",
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
        "--workers",
        "1",
        "--input_timing_cache",
        "/work/timing.cache",
        "--output_timing_cache",
        "/work/timing.cache",
    ]  # fmt: skip  (workers is capped at the number of ranks: one here)


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
        config.load(["build.extra_args=[--no_such_flag]"])
    with pytest.raises(ConfigError, match="choose one of"):
        config.load(["build.extra_args=[--log_level,loud]"])
    with pytest.raises(ConfigError, match="use the matching build"):
        config.load(["build.extra_args=[--max_batch_size,8]"])


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"exceeds build\.max_seq_len"):
        config.load(["build.max_input_len=8192", "build.max_seq_len=4096"])
    with pytest.raises(ConfigError, match="8192-token context"):
        config.load(["build.max_seq_len=16384", "build.max_input_len=1024"])


def test_packaged_flag_table_matches_the_shared_reference() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "reference" / "trtllm_build_flags.json"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    assert trtllm.FLAG_TABLE.read_text() == shared.read_text()
