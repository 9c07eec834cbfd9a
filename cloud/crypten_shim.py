"""The one place that imports CrypTen: a compatibility alias for current torch.

CrypTen 0.4.1 (the last release; the project is dormant) imports
``torch.onnx._internal.registration`` at import time, for its ONNX model
converter, which tierfl never uses. torch >= 2.9 moved that module to
``torch.onnx._internal.torchscript_exporter.registration``. Aliasing the old
name in ``sys.modules`` before ``import crypten`` is enough: nothing else in
the secure-aggregation path touches ONNX. Keeping the alias here means a future
CrypTen (or a torch that restores the name) needs a change in one file only.

Every other module gets CrypTen through :func:`import_crypten`, never with a
bare ``import crypten``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

_OLD = "torch.onnx._internal.registration"
_NEW = "torch.onnx._internal.torchscript_exporter.registration"


def _alias_onnx_registration() -> None:
    if _OLD in sys.modules:
        return
    try:
        importlib.import_module(_OLD)  # an older torch still has it: nothing to do
        return
    except ImportError:
        pass
    try:
        sys.modules[_OLD] = importlib.import_module(_NEW)
    except ImportError as exc:  # pragma: no cover - depends on the installed torch
        raise ImportError(f"CrypTen needs {_OLD}; this torch has neither it nor {_NEW}") from exc


def import_crypten() -> Any:
    """Import CrypTen (and its ``mpc`` and ``communicator`` subpackages) on this torch.

    Returns the ``crypten`` module. Raises ImportError with the install line when
    CrypTen is missing (it is installed without its dependencies, see README).
    """
    _alias_onnx_registration()
    try:
        crypten: ModuleType = importlib.import_module("crypten")
        importlib.import_module("crypten.mpc")
        importlib.import_module("crypten.communicator")
    except ImportError as exc:
        raise ImportError(
            "CrypTen is not importable: install it with "
            "`pip install --no-deps crypten==0.4.1 omegaconf pyyaml scipy onnx torch==2.13.0` "
            f"({exc})"
        ) from exc
    return crypten
