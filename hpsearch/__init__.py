"""hpsearch: hyperparameter search for BP networks (multi-layer perceptrons).

From Python: `hpsearch.Client` (see `hpsearch.client`) and `hpsearch.load_model` (a model
file downloaded from a study, as a model that predicts on raw rows; see
`hpsearch.training.modelfile`). The names are loaded when first used, so that `import
hpsearch` (which every command does) loads neither pydantic nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "hpsearch.client",
    "Study": "hpsearch.client",
    "HpsearchError": "hpsearch.errors",
    "SpecError": "hpsearch.errors",
    "NotFound": "hpsearch.errors",
    "Conflict": "hpsearch.errors",
    "ApiError": "hpsearch.client.backends",
    "load_model": "hpsearch.training.modelfile",
}

if TYPE_CHECKING:
    from hpsearch.client import Client, Study
    from hpsearch.client.backends import ApiError
    from hpsearch.errors import Conflict, HpsearchError, NotFound, SpecError
    from hpsearch.training.modelfile import load_model


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "ApiError",
    "Client",
    "Conflict",
    "HpsearchError",
    "NotFound",
    "SpecError",
    "Study",
    "__version__",
    "load_model",
]
