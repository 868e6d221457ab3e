"""The one shim around spconv: quiet import, algorithm choice per device, dense conversion.

spconv's implicit-GEMM algorithms exist only in CUDA builds of its kernels; on the CPU every convolution must use
``ConvAlgo.Native``. Modules are built device-agnostic and :func:`set_conv_algo` switches them when the model moves.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    # spconv 2.3 decorates its autograd functions with torch.cuda.amp.custom_fwd/bwd (deprecated in torch 2.4+),
    # and its build helper ccimport calls locale.getdefaultlocale (deprecated in Python 3.11).
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import spconv.pytorch as spconv  # noqa: F401 - re-exported for the model code
    from spconv.core import ConvAlgo
# spconv's modules trip torch.fx's one-time is_fx_tracing notice, logged (not warned) on first use.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__all__ = ["ConvAlgo", "SparseConvTensor", "set_conv_algo", "spconv", "to_dense"]

SparseConvTensor = spconv.SparseConvTensor


def algo_for(device: torch.device | str) -> Any:
    """Native on the CPU (the only algorithm with CPU kernels), spconv's default implicit GEMM on CUDA."""
    return ConvAlgo.Native if torch.device(device).type == "cpu" else ConvAlgo.MaskImplicitGemm


def set_conv_algo(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Point every spconv convolution in ``module`` at the algorithm that runs on ``device``."""
    algo = algo_for(device)
    for m in module.modules():
        if isinstance(m, spconv.conv.SparseConvolution):
            m.algo = algo
    return module


def to_dense(x: "spconv.SparseConvTensor") -> torch.Tensor:
    """(B, C, D, H, W) dense tensor of a sparse tensor."""
    with warnings.catch_warnings():
        # spconv indexes with a list of slices, deprecated in torch 2.9 (same result today).
        warnings.simplefilter("ignore", UserWarning)
        return x.dense()
