"""Self-describing safetensors checkpoints: round trips, shared tensors, atomic writes, bad files."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dclsify import CheckpointError, Dcls2d, convert, load, save
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


def test_weights_that_do_not_fit_are_a_clear_error(model, tmp_path):
    path = save(model, tmp_path / "atto.safetensors")
    with safe_open(path, framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
    metadata["rewrite"] = json.dumps({**json.loads(metadata["rewrite"]), "count": 8})
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="weights do not fit the rebuilt model"):
        load(path)


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
    rebuilt = load(path)
    x = torch.randn(2, 1, 16, 20)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert isinstance(rebuilt[1], Dcls2d) and rebuilt[1].in_channels == 6
    with pytest.raises(Exception, match="has no function 'make'"):
        convert(f"file:{source}:make")


def test_starting_from_local_pretrained_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    imagenet = timm.create_model("convnext_atto")
    weights = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    for suffix, write in ((".safetensors", save_file), (".pth", torch.save)):
        path = tmp_path / f"atto{suffix}"
        write(weights, path)
        model = convert("timm:convnext_atto", pretrained=path, num_classes=5)
        kept = "stages.1.blocks.0.mlp.fc1.weight"
        assert torch.equal(model.state_dict()[kept], weights[kept])  # what the rewrite keeps, it keeps trained
        assert model.dclsify.pretrained == str(path) and "state_dict" not in model.pretrained_cfg
    saved = save(model, tmp_path / "tagger.safetensors")
    assert checkpoint.read_metadata(saved)["pretrained"] == str(path)
    torch.testing.assert_close(load(saved).state_dict()[kept], weights[kept])  # from the checkpoint itself
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in weights.items() if not k.startswith("stages.3")}, partial)
    with pytest.raises(Exception, match=r"partial.safetensors does not fit timm's convnext_atto: .*Missing key"):
        convert("timm:convnext_atto", pretrained=partial)
    with pytest.raises(Exception, match="no such weights file"):
        convert("timm:convnext_atto", pretrained=tmp_path / "missing.pth")


def test_baked_models_and_damaged_metadata_are_refused(model, tmp_path):
    from dclsify import bake

    with pytest.raises(CheckpointError, match="not a baked one"):
        save(bake(model), tmp_path / "baked.safetensors")
    assert list(tmp_path.iterdir()) == []
    path = save(model, tmp_path / "atto.safetensors")
    with safe_open(path, framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
    for damage, message in [
        ({"rewrite": "{not json"}, "damaged dclsify metadata"),
        ({"rewrite": json.dumps({**json.loads(metadata["rewrite"]), "warp": 9})}, "rewrite arguments this dclsify"),
    ]:
        save_file(tensors, path, metadata={**metadata, **damage})
        with pytest.raises(CheckpointError, match=message):
            load(path)
    save_file(tensors, path, metadata={k: v for k, v in metadata.items() if k != "model_kwargs"})
    with pytest.raises(CheckpointError, match="damaged dclsify metadata"):
        load(path)


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
