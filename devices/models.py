"""The small models devices train, plus flat-parameter helpers.

Every model here is a plain stack of Linear / Conv layers and ReLUs: no
BatchNorm (its running statistics are state that federated averaging and
``torch.func.vmap`` would both have to special-case) and no Dropout (training
must be deterministic so a cohort trained with ``vmap`` matches devices
trained one by one). Each stays well under ~15k parameters so a float32
update fits the 50 KB uplink budget before any compression.

``build_model`` does **not** seed: the caller sets ``torch.manual_seed`` (or
uses :func:`init_params`, which seeds privately) so one process can build many
identical models without disturbing anyone else's random stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

MODEL_NAMES = ("mlp", "cnn1d", "cnn2d")

_DEFAULT_MODELS = {"har": "cnn1d", "fashion": "cnn2d", "digits": "mlp"}


class GlobalAvgPool1d(nn.Module):
    """Mean over the time axis: (N, C, L) -> (N, C).

    A plain ``mean`` rather than ``AdaptiveAvgPool1d`` so it has a trivial
    ``vmap`` batching rule and the classifier does not depend on window length.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


def _conv1d_out(length: int, kernel: int, stride: int) -> int:
    return (length - kernel) // stride + 1


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two strided temporal convolutions then a global average.

    For HAPT (6, 128): 6->16 (k=8, s=4, 31 steps) -> 32 (k=5, s=2, 14 steps)
    -> 48 (k=3, 12 steps) -> mean over time -> 12 classes, ~9k parameters. The
    strides do the downsampling cheaply; averaging over time makes the
    features position-invariant, which suits activity windows.
    """
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs input_shape (channels, length), got {input_shape}")
    channels, length = input_shape
    l1 = _conv1d_out(length, 8, 4)
    l2 = _conv1d_out(l1, 5, 2) if l1 > 0 else 0
    l3 = _conv1d_out(l2, 3, 1) if l2 > 0 else 0
    if l3 < 1:
        raise ValueError(f"cnn1d needs a window of at least 32 samples, got length {length}")
    return nn.Sequential(
        nn.Conv1d(channels, 16, kernel_size=8, stride=4),
        nn.ReLU(),
        nn.Conv1d(16, 32, kernel_size=5, stride=2),
        nn.ReLU(),
        nn.Conv1d(32, 48, kernel_size=3, stride=1),
        nn.ReLU(),
        GlobalAvgPool1d(),
        nn.Linear(48, num_classes),
    )


def _cnn2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two stride-2 3x3 convolutions and one linear layer.

    For Fashion (1, 28, 28): 8x13x13 -> 16x6x6 -> 576 -> 10, ~7k parameters.
    Strided convolutions instead of pooling keep the forward pass to three
    matmul-like ops, which is what makes the vmapped cohort cheap.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn2d needs input_shape (channels, height, width), got {input_shape}")
    channels, height, width = input_shape
    h = ((height - 3) // 2 + 1 - 3) // 2 + 1
    w = ((width - 3) // 2 + 1 - 3) // 2 + 1
    if h < 1 or w < 1:
        raise ValueError(f"cnn2d needs images of at least 7x7, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 8, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * h * w, num_classes),
    )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch axis).

    Initialisation draws from torch's global RNG; seed it first (or call
    :func:`init_params`) for reproducible weights.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 2:
        raise ValueError(f"build_model: num_classes must be >= 2, got {num_classes}")
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(
            f"build_model: input_shape must be non-empty and positive, got {input_shape}"
        )
    if name == "mlp":
        return _mlp(input_shape, num_classes)
    if name == "cnn1d":
        return _cnn1d(input_shape, num_classes)
    if name == "cnn2d":
        return _cnn2d(input_shape, num_classes)
    raise ValueError(f"build_model: unknown model {name!r}; expected one of {MODEL_NAMES}")


def default_model(dataset: str) -> str:
    """The model each dataset is benchmarked with (har -> cnn1d, ...)."""
    try:
        return _DEFAULT_MODELS[dataset]
    except KeyError:
        raise ValueError(
            f"default_model: unknown dataset {dataset!r}; expected one of {sorted(_DEFAULT_MODELS)}"
        ) from None


def init_params(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> np.ndarray:
    """The initial flat parameter vector of ``build_model(name, ...)`` for ``seed``.

    Seeds inside ``torch.random.fork_rng`` so the caller's global RNG state is
    left exactly as it was: every process that asks for the same seed gets
    the same global model without coordinating RNG use.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, input_shape, num_classes)
    return get_flat_params(model)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Analytic forward FLOPs for one sample: 2 x MACs of every Linear / Conv layer.

    Found by running a one-sample dummy input through the model with forward
    hooks, so output sizes come from the real layers rather than re-derived
    formulas. Biases, activations and pooling are ignored (they are a rounding
    error next to the MACs, and the emulator only needs compute time to
    within a few percent).
    """
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            # Every output element is one in_features-long dot product.
            macs += output.numel() * module.in_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kernel = math.prod(module.kernel_size)
            macs += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return float(2 * macs)


def get_flat_params(model: nn.Module) -> np.ndarray:
    """All parameters as one float32 vector, in ``model.parameters()`` order."""
    params = [p.detach().reshape(-1) for p in model.parameters()]
    if not params:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(params).to(torch.float32).numpy().copy()


def set_flat_params(model: nn.Module, flat: np.ndarray) -> None:
    """Load a flat vector (as made by :func:`get_flat_params`) into ``model`` in place."""
    flat = np.asarray(flat)
    expected = num_params(model)
    if flat.ndim != 1 or flat.size != expected:
        raise ValueError(
            f"set_flat_params: expected a 1-D vector of {expected} parameters, "
            f"got shape {flat.shape}"
        )
    src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n
