"""Frame scores and embeddings: the head at each time position, what holds exactly per family, the HEAR API."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import soundfile
import torch
from test_import_convformer import ConvFormerAudio, randomise
from test_predict import tone
from test_train import CLASSES, TINY, make_set
from typer.testing import CliRunner

from dclsify import bake, convert, import_checkpoint, save
from dclsify.cli import app
from dclsify.pipeline.frames import FrameError, frame_outputs, head_parts
from dclsify.pipeline.hear import hear_rate
from dclsify.pipeline.predict import Tagger
from dclsify.pipeline.recipe import load_recipe
from dclsify.pipeline.sources import to_clip
from dclsify.pipeline.train import train
from dclsify.surgery.audio import AudioConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def tagger_checkpoint(tmp_path_factory):  # test_predict's: a tiny ConvNeXt that tells the four sounds apart
    folder = tmp_path_factory.mktemp("frames")
    quiet = ["augment.speed_p=0", "augment.erase_p=0", "augment.mixup_alpha=0", "train.epochs=6", "train.lr=4e-3"]
    result = train(load_recipe(None, TINY + quiet), make_set(folder / "train.h5", 24, 0), None, folder / "run")
    return result.run_dir / "last.safetensors"


# The smallest model of each family the project rewrites, and whether its head is linear after its pooling and norm.
FAMILY_MODELS = [
    ("convmixer_768_32", True),
    ("convnext_atto", True),
    ("edgenext_xx_small", True),
    ("fastvit_t8", True),
    ("mambaout_femto", False),
    ("convformer_s18", False),
    ("rdnet_tiny", True),
    ("starnet_s1", True),
]


@pytest.mark.parametrize(("name", "exact"), FAMILY_MODELS)
def test_the_mean_of_the_frame_logits_is_the_clip_logit_where_the_head_is_linear_after_its_norm(name, exact):
    torch.manual_seed(0)
    model = bake(convert(name, {"num_classes": 5}, count=2)).eval()
    for parameter in model.parameters():  # trained-looking weights: frames that differ, norms away from 1 and 0
        parameter.data += 0.05 * torch.randn_like(parameter)
    spectrograms = torch.randn(2, 1, 32, 800)  # 4 to 50 time positions, by family
    parts = head_parts(model)
    with torch.no_grad():
        outputs = frame_outputs(model, spectrograms)
        expected = model(spectrograms)
        torch.testing.assert_close(parts.fc(outputs.frame_embeddings), outputs.frame_logits)  # fc(embedding) = logit
        torch.testing.assert_close(parts.fc(outputs.clip_embeddings), outputs.clip_logits)
    positions = outputs.frame_logits.shape[1]
    assert parts.exact == exact and positions >= 4 and outputs.frame_logits.shape == (2, positions, 5)
    assert outputs.frame_embeddings.shape == (2, positions, parts.embedding_size)
    assert outputs.clip_embeddings.shape == (2, parts.embedding_size)
    torch.testing.assert_close(outputs.clip_logits, expected, atol=1e-4, rtol=1e-3)  # the model's logits (to 300)
    gap = (outputs.frame_logits.mean(1) - outputs.clip_logits).abs().max().item()
    spread = (outputs.frame_logits - outputs.clip_logits[:, None]).abs().max().item()
    print(f"{name}: mean of the frame logits - clip logit {gap:.3g}, frame - clip {spread:.3g}")
    assert spread > 1e-2  # the frames differ from the clip: the test could fail
    if exact:
        assert gap < 1e-5 * max(1.0, outputs.clip_logits.abs().max().item())
    else:
        assert gap > 1e-3 * max(1.0, outputs.clip_logits.abs().max().item())  # the MLP is not linear: not equal


def test_a_head_that_does_not_average_is_refused():
    model = convert("convnext_atto", {"num_classes": 5, "global_pool": "max"}, count=2)
    with pytest.raises(FrameError, match="pools with 'max'"):
        head_parts(model)


def test_frame_scores_of_a_trained_tagger_follow_its_sound_and_pool_to_its_clip_scores(tagger_checkpoint):
    tagger = Tagger(tagger_checkpoint, "cpu")
    clip = torch.from_numpy(np.round(tone(300, 8000, 0.5) * 32767).astype(np.int16))
    outputs = tagger.outputs([clip, clip.flip(0)])
    np.testing.assert_allclose(outputs.frame_logits.mean(1), outputs.clip_logits, atol=1e-5)  # ConvNeXt: exact
    np.testing.assert_allclose(torch.sigmoid(outputs.clip_logits), tagger.score([clip, clip.flip(0)]), atol=1e-6)
    # 1.5 s of silence, 1 s of "low", 0.5 s of silence: windows at 0, 0.5, ... 1.5 s
    sound = np.concatenate([np.zeros(12000, np.float32), tone(300, 8000, 1.0), np.zeros(4000, np.float32)])
    frames = tagger.frames(sound, sample_rate=8000)
    step = tagger.audio.hop_length / 8000
    assert frames.step == step and frames.scores.shape == (4, len(frames.times)) and frames.class_names == CLASSES
    np.testing.assert_allclose(frames.times, np.arange(round(3.0 / step)) * step)
    low = frames.scores[CLASSES.index("low")]
    inside, outside = (frames.times >= 1.5) & (frames.times < 2.5), (frames.times < 1.4) | (frames.times >= 2.6)
    assert low[inside].min() > 0.5 > low[outside].max()
    coarse = tagger.frames(sound, sample_rate=8000, step=0.25)
    np.testing.assert_allclose(coarse.times, np.arange(12) * 0.25)
    scorer, rng, pieces = tagger.frame_scorer(), np.random.default_rng(0), []  # the sound handed over in pieces
    for piece in np.split(sound, np.sort(rng.choice(len(sound), 7, replace=False))):
        pieces.append(scorer.push(piece))
    pieces.append(scorer.close())
    assert sum(len(piece.times) > 0 for piece in pieces) >= 4  # frames come out as the windows fill
    np.testing.assert_array_equal(np.concatenate([piece.times for piece in pieces]), frames.times)
    streamed = torch.sigmoid(torch.cat([piece.logits for piece in pieces])).T.numpy()
    np.testing.assert_allclose(streamed, frames.scores, atol=1e-6)
    with pytest.raises(ValueError, match="step must be positive"):
        tagger.frames(sound, sample_rate=8000, step=0)


@pytest.mark.parametrize("name", ["mambaout_femto", "fastvit_t8"])
def test_a_checkpoint_of_another_family_gives_frames_and_embeddings(name, tmp_path):
    """Channels-last MambaOut (an MLP head) and FastViT through the Tagger: a saved checkpoint, baked on load."""
    torch.manual_seed(0)
    audio = AudioConfig(sample_rate=8000, seconds=1.0, n_fft=256, hop_length=64, n_mels=32)
    path = save(convert(name, {"num_classes": 3}, count=2), tmp_path / "model.safetensors", ["a", "b", "c"], audio)
    tagger = Tagger(path, "cpu")
    sound = tone(500, 8000, 2.5)
    frames = tagger.frames(sound, sample_rate=8000, step=0.1)
    assert frames.scores.shape == (3, 25) and np.all((frames.scores > 0) & (frames.scores < 1))
    clip = torch.from_numpy(np.round(sound[:8000] * 32767).astype(np.int16))
    outputs = tagger.outputs([clip])
    np.testing.assert_allclose(torch.sigmoid(outputs.clip_logits), tagger.score([clip]), atol=1e-5)
    times, embeddings = tagger.embed(sound, sample_rate=8000, frames=True, step=0.1)
    assert embeddings.shape == (25, tagger.embedding_size) and tagger.embedding_size == (
        1152 if "mamba" in name else 768
    )
    with torch.no_grad():  # fc(frame embedding) is the frame logit
        logits = head_parts(tagger.model).fc(torch.from_numpy(embeddings))
    np.testing.assert_allclose(torch.sigmoid(logits).T, frames.scores, atol=1e-5)


def test_an_imported_dcls_audio_convformer_gives_frames_and_hear_embeddings(tmp_path):
    """The paper's ConvFormer layout (MLP head, its norm's eps 1e-5), imported: 10-s clips at 32 kHz, 527 classes."""
    torch.save({"model": randomise(ConvFormerAudio(False)).state_dict()}, tmp_path / "released.pth")
    model = import_checkpoint(tmp_path / "released.pth")
    path = save(model, tmp_path / "audio.safetensors", model.class_names, model.audio, model.multi_label)
    tagger = Tagger(path, "cpu")
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, 320000).astype(np.float32))
    outputs = tagger.outputs([noise])
    np.testing.assert_allclose(torch.sigmoid(outputs.clip_logits), tagger.score([noise]), atol=1e-5)
    assert outputs.clip_embeddings.shape == (1, 2048) and head_parts(tagger.model).hidden[2].eps == 1e-5  # its own
    frames = tagger.frames(noise, sample_rate=32000)
    assert frames.scores.shape == (527, 1000) and frames.times[1] == 0.01
    hear = importlib.import_module("dclsify.hear")
    model = hear.load_model(path)
    assert model.sample_rate == 44100 and model.scene_embedding_size == model.timestamp_embedding_size == 2048


def test_embeddings_are_what_the_classifier_sees(tagger_checkpoint):
    tagger = Tagger(tagger_checkpoint, "cpu")
    sound = tone(1000, 8000, 0.5)
    embedding = tagger.embed(sound, sample_rate=8000)
    fc = head_parts(tagger.model).fc
    assert embedding.shape == (tagger.embedding_size,) == (320,) and embedding.dtype == np.float32
    with torch.no_grad():
        logits = fc(torch.from_numpy(embedding))
    np.testing.assert_allclose(torch.sigmoid(logits), tagger(sound, sample_rate=8000).scores, atol=1e-5)
    times, frames = tagger.embed(sound, sample_rate=8000, frames=True)
    assert frames.shape == (len(times), 320) and frames.dtype == np.float32 and times[0] == 0
    long = np.concatenate([sound, np.zeros(2000, np.float32), sound])  # 1.25 s: windows at 0, 0.5, 0.75 s
    times, frames = tagger.embed(long, sample_rate=8000, frames=True, step=0.05)
    assert frames.shape == (25, 320)
    np.testing.assert_allclose(
        frames[:2], tagger.embed(sound, 8000, frames=True, step=0.05)[1][:2], atol=1e-5
    )  # batch rounding


def test_the_hear_api_gives_shapes_dtypes_and_milliseconds_and_each_sound_alone(tagger_checkpoint):
    hear = importlib.import_module("dclsify.hear")  # as the HEAR tools load it
    model = hear.load_model(str(tagger_checkpoint))
    assert isinstance(model, torch.nn.Module) and model.sample_rate == 16000  # a HEAR rate, resampled to 8 kHz
    assert model.scene_embedding_size == model.timestamp_embedding_size == 320
    audio = torch.rand(3, 24000) * 2 - 1  # 1.5 s of noise each
    audio[1] = torch.from_numpy(tone(300, 16000, 1.5))
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 320) and scene.dtype == torch.float32
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    step_ms = 1000 * model.tagger.audio.hop_length / 8000  # the front-end's hop
    assert embeddings.dtype == timestamps.dtype == torch.float32
    assert embeddings.shape == (3, timestamps.shape[1], 320) and timestamps.shape == (3, round(1500 / step_ms))
    np.testing.assert_allclose(timestamps[0], np.arange(timestamps.shape[1]) * step_ms, atol=1e-3)  # milliseconds
    for index in range(3):  # a batch gives what each sound gives alone
        alone = hear.get_timestamp_embeddings(audio[index : index + 1], model)
        torch.testing.assert_close(alone[0][0], embeddings[index])
        torch.testing.assert_close(hear.get_scene_embeddings(audio[index : index + 1], model)[0], scene[index])
    assert not torch.allclose(scene[0], scene[1], atol=1e-3)
    assert [hear_rate(rate) for rate in (8000, 16000, 32000, 44100, 96000)] == [16000, 16000, 44100, 44100, 48000]
    with pytest.raises(ValueError, match="sounds, samples"):
        hear.get_scene_embeddings(audio[0], model)


def test_the_hear_validator_passes_where_it_is_installed(tagger_checkpoint, monkeypatch):
    """hearvalidator 2021.0.2 imports tensorflow at its top, for its tensorflow checks only: where tensorflow is
    missing (``pip install --no-deps hearvalidator``), a stand-in lets its torch checks run."""
    pytest.importorskip("hearvalidator")
    if importlib.util.find_spec("tensorflow") is None:
        monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(Module=type("Module", (), {})))
    monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    validate = importlib.import_module("hearvalidator.validate")
    validate.ValidateModel("dclsify.hear", str(tagger_checkpoint), device="cpu")()  # raises ModelError on a fault


def test_embed_command_writes_clip_or_frame_embeddings_in_an_npz(tagger_checkpoint, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    soundfile.write(folder / "a_low.wav", tone(300, 8000, 0.5), 8000)
    soundfile.write(folder / "b_middle.wav", tone(1000, 8000, 1.2), 8000)
    (folder / "c_broken.wav").write_bytes(b"not a sound")
    output = tmp_path / "out" / "emb.npz"
    result = runner.invoke(app, ["embed", str(tagger_checkpoint), str(folder), "-o", str(output), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "c_broken.wav: unreadable" in result.output and "embeddings of 2 files (320 values each)" in result.output
    tagger = Tagger(tagger_checkpoint, "cpu")
    with np.load(output) as data:
        assert sorted(data.files) == ["embeddings", "names"]
        assert list(data["names"]) == [str(folder / "a_low.wav"), str(folder / "b_middle.wav")]
        assert data["embeddings"].shape == (2, 320) and data["embeddings"].dtype == np.float32
        np.testing.assert_allclose(data["embeddings"][1], tagger.embed(folder / "b_middle.wav"), atol=1e-6)
    frames = tmp_path / "frames.npz"
    options = ["-o", str(frames), "--frames", "--step", "0.1"]
    result = runner.invoke(app, ["embed", str(tagger_checkpoint), str(folder / "b_middle.wav"), *options])
    assert result.exit_code == 0, result.output
    with np.load(frames) as data:
        assert sorted(data.files) == ["embeddings_0", "names", "timestamps_0"]
        np.testing.assert_allclose(data["timestamps_0"], np.arange(12) * 0.1)
        assert data["embeddings_0"].shape == (12, 320) and data["embeddings_0"].dtype == np.float32
    broken = runner.invoke(app, ["embed", str(tagger_checkpoint), str(folder / "c_broken.wav"), "-o", str(output)])
    assert broken.exit_code == 1 and "nothing written" in broken.output and "Traceback" not in broken.output
    with np.load(output) as data:  # the earlier file is untouched
        assert data["embeddings"].shape == (2, 320)
    bad_step = runner.invoke(app, ["embed", str(tagger_checkpoint), str(folder), "-o", str(frames), "--step", "0"])
    assert bad_step.exit_code == 1 and "--step must be positive" in bad_step.output


def test_the_frames_of_a_long_sound_each_come_from_the_position_that_covers_them(tagger_checkpoint):
    """A sound of 2.65 clips: windows at 0, 1 and 1.65 clips (the last flush with the end); where the last
    window overlaps the one before, each time still takes a position whose span holds it."""
    tagger = Tagger(tagger_checkpoint, "cpu")
    length, rate = tagger.audio.samples, tagger.audio.sample_rate
    mono = 0.1 * np.random.default_rng(0).standard_normal(round(2.65 * length)).astype(np.float32)
    scorer = tagger.frame_scorer()
    pieces = [scorer.push(mono), scorer.close()]
    times, logits = np.concatenate([p.times for p in pieces]), torch.cat([p.logits for p in pieces])
    starts = [0, length, len(mono) - length]
    outputs = tagger.outputs(torch.from_numpy(to_clip(mono[s : s + length], length)) for s in starts)
    positions = outputs.frame_logits.shape[1]
    share = tagger.audio.seconds / positions
    assert len(times) == int(np.ceil(len(mono) / tagger.audio.hop_length - 1e-9))
    for time, row in zip(times, logits, strict=True):
        holders = [
            (w, j)
            for w, start in enumerate(starts)
            for j in range(positions)
            if start / rate + j * share <= time + 1e-9 < start / rate + (j + 1) * share
        ]
        assert any(torch.allclose(row, outputs.frame_logits[w, j], atol=1e-6) for w, j in holders), time
        if time >= 2 * tagger.audio.seconds:  # only the last window covers the sound's end
            assert all(w == 2 for w, _ in holders)


def test_a_head_with_an_rms_norm_is_refused_not_taken_for_a_layer_norm():
    model = convert("timm:convnext_atto_rms", kernel=9, count=5, stem="4x4", num_classes=3, input_size=(32, 63))
    with pytest.raises(FrameError, match="frame scores know heads with a LayerNorm, not a RmsNorm2d"):
        head_parts(model)


def test_embed_command_errors_before_reading_any_sound(tagger_checkpoint, tmp_path):
    sound = tmp_path / "a.wav"
    soundfile.write(sound, tone(300, 8000, 0.5), 8000)
    step = runner.invoke(
        app, ["embed", str(tagger_checkpoint), str(sound), "-o", str(tmp_path / "e.npz"), "--step", "0.1"]
    )
    assert step.exit_code == 1 and "--step is the time between frames: it goes with --frames" in step.output
    folder = runner.invoke(app, ["embed", str(tagger_checkpoint), str(sound), "-o", str(tmp_path)])
    assert folder.exit_code == 1 and "it is a folder" in folder.output


def test_the_hear_model_is_in_eval_mode(tagger_checkpoint):
    model = importlib.import_module("dclsify.hear").load_model(str(tagger_checkpoint))
    assert not model.training and not any(module.training for module in model.modules())
