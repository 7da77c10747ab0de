"""A trainer that asks oneDNN for bf16 float32 matmuls through torch's per-backend precision API (torch 2.9 and
later), as a project tuned for a CPU with AMX may, and then trains as ``seed_style`` does (for
tests/cli/test_switches.py): after it, torch refuses its legacy precision getter, and the record must still be
written and say bf16."""

import torch

import seed_style


def train(cfg, ctx):
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    return seed_style.train(cfg, ctx)
