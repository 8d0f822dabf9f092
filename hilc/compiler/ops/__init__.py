"""Operator families; importing this package registers every operator and ONNX importer."""

from hilc.compiler.ops import conv, dense, elementwise, layout, lut, pool, softmax  # noqa: F401
from hilc.compiler.ops.base import ONNX_IMPORTERS, OPS, Op

__all__ = ["ONNX_IMPORTERS", "OPS", "Op"]
