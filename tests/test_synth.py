"""The demo's generated sound set: its files, its determinism, and labels that match the sounds."""

import h5py
import numpy as np
import pytest
import soundfile

from dclsify.pipeline.datasets import open_source
from dclsify.pipeline.sources import HDF5Clips
from dclsify.pipeline.synth import CLASS_NAMES, SOUND_CLASSES, class_descriptions, make_clip, make_scene, make_sound_set

CLASSES = len(CLASS_NAMES)
RATE = 16000


@pytest.fixture(scope="module")
def sound_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return make_sound_set(folder, train_clips=30, eval_clips=CLASSES, seed=3)


def test_the_files_read_as_packed_data(sound_set):
    train, eval_ = sound_set
    assert (train.name, eval_.name) == ("train.h5", "eval.h5")
    for path, clips in ((train, 30), (eval_, CLASSES)):
        dataset = open_source(path)
        assert isinstance(dataset, HDF5Clips)
        assert len(dataset) == clips
        assert dataset.class_names == CLASS_NAMES and CLASSES >= 12
        assert dataset.multi_label is True
        assert (dataset.audio.sample_rate, dataset.audio.seconds) == (RATE, 2.0)
        waveform, target = dataset.load(clips - 1)
        assert waveform.dtype == np.int16 and waveform.shape == (2 * RATE,)
        assert target.dtype == bool and target.shape == (CLASSES,)
        with h5py.File(path) as handle:
            assert handle["audio_name"].dtype.kind == "S" and handle["target"].dtype == bool
            assert set(handle.attrs) >= {"sample_rate", "clip_seconds", "class_names", "multi_label", "dclsify_version"}
            assert handle.attrs["synth_seed"] == 3


def test_the_files_hold_what_make_clip_describes(sound_set):
    for split, path in zip(("train", "eval"), sound_set, strict=True):
        with h5py.File(path) as handle:
            waveforms, targets = handle["waveform"][:], handle["target"][:]
        for index in range(len(waveforms)):
            waveform, events = make_clip(3, split, index)
            np.testing.assert_array_equal(waveforms[index], waveform)
            assert np.flatnonzero(targets[index]).tolist() == sorted(e.label for e in events)
            assert 1 <= len(events) <= 3 and events[0].label == index % CLASSES
        assert targets.any(axis=0).all()  # every class in each split
        assert np.abs(waveforms.astype(np.int32)).max() < 32767  # turned down, never clipped


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(sound_set, tmp_path):
    again = make_sound_set(tmp_path / "again", train_clips=30, eval_clips=CLASSES, seed=3)
    other = make_sound_set(tmp_path / "other", train_clips=30, eval_clips=CLASSES, seed=4)
    for first, second, third in zip(sound_set, again, other, strict=True):
        assert first.read_bytes() == second.read_bytes()
        assert first.read_bytes() != third.read_bytes()
    with h5py.File(sound_set[0]) as train, h5py.File(sound_set[1]) as eval_:
        assert not (train["waveform"][:CLASSES] == eval_["waveform"][:]).all(axis=1).any()  # no clip in both splits


def single_event(name: str, seed: int = 0):
    """The first clip of the train split holding one event, of class ``name``: (float waveform, event)."""
    label = CLASS_NAMES.index(name)
    for index in range(label, 100 * CLASSES, CLASSES):
        waveform, events = make_clip(seed, "train", index)
        if len(events) == 1:
            return waveform / 32768.0, events[0]
    raise AssertionError(f"no clip with {name} alone")


def spectrum(signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.fft.rfftfreq(len(signal), 1 / RATE), np.abs(np.fft.rfft(signal)) ** 2


def event_part(waveform, event, first=0.0, last=1.0):
    start = round(event.start * RATE)
    length = round(event.seconds * RATE)
    return waveform[start + round(first * length) : start + round(last * length)]


def energy_share(signal, low, high):
    frequencies, power = spectrum(signal)
    return power[(frequencies >= low) & (frequencies <= high)].sum() / power.sum()


def dominant_frequency(signal):
    frequencies, power = spectrum(signal)
    return frequencies[power.argmax()]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tone_sounds_at_its_frequency_and_its_time(seed):
    waveform, event = single_event("tone", seed)
    frequency = event.parameters["frequency"]
    assert 300 <= frequency <= 3000
    inside = event_part(waveform, event)
    assert abs(dominant_frequency(inside) - frequency) < 2 * RATE / len(inside)
    assert energy_share(inside, 0.97 * frequency, 1.03 * frequency) > 0.8
    start, end = round(event.start * RATE), round((event.start + event.seconds) * RATE)
    outside = np.concatenate([waveform[:start], waveform[end:]])
    assert np.sqrt(np.mean(outside**2)) < 0.004  # the noise floor, at most -50 dBFS
    assert np.sqrt(np.mean(inside**2)) > 0.008  # an event at -20 dB or louder


def test_each_class_name_names_its_sound():
    # a table that paired a name with another class's generator would fail one of these
    waveform, event = single_event("rising chirp")
    assert dominant_frequency(event_part(waveform, event, 0.8)) > 2 * dominant_frequency(
        event_part(waveform, event, 0, 0.2)
    )
    waveform, event = single_event("falling chirp")
    assert dominant_frequency(event_part(waveform, event, 0, 0.2)) > 2 * dominant_frequency(
        event_part(waveform, event, 0.8)
    )
    waveform, event = single_event("rumble")
    assert energy_share(event_part(waveform, event), 0, 400) > 0.8
    waveform, event = single_event("noise burst")
    assert energy_share(event_part(waveform, event), event.parameters["low_hz"], event.parameters["high_hz"]) > 0.8
    waveform, event = single_event("bird trill")
    assert energy_share(event_part(waveform, event), 1800, 7000) > 0.8
    waveform, event = single_event("harmonic stack")
    fundamental = event.parameters["fundamental"]
    part = event_part(waveform, event)
    assert energy_share(part, 0.97 * fundamental, 1.03 * fundamental) > 0.3  # the strongest partial
    assert energy_share(part, 1.97 * fundamental, 2.03 * fundamental) > 0.1  # and the second


def test_interrupted_generation_leaves_nothing_under_the_final_names(tmp_path):
    def stop_at(clip):
        def progress(done, total):
            if done == clip:
                raise KeyboardInterrupt

        return progress

    for clip in (5, 20):  # in the train split, in the eval split
        with pytest.raises(KeyboardInterrupt):
            make_sound_set(tmp_path / "new", train_clips=CLASSES, eval_clips=CLASSES, progress=stop_at(clip))
        assert list((tmp_path / "new").iterdir()) == []
    finished = make_sound_set(tmp_path / "old", train_clips=CLASSES, eval_clips=CLASSES, seed=1)
    before = [path.read_bytes() for path in finished]
    with pytest.raises(KeyboardInterrupt):
        make_sound_set(tmp_path / "old", train_clips=CLASSES, eval_clips=CLASSES, progress=stop_at(20))
    assert [path.read_bytes() for path in finished] == before  # the earlier set, untouched
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["eval.h5", "train.h5"]


def test_progress_counts_every_clip(tmp_path):
    calls = []
    make_sound_set(tmp_path, train_clips=CLASSES, eval_clips=CLASSES + 1, progress=lambda *a: calls.append(a))
    assert calls == [(done, 2 * CLASSES + 1) for done in range(1, 2 * CLASSES + 2)]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 14 clips"):
        make_sound_set(tmp_path, train_clips=100, eval_clips=13)
    with pytest.raises(ValueError, match="at least 8000 Hz"):
        make_sound_set(tmp_path, train_clips=20, eval_clips=20, sample_rate=4000)
    with pytest.raises(ValueError, match="non-negative"):
        make_sound_set(tmp_path, train_clips=20, eval_clips=20, seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_every_class_is_described():
    descriptions = class_descriptions()
    assert list(descriptions) == CLASS_NAMES == [sound.name for sound in SOUND_CLASSES]
    assert all(len(text) > 10 for text in descriptions.values())


def test_a_scene_places_every_class_once_at_its_stated_times_over_the_noise_floor(tmp_path):
    truth = make_scene(tmp_path / "scene.wav", seconds=60.0, seed=3)
    sound, rate = soundfile.read(tmp_path / "scene.wav", dtype="float32")
    assert rate == 16000 and len(sound) == 60 * 16000
    assert {label for _, _, label in truth} == {c.name for c in SOUND_CLASSES}  # 14 classes fit in a minute
    assert all(a[1] + 1.0 <= b[0] for a, b in zip(truth, truth[1:], strict=False))  # a second apart at least
    for onset, offset, _ in truth:  # louder inside an event than in the gap before it
        inside = sound[round(onset * rate) : round(offset * rate)]
        before = sound[round((onset - 0.45) * rate) : round((onset - 0.05) * rate)]
        assert np.sqrt(np.mean(inside**2)) > 2 * np.sqrt(np.mean(before**2))
    rows = [line.split("\t") for line in (tmp_path / "scene.tsv").read_text().splitlines()]
    assert rows[0] == ["filename", "onset", "offset", "event_label"] and len(rows) == len(truth) + 1
    assert rows[1] == ["scene.wav", f"{truth[0][0]:.3f}", f"{truth[0][1]:.3f}", truth[0][2]]
