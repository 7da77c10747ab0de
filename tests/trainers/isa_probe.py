"""A trainer that dispatches one ATen, one oneDNN and one MKL kernel before it trains as ``seed_style`` does
(for tests/cli/test_warm.py): run with ONEDNN_VERBOSE=1 and MKL_VERBOSE=1, each library prints the instruction
set it took into the cell's log, and ``isa.json`` says what ATen took and which process forked this one."""

import json
import os
from pathlib import Path

import torch

import seed_style


def train(cfg, ctx):
    x = torch.randn(1, 4, 64)
    conv = torch.nn.Conv1d(4, 8, 5)
    with torch.no_grad():
        torch.mkldnn_convolution(x, conv.weight, conv.bias, [0], [1], [1], 1)  # oneDNN
        torch.randn(128, 128) @ torch.randn(128, 128)  # MKL's sgemm
    Path(ctx.out_dir, "isa.json").write_text(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(),
                                                           "ppid": os.getppid()}))
    return seed_style.train(cfg, ctx)
