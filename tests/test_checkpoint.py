"""Self-describing safetensors checkpoints: round trips, shared tensors, atomic writes, bad files."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dclsify import CheckpointError, Dcls2d, SurgeryError, __version__, convert, load, save
from dclsify.surgery import checkpoint


@pytest.fixture(scope="module")
def model():
    return convert("timm:convnext_atto", num_classes=5, kernel=9, count=7, seed=3)


def test_round_trip_rebuilds_the_same_model(model, tmp_path):
    path = save(model, tmp_path / "atto.safetensors", class_names=["a", "b", "c", "d", "e"])
    rebuilt = load(path)
    x = torch.randn(2, 1, 128, 1001)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.class_names == ["a", "b", "c", "d", "e"]
    layers = [m for m in rebuilt.modules() if isinstance(m, Dcls2d)]
    assert layers[0].dilated_kernel_size == (9, 9) and layers[0].kernel_count == 7
    assert layers[0].P is layers[1].P  # synchronisation survives the round trip
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's private 0600
    metadata = checkpoint.read_metadata(path)
    assert metadata["source"] == "timm:convnext_atto"
    assert metadata["rewrite"]["kernel"] == 9 and metadata["rewrite"]["num_classes"] == 5
    assert metadata["rewrite"]["seed"] == 3 and metadata["timm_version"] and metadata["dclsify_version"]


def test_shared_positions_are_stored_once(model, tmp_path):
    path = save(model, tmp_path / "atto.safetensors")
    with safe_open(path, framework="pt") as reader:
        keys = list(reader.keys())
    position_keys = [k for k in keys if k.endswith(".P")]
    assert len(position_keys) == 4  # one per stage, not one per layer (12)
    unique = {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert len(keys) == len(unique)


def test_interrupted_save_leaves_no_file(model, tmp_path, monkeypatch):
    target = tmp_path / "atto.safetensors"

    def crash(model, filename, metadata=None):
        with open(filename, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save(model, target)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_survives_a_failed_overwrite(model, tmp_path, monkeypatch):
    target = save(model, tmp_path / "atto.safetensors")
    before = target.read_bytes()
    monkeypatch.setattr(checkpoint, "save_model", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save(model, target)
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a dclsify checkpoint"):
        load(foreign)


def test_saving_needs_a_known_source(tmp_path):
    with pytest.raises(CheckpointError, match="needs a model made by dclsify.convert"):
        save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_models_from_a_python_file_round_trip(tmp_path):
    source = tmp_path / "mymodel.py"
    source.write_text(
        "from torch import nn\n"
        "def build(width=8):\n"
        "    dw = nn.Conv2d(width, width, 7, padding=3, groups=width)\n"
        "    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), dw, nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(width, 3))\n"
    )
    model = convert(f"file:{source}:build", {"width": 6}, stem=None, input_size=(16, 20), count=5, kernel=9)
    path = save(model, tmp_path / "mine.safetensors")
    rebuilt = load(path, trust_code=True)
    x = torch.randn(2, 1, 16, 20)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert isinstance(rebuilt[1], Dcls2d) and rebuilt[1].in_channels == 6
    with pytest.raises(Exception, match="has no function 'make'"):
        convert(f"file:{source}:make")


def test_starting_from_local_pretrained_weights(tmp_path):
    """convert(pretrained=) loads timm weights as `dclsify import --model timm:NAME` does: the RGB stem
    becomes the audio stem (it used to start random), a report says so, and the file is recorded."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_patch_embed

    torch.manual_seed(7)
    imagenet = timm.create_model("convnext_atto")
    weights = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    audio_stem = resample_patch_embed(weights["stem.0.weight"].sum(1, keepdim=True), [2, 16])
    kept = "stages.1.blocks.0.mlp.fc1.weight"
    for suffix, write in ((".safetensors", save_file), (".pth", torch.save)):
        path = tmp_path / f"atto{suffix}"
        write(weights, path)
        model = convert("timm:convnext_atto", pretrained=path, num_classes=5)
        assert torch.equal(model.state_dict()[kept], weights[kept])  # what the rewrite keeps, it keeps trained
        torch.testing.assert_close(model.state_dict()["stem.0.weight"], audio_stem)
        assert model.imported.adapted == [("stem.0.weight", "summed over its 3 input channels, resized 4x4 -> 2x16")]
        assert model.imported.problems == [] and dict(model.imported.dropped)["head.fc.weight"] == "the ImageNet head"
        assert model.dclsify.pretrained == str(path)
    saved = save(model, tmp_path / "tagger.safetensors")
    assert checkpoint.read_metadata(saved)["pretrained"] == str(path)
    rebuilt = load(saved).state_dict()  # from the checkpoint itself
    torch.testing.assert_close(rebuilt[kept], weights[kept])
    torch.testing.assert_close(rebuilt["stem.0.weight"], audio_stem)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in weights.items() if not k.startswith("stages.3")}, partial)
    with pytest.raises(CheckpointError, match=r"partial.safetensors: 18 tensors do not fit timm:convnext_atto: "):
        convert("timm:convnext_atto", pretrained=partial)
    with pytest.raises(CheckpointError, match="no such weights file"):
        convert("timm:convnext_atto", pretrained=tmp_path / "missing.pth")
    with pytest.raises(SurgeryError, match="pretrained= is for timm models"):
        convert("file:/nowhere.py:build", pretrained=path)


def test_baked_models_load_baked_and_mixed_ones_are_refused(model, tmp_path):
    from dclsify import LargeKernelConv2d, bake

    path = save(bake(model), tmp_path / "dense" / "baked.safetensors")
    dense = load(path)
    assert checkpoint.read_metadata(path)["baked"] and not any(isinstance(m, Dcls2d) for m in dense.modules())
    assert sum(isinstance(m, LargeKernelConv2d) for m in dense.modules()) == 12
    x = torch.randn(2, 1, 128, 1001)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), model.eval()(x), rtol=0, atol=1e-5)
    mixed = copy.deepcopy(model)
    mixed.stages[0].blocks[0].conv_dw = mixed.stages[0].blocks[0].conv_dw.bake()
    with pytest.raises(CheckpointError, match="every Dcls2d baked .* or none: this one is mixed"):
        save(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="class_names holds 2 names for a head of 5 classes"):
        save(model, tmp_path / "named.safetensors", class_names=["a", "b"])
    assert [p.name for p in tmp_path.iterdir()] == ["dense"]


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A checkpoint of ``model`` taken apart: its bytes, its metadata and its tensors, to damage."""
    path = save(model, tmp_path_factory.mktemp("saved") / "atto.safetensors", class_names=list("abcde"))
    with safe_open(path, framework="pt") as reader:
        return path.read_bytes(), reader.metadata(), {k: reader.get_tensor(k) for k in reader.keys()}


def write_checkpoint(path, tensors, metadata, **changes):
    """``tensors`` saved with ``metadata`` changed: a key set to a string, or dropped with None."""
    metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    save_file(tensors, path, metadata=metadata)
    return path


def with_metadata(**changes):
    return lambda path, data, metadata, tensors: write_checkpoint(path, tensors, metadata, **changes)


def with_rewrite(**changes):
    def damage(path, data, metadata, tensors):
        rewrite = json.dumps({**json.loads(metadata["rewrite"]), **changes})
        write_checkpoint(path, tensors, metadata, rewrite=rewrite)

    return damage


def with_bytes(change):
    return lambda path, data, metadata, tensors: path.write_bytes(change(data))


def with_tensors(change):
    return lambda path, data, metadata, tensors: write_checkpoint(path, change(dict(tensors)), metadata)


DAMAGED = {
    "zero bytes": (with_bytes(lambda data: b""), "not a readable safetensors file: it is empty (0 bytes)"),
    "too short": (with_bytes(lambda data: data[:5]), "it is 5 bytes long, too short to hold a header"),
    "truncated": (with_bytes(lambda data: data[:-100]), "its tensors do not fill the file as its header says"),
    "header larger than the file": (
        with_bytes(lambda data: (2 * len(data)).to_bytes(8, "little") + data[8:]),
        "its header says it is",
    ),
    "header not JSON": (with_bytes(lambda data: data[:8] + b"#" + data[9:]), "its header is not JSON"),
    "from a newer dclsify": (
        with_metadata(dclsify_version="0.10.0"),  # newer as a version, older as a string
        f"was written by dclsify 0.10.0, newer than this dclsify {__version__}: upgrade",
    ),
    "version not a version": (with_metadata(dclsify_version="soon"), "'dclsify_version' is not a version: 'soon'"),
    "metadata not JSON": (with_metadata(rewrite="{not json"), "damaged dclsify metadata: 'rewrite' is not JSON"),
    "metadata key missing": (
        with_metadata(model_kwargs=None),
        "damaged dclsify metadata: missing keys ['model_kwargs']",
    ),
    "metadata key unknown": (with_metadata(hook="x"), "damaged dclsify metadata: unknown keys ['hook']"),
    "baked not true": (with_metadata(baked="yes"), "damaged dclsify metadata: 'baked' must be true where present"),
    "baked, but positions stored": (with_metadata(baked="true"), "8 not in the model: stages.0.blocks.0.conv_dw.P;"),
    "source not a source": (with_metadata(source="hub:atto"), "'source' must be timm:NAME or file:PATH.py:FACTORY"),
    "unknown timm model": (with_metadata(source="timm:convnext_nano_x"), "cannot be built: unknown timm model"),
    "model_kwargs timm cannot build": (with_metadata(model_kwargs='{"dims": [8]}'), "cannot be built (IndexError"),
    "model_kwargs not a mapping": (with_metadata(model_kwargs="[1]"), "model_kwargs must be a mapping"),
    "model_kwargs value not JSON scalar": (
        with_metadata(model_kwargs='{"dims": {"a": 1}}'),
        "model_kwargs 'dims' must be a number, string, bool, null or list",
    ),
    "unknown rewrite argument": (with_rewrite(warp=9), "unknown rewrite arguments ['warp']"),
    "rewrite argument out of range": (with_rewrite(count=0), "count must be from 1 to kernel^2 = 81, got 0"),
    "rewrite argument of the wrong type": (with_rewrite(stem="2x16"), "stem must be None or [[kh, kw], [sh, sw]]"),
    "rewrite predicate": (with_rewrite(match="predicate"), "match was a Python predicate, which cannot be rebuilt"),
    "class names for another head": (
        with_metadata(class_names='["a"]'),
        "class_names holds 1 names for a head of 5 classes",
    ),
    "class names not strings": (with_metadata(class_names="[1, 2, 3, 4, 5]"), "class_names must be a list of strings"),
    "tensor of the wrong dtype": (
        with_tensors(lambda t: {**t, "head.fc.bias": t["head.fc.bias"].half()}),
        "1 of the wrong dtype or shape: head.fc.bias is torch.float16 (5,), the model's torch.float32 (5,)",
    ),
    "tensor of the wrong shape": (
        with_rewrite(count=8),  # the metadata asks for 8 elements per channel, the file holds 7
        "20 of the wrong dtype or shape: "  # 12 layers' weights, 4 stages' P and SIG
        "stages.0.blocks.0.conv_dw.P is torch.float32 (2, 40, 1, 7), the model's torch.float32 (2, 40, 1, 8)",
    ),
    "tensor missing": (
        with_tensors(lambda t: {k: v for k, v in t.items() if k != "head.fc.bias"}),
        "weights do not fit the rebuilt model: 1 missing: head.fc.bias",
    ),
    "tensor extra": (
        with_tensors(lambda t: {**t, "head.extra": torch.zeros(2)}),
        "weights do not fit the rebuilt model: 1 not in the model: head.extra",
    ),
}


@pytest.mark.parametrize("damage, message", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_checkpoints_are_one_clear_error(saved, tmp_path, damage, message):
    path = tmp_path / "damaged.safetensors"
    damage(path, *saved)
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert message in str(error.value) and str(error.value).startswith(str(path))


def test_the_undamaged_checkpoint_loads_and_an_older_version_is_fine(saved, tmp_path):
    """The damage table's control: what it damages loads when it is not damaged."""
    path = write_checkpoint(tmp_path / "older.safetensors", saved[2], saved[1], dclsify_version="0.0.9")
    assert load(path).class_names == list("abcde")


EVIL_MODEL = """
import pathlib
import timm

pathlib.Path({marker!r}).write_text("ran")  # what an attacker's file would do, harmlessly


def build():
    return timm.create_model("convnext_atto")
"""


def test_a_file_source_runs_only_with_consent(saved, tmp_path):
    """A shared timm checkpoint whose metadata now names a Python file sent along with it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    marker = tmp_path / "PWNED"
    script = shared / "evil.py"
    script.write_text(EVIL_MODEL.format(marker=str(marker)))
    path = write_checkpoint(shared / "atto.safetensors", saved[2], saved[1], source=f"file:{script}:build")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert f"would run the Python file {script}" in str(error.value) and "trust_code=True" in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before  # no marker, not even a __pycache__
    rebuilt = load(path, trust_code=True)
    assert marker.read_text() == "ran" and rebuilt.class_names == list("abcde")
    checkpoint.require_trust("timm:convnext_atto", False, "recipe.yaml")  # timm sources need no consent
    with pytest.raises(CheckpointError, match="recipe.yaml would run the Python file"):
        checkpoint.require_trust(f"file:{script}:build", False, "recipe.yaml")


@pytest.mark.parametrize(
    "model_kwargs",
    [
        {"pretrained": True},  # the issue's: was a raw TypeError from create_source
        {"pretrained_cfg": "in22k"},
        {"pretrained_cfg_overlay": {"file": "/tmp/other.pth"}},
        {"checkpoint_path": "/tmp/other.pth"},
        {"cache_dir": "/tmp"},
        {"features_only": True},
        {"drop_path_rate": 0.1, "device": "cuda"},
    ],
)
def test_model_kwargs_are_architecture_only(saved, tmp_path, model_kwargs):
    path = write_checkpoint(tmp_path / "k.safetensors", saved[2], saved[1], model_kwargs=json.dumps(model_kwargs))
    refused = list(model_kwargs)[-1]
    with pytest.raises(CheckpointError, match=f"model_kwargs '{refused}' is not an architecture argument"):
        load(path)
    with pytest.raises(ValueError, match=f"model_kwargs '{refused}' is not an architecture argument"):
        convert("timm:convnext_atto", model_kwargs, num_classes=5)  # nor can a checkpoint be made with them


def test_architecture_model_kwargs_round_trip(tmp_path):
    from timm.layers import DropPath

    model_kwargs = {"drop_path_rate": 0.1, "conv_mlp": True}  # conv_mlp: 1x1 convs, weights of another shape
    model = convert("timm:convnext_atto", model_kwargs, kernel=11, count=9)
    rebuilt = load(save(model, tmp_path / "atto.safetensors"))
    assert rebuilt.dclsify.model_kwargs == model_kwargs
    drop_probs = [m.drop_prob for m in rebuilt.modules() if isinstance(m, DropPath)]
    assert drop_probs and drop_probs == [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


class RunsCode:
    """Unpickling it opens, and so creates, the file it names: a malicious .pth's payload, harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pth_that_would_run_code_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"stem.0.weight": torch.zeros(1), "payload": RunsCode(marker)}, evil)
    for read in (checkpoint.read_state_dict, lambda path: convert("timm:convnext_atto", pretrained=path)):
        with pytest.raises(CheckpointError, match=r"evil.pth holds pickled Python objects.*refused \(.*io.open"):
            read(evil)
        assert not marker.exists()
    torch.load(evil, weights_only=False)["payload"].close()  # the control: unpickled for real, it runs
    assert marker.exists()


def test_read_state_dict_takes_tensors_only(tmp_path):
    weights = {"w": torch.ones(2), "b": torch.zeros(1)}
    for name, content in [("plain.pth", weights), ("trained.pth", {"state_dict": weights, "epoch": 3})]:
        torch.save(content, tmp_path / name)
        assert checkpoint.read_state_dict(tmp_path / name).keys() == weights.keys()
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        checkpoint.read_state_dict(tmp_path / "list.pth")
    (tmp_path / "text.bin").write_text("not weights")
    with pytest.raises(CheckpointError, match="text.bin is not a readable PyTorch weights file"):
        checkpoint.read_state_dict(tmp_path / "text.bin")
    (tmp_path / "hello.bin").write_text("hello")  # torch's unpickler raised a bare KeyError on these bytes
    with pytest.raises(CheckpointError, match=r"hello.bin is not a readable PyTorch .* damaged\? \(KeyError"):
        checkpoint.read_state_dict(tmp_path / "hello.bin")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth is empty \(0 bytes\)"):
        checkpoint.read_state_dict(tmp_path / "empty.pth")
    torch.save(weights, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"cut.pth .* truncated or damaged\? \(PytorchStreamReader .*directory\)$"
    ):
        checkpoint.read_state_dict(tmp_path / "cut.pth")  # torch's first sentence, not its advice cut short
