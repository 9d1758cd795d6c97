"""moetier: a tiered runtime for giant Mixture-of-Experts models.

The core defines the plugin contracts (backends, memory tiers, model families), hardware detection,
backend selection, weight formats and the conformance suite; backends and families are plugins.
"""
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

__all__ = [
    "BackendSpec", "Probe", "ExpertBackend", "ExpertLayerSpec", "ExpertSource", "ExpertTensors", "ExpertWeights",
    "ForwardInputs", "Pending", "PreparedExperts", "ModelFamily", "FORMATS", "QuantizedTensor", "WeightFormat",
    "dequantize", "get_format", "quantize", "hookimpl", "Tier", "TierLedger", "TierProvider",
    "MoetierError", "PluginError", "BackendUnavailable", "SelectionError", "ShapeError", "DTypeError",
    "ExpertIdError", "FormatError", "NonFiniteError", "CheckpointError", "LayoutError", "BudgetError",
    "KernelVariantError",
]
