"""The machine description in benchmark and grid results agrees with torch's own `collect_env`."""

from __future__ import annotations

import torch
from torch.utils import collect_env

from comoe.utils.machine import machine_info, machine_summary


def test_machine_info_agrees_with_torch_collect_env():
    info = machine_info(torch.device("cpu"))
    env = collect_env.get_env_info()
    assert info["torch"] == env.torch_version
    assert env.python_version.startswith(info["python"])
    assert info["torch"] in machine_summary()
    if env.cpu_info and "Model name:" in env.cpu_info:  # lscpu's view of the same processor
        model = next(line for line in env.cpu_info.splitlines() if line.startswith("Model name:"))
        assert model.split(":", 1)[1].strip() == info["cpu_model"]
    assert ("CUDA" in machine_summary()) == (env.is_cuda_available == "True")  # a string there
