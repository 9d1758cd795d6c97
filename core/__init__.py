"""moetier: a tiered runtime for giant Mixture-of-Experts models.

The core defines the plugin contracts (backends, memory tiers, model families), hardware detection,
backend selection, weight formats and the conformance suite; backends and families are plugins.
`moetier.load(checkpoint, ...)` returns a transformers model whose routed experts run on moetier.
"""
from . import openmp  # noqa: F401  (first: it must act before anything here loads torch)
from .backend_spec import BackendSpec, Probe
from .errors import (BackendUnavailable, BudgetError, CheckpointError, DTypeError, ExpertIdError, FormatError,
                     KernelVariantError, LayoutError, MoetierError, NonFiniteError, PluginError, SelectionError,
                     ShapeError)
from .experts import (ExpertBackend, ExpertLayerSpec, ExpertSource, ExpertTensors, ExpertWeights, ForwardInputs,
                      Pending, PreparedExperts)
from .family import ModelFamily
from .formats import FORMATS, QuantizedTensor, WeightFormat, dequantize, get_format, quantize
from .hookspecs import hookimpl
from .tiers import Tier, TierLedger, TierProvider

__version__ = "0.1.0"


def __getattr__(name: str):
    # moetier.load pulls in transformers: imported on first use, so `import moetier` stays light.
    if name == "load":
        from .integrations.transformers import load
        return load
    raise AttributeError(f"module 'moetier' has no attribute {name!r}")

__all__ = [
    "BackendSpec", "Probe", "ExpertBackend", "ExpertLayerSpec", "ExpertSource", "ExpertTensors", "ExpertWeights",
    "ForwardInputs", "Pending", "PreparedExperts", "ModelFamily", "FORMATS", "QuantizedTensor", "WeightFormat",
    "dequantize", "get_format", "quantize", "hookimpl", "Tier", "TierLedger", "TierProvider",
    "MoetierError", "PluginError", "BackendUnavailable", "SelectionError", "ShapeError", "DTypeError",
    "ExpertIdError", "FormatError", "NonFiniteError", "CheckpointError", "LayoutError", "BudgetError",
    "KernelVariantError", "load",
]
