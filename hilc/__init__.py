"""hilc: a hardware-in-the-loop deployment compiler for tiny neural networks."""

__version__ = "0.1.0"


_API = ("compile", "load", "simulate", "run", "flash", "profile", "report", "export_onnx", "inspect", "Compiled",
        "RunResult", "evaluate", "Evaluation", "regress")


def __getattr__(name: str):
    # The Python API (hilc/api.py), imported on first use so `hilc --help` stays fast.
    if name in _API:
        from hilc import api

        return getattr(api, name)
    raise AttributeError(f"module 'hilc' has no attribute {name!r}")
