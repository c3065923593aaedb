"""Live audio: WAV and raw PCM streams read as a pipe gives them, listen's lines and latencies, the CLI."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
from test_predict import tone
from typer.testing import CliRunner

from dclsify.cli import app
from dclsify.pipeline.live import FileStream, StreamError, listen, raw_stream, wav_stream
from dclsify.pipeline.predict import Tagger

runner = CliRunner()
RATE = 8000
# whole windows of the tiny model (0.5 s, one time position each), its surest classes
SPANS = [(0.5, 1.5, "low", 300), (2.0, 3.0, "middle", 1000), (3.5, 4.0, "low", 300)]


class Pipe(io.RawIOBase):
    """What a pipe gives: at most a few hundred bytes a read, no seeking."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), 333, len(self.data) - self.at)
        buffer[:size] = self.data[self.at : self.at + size]
        self.at += size
        return size


@pytest.fixture(scope="module")
def tagger(tagger_checkpoint):
    return Tagger(tagger_checkpoint, device="cpu")


def read_all(stream) -> np.ndarray:
    return np.concatenate(list(stream))


def tones(rate: int, seconds: float = 4.5) -> np.ndarray:
    sound = np.zeros(round(seconds * rate), np.float32)
    for onset, offset, _, frequency in SPANS:
        sound[round(onset * rate) : round(offset * rate)] += tone(frequency, rate, offset - onset)
    return sound


def wav_bytes(tmp_path, data: np.ndarray, rate: int = RATE, **options) -> bytes:
    path = tmp_path / "sound.wav"
    soundfile.write(path, data, rate, **options)
    return path.read_bytes()


@pytest.mark.parametrize(
    "options",
    [
        {"subtype": "PCM_U8"},
        {"subtype": "PCM_16"},
        {"subtype": "PCM_24"},
        {"subtype": "PCM_32"},
        {"subtype": "FLOAT"},  # with fact and PEAK chunks before the data
        {"subtype": "DOUBLE"},
        {"subtype": "PCM_24", "format": "WAVEX"},
        {"subtype": "FLOAT", "format": "WAVEX"},
        {"subtype": "PCM_16", "format": "RF64"},
    ],
    ids=lambda options: "-".join(options.values()),
)
def test_a_wav_stream_gives_the_samples_soundfile_reads(tmp_path, options):
    data = np.random.default_rng(0).uniform(-0.9, 0.9, (1234, 2)).astype(np.float32)  # stereo
    raw = wav_bytes(tmp_path, data, 11025, **options)
    expected = soundfile.read(tmp_path / "sound.wav", dtype="float32", always_2d=True)[0]
    stream = wav_stream(Pipe(raw), chunk_seconds=0.01)
    assert (stream.sample_rate, stream.channels) == (11025, 2)
    chunks = list(stream)
    assert [len(chunk) for chunk in chunks] == [110] * 11 + [24] and chunks[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(chunks), expected)


def test_unknown_data_sizes_read_to_the_end_and_other_chunks_are_skipped(tmp_path):
    data = np.random.default_rng(1).uniform(-0.9, 0.9, 1000).astype(np.float32)
    raw = wav_bytes(tmp_path, data, subtype="PCM_16")
    expected = soundfile.read(tmp_path / "sound.wav", dtype="float32", always_2d=True)[0]
    assert raw[36:40] == b"data"
    header, samples = raw[:36], raw[44:]
    for size in (0, 0xFFFFFFFF):  # what ffmpeg and others write on a pipe, where they cannot seek back
        streamed = b"RIFF" + size.to_bytes(4, "little") + header[8:] + b"data" + size.to_bytes(4, "little") + samples
        np.testing.assert_array_equal(read_all(wav_stream(Pipe(streamed))), expected)
    tags = b"LIST" + (5).to_bytes(4, "little") + b"INFOx\x00"  # an odd size: padded to even
    stated = header + tags + raw[36:] + b"LIST" + (4).to_bytes(4, "little") + b"INFO"  # tags after the data too
    np.testing.assert_array_equal(read_all(wav_stream(Pipe(stated))), expected)  # the stated size is kept
    stream = wav_stream(Pipe(raw[:-3]))  # cut inside a sample frame: the part is left out
    assert len(read_all(stream)) == 998 and stream.dropped_bytes == 1


def test_a_stream_that_is_no_wav_or_of_another_format_is_one_clear_error(tmp_path):
    tone16 = wav_bytes(tmp_path, tone(300, RATE, 0.1), subtype="PCM_16")
    for data, message in (
        (b"", "not a WAV stream: it is empty"),
        (b"garbage, not a sound at all", "not a WAV stream: it starts with b'garbage, not', not RIFF....WAVE"),
        (tone16[:12], "not a WAV stream: it ends before its fmt chunk"),
        (tone16[:36], "not a WAV stream: it ends before its data chunk"),
        (
            wav_bytes(tmp_path, tone(300, RATE, 0.1), subtype="ULAW"),
            "unsupported WAV format: code 0x0007 (mu-law), 8 bits;",
        ),
        (
            wav_bytes(tmp_path, tone(300, RATE, 0.1), subtype="IMA_ADPCM"),
            "unsupported WAV format: code 0x0011 (IMA ADPCM), 4 bits;",
        ),
    ):
        with pytest.raises(StreamError, match="^" + re.escape(message)):
            wav_stream(Pipe(data))


def test_raw_pcm_is_read_in_chunks_and_a_file_at_real_time(tmp_path):
    data = (np.random.default_rng(2).uniform(-0.9, 0.9, (2000, 2)) * 32768).astype("<i2")
    stream = raw_stream(Pipe(data.tobytes() + b"\x01\x02\x03"), RATE, "s16le", channels=2, chunk_seconds=0.1)
    np.testing.assert_array_equal(read_all(stream), data / np.float32(32768))
    assert stream.dropped_bytes == 3
    floats = data[:, 0].astype("<f4") / 32768
    np.testing.assert_array_equal(read_all(raw_stream(Pipe(floats.tobytes()), RATE, "f32le"))[:, 0], floats)
    soundfile.write(tmp_path / "half.flac", tone(300, RATE, 0.5), RATE)
    stream, started, handed = FileStream(tmp_path / "half.flac", 0.1, realtime=True), time.perf_counter(), []
    for chunk in stream:
        handed.append((time.perf_counter() - started, len(chunk)))
    assert [samples for _, samples in handed] == [800] * 5
    assert all(0.1 * (i + 1) - 0.01 <= at < 0.1 * (i + 1) + 0.3 for i, (at, _) in enumerate(handed)), handed
    with pytest.raises(StreamError, match="no such file"):
        FileStream(tmp_path / "none.wav")


def test_listen_gives_the_events_of_the_file_each_once_as_a_start_and_an_end(tagger, tmp_path):
    rate = 16000  # resampled to the model's 8 kHz as it comes
    sound = tones(rate)
    soundfile.write(tmp_path / "tones.wav", sound, rate, subtype="FLOAT")
    sizes = [777, 1, 4001, 123]
    chunks = [sound[i : i + sizes[k % 4]] for k, i in enumerate(np.cumsum([0, *(sizes * 999)]))]
    chunks = [chunk[:, None] for chunk in chunks if len(chunk)]  # (samples, channels)
    printed = []
    report = listen(tagger, chunks, rate, on_line=printed.append)
    expected = tagger.events(tmp_path / "tones.wav")
    assert [event.label for event in expected] == ["low", "middle", "low"]
    starts = [line for line in printed if line.offset is None]
    ends = [line for line in printed if line.offset is not None]
    assert printed == report.lines and report.events == len(starts) == len(ends) == len(expected)
    for event in expected:  # one start line, then one end line, each event
        (start,) = [line for line in starts if line.label == event.label and abs(line.onset - event.onset) < 0.1]
        (end,) = [line for line in ends if line.label == event.label and abs(line.onset - event.onset) < 0.1]
        assert printed.index(start) < printed.index(end) and start.onset == end.onset < end.offset
        step = 0.008  # the front-end's hop: a frame
        assert abs(end.onset - event.onset) <= step and abs(end.offset - event.offset) <= step
    assert list(printed[-1].as_dict()) == ["label", "onset", "offset", "score"]
    assert len(report.start_latencies) == len(report.end_latencies) == 3 and min(report.start_latencies) >= 0
    assert report.audio_seconds == pytest.approx(4.5) and "(3 events)" in report.summary()


def test_ctrl_c_ends_the_stream_and_the_open_event_with_it(tagger):
    sound = tones(RATE)

    def until_ctrl_c(seconds: float):
        for start in range(0, len(sound), 800):
            if start >= seconds * RATE:
                os.kill(os.getpid(), signal.SIGINT)  # while listen waits for audio
            yield sound[start : start + 800]

    report = listen(tagger, until_ctrl_c(2.5), RATE)  # inside the "middle" tone, 2-3 s
    assert report.interrupted and report.audio_seconds == pytest.approx(2.5)
    ends = [(line.label, line.offset) for line in report.lines if line.offset is not None]
    assert [label for label, _ in ends] == ["low", "middle"] and ends[1][1] == pytest.approx(2.5)
    pressed = []

    def press_once(line) -> None:  # Ctrl-C while the model works: the stream ends before the next chunk
        if not pressed:
            pressed.append(line)
            os.kill(os.getpid(), signal.SIGINT)

    report = listen(tagger, (sound[i : i + 800] for i in range(0, len(sound), 800)), RATE, on_line=press_once)
    assert report.interrupted and report.audio_seconds < 2.0 and report.lines[-1].offset is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    with pytest.raises(StreamError, match="no audio came"):
        listen(tagger, iter([]), RATE)


def lines_of(stdout: str) -> tuple[list, list]:
    """The start and end lines printed, as (label, onset); every line must parse as JSON."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert all(list(line) == ["label", "onset", "offset", "score"] for line in lines if "offset" in line)
    starts = [(line["label"], line["onset"]) for line in lines if "offset" not in line]
    return starts, [(line["label"], line["onset"]) for line in lines if "offset" in line]


def test_listen_command_reads_a_wav_through_a_pipe_or_raw_pcm(tagger_checkpoint, tmp_path):
    sound = tones(RATE)
    command = [sys.executable, "-m", "dclsify", "listen", str(tagger_checkpoint), "-", "--device", "cpu"]
    run = subprocess.run(command, input=wav_bytes(tmp_path, sound, subtype="PCM_16"), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    starts, ends = lines_of(run.stdout.decode())
    assert [label for label, _ in starts] == ["low", "middle", "low"] and sorted(ends) == sorted(starts)
    assert "latency onset -> start line: min " in run.stderr.decode() and "(3 events)" in run.stderr.decode()
    assert "4.50 s of audio in" in run.stderr.decode()
    raw = np.clip(np.rint(sound * 32768), -32768, 32767).astype("<i2").tobytes()
    args = ["listen", str(tagger_checkpoint), "-", "--format", "s16le", "--rate", str(RATE), "--device", "cpu"]
    result = runner.invoke(app, args, input=raw)
    assert result.exit_code == 0, result.output
    assert lines_of(result.stdout) == (starts, ends) and "(3 events)" in result.stderr


def test_listen_command_realtime_takes_the_file_s_duration_and_errors_are_one_line(tagger_checkpoint, tmp_path):
    soundfile.write(tmp_path / "one.wav", tones(RATE)[:RATE], RATE)  # 1 s: "low" from 0.5 s
    checkpoint = str(tagger_checkpoint)
    result = runner.invoke(app, ["listen", checkpoint, str(tmp_path / "one.wav"), "--realtime", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == ["low", "low"]
    numbers = result.stderr.splitlines()[-1].split()  # "1.00 s of audio in 1.03 s"
    audio, wall = float(numbers[0]), float(numbers[-2])
    assert audio == 1.0 and 0.95 <= wall < 2.0, result.stderr
    for args, data, message in (
        (["-", "--format", "s16le"], b"", "raw PCM (s16le) needs its rate: --rate"),
        (["-", "--realtime"], b"", "--realtime paces a file: standard input comes at its own pace"),
        (["-", "--rate", "8000"], b"", "--rate and --channels are for raw PCM"),
        (["-"], b"garbage on stdin", "not a WAV stream: it starts with b'garbage on s'"),
        ([str(tmp_path / "none.wav")], b"", "none.wav: no such file"),
    ):
        failed = runner.invoke(app, ["listen", checkpoint, *args, "--device", "cpu"], input=data)
        assert failed.exit_code == 1 and message in failed.stderr, (args, failed.output)
        assert failed.stdout == "" and "Traceback" not in failed.output and len(failed.stderr.splitlines()) == 1
    missing = runner.invoke(app, ["listen", str(tmp_path / "none.safetensors"), "-"], input=b"")
    assert missing.exit_code == 1 and "no such checkpoint" in missing.stderr and missing.stdout == ""
