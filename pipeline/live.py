"""Live audio: sound read as it comes (a pipe, or a file at the pace it plays), tagged as it comes.

Three sources, each an iterable of float32 chunks (samples, channels) with its ``sample_rate`` and
``channels``: :func:`wav_stream` (a WAV on a pipe: ``ffmpeg ... -f wav -``), :func:`raw_stream`
(headerless PCM: ``arecord -t raw``) and :class:`FileStream` (a sound file, optionally paced at real
time). :func:`listen` runs :meth:`Tagger.stream <dclsify.pipeline.predict.Tagger.stream>` on the chunks
and measures how long each event's lines take: the ``dclsify listen`` command.
"""

from __future__ import annotations

import bisect
import os
import signal
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .events import EventRules, EventUpdate

CHUNK_SECONDS = 0.1
PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE  # WAVE format codes
FORMAT_NAMES = {
    PCM: "PCM",
    IEEE_FLOAT: "IEEE float",
    0x0002: "ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
}
# WAVE_FORMAT_EXTENSIBLE's subformat is a GUID: the format code, then these 14 bytes
SUBFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what writers that cannot seek back put in a size field


def _int24(data: bytes) -> np.ndarray:
    triples = np.frombuffer(data, np.uint8).reshape(-1, 3)
    words = np.zeros((len(triples), 4), np.uint8)
    words[:, 1:] = triples  # the 24 bits at the top of an int32: its sign is theirs
    return words.view("<i4")[:, 0].astype(np.float32) / 2**31


# (format code, bits) -> bytes to float32 in [-1, 1], as libsndfile scales them
DECODERS: dict[tuple[int, int], Callable[[bytes], np.ndarray]] = {
    (PCM, 8): lambda data: (np.frombuffer(data, np.uint8).astype(np.float32) - 128) / 128,
    (PCM, 16): lambda data: np.frombuffer(data, "<i2").astype(np.float32) / 2**15,
    (PCM, 24): _int24,
    (PCM, 32): lambda data: np.frombuffer(data, "<i4").astype(np.float32) / 2**31,
    (IEEE_FLOAT, 32): lambda data: np.frombuffer(data, "<f4").astype(np.float32),
    (IEEE_FLOAT, 64): lambda data: np.frombuffer(data, "<f8").astype(np.float32),
}
RAW_FORMATS = {"s16le": (PCM, 16), "f32le": (IEEE_FLOAT, 32)}


class StreamError(ValueError):
    """A sound stream that cannot be read; the message says why."""


def _read(file: BinaryIO, size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the stream (a pipe may hand over less at a time)."""
    parts, got = [], 0
    while got < size:
        part = file.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class PcmStream:
    """Interleaved little-endian PCM from a binary file, read as it comes (never seeked: a pipe does), in
    chunks of ``chunk_seconds``: float32 (samples, channels) in [-1, 1]. ``size``: the bytes to read (None:
    up to the end of the stream). An incomplete sample frame at the end is left out: ``dropped_bytes``."""

    def __init__(
        self,
        file: BinaryIO,
        sample_rate: int,
        channels: int,
        encoding: tuple[int, int],
        chunk_seconds: float = CHUNK_SECONDS,
        size: int | None = None,
    ) -> None:
        if sample_rate < 1 or channels < 1:
            raise StreamError(f"a stream needs a positive rate and channel count, got {sample_rate} Hz, {channels}")
        if chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds:g}")
        self.file, self.sample_rate, self.channels, self.size = file, sample_rate, channels, size
        self.decode = DECODERS[encoding]
        self.frame_bytes = channels * encoding[1] // 8
        self.chunk_frames = max(1, round(chunk_seconds * sample_rate))
        self.dropped_bytes = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        left, per_chunk = self.size, self.chunk_frames * self.frame_bytes
        while left is None or left > 0:
            want = per_chunk if left is None else min(left, per_chunk)
            data = _read(self.file, want)
            whole = len(data) - len(data) % self.frame_bytes
            self.dropped_bytes = len(data) - whole  # only the last read can hold part of a frame
            if whole:
                yield self.decode(data[:whole]).reshape(-1, self.channels)
            if len(data) < want:  # the end of the stream
                return
            if left is not None:
                left -= len(data)


def raw_stream(
    file: BinaryIO, sample_rate: int, format: str = "s16le", channels: int = 1, chunk_seconds: float = CHUNK_SECONDS
) -> PcmStream:
    """Headerless PCM (``s16le``: int16, ``f32le``: float32; little-endian, channels interleaved) from a binary
    file or pipe, as :class:`PcmStream` chunks."""
    if format not in RAW_FORMATS:
        raise StreamError(f"raw PCM formats are {', '.join(RAW_FORMATS)}, not {format!r}")
    return PcmStream(file, sample_rate, channels, RAW_FORMATS[format], chunk_seconds)


def wav_stream(file: BinaryIO, chunk_seconds: float = CHUNK_SECONDS) -> PcmStream:
    """A WAV from a binary file or pipe: its header is read at once (:class:`StreamError` if it is no WAV or one
    of an unsupported format), its samples as :class:`PcmStream` chunks.

    libsndfile cannot read a WAV from a pipe (it seeks: "No 'data' chunk marker", illegal seek) and Python's
    ``wave`` reads no float WAVs and trusts the data chunk's size, which a streamed WAV does not know, so this
    reads the RIFF header itself: PCM of 8 (unsigned), 16, 24 or 32 bits, IEEE float of 32 or 64 bits, plain
    or WAVE_FORMAT_EXTENSIBLE, RIFF or RF64; chunks other than ``fmt`` and ``data`` (LIST, fact, ...) are
    skipped. A data size of 0 or 0xFFFFFFFF (ffmpeg's and others' "unknown" on a pipe) reads to the end of
    the stream; another size is kept, so that a chunk after the data (tags) is not heard as sound, and a
    stream that ends sooner ends there."""
    header = _read(file, 12)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RF64") or header[8:] != b"WAVE":
        found = f"it starts with {header!r}" if header else "it is empty"
        raise StreamError(f"not a WAV stream: {found}, not RIFF....WAVE")
    encoding = rate = channels = None
    long_size = 0  # RF64: the data's size, from the ds64 chunk
    while True:
        chunk = _read(file, 8)
        if len(chunk) < 8:
            raise StreamError(f"not a WAV stream: it ends before its {'data' if encoding else 'fmt'} chunk")
        name, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if name == b"data":
            break
        body = _read(file, size + size % 2)  # chunks are padded to an even size
        if len(body) < size:
            raise StreamError(f"not a WAV stream: it ends inside its {name.decode('latin-1')!r} chunk")
        if name == b"fmt ":
            encoding, rate, channels = _wav_format(body)
        elif name == b"ds64" and size >= 16:
            long_size = int.from_bytes(body[8:16], "little")
    if encoding is None:
        raise StreamError("not a WAV stream: its data chunk comes before any fmt chunk")
    known = size if size not in UNKNOWN_SIZES else long_size or None
    return PcmStream(file, rate, channels, encoding, chunk_seconds, known)


def _wav_format(body: bytes) -> tuple[tuple[int, int], int, int]:
    """A fmt chunk's (format code, bits), rate and channels, checked."""
    if len(body) < 16:
        raise StreamError(f"not a WAV stream: its fmt chunk holds {len(body)} bytes, not 16 or more")
    code, channels, rate, _, align, bits = struct.unpack("<HHIIHH", body[:16])  # _: bytes per second
    if code == EXTENSIBLE and len(body) >= 40 and body[26:40] == SUBFORMAT_TAIL:
        code = int.from_bytes(body[24:26], "little")  # bits stays the container's size: valid bits may be fewer
    if (code, bits) not in DECODERS:
        name = FORMAT_NAMES.get(code, "extensible, another subformat" if code == EXTENSIBLE else "unknown")
        raise StreamError(
            f"unsupported WAV format: code 0x{code:04X} ({name}), {bits} bits; "
            "PCM of 8, 16, 24 or 32 bits and IEEE float of 32 or 64 bits are read"
        )
    if channels < 1 or rate < 1 or align != channels * bits // 8:
        raise StreamError(
            f"a WAV header that does not add up: {channels} channels of {bits} bits at {rate} Hz, {align} bytes a frame"
        )
    return (code, bits), rate, channels


class FileStream:
    """A sound file (any format libsndfile reads) in chunks of ``chunk_seconds``: float32 (samples, channels).

    ``realtime``: each chunk is handed over once the time of its last sample has come (the clock starts when
    the first is asked for), as a live source would hand it over; to a reader that fell behind, at once."""

    def __init__(self, path: str | os.PathLike, chunk_seconds: float = CHUNK_SECONDS, realtime: bool = False) -> None:
        import soundfile

        if chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds:g}")
        self.path, self.realtime = Path(path), realtime
        if not self.path.is_file():
            raise StreamError(f"{path}: no such file")
        try:
            info = soundfile.info(self.path)
        except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
            raise StreamError(f"{path}: unreadable: {getattr(error, 'error_string', None) or error}") from None
        self.sample_rate, self.channels = info.samplerate, info.channels
        self.chunk_frames = max(1, round(chunk_seconds * self.sample_rate))

    def __iter__(self) -> Iterator[np.ndarray]:
        import soundfile

        start, done = time.perf_counter(), 0
        with soundfile.SoundFile(self.path) as reader:
            while len(data := reader.read(self.chunk_frames, dtype="float32", always_2d=True)):
                done += len(data)
                if self.realtime:
                    time.sleep(max(0.0, start + done / self.sample_rate - time.perf_counter()))
                yield data


def spread(values: list[float]) -> tuple[float, float, float] | None:
    """(min, median, max) of ``values``; None for none."""
    return (min(values), statistics.median(values), max(values)) if values else None


@dataclass
class ListenReport:
    """What :func:`listen` heard: its ``lines`` (the start and end of each event), the latency of each start
    line (seconds from the arrival of the input holding the event's onset to the line) and of each end line
    (from the arrival of its offset), how much audio came and how long listening took."""

    lines: list[EventUpdate] = field(default_factory=list)
    start_latencies: list[float] = field(default_factory=list)
    end_latencies: list[float] = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    interrupted: bool = False  # Ctrl-C ended the stream

    @property
    def events(self) -> int:
        """The events that started (each ends too: those still open end with the stream)."""
        return len(self.start_latencies)

    def summary(self) -> str:
        """The latencies in one line: min, median and max of each kind of line."""
        parts = []
        for name, values in (("onset -> start line", self.start_latencies), ("offset -> end line", self.end_latencies)):
            low, median, high = spread(values) or (0, 0, 0)
            count = f"{len(values)} event{'s' * (len(values) != 1)}"
            parts.append(f"{name}: min {low:.2f} s, median {median:.2f} s, max {high:.2f} s ({count})")
        return "latency " + "; ".join(parts) if self.lines else "latency: no event"


class _CtrlC:
    """SIGINT while listening: raised at once while waiting for audio, else only noted (the next chunk is
    then not asked for), so the stream closes as it would at its end; a second Ctrl-C is raised at once."""

    def __init__(self) -> None:
        self.waiting = self.pressed = False

    def __call__(self, signum, frame) -> None:
        again, self.pressed = self.pressed, True
        if self.waiting or again:
            raise KeyboardInterrupt


def listen(
    tagger,
    chunks: Iterable,
    sample_rate: int,
    rules: EventRules | None = None,
    step: float | None = None,
    on_line: Callable[[EventUpdate], None] | None = None,
) -> ListenReport:
    """Tag ``chunks`` (of any size, at ``sample_rate``: see :meth:`Tagger.stream
    <dclsify.pipeline.predict.Tagger.stream>`) as they come, handing each event line to ``on_line`` once it is
    final, and time it: a line's latency is the wall time from the arrival of the chunk holding the input
    sample at the event's onset (a start line) or offset (an end line) to the line. A chunk arrives when it
    is taken from ``chunks``: a backlog waiting in a pipe is not counted.

    Ctrl-C (in the main thread) ends the stream as its end would: the events still open end there."""
    report, ends, arrivals, ctrl_c = ListenReport(), [], [], _CtrlC()
    started = time.perf_counter()

    def taken() -> Iterator:
        received, source = 0, iter(chunks)
        while True:
            try:  # a Ctrl-C while waiting, or noted while the model worked, ends the chunks: the stream closes
                ctrl_c.waiting = True
                if ctrl_c.pressed:
                    raise KeyboardInterrupt
                chunk = next(source)
                ctrl_c.waiting = False
            except (StopIteration, KeyboardInterrupt):
                if not received:
                    raise StreamError("no audio came: the stream ended before its first sample") from None
                return
            arrivals.append(time.perf_counter())
            received += len(chunk)
            ends.append(received)
            yield chunk

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, ctrl_c) if main else None
    try:
        for update in tagger.stream(taken(), sample_rate, rules, step):
            for line in update.events:
                sample = int(line.time * sample_rate + 1e-6)  # the input sample at the onset or offset
                arrival = arrivals[min(bisect.bisect_right(ends, sample), len(arrivals) - 1)]
                kind = report.start_latencies if line.offset is None else report.end_latencies
                kind.append(time.perf_counter() - arrival)
                report.lines.append(line)
                if on_line is not None:
                    on_line(line)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    report.audio_seconds = (ends[-1] if ends else 0) / sample_rate
    report.wall_seconds, report.interrupted = time.perf_counter() - started, ctrl_c.pressed
    return report
