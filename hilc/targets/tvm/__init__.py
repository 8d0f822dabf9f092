"""TVM engine: the integer graph lowered to TVM (TE + TIR schedules) and built for the host CPU
with LLVM, bit for bit the simulator's arithmetic, many times faster.

Where the lowerings live: each operator holds its TVM lowering as a ``lower_tvm`` method on its
``Op`` class, right beside the ``eval_int`` kernel it must reproduce and the ``lower_c`` it
parallels (DESIGN.md: one module per operator family holds everything about it). A registry
keyed by op name here would put the TVM code of all operators together but split each
operator across two files, so that reviewing "does TVM compute what eval_int computes" would
mean reading both; with the method, one screen shows both kernels, and an operator added
later without ``lower_tvm`` fails with a one-line error naming it. The ops modules never import
TVM: ``lower_tvm`` receives a ``TVMBuilder`` (``engine.py``) that carries ``te``/``tirx`` and
the shared pieces (constants, the requantizer, padding, the convolution schedule).

TVM is optional (``pip install 'hilc[tvm]'``); ``require_tvm`` turns its absence into one line.
"""

from __future__ import annotations

from hilc.errors import HilcError

INSTALL_HINT = "pip install 'hilc[tvm]'  (or: pip install apache-tvm)"
ENGINES = ("numpy", "tvm")


def require_tvm():
    """Import TVM or fail with a one-line error that says how to install it."""
    import os

    # TVM's thread pool assumes two hardware threads per core and would use half the CPUs
    # given (one on a 2-CPU machine); an explicit TVM_NUM_THREADS from the user wins.
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1))
    try:
        import tvm
        from tvm import te  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing shared library)
        raise HilcError(f"the TVM engine needs Apache TVM, which is not installed or failed to load "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"install it with: {INSTALL_HINT}") from None
    return tvm


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise HilcError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    return engine
