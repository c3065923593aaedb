"""MonoBlocks: a long sound file read in blocks gives read_mono's sound."""

import numpy as np
import pytest
import soundfile

from dclsify.pipeline.sources import ClipError, MonoBlocks, read_mono


def noise_file(path, rate, seconds, channels=1):
    """White noise, in a 32-bit float WAV so that nothing is lost in writing it; returns its path."""
    frames = round(seconds * rate) + 7  # a length no block size divides
    noise = np.random.default_rng(rate).uniform(-0.9, 0.9, (frames, channels)).astype(np.float32)
    soundfile.write(path, noise, rate, subtype="FLOAT")
    return path


def blocks_of(path, sample_rate, block_seconds):
    with MonoBlocks(path, sample_rate, block_seconds) as blocks:
        parts = list(blocks)
        assert blocks.samples == sum(len(part) for part in parts)
    assert all(part.dtype == np.float32 and part.ndim == 1 for part in parts)
    return parts


# 0.37 s: a few blocks, no divisor of the length; 0.0002 s: blocks shorter than their margins
# (rounded up to one period of the reduced input rate: 441 frames at 44100 -> 16000); 60 s: one block
BLOCK_SECONDS = [0.37, 0.0002, 60.0]


@pytest.mark.parametrize("block_seconds", BLOCK_SECONDS)
@pytest.mark.parametrize("channels", [1, 2])
def test_without_resampling_the_blocks_are_read_mono_exactly(tmp_path, channels, block_seconds):
    path = noise_file(tmp_path / "noise.wav", 16000, 1.3, channels)
    parts = blocks_of(path, 16000, block_seconds)
    np.testing.assert_array_equal(np.concatenate(parts), read_mono(path, 16000))


@pytest.mark.parametrize("block_seconds", BLOCK_SECONDS)
@pytest.mark.parametrize(
    "rate, sample_rate, channels",
    [(44100, 16000, 1), (48000, 32000, 1), (22050, 16000, 1), (8000, 16000, 1), (44100, 32000, 2)],
)
def test_resampled_blocks_equal_read_mono(tmp_path, rate, sample_rate, channels, block_seconds):
    path = noise_file(tmp_path / "noise.wav", rate, 1.3, channels)
    whole = read_mono(path, sample_rate)
    joined = np.concatenate(blocks_of(path, sample_rate, block_seconds))
    assert len(joined) == len(whole)
    assert np.abs(joined - whole).max() < 1e-6  # the same sums, added in another order


def test_a_file_shorter_than_a_block_is_one_block(tmp_path):
    path = noise_file(tmp_path / "short.wav", 44100, 0.05)
    parts = blocks_of(path, 16000, 1.0)
    assert len(parts) == 1
    assert np.abs(parts[0] - read_mono(path, 16000)).max() < 1e-6


def test_duration_length_and_a_second_pass(tmp_path):
    path = noise_file(tmp_path / "noise.wav", 22050, 1.0)
    with MonoBlocks(path, 16000, 0.37) as blocks:
        assert blocks.seconds == (22050 + 7) / 22050
        assert blocks.samples == len(read_mono(path, 16000))
        first, second = np.concatenate(list(blocks)), np.concatenate(list(blocks))
    np.testing.assert_array_equal(first, second)


def test_errors_are_read_monos_and_come_at_once(tmp_path):
    (tmp_path / "text.wav").write_text("not a sound")
    (tmp_path / "nothing.wav").touch()
    soundfile.write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    reasons = {}
    for name in ("absent.wav", "text.wav", "nothing.wav", "silent.wav"):
        with pytest.raises(ClipError) as expected:
            read_mono(tmp_path / name, 16000)
        with pytest.raises(ClipError) as raised:
            MonoBlocks(tmp_path / name, 16000)
        reasons[name] = str(raised.value)
        assert reasons[name] == str(expected.value)
    assert reasons["absent.wav"] == "missing" and reasons["silent.wav"] == "empty"
    assert reasons["text.wav"].startswith("unreadable: ") and reasons["nothing.wav"].startswith("unreadable: ")
