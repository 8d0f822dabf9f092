"""Protocol fuzzing: the board firmware's frame parser and dispatcher built for the host (libFuzzer
with ASan/UBSan; the committed corpus replayed under gcc's sanitizers), and the host side's frame
decoder and request loop driven by hypothesis."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hilc.hil import protocol
from hilc.hil.protocol import BoardResetError, Link, LinkError

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
CORPUS = FUZZ / "corpus"
FW = ROOT / "hilc" / "runtime_c" / "firmware"
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
FUZZ_RUNS = 1_000_000


def build_harness(out: Path, cc: str = "gcc", libfuzzer: bool = False, defines: tuple[str, ...] = ()) -> Path:
    """The firmware with the harness's stub board: a libFuzzer target (clang) or a corpus replayer."""
    srcs = [str(FUZZ / "fw_fuzz.c")] + ([] if libfuzzer else [str(FUZZ / "fw_replay.c")])
    san = ["-fsanitize=fuzzer," + SAN[0].split("=", 1)[1], *SAN[1:]] if libfuzzer else SAN
    cmd = [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-g", *san, f"-I{FW}", f"-I{FUZZ}",
           *(f"-D{d}" for d in defines), *srcs, "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def corpus_files() -> list[str]:
    return sorted(str(p) for p in CORPUS.iterdir())


def test_corpus_is_committed_and_replays_clean_under_asan_ubsan(tmp_path):
    files = corpus_files()
    assert len(files) >= 100
    exe = build_harness(tmp_path / "replay")
    r = subprocess.run([str(exe), *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"replayed {len(files)} inputs" in r.stdout


def test_harness_oracle_catches_a_corrupted_answer(tmp_path):
    """The harness must be able to fail: with one answer byte flipped it aborts on the corpus."""
    exe = build_harness(tmp_path / "broken", defines=("FW_FUZZ_SELFTEST=1",))
    r = subprocess.run([str(exe), *corpus_files()], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "fw_fuzz: the board sent a frame with a wrong CRC" in r.stderr


def _libfuzzer_available() -> bool:
    if shutil.which("clang") is None:
        return False
    r = subprocess.run(["clang", "-print-file-name=libclang_rt.fuzzer-x86_64.a"], capture_output=True, text=True)
    return Path(r.stdout.strip()).exists()


@pytest.mark.slow
@pytest.mark.skipif(not _libfuzzer_available(), reason="needs clang and libFuzzer (apt: clang libclang-rt-14-dev, "
                                                       "installed by .ci/run)")
def test_libfuzzer_one_million_runs_no_crash(tmp_path):
    exe = build_harness(tmp_path / "fuzz", cc="clang", libfuzzer=True)
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS, work)  # new units go here, never into the committed corpus
    r = subprocess.run([str(exe), f"-runs={FUZZ_RUNS}", "-max_len=1400", "-max_total_time=600", "-timeout=10",
                        "-rss_limit_mb=1024", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(work)],
                       capture_output=True, text=True, timeout=900)
    log = r.stderr
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("leak-*"))
    assert r.returncode == 0 and not crashes, (
        f"fuzzer failed (exit {r.returncode}); reproduce with the replayer on: "
        f"{[c.read_bytes().hex() for c in crashes]}\n{log[-3000:]}")
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))
    secs = re.search(r"Done \d+ runs in (\d+) second", log).group(1)
    seed = re.search(r"Seed: (\d+)", log).group(1)
    print(f"libFuzzer: {runs} runs in {secs} s, 0 crashes (seed {seed})")
    assert runs >= FUZZ_RUNS


# --- host side: the Python frame decoder and request loop ------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=1100))
def test_encode_decode_round_trip(ftype, seq, payload):
    raw = protocol.encode_frame(ftype, seq, payload)
    assert raw.endswith(b"\x00") and b"\x00" not in raw[:-1]
    assert protocol.decode_frame(raw[:-1]) == (ftype, seq, payload)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300), st.data())
def test_truncated_or_bit_flipped_frames_are_refused(ftype, seq, payload, data):
    raw = protocol.encode_frame(ftype, seq, payload)[:-1]
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(ValueError):
        protocol.decode_frame(raw[:cut])
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    bad = bytearray(raw)
    bad[i] ^= 1 << bit
    with pytest.raises(ValueError):
        protocol.decode_frame(bytes(bad))


class ScriptedPort:
    """A fake serial port: each request gets the next scripted answer (noise, a good or damaged
    answer, an error frame, an answer to another seq, silence). The good answer's payload is
    b"ok" + the request's payload, so the test knows what the link must return."""

    def __init__(self, script: list[tuple[bytes, str]]) -> None:
        self.script = list(script)
        self.pending = bytearray()
        self.timeout = 0.0
        self.requests = 0

    @property
    def in_waiting(self) -> int:
        return len(self.pending)

    def reset_input_buffer(self) -> None:
        self.pending.clear()

    def read(self, n: int) -> bytes:
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def write(self, data: bytes) -> None:
        frames = [f for f in data.split(b"\x00") if f]
        assert len(frames) == 1
        ftype, seq, payload = protocol.decode_frame(frames[0])
        self.requests += 1
        noise, kind = self.script.pop(0) if self.script else (b"", "silent")
        answer = protocol.encode_frame(ftype | 0x80, seq, b"ok" + payload)
        if kind == "flip":
            answer = answer[:2] + bytes([answer[2] ^ 0x10 or 1]) + answer[3:]
        elif kind == "truncate":
            answer = answer[: len(answer) // 2] + b"\x00"
        elif kind == "other_seq":
            answer = protocol.encode_frame(ftype | 0x80, (seq + 1) & 0xFF, b"stale")
        elif kind == "error":
            answer = protocol.encode_frame(protocol.ERR, seq, bytes([1]))
        elif kind == "reset":
            answer = protocol.encode_frame(protocol.ERR, seq, bytes([7]))
        elif kind == "silent":
            answer = b""
        self.pending += noise + answer


ANSWER = st.tuples(st.binary(max_size=40),
                   st.sampled_from(["good", "flip", "truncate", "other_seq", "error", "reset", "silent"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANSWER, max_size=8), st.binary(max_size=64))
def test_request_returns_the_verified_answer_or_raises(script, payload):
    port = ScriptedPort(script)
    link = Link(port, timeout=0.002, retries=4)
    try:
        got = link.request(protocol.WRITE_INPUT, payload)
    except BoardResetError:
        assert any(k == "reset" for _, k in script)
        return
    except LinkError:
        return
    assert got == b"ok" + payload  # never anything else


def test_request_succeeds_through_damage_within_the_retries():
    script = [(b"\x13\x00\x99", "flip"), (b"", "truncate"), (b"\x00\x00", "other_seq"), (b"", "error"), (b"", "good")]
    link = Link(ScriptedPort(script), timeout=0.01, retries=4)
    assert link.request(protocol.RUN, b"abc") == b"okabc"
    assert link.stats["retries"] == 4 and link.stats["bad_frames"] == 2


def test_state_lost_answer_raises_board_reset_at_once():
    port = ScriptedPort([(b"", "reset"), (b"", "good")])
    link = Link(port, timeout=0.01, retries=4)
    with pytest.raises(BoardResetError, match="board reset detected"):
        link.request(protocol.RUN)
    assert port.requests == 1 and link.stats["resets"] == 1


def test_write_input_gap_is_a_detected_reset():
    class GapPort(ScriptedPort):
        def write(self, data):
            _, seq, payload = protocol.decode_frame(data.split(b"\x00")[1])
            off = struct.unpack_from("<I", payload)[0]
            held = 0 if off else len(payload) - 4  # the board reboots after the first chunk
            self.pending += protocol.encode_frame(protocol.WRITE_INPUT | 0x80, seq, struct.pack("<I", held))

    link = Link(GapPort([]), timeout=0.01)
    link.chunk = 100
    with pytest.raises(BoardResetError, match="holds 0 bytes of the input, 100 were written"):
        link.write_input(bytes(250))

