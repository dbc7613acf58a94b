"""What GPUs this host has, for ``target=auto``: nvidia-smi when present, else the CPU target."""

from __future__ import annotations

import logging
import shutil
import subprocess

from pipeline.config.schema import TargetConfig, TargetKind

log = logging.getLogger(__name__)
QUERY = "name,compute_cap,memory.total"


def parse_nvidia_smi(csv: str) -> TargetConfig | None:
    """``nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits`` ->
    a target describing the first GPU and how many there are."""
    rows = [[cell.strip() for cell in line.split(",")] for line in csv.strip().splitlines() if line.strip()]
    if not rows:
        return None
    name, capability, memory_mib = rows[0][:3]
    major, _, minor = capability.partition(".")
    return TargetConfig(
        name="auto",
        kind=TargetKind.gpu,
        gpu=name,
        sm=int(major) * 10 + int(minor or 0),
        memory_gib=round(float(memory_mib) / 1024, 1),
        count=len(rows),
    )


def detect() -> TargetConfig:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=15,
                check=True,
            ).stdout
            if (target := parse_nvidia_smi(out)) is not None:
                return target
        except (subprocess.SubprocessError, OSError, ValueError) as error:
            log.warning("nvidia-smi failed (%s); using the CPU target", error)
    return TargetConfig(name="cpu", kind=TargetKind.cpu, count=0)
