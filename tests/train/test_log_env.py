"""env.json's description of the machine: the CPU's model name and the core count."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from valleys.train.log import env_info


def test_env_names_the_cpu_model_and_counts_the_cores():
    info = env_info(torch.device("cpu"))
    assert info["cores"] == os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        if names:
            assert info["cpu"] == names[0]
    assert isinstance(info["cpu"], str) and info["cpu"]
