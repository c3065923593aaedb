"""The data half of the pipeline: sources, pack, loader, front-end, augmentation, and their CLI."""

import csv
import json
import math

import h5py
import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from rich.console import Console
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.augment import Augment, AugmentConfig, change_speed, erase_boxes, roll
from dclsify.pipeline.datasets import open_source
from dclsify.pipeline.frontend import AudioConfig, LogMel
from dclsify.pipeline.loader import BalancedSampler, FailureLog, ShardSampler, balanced_weights, make_loader
from dclsify.pipeline.pack import pack
from dclsify.pipeline.sources import (
    ClipSubset,
    DataError,
    HDF5Clips,
    ManifestClips,
    SegmentClips,
    audioset_classes,
    decode,
    read_blacklist,
    youtube_id,
)

runner = CliRunner()
ONE_SECOND = AudioConfig(seconds=1.0)  # 32 kHz, 32000 samples: small and fast
CLASSES = audioset_classes()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


@pytest.fixture
def clips(tmp_path):
    """Six clips in four formats, rates and channel counts, named as AudioSet's folder names
    them, with AudioSet labels; the segment CSV and manifests (CSV by name, JSONL by mid) that list them."""
    folder = tmp_path / "audio"
    folder.mkdir()
    specs = [  # (ytid, extension, rate, channels, seconds, class indices)
        ("aaaaaaaaaa1", "wav", 32000, 1, 1.5, [0]),
        ("bbbbbbbbbb2", "flac", 44100, 2, 0.6, [0, 137]),
        ("cccccccccc3", "ogg", 48000, 1, 2.0, [137]),
        ("dddddddddd4", "wav", 16000, 2, 1.0, [72, 0]),
        ("-eeeeeeeee5", "mp3", 44100, 1, 1.2, [500]),
        ("ffffffffff6", "flac", 22050, 1, 0.3, [72]),
    ]
    segment_lines = ["# Segments csv", "# num_ytids=6", "# YTID, start_seconds, end_seconds, positive_labels"]
    manifest = [["path", "labels"]]
    jsonl = []
    for i, (ytid, extension, rate, channels, seconds, labels) in enumerate(specs):
        signal = tone(300 + 150 * i, rate, seconds)
        data = np.stack([signal, -0.5 * signal], axis=1) if channels == 2 else signal
        path = folder / f"Y{ytid}.{extension}"
        soundfile.write(path, data, rate)
        mids = ",".join(CLASSES[c].mid for c in labels)
        segment_lines.append(f'{ytid}, 0.000, 10.000, "{mids}"')
        manifest.append([f"audio/{path.name}", ";".join(CLASSES[c].name for c in labels)])
        jsonl.append(json.dumps({"path": f"audio/{path.name}", "labels": [CLASSES[c].mid for c in labels]}))
    (tmp_path / "segments.csv").write_text("\n".join(segment_lines) + "\n")
    with open(tmp_path / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(manifest)
    (tmp_path / "manifest.jsonl").write_text("\n".join(jsonl) + "\n")
    return tmp_path, specs


def everything(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    assert all(not failures for *_, failures in items)
    return torch.stack([w for w, *_ in items]), torch.stack([t for _, t, *_ in items])


def test_the_three_sources_give_the_same_clips(clips):
    root, specs = clips
    segments = open_source(root / "segments.csv", ONE_SECOND)
    by_name = open_source(root / "manifest.csv", ONE_SECOND, classes="audioset")
    by_mid = open_source(root / "manifest.jsonl", ONE_SECOND, classes="audioset")
    assert isinstance(segments, SegmentClips) and isinstance(by_name, ManifestClips)
    report = pack(root / "manifest.csv", root / "packed.h5", classes="audioset", audio=ONE_SECOND, workers=0)
    assert report.packed == 6 and report.skipped == []
    packed = open_source(root / "packed.h5")
    assert isinstance(packed, HDF5Clips) and packed.audio == ONE_SECOND  # the file says how it was packed
    waveforms, targets = everything(segments)
    assert waveforms.dtype == torch.int16 and waveforms.shape == (6, 32000)
    assert targets.dtype == torch.bool and targets.shape == (6, 527)
    assert [np.flatnonzero(t).tolist() for t in targets] == [sorted(labels) for *_, labels in specs]
    for other in (by_name, by_mid, packed):
        other_waveforms, other_targets = everything(other)
        assert torch.equal(other_waveforms, waveforms) and torch.equal(other_targets, targets)
    assert packed.class_names == segments.class_names == [c.name for c in CLASSES]
    assert [packed.clip_name(i) for i in range(6)] == [f"Y{ytid}" for ytid, *_ in specs]


def test_decode_mixes_resamples_pads_and_cuts(clips):
    root, specs = clips
    stereo_44k = decode(root / "audio" / "Ybbbbbbbbbb2.flac", ONE_SECOND)  # 0.6 s of 450 Hz, channels x and -x/2
    assert stereo_44k.dtype == np.int16 and len(stereo_44k) == 32000
    assert np.all(stereo_44k[int(0.61 * 32000) :] == 0)  # padded after the sound
    spectrum = np.abs(np.fft.rfft(stereo_44k[:16000].astype(float)))
    assert np.argmax(spectrum) * 32000 / 16000 == pytest.approx(450, abs=2)  # resampled: same pitch at 32 kHz
    assert np.abs(stereo_44k).max() == pytest.approx(0.125 * 32768, rel=0.02)  # mean of 0.5 x and -0.25 x
    long = decode(root / "audio" / "Ycccccccccc3.ogg", ONE_SECOND)  # 2 s, cut to 1 s
    assert len(long) == 32000 and np.abs(long[-100:]).max() > 1000


def test_pack_is_resumable_and_reports_skipped_clips(clips, tmp_path):
    root, _ = clips
    (root / "audio" / "broken.wav").write_bytes(b"RIFF....not audio")
    soundfile.write(root / "audio" / "empty.wav", np.zeros(0, dtype=np.float32), 32000)
    soundfile.write(root / "audio" / "blip.wav", tone(440, 32000, 0.01), 32000)  # 320 samples < n_fft
    rows = (root / "manifest.csv").read_text().splitlines()
    rows[3:3] = [
        "audio/missing.wav,Speech",
        "audio/broken.wav,Speech",
        "audio/empty.wav,Speech",
        "audio/blip.wav,Music",
    ]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")

    whole = pack(root / "manifest.csv", tmp_path / "whole.h5", classes="audioset", audio=ONE_SECOND, workers=2)
    expected_skips = {
        "missing": "missing",
        "broken": "unreadable: Format not recognised.",
        "empty": "empty",
        "blip": "shorter than a frame (320 samples < n_fft 1024)",
    }
    assert whole.packed == 6 and {name: reason for name, _, reason in whole.skipped} == expected_skips
    with open(whole.skip_report) as handle:
        assert {row["name"]: row["reason"] for row in csv.DictReader(handle)} == expected_skips

    out = tmp_path / "resumed.h5"

    def interrupt_after_three(done, total):
        assert total == 10
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(
            root / "manifest.csv", out, classes="audioset", audio=ONE_SECOND, workers=0, progress=interrupt_after_three
        )
    assert not out.exists() and (tmp_path / "resumed.h5.partial").exists()  # only a complete pack has the name
    resumed = pack(root / "manifest.csv", out, classes="audioset", audio=ONE_SECOND, workers=0)
    assert resumed.resumed_from == 3 and resumed.packed == 6 and not (tmp_path / "resumed.h5.partial").exists()
    with h5py.File(tmp_path / "whole.h5") as a, h5py.File(out) as b:
        for key in ("audio_name", "waveform", "target"):
            assert np.array_equal(a[key][:], b[key][:]), key
        assert json.loads(b.attrs["class_names"]) == [c.name for c in CLASSES]
        assert b.attrs["sample_rate"] == 32000 and b["waveform"].dtype == np.int16
        assert "pack_identity" not in b.attrs and "skipped_index" not in b


def test_hdf5_sources_concatenate_and_skip_a_black_list(tmp_path):
    for part, names in (("a", ["Yone.wav", "Ytwo.wav"]), ("b", ["Ythree.wav"])):
        with h5py.File(tmp_path / f"{part}.h5", "w") as handle:  # the PANNs layout, no dclsify attributes
            handle["audio_name"] = np.array([n.encode() for n in names])
            handle["waveform"] = np.arange(len(names) * 2048, dtype=np.int16).reshape(len(names), 2048) + 1
            handle["target"] = np.eye(len(names), 527, dtype=bool)
    (tmp_path / "black_list.csv").write_text("two\n")
    data = open_source(f"{tmp_path / 'a.h5'},{tmp_path / 'b.h5'}", blacklist=tmp_path / "black_list.csv")
    assert len(data) == 2 and [data.clip_name(i) for i in range(2)] == ["Yone.wav", "Ythree.wav"]
    assert data.audio.sample_rate == 32000 and data.audio.samples == 2048
    assert data[1][0].tolist() == list(range(1, 2049)) and data.labels(1) == [CLASSES[0].name]
    assert len(open_source(str(tmp_path / "*.h5"))) == 3


def write_hdf5(path, names, targets=None):
    """A PANNs-layout file of tiny clips: clip i's samples all equal i + 1."""
    targets = np.eye(len(names), 4, dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    with h5py.File(path, "w") as handle:
        handle["audio_name"] = np.array([n.encode() for n in names])
        handle["waveform"] = np.repeat(np.arange(1, len(names) + 1, dtype=np.int16)[:, None], 2048, axis=1)
        handle["target"] = targets
        handle.attrs.update(class_names=json.dumps(["a", "b", "c", "d"]))
    return path


def test_black_lists_are_read_as_audioset_ships_them(tmp_path):
    # PANNs' metadata/black_list/*.csv: bare YouTube ids, one a line, no header
    (tmp_path / "panns.csv").write_text("-0Hz6AG9uV8\n0sYcEVTfF2E\n-0Hz6AG9uV8\n")
    assert read_blacklist(tmp_path / "panns.csv").ids == ("-0Hz6AG9uV8", "0sYcEVTfF2E")  # distinct, in order
    mixed = [
        "# clips that overlap the DCASE 2017 task 4 evaluation set",
        "",
        "  Y-0Hz6AG9uV8.wav   # a note",
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"',  # an AudioSet segment CSV line
        "Y0sYcEVTfF2E_0.000_10.000.wav\t0.0\t10.0\tSpeech",  # a DCASE label file line (tabs)
        "my clip.flac",
    ]
    (tmp_path / "mixed.txt").write_text("\n".join(mixed) + "\n")
    ids = read_blacklist(tmp_path / "mixed.txt").ids
    assert ids == ("Y-0Hz6AG9uV8.wav", "--PJHxphWEs", "Y0sYcEVTfF2E_0.000_10.000.wav", "my clip.flac")
    spellings = ["Y-0Hz6AG9uV8.wav", "-0Hz6AG9uV8", "Y-0Hz6AG9uV8", "-0Hz6AG9uV8_30.000_40.000", "a/Y-0Hz6AG9uV8.FLAC"]
    assert {youtube_id(name) for name in spellings} == {"-0Hz6AG9uV8"}
    assert youtube_id("Yabcdefghij_30") == "Yabcdefghij"  # an id that starts with Y, without PANNs' Y
    assert youtube_id("oPRC3zComfA_000117") == "oPRC3zComfA" and youtube_id("dog_bark") is None
    (tmp_path / "comments.txt").write_text("# nothing but a comment\n\n")
    (tmp_path / "binary.csv").write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    for path, message in [
        (tmp_path / "nope.csv", "no such black list"),
        (tmp_path / "comments.txt", "no clip ids in this black list"),
        (tmp_path / "binary.csv", "not a black list"),
        (tmp_path, "no such black list"),
    ]:
        with pytest.raises(DataError, match=message):
            read_blacklist(path)


def test_a_black_list_skips_every_spelling_of_its_clips_and_counts_them(tmp_path):
    names = [
        "Y-0Hz6AG9uV8.wav",  # PANNs' name of YouTube clip -0Hz6AG9uV8
        "0sYcEVTfF2E_30.000_40.000",  # a segment's name
        "Yabcdefghijk",
        "keep1",
        "dog_bark",
        "Yone.wav",
        "Y--PJHxphWEs.wav",
    ]
    targets = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    write_hdf5(tmp_path / "set.h5", names, targets)
    listed = [
        "-0Hz6AG9uV8",  # a bare id names PANNs' Y<id>.wav
        "Y0sYcEVTfF2E.wav",  # PANNs' form names the segment
        "abcdefghijk_0.000_10.000",  # a segment form names Y<id>
        "dog_bark.wav",  # an extension is no part of a name
        "one",  # PANNs' Y<name>.wav, for any name
        "keep",  # a part of a name is not the name
        "zzzzzzzzzzz",
    ]
    (tmp_path / "black.csv").write_text("\n".join(listed) + "\n")
    whole = open_source(tmp_path / "set.h5")
    data = open_source(tmp_path / "set.h5", blacklist=tmp_path / "black.csv")
    assert isinstance(data, ClipSubset) and [data.clip_name(i) for i in range(len(data))] == [
        "keep1",
        "Y--PJHxphWEs.wav",
    ]
    report = data.blacklisted
    assert (report.ids, report.skipped, report.unmatched) == (7, 5, 2)
    assert str(report) == f"black list {tmp_path / 'black.csv'}: 5 clips skipped; 2 of its 7 ids name no clip here"
    assert np.array_equal(whole.target_matrix(), np.array(targets, dtype=bool))
    assert np.array_equal(data.target_matrix(), whole.target_matrix()[[3, 6]])
    assert [int(data[i][0][0]) for i in range(2)] == [4, 7] and data.labels(0) == ["c"]
    loaded = torch.cat([batch.waveforms[:, 0] for batch in make_loader(data, batch_size=2, train=False)])
    assert loaded.tolist() == [4, 7]
    (tmp_path / "all.csv").write_text("\n".join(names) + "\n")
    with pytest.raises(DataError, match="names every clip of the data"):
        open_source(tmp_path / "set.h5", blacklist=tmp_path / "all.csv")


def test_pack_leaves_a_black_lists_clips_out_and_says_how_many(clips, tmp_path):
    root, specs = clips
    (tmp_path / "black.csv").write_text("bbbbbbbbbb2\nYdddddddddd4.wav\nnever_seen\n")
    out = tmp_path / "set.h5"
    args = ["pack", str(root / "segments.csv"), "-o", str(out), "--seconds", "1", "--workers", "0"]
    result = runner.invoke(app, [*args, "--blacklist", str(tmp_path / "black.csv")])
    assert result.exit_code == 0, result.output
    assert f"black list {tmp_path / 'black.csv'}: 2 clips skipped; 1 of its 3 ids name no clip here" in result.output
    assert "packed 4 clips" in result.output
    packed = open_source(out)
    kept = [spec for spec in specs if spec[0] not in ("bbbbbbbbbb2", "dddddddddd4")]
    assert [packed.clip_name(i) for i in range(4)] == [f"Y{ytid}" for ytid, *_ in kept]
    assert [np.flatnonzero(t).tolist() for t in packed.target_matrix()] == [sorted(s[-1]) for s in kept]
    missing = runner.invoke(app, [*args, "--blacklist", str(tmp_path / "none.csv")])
    assert missing.exit_code == 1 and "no such black list" in missing.output and "Traceback" not in missing.output


def test_faulty_clips_are_replaced_counted_and_logged_once(clips, caplog):
    root, _ = clips
    rows = (root / "manifest.csv").read_text().splitlines()
    rows.insert(2, "audio/gone.wav,Speech")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    data = open_source(root / "manifest.csv", ONE_SECOND, classes="audioset")
    waveform, target, index, failures = data[1]
    assert index == 1 and failures == [(str(root / "audio" / "gone.wav"), "missing")]
    assert torch.equal(waveform, data[2][0])  # replaced by the next clip
    log = FailureLog()
    for _ in range(2):  # two epochs: the clip is met twice, logged once
        for batch in make_loader(data, batch_size=3, train=False):
            log.record(batch.failures)
    assert log.replacements == 2 and list(log.failures) == [str(root / "audio" / "gone.wav")]
    assert sum("gone.wav" in r.message for r in caplog.records) == 1


def test_shard_sampler_is_disjoint_complete_seeded_and_resumable():
    shards = [ShardSampler(103, rank, 4, shuffle=True, seed=5) for rank in range(4)]
    for sampler in shards:
        sampler.set_epoch(2)
    seen = [list(s) for s in shards]
    assert all(len(s) == 25 == len(sampler) for s, sampler in zip(seen, shards, strict=True))
    assert len(set().union(*map(set, seen))) == 100  # disjoint, 3 dropped to keep the ranks equal
    again = ShardSampler(103, 1, 4, shuffle=True, seed=5)
    again.set_epoch(2)
    assert list(again) == seen[1]
    again.set_epoch(3)
    assert list(again) != seen[1]
    again.set_epoch(2, start=10)
    assert list(again) == seen[1][10:] and len(again) == 15
    evaluation = [list(ShardSampler(103, rank, 4, shuffle=False)) for rank in range(4)]
    assert sorted(i for shard in evaluation for i in shard) == list(range(103))  # each clip exactly once
    with pytest.raises(ValueError, match="rank 4 is not in a world of 4"):
        ShardSampler(10, 4, 4)


def test_uniform_epochs_of_any_length_cut_one_stream_of_seeded_permutations():
    def permutation(k):
        return torch.randperm(10, generator=torch.Generator().manual_seed(3 + k)).tolist()

    def epoch(sampler, e, start=0):
        sampler.set_epoch(e, start)
        return list(sampler)

    whole = ShardSampler(10, seed=3)
    assert [epoch(whole, e) for e in range(3)] == [permutation(e) for e in range(3)]  # as before epoch_clips
    short = ShardSampler(10, seed=3, epoch_clips=4)
    assert sum((epoch(short, e) for e in range(5)), []) == permutation(0) + permutation(1)
    assert len(short) == 4 and epoch(short, 2, start=1) == (permutation(0) + permutation(1))[9:12]
    long = ShardSampler(10, seed=3, epoch_clips=25)
    assert epoch(long, 1) == (permutation(2) + permutation(3) + permutation(4))[5:30]
    shares = [ShardSampler(10, rank, 2, seed=3, epoch_clips=7) for rank in range(2)]  # 7 clips: 3 a rank
    assert [epoch(s, 0) for s in shares] == [permutation(0)[0:6:2], permutation(0)[1:6:2]]


def test_balanced_sampling_draws_clips_by_the_rarity_of_their_labels():
    targets = np.array(
        [[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=bool
    )  # label counts 3, 1, 1; the last clip has none
    weights = balanced_weights(targets)
    common, rare = 1000 / 103, 1000 / 101
    np.testing.assert_allclose(weights, [common, common + rare, common, rare, common], rtol=1e-15)
    sampler = BalancedSampler(weights, seed=7, epoch_clips=200_000)
    sampler.set_epoch(2)
    draws = np.array(list(sampler))
    assert len(draws) == 200_000 == len(sampler)
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), weights / weights.sum(), atol=0.004)

    small = BalancedSampler(weights, seed=7, epoch_clips=13)  # two ranks share one global draw of 12
    small.set_epoch(1)
    draw = list(small)
    ranks = [BalancedSampler(weights, rank, 2, seed=7, epoch_clips=13) for rank in range(2)]
    for r in ranks:
        r.set_epoch(1)
    shares = [list(r) for r in ranks]
    assert [len(s) for s in shares] == [6, 6] == [len(r) for r in ranks]
    assert [i for pair in zip(*shares, strict=True) for i in pair] == draw[:12]  # disjoint turns of the same draw
    ranks[1].set_epoch(1, start=4)
    assert list(ranks[1]) == shares[1][4:] and len(ranks[1]) == 2  # a resume takes the rest of its share
    small.set_epoch(2)
    assert list(small) != draw and len(BalancedSampler(weights)) == 5  # epoch_clips 0: the data's size
    assert balanced_weights(np.zeros((3, 2), dtype=bool)).tolist() == [10.0] * 3  # no labels anywhere: uniform


def test_loaders_epochs_follow_the_sampler_and_epoch_clips(tmp_path):
    targets = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    data = open_source(write_hdf5(tmp_path / "set.h5", [f"c{i}" for i in range(6)], targets))
    balanced = make_loader(data, batch_size=4, train=True, seed=1, sampler="balanced", epoch_clips=40)
    assert len(balanced) == 10 and isinstance(balanced.sampler, BalancedSampler)
    weights = [1000 / 102] * 2 + [1000 / 101] * 2 + [1000 / 102] * 2  # the targets read from the file
    np.testing.assert_allclose(balanced.sampler.cumulative, np.cumsum(weights), rtol=1e-15)
    assert sum(len(batch.indices) for batch in balanced) == 40
    assert len(make_loader(data, batch_size=4, train=True, epoch_clips=9)) == 2
    assert len(make_loader(data, batch_size=4, train=False)) == 2  # evaluation: every clip once
    with pytest.raises(ValueError, match="sampler must be one of uniform, balanced"):
        make_loader(data, batch_size=4, train=True, sampler="random")


def test_loader_moves_int16_and_bool_and_drops_the_last_training_batch(clips):
    root, _ = clips
    data = open_source(root / "segments.csv", ONE_SECOND)
    train = list(make_loader(data, batch_size=4, train=True, workers=1, seed=3))
    assert len(train) == 1 and train[0].waveforms.dtype == torch.int16 and train[0].targets.dtype == torch.bool
    evaluation = list(make_loader(data, batch_size=4, train=False))
    assert [len(b.indices) for b in evaluation] == [4, 2] and torch.cat([b.indices for b in evaluation]).tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]


def mel_of(hz: float) -> float:
    return 2595 * math.log10(1 + hz / 700)


def test_frontend_is_the_papers_log_mel(device):
    frontend = LogMel().to(device)
    rate = 32000
    waveform = torch.from_numpy(tone(1000, rate, 10.0, 0.3) * 32768).round().to(torch.int16)[None].to(device)
    logmel = frontend(waveform)
    assert logmel.shape == (1, 1, 128, 1001) and logmel.dtype == torch.float32
    chain = torch.nn.Sequential(
        torchaudio.transforms.Spectrogram(n_fft=1024, hop_length=320, power=2),
        torchaudio.transforms.MelScale(n_mels=128, sample_rate=32000, f_min=50, f_max=14000, n_stft=513),
        torchaudio.transforms.AmplitudeToDB(),
    ).to(device)
    expected = (chain(waveform.float() / 32768) + 18.2696) / 30.5735
    torch.testing.assert_close(logmel[:, 0], expected, rtol=0, atol=1e-5)
    # the tone lands in the mel band whose centre is nearest to 1 kHz (HTK mel scale, 128 bands from 50 to 14000 Hz)
    centres = [mel_of(50) + (i + 1) * (mel_of(14000) - mel_of(50)) / 129 for i in range(128)]
    nearest = min(range(128), key=lambda i: abs(centres[i] - mel_of(1000)))
    assert int(logmel[0, 0, :, 500].argmax()) == nearest
    silence = frontend(torch.zeros(1, 32000, dtype=torch.int16, device=device))  # AmplitudeToDB floors at -100 dB
    torch.testing.assert_close(silence, torch.full_like(silence, (-100 + 18.2696) / 30.5735))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        autocast = frontend(waveform)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, logmel, rtol=0, atol=1e-5)  # the STFT and the log stay in float32


def test_frontend_sizes_follow_the_clip_format():
    assert AudioConfig().input_size == (128, 1001)
    short = AudioConfig(sample_rate=16000, seconds=1.0)
    assert (
        short.top_frequency == 8000
        and AudioConfig().top_frequency == 14000
        and short.samples == 16000
        and short.input_size == (128, 51)
    )
    assert LogMel(short)(torch.zeros(2, 16000, dtype=torch.int16)).shape == (2, 1, 128, 51)
    with pytest.raises(ValueError, match="f_max"):
        AudioConfig(sample_rate=16000, f_max=14000)


def test_roll_and_speed_do_what_they_say():
    x = torch.randn(3, 50)
    shifts = torch.tensor([0, -7, 123])
    rolled = roll(x, shifts)
    for b, shift in enumerate(shifts.tolist()):
        assert torch.equal(rolled[b], torch.roll(x[b], shift))
    rate, samples = 8000, 8000
    signal = torch.from_numpy(tone(500, rate, 1.0))[None].repeat(2, 1)
    moved = change_speed(signal, torch.tensor([2.0, 0.5]), torch.tensor([1000.0, -2000.0]))
    assert moved.shape == (2, samples)
    faster, slower = moved
    silent = torch.cat([faster[:999], faster[1000 + samples // 2 + 1 :]])
    assert silent.abs().max() < 1e-6 and faster[1100:4900].abs().max() > 0.45  # placed at 1000 (FFT rounding aside)
    peak = lambda part: int(torch.fft.rfft(part).abs().argmax()) * rate / len(part)  # noqa: E731
    assert peak(faster[1000:5000]) == pytest.approx(1000, abs=3)  # twice as fast: an octave up
    assert peak(slower) == pytest.approx(250, abs=3)  # half as fast: an octave down, cut to the length
    torch.testing.assert_close(slower[0], signal[0, 1000], atol=1e-4, rtol=0)  # out[0] = x(0.5 * (0 + 2000))
    still = change_speed(signal, torch.ones(2), torch.zeros(2))
    torch.testing.assert_close(still, signal, atol=2e-4, rtol=0)  # float32 grid coordinates
    # 3200 Hz played 1.5x faster is 4800 Hz, above the 4 kHz Nyquist frequency: it must vanish, not fold to 3200 Hz
    high = change_speed(torch.from_numpy(tone(3200, rate, 1.0))[None], torch.tensor([1.5]), torch.tensor([0.0]))
    assert high[0, 500:5000].abs().max() < 0.02  # of 0.5
    # 3200 Hz played at half speed is 1600 Hz; linear interpolation alone would leave images of it above 2 kHz
    low = change_speed(torch.from_numpy(tone(3200, rate, 1.0))[None], torch.tensor([0.5]), torch.tensor([0.0]))
    spectrum = torch.fft.rfft(low[0]).abs() ** 2
    assert int(spectrum.argmax()) * rate / samples == pytest.approx(1600, abs=2)
    assert spectrum[2000 * samples // rate :].sum() < 1e-6 * spectrum.sum()


def test_augmentation_probabilities_over_many_draws():
    frontend = LogMel(AudioConfig(sample_rate=8000, seconds=0.25, n_fft=256, hop_length=64, n_mels=32))
    augment = Augment(frontend, AugmentConfig(roll=False, mixup_alpha=0, label_smoothing=0), seed=1)
    waveforms = torch.arange(2000, dtype=torch.int16).repeat(4000, 1)  # a ramp: any speed change shows
    moved = augment.waveforms(waveforms)
    changed = (moved - waveforms / 32768).abs().amax(dim=1) > 1e-3
    assert changed.float().mean().item() == pytest.approx(0.5, abs=0.03)  # speed perturbation, p 0.5
    counts = [len(augment._chosen(3, 0.5, waveforms)) for _ in range(2000)]  # small batches: 1 or 2 of 3 rows
    assert set(counts) == {1, 2} and np.mean(counts) / 3 == pytest.approx(0.5, abs=0.02)
    boxes = augment._boxes(4000, 129, 33, waveforms)
    erased = boxes[:, 1] > 0
    assert erased.float().mean().item() == pytest.approx(0.25, abs=0.03)  # random erasing, p 0.25
    area = boxes[erased, 1] * boxes[erased, 3] / (129 * 33)
    assert area.min() >= 0.015 and area.max() <= 0.36
    assert torch.all(boxes[erased, 0] + boxes[erased, 1] <= 129) and torch.all(
        boxes[erased, 2] + boxes[erased, 3] <= 33
    )
    assert torch.all(boxes[:, :3] >= 0) and torch.all(boxes[erased, 1] >= 1) and torch.all(boxes[erased, 3] >= 1)
    power = torch.ones(2, 6, 7)
    cut = erase_boxes(power, torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]]))
    assert cut[0, 1:3, 3:7].sum() == 0 and cut.sum() == 2 * 42 - 8 and torch.all(cut[1] == 1)


def test_mixup_and_label_smoothing_targets():
    classes = 10
    augment = Augment(LogMel(), AugmentConfig(mixup_alpha=0.8, label_smoothing=0.1), seed=7)
    logmels = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 3)
    targets = torch.eye(6, classes, dtype=torch.bool)
    mixed, soft = augment.mixup(logmels, targets)
    smooth = targets.float() * 0.9 + 0.01
    partner = soft[:, :6].sub(0.01).gt(1e-6) & ~targets[:, :6]  # each row's second class
    lam = (soft[0, 0] - 0.01) / 0.9 if partner[0].any() else torch.tensor(1.0)
    for row in range(6):
        other = int(partner[row].nonzero()[0]) if partner[row].any() else row
        torch.testing.assert_close(soft[row], lam * smooth[row] + (1 - lam) * smooth[other])
        torch.testing.assert_close(mixed[row], lam * logmels[row] + (1 - lam) * logmels[other])
    assert torch.allclose(soft.sum(1), torch.ones(6))
    plain = Augment(LogMel(), AugmentConfig(mixup_alpha=0, label_smoothing=0.1))
    assert torch.equal(plain.mixup(logmels, targets)[1], smooth)


def test_augmentation_is_seeded_and_resumable():
    frontend = LogMel(AudioConfig(seconds=0.5))
    waveforms = (torch.randn(4, 16000) * 3000).to(torch.int16)
    targets = torch.eye(4, 5, dtype=torch.bool)
    first, second = Augment(frontend, seed=3), Augment(frontend, seed=3)
    state = first.get_rng_state()
    a = first(waveforms, targets)
    b = second(waveforms, targets)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    first.set_rng_state(state)
    assert torch.equal(first(waveforms, targets)[0], a[0])
    assert not torch.equal(Augment(frontend, seed=4)(waveforms, targets)[0], a[0])
    assert a[0].shape == (4, 1, 128, 51) and a[1].shape == (4, 5)


def test_bad_inputs_name_the_file_and_the_line(tmp_path, clips):
    root, _ = clips
    (tmp_path / "empty.h5").touch()
    with h5py.File(tmp_path / "no_target.h5", "w") as handle:
        handle["audio_name"] = np.array([b"a"])
        handle["waveform"] = np.zeros((1, 10), dtype=np.int16)
    with h5py.File(tmp_path / "flat_target.h5", "w") as handle:
        handle["audio_name"] = np.array([b"a"])
        handle["waveform"] = np.zeros((1, 10), dtype=np.int16)
        handle["target"] = np.zeros(527, dtype=bool)
    (tmp_path / "unknown_mid.csv").write_text('# a\n# b\n# c\nxyz, 0, 10, "/m/09x0r"\nabc, 0, 10, "/m/nope"\n')
    (tmp_path / "no_path.csv").write_text("path,labels\na.wav,dog\n,cat\n")
    (tmp_path / "no_path_column.csv").write_text("file,labels\na.wav,dog\n")
    (tmp_path / "no_path.jsonl").write_text('{"path": "a.wav", "labels": ["dog"]}\n{"labels": ["cat"]}\n')
    (tmp_path / "unknown.csv").write_text("path,labels\na.wav,dog\n")
    cases = [
        (tmp_path / "nothing.h5", "no such file"),
        (tmp_path / "empty.h5", "not a readable HDF5 file"),
        (tmp_path / "no_target.h5", "no 'target' dataset"),
        (tmp_path / "flat_target.h5", "target has shape (527,); expected (1, classes)"),
        (tmp_path / "unknown_mid.csv", "unknown_mid.csv, line 5: unknown AudioSet label mid '/m/nope'"),
        (tmp_path / "no_path.csv", "no_path.csv, line 3: no 'path'"),
        (tmp_path / "no_path_column.csv", "no_path_column.csv, line 1: no 'path' column"),
        (tmp_path / "no_path.jsonl", "no_path.jsonl, line 2: no 'path'"),
        (root / "audio", "is a folder"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=None) as error:
            open_source(path, audio_dir=tmp_path)
        assert message in str(error.value), (path, str(error.value))
    with pytest.raises(DataError, match=r"unknown\.csv, line 2: unknown class 'dog'"):
        open_source(tmp_path / "unknown.csv", classes="audioset")
    for path, message in cases[:4] + cases[5:6]:  # the same, as one line from the CLI
        result = runner.invoke(app, ["show", str(path)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_pack_command_shows_progress_and_skips_and_never_leaves_half_files(clips, tmp_path):
    root, _ = clips
    rows = (root / "manifest.csv").read_text().splitlines() + ["audio/missing.wav,Speech"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out" / "set.h5"
    args = ["pack", str(root / "manifest.csv"), "-o", str(out), "--seconds", "1", "--workers", "0"]
    result = runner.invoke(app, [*args, "--labels", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1 and "no such class list" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 clips skipped" in result.output and "missing.wav" in result.output
    assert "packed 6 clips of 1 s at 32000 Hz" in result.output
    data = open_source(out)
    assert data.class_names == sorted(data.class_names) and len(data.class_names) == 4  # from the manifest
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = runner.invoke(app, ["pack", str(root / "manifest.csv"), "-o", str(blocker / "x.h5"), "--workers", "0"])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["pack", str(out), "-o", str(tmp_path / "again.h5")])
    assert result.exit_code == 1 and "packed already" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["set.h5", "set.h5.skipped.csv"]


def test_show_draws_a_png_and_bench_data_reports(clips, tmp_path):
    root, _ = clips
    png = tmp_path / "spec.png"
    result = runner.invoke(app, ["show", str(root / "segments.csv"), "--index", "3", "--seconds", "1", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert "clip 3 (Ydddddddddd4: Speech, Animal)" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    result = runner.invoke(app, ["show", str(root / "segments.csv"), "--index", "6"])
    assert result.exit_code == 1 and "the data has 6 clips" in result.output
    pack(root / "segments.csv", tmp_path / "set.h5", audio=ONE_SECOND, workers=0)
    out = tmp_path / "bench.json"
    args = ["bench-data", str(tmp_path / "set.h5"), "--batch", "4", "--workers", "0", "--batches", "2"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["batch"] == 4 and data["clip_seconds"] == 1
    assert all(
        data[k] > 0 for k in ("loader_clips_per_second", "frontend_clips_per_second", "augment_clips_per_second")
    )


def test_augmentation_never_waits_for_the_device(device):
    """Every random draw is made where the batch is: no host-device synchronisation per batch
    (which would stall a GPU pipeline and rules out CUDA graphs)."""
    frontend = LogMel(AudioConfig(seconds=0.5)).to(device)
    augment = Augment(frontend, AugmentConfig(speed_p=1, erase_p=1), seed=0)
    waveforms = (torch.randn(8, 16000) * 3000).to(torch.int16).to(device)
    targets = torch.eye(8, 5, dtype=torch.bool, device=device)
    augment(waveforms, targets)  # the first call makes the generator
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        logmels, soft = augment(waveforms, targets)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert logmels.device == waveforms.device and logmels.shape == (8, 1, 128, 51) and soft.shape == (8, 5)
    assert augment.get_rng_state()["device"] == device.type


def test_loader_workers_leave_ctrl_c_to_the_training_process():
    import signal

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            handler = signal.getsignal(signal.SIGINT)
            return torch.zeros(4, dtype=torch.int16), torch.zeros(1, dtype=torch.bool), index, [("x", str(handler))]

    batch = next(iter(make_loader(Probe(), batch_size=2, train=False, workers=1)))
    assert batch.failures == [("x", str(signal.SIG_IGN))] * 2
