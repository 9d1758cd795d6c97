"""What the installed torch can do for the accelerator backend, found cheaply: version strings, module
specs and attributes only. Nothing here touches a driver or imports triton / torch_npu, so a probe that
reads it stays cheap; the factory imports what the plan says it will use."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TorchBuild:
    """The software half of a probe (the hardware half is the inventory).

    cuda / hip: torch.version.cuda / torch.version.hip (None on a build without them); torch_npu and
    triton: importable (by module spec); grouped_mm: torch._grouped_mm exists; scaled_mm_blockwise:
    torch.nn.functional.scaled_mm knows the 128x128 block recipe.
    """

    torch_version: str
    cuda: str | None = None
    hip: str | None = None
    torch_npu: bool = False
    triton: bool = False
    grouped_mm: bool = False
    scaled_mm_blockwise: bool = False


def detect_build() -> TorchBuild:
    import torch.nn.functional as F

    scaling = getattr(F, "ScalingType", None)
    return TorchBuild(
        torch_version=torch.__version__,
        cuda=getattr(torch.version, "cuda", None),
        hip=getattr(torch.version, "hip", None),
        torch_npu=importlib.util.find_spec("torch_npu") is not None,
        triton=importlib.util.find_spec("triton") is not None,
        grouped_mm=hasattr(torch, "_grouped_mm"),
        scaled_mm_blockwise=hasattr(F, "scaled_mm") and scaling is not None and hasattr(scaling, "BlockWise128x128"),
    )
