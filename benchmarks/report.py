"""What every benchmark script shares: the machine it ran on and its BENCHMARKS.md section."""
from __future__ import annotations

import os
import platform
from pathlib import Path


OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # models come from local checkpoints only
    "TOKENIZERS_PARALLELISM": "false",  # no fork warnings from the tokenizers' thread pool
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # progress bars would flood the logs
}


def use_offline_environment() -> None:
    """Defaults for a benchmark's environment (what is already set wins); call it before
    importing transformers or MLflow."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """The vector-instruction flags of /proc/cpuinfo that change model speed (``lscpu``'s
    Flags, filtered): AVX2, AVX-512, its VNNI and BF16 parts, AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in VECTOR_FLAGS if flag in present) or "none of " + "/".join(VECTOR_FLAGS)
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    """CPU model, vector flags and core count, the line every timing carries."""
    return f"{cpu_model()} [{cpu_flags()}], {os.cpu_count()} cores"


def load_average() -> str:
    """The 1-minute load average when the run ended (other processes share the cores)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def write_section(path: Path, section: str, heading: str) -> None:
    """Replace ``heading``'s section of ``path`` (up to the next ``## `` heading) or append it.

    ``section`` is the whole section, starting with its ``heading`` line.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = section.rstrip("\n") + "\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text, encoding="utf-8")
