"""Checks of ``compile_model``'s numeric options and of options that would be silently ignored,
made before any work: a bad number is one line naming the option, never a numpy traceback deep in
calibration nor a quietly different model."""

from __future__ import annotations

import math

from hilc.errors import HilcError


def check_compile_options(*, percentile: float, ptq_budget: float | None, fpga_error_ratio: float,
                          flash_bytes: int | None, sram_bytes: int | None, finetune_steps: int | None,
                          target: str, patch: str, precision: str) -> None:
    """``target`` as resolved from ``board`` ("c" for an MCU board, "hls" for an FPGA one)."""
    # the range kept is [100 - P, P] percentiles: below 50 it would be upside down
    if not (isinstance(percentile, int | float) and 50 < percentile <= 100):
        raise HilcError(f"--percentile: expected a number in (50, 100] (values between the (100-P)-th and "
                        f"P-th percentiles are kept), got {percentile}")
    # (None, from the Python API: every AdaRound runs its full step count)
    if ptq_budget is not None and not (isinstance(ptq_budget, int | float) and math.isfinite(ptq_budget)
                                       and ptq_budget >= 0):
        raise HilcError(f"--ptq-budget: expected a finite number of seconds >= 0, got {ptq_budget}")
    if not (isinstance(fpga_error_ratio, int | float) and math.isfinite(fpga_error_ratio) and fpga_error_ratio > 0):
        raise HilcError(f"--fpga-error-ratio: expected a finite number above 0, got {fpga_error_ratio}")
    if flash_bytes is not None:
        if flash_bytes <= 0:
            raise HilcError(f"--flash: expected a positive number of bytes, got {flash_bytes}")
        if target != "c":  # only the C target's constants are counted
            raise HilcError(f"--flash needs --target c or an MCU --board (target {target} has no flash)")
    if sram_bytes is not None and sram_bytes <= 0:
        raise HilcError(f"--sram: expected a positive number of bytes, got {sram_bytes}")
    if finetune_steps is not None and finetune_steps < 0:
        raise HilcError(f"--finetune-steps: expected a number of steps >= 0, got {finetune_steps}")
    # --sram budgets the C build's memory, the patch schedule or the mixed-precision search: elsewhere
    # it would be ignored and the model could exceed it unnoticed
    if sram_bytes is not None and target != "c" and patch == "off" and precision != "mixed":
        raise HilcError(f"--sram needs --target c, an MCU --board, --patch or --precision mixed (target {target} "
                        "alone has no SRAM budget)")
