"""The reference models, chosen by config.yaml's ``model.name``:

* ``mlp`` (default): an MLP over the flattened (channels x time) signal.
  ``hidden`` (width), ``num_layers`` (hidden blocks), ``dropout_rate``,
  ``use_residual`` (skip connection around each hidden block after the first)
  and ``activation``.
* ``conv1d``: ``num_layers`` Conv1d layers of ``hidden`` channels over time
  (``kernel_size``, "same" padding), each followed by the activation and dropout
  (``use_residual``: a skip connection around each layer after the first), then
  a linear head on the flattened feature map.
* ``gru``: a ``num_layers``-deep GRU of ``hidden`` units over time (dropout
  between layers and on its last state), then a linear head.

Convolutions and recurrent cells run through oneDNN/MKL kernels whose results
depend on the CPU instruction set, and training amplifies such differences:
these models show the ISA axis. PyTorch's default initialisers are used, as in
the seed document; the caller seeds right before building a model.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import nn

from ..bundle import ModelSpec
from ..errors import InputError

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Block(nn.Module):
    def __init__(self, width: int, dropout: float, activation: str, residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = _ACT[activation]()
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.linear(x)))
        return x + h if self.residual else h


class SignalMLP(nn.Module):
    def __init__(self, n_features: int, n_targets: int, spec: ModelSpec) -> None:
        super().__init__()
        self.input = nn.Linear(n_features, spec.hidden)
        self.act = _ACT[spec.activation]()
        self.drop = nn.Dropout(spec.dropout_rate)
        self.blocks = nn.ModuleList(
            Block(spec.hidden, spec.dropout_rate, spec.activation, spec.use_residual) for _ in range(spec.num_layers - 1)
        )
        self.head = nn.Linear(spec.hidden, n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.input(x.flatten(1))))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, spec: ModelSpec, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, spec.kernel_size, padding="same")
        self.act = _ACT[spec.activation]()
        self.drop = nn.Dropout(spec.dropout_rate)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.conv(x)))
        return x + h if self.residual else h


class SignalConv1d(nn.Module):
    def __init__(self, channels: int, steps: int, n_targets: int, spec: ModelSpec) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvBlock(channels if i == 0 else spec.hidden, spec.hidden, spec, spec.use_residual and i > 0)
            for i in range(spec.num_layers)
        )
        self.head = nn.Linear(spec.hidden * steps, n_targets)  # "same" padding keeps the length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(1))


class SignalGRU(nn.Module):
    def __init__(self, channels: int, n_targets: int, spec: ModelSpec) -> None:
        super().__init__()
        self.gru = nn.GRU(channels, spec.hidden, num_layers=spec.num_layers, batch_first=True,
                          dropout=spec.dropout_rate if spec.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(spec.dropout_rate)
        self.head = nn.Linear(spec.hidden, n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.transpose(1, 2))  # (batch, time, channels)
        return self.head(self.drop(out[:, -1]))


def build(n_features: int, n_targets: int, spec: ModelSpec, channels: int | None = None) -> nn.Module:
    """The model ``spec.name`` names, for inputs of ``channels`` x ``n_features // channels`` steps.

    The MLP flattens its input and needs no channel count; the Conv1d and GRU models do.
    """
    if spec.name in ("conv1d", "gru") and not channels:
        raise ValueError(f"model {spec.name!r} needs the input's channel count")
    if spec.name == "conv1d":
        return SignalConv1d(channels, n_features // channels, n_targets, spec)
    if spec.name == "gru":
        return SignalGRU(channels, n_targets, spec)
    return SignalMLP(n_features, n_targets, spec)


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict's tensors: names, dtypes, shapes and raw bytes.

    Independent of the serialisation format, so bitwise-identical weights give
    the same digest under any torch version.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (an epoch)
    return h.hexdigest()


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``model``, or None when it does."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        return ", ".join(parts)
    for k, shape in expected.items():
        if got[k] != shape:
            return f"{k} has shape {list(got[k])}, the config's model needs {list(shape)}"
    return None


def load_checked(path: str, net: nn.Module) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``) and check that it fits ``net``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable weights
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(path, f"cannot be loaded as weights ({exc.__class__.__name__}: {first})",
                         hint="save a state_dict with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(path, f"holds a {type(state).__name__}, not a state_dict", hint="save model.state_dict()")
    why = describe_mismatch(net, state)
    if why:
        raise InputError(path, f"weights do not fit the model in config.yaml: {why}",
                         hint="check model.hidden / num_layers / use_residual and the data preprocessing against the trial")
    return state
