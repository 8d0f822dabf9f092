"""Operator families; importing this package registers every operator and ONNX importer."""

from hilc.compiler.ops import (  # noqa: F401
    conv,
    dense,
    elementwise,
    gather,
    layernorm,
    layout,
    lut,
    matmul,
    pool,
    reduce,
    softmax,
)
from hilc.compiler.ops.base import ONNX_IMPORTERS, OPS, Op

__all__ = ["ONNX_IMPORTERS", "OPS", "Op"]
