"""Building generated C: the host test harness (gcc, optionally under sanitizers) and a
Cortex-M firmware image (arm-none-eabi-gcc) whose ELF gives flash, code and stack sizes."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from hilc.errors import HilcError
from hilc.targets.c.codegen import runtime_dir


@dataclass(frozen=True)
class Cpu:
    name: str
    flags: tuple[str, ...]
    dsp: bool  # ARMv7E-M DSP extension (SMLAD, SXTB16)


CPUS = {
    "cortex-m3": Cpu("cortex-m3", ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"), False),
    "cortex-m4": Cpu("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"), True),
    "cortex-m7": Cpu("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=soft"), True),
}
# Memory map used when no board is named: the QEMU mps2 boards' 4 MiB code and data regions.
DEFAULT_MAP = {"flash_origin": 0x0, "flash_bytes": 4 << 20, "ram_origin": 0x20000000, "ram_bytes": 4 << 20}
FORBIDDEN_SYMBOLS = re.compile(r"^__aeabi_(f|d|[a-z]*div)|^__(div|mod|udiv|umod)[sdt]i3$")


def cpu(name: str) -> Cpu:
    if name not in CPUS:
        raise HilcError(f"unknown CPU '{name}' (the C backend builds for: {', '.join(CPUS)})")
    return CPUS[name]


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise HilcError(f"{what}: '{cmd[0]}' is not installed") from None
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).splitlines()
        first = next((ln for ln in lines if "error" in ln), (r.stderr or r.stdout).strip())
        # the linker's own reason (a memory region overflowed) says more than collect2's error
        first = next((ln for ln in lines if _REGION_OVERFLOW.search(ln)), first)
        raise HilcError(f"{what} failed: {first.strip()[:400]}")


_REGION_OVERFLOW = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")


def build_host(out_dir: Path, sanitize: bool = False, dsp: bool = False, cc: str = "cc") -> Path:
    """Build the host harness with -Wall -Wextra -Werror; ``dsp`` compiles the DSP kernels
    through their exact portable stand-ins, ``sanitize`` adds ASan and UBSan."""
    out_dir = Path(out_dir)
    target = "model_host" + ("_dsp" if dsp else "") + ("_san" if sanitize else "")
    srcs = ["src/model.c", "src/hilc_kernels.c", "src/host_main.c"]
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Isrc", f"-DHILC_DSP={int(dsp)}"]
    flags += (["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
              if sanitize else ["-O2"])
    _run([cc, *flags, *srcs, "-o", target], out_dir, f"host build of {out_dir}")
    return out_dir / target


def run_host(binary: Path, x: np.ndarray, output_size: int) -> np.ndarray:
    """Run the host harness on int8 samples [N, ...] (physical layout); returns [N, output_size] int8."""
    binary = Path(binary)
    work = binary.parent
    (work / "host_in.bin").write_bytes(np.ascontiguousarray(x, dtype=np.int8).tobytes())
    r = subprocess.run([str(binary), "host_in.bin", "host_out.bin"], cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        raise HilcError(f"{binary.name} failed (exit {r.returncode}): {r.stderr.strip()[:2000]}", exit_code=1)
    return np.frombuffer((work / "host_out.bin").read_bytes(), np.int8).reshape(len(x), output_size)


def _cross_build(out_dir: Path, cpu_name: str, build_name: str, memory_map: dict, stack_reserve: int,
                 sources: list[Path], defines: dict[str, str], includes: list[Path], opt: str) -> Path:
    """Compile the generated model plus ``sources`` for a Cortex-M CPU and link them with the
    startup code and a linker script for ``memory_map``: OUT/build/<build_name>/firmware.elf."""
    c = cpu(cpu_name)
    gcc = shutil.which("arm-none-eabi-gcc")
    if gcc is None:
        raise HilcError("arm-none-eabi-gcc is not installed "
                        "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")
    out_dir = Path(out_dir)
    build = out_dir / "build" / build_name
    build.mkdir(parents=True, exist_ok=True)
    tpl = (Path(__file__).parent / "templates" / "link.ld.j2").read_text()
    (build / "link.ld").write_text(jinja2.Template(tpl).render(dict(memory_map, name=build_name,
                                                                    stack_reserve=stack_reserve)))
    rt = runtime_dir()
    srcs = [str((out_dir / "src" / f).resolve()) for f in ("model.c", "hilc_kernels.c")]
    srcs += [str(rt / "cortexm" / "startup.c"), *(str(s) for s in sources)]
    flags = [*c.flags, opt, "-std=c99", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections",
             "-fstack-usage", f"-I{(out_dir / 'src').resolve()}", f"-I{rt}", *(f"-I{i}" for i in includes),
             "-nostartfiles", "--specs=nano.specs", "-Wl,--gc-sections", "-Wl,--no-warn-rwx-segments",
             "-T", "link.ld", *(f"-D{k}={v}" for k, v in defines.items())]
    try:
        _run([gcc, *flags, *srcs, "-o", "firmware.elf"], build, f"{build_name} firmware build")
    except HilcError as e:
        m = _REGION_OVERFLOW.search(str(e))
        if m is None:
            raise
        region, over = m.group(1), int(m.group(2))
        has = memory_map["flash_bytes"] if region == "FLASH" else memory_map["ram_bytes"]
        kind = "flash" if region == "FLASH" else "SRAM"
        raise HilcError(f"firmware needs {has + over} bytes of {kind}; {build_name} has {has}") from None
    return build / "firmware.elf"


def build_firmware(out_dir: Path, cpu_name: str, memory_map: dict | None = None, opt: str = "-Os") -> Path:
    """The model with a stub main (one inference), for sizes and symbol checks: OUT/build/<cpu>/firmware.elf."""
    return _cross_build(out_dir, cpu_name, cpu(cpu_name).name, dict(DEFAULT_MAP, **(memory_map or {})), 1024,
                        [runtime_dir() / "cortexm" / "size_main.c"], {}, [], opt)


def build_board_firmware(out_dir: Path, board, opt: str = "-O2") -> Path:
    """The protocol firmware (runtime_c/firmware) with the model, for a board: OUT/build/<board>/firmware.elf."""
    fw = runtime_dir() / "firmware"
    sources = [fw / "hilc_fw.c", fw / f"uart_{board.uart['driver']}.c", fw / f"timer_{board.timer['kind']}.c"]
    defines = {"HILC_LAYER_HOOK": "1", "HILC_CLOCK_HZ": f"{board.clock_hz}u", "HILC_BAUD": f"{board.uart['baud']}u",
               "HILC_TICK_HZ": f"{board.tick_hz}u", "HILC_TIMER_KIND": "1" if board.timer["kind"] == "dwt" else "0",
               "HILC_BOARD_NAME": f'"{board.name}"', **board.uart.get("defines", {})}
    elf = _cross_build(out_dir, board.cpu, board.name, board.memory_map, 4096, sources, defines, [fw], opt)
    sizes = elf_sizes(elf)
    if sizes["flash_bytes"] > board.flash_bytes:
        raise HilcError(f"firmware needs {sizes['flash_bytes']} bytes of flash; {board.name} has {board.flash_bytes}")
    return elf


def elf_sizes(elf: Path) -> dict[str, int]:
    """Flash (code + constants + data initialisers) and code bytes from the ELF's sections and symbols."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        e = ELFFile(f)
        sec = {s.name: s["sh_size"] for s in e.iter_sections()}
        symtab = e.get_section_by_name(".symtab")
        funcs = sum(s["st_size"] for s in symtab.iter_symbols() if s["st_info"]["type"] == "STT_FUNC")
    flash = sum(sec.get(n, 0) for n in (".isr_vector", ".text", ".rodata", ".ARM.exidx", ".data"))
    return {"flash_bytes": int(flash), "code_bytes": int(sec.get(".text", 0) + sec.get(".isr_vector", 0)),
            "function_bytes": int(funcs), "rodata_bytes": int(sec.get(".rodata", 0)),
            "ram_static_bytes": int(sec.get(".data", 0) + sec.get(".bss", 0))}


def forbidden_symbols(elf: Path) -> list[str]:
    """Float and division helpers linked into the image (the contract allows none)."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return sorted({s.name for s in symtab.iter_symbols() if FORBIDDEN_SYMBOLS.match(s.name)})


def stack_bytes(build_dir: Path) -> int:
    """Worst stack depth of model_run: its own frame plus the deepest kernel frame (-fstack-usage)."""
    frames: dict[str, int] = {}
    for su in Path(build_dir).glob("*.su"):
        for line in su.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                fn = parts[0].rsplit(":", 1)[-1]
                frames[fn] = max(frames.get(fn, 0), int(parts[1]))
    kernels = [v for k, v in frames.items() if k.startswith("hilc_")]
    return frames.get("model_run", 0) + (max(kernels) if kernels else 0)
