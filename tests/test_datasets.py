"""Datasets as they come: the five folder layouts (tiny synthetic copies of each), selectors, k-fold,
`dclsify data`, and one clear error for each way a path or selector can be wrong."""

import json

import h5py
import numpy as np
import pytest
import soundfile
from rich.console import Console
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.datasets import (
    DataLayout,
    LayoutClips,
    describe_data,
    detect_layout,
    kfold_assignment,
    open_source,
    parse_selector,
    split_selector,
)
from dclsify.pipeline.frontend import AudioConfig
from dclsify.pipeline.pack import pack
from dclsify.pipeline.sources import ClipSubset, DataError, HDF5Clips

runner = CliRunner()
RATE = 32000
SAMPLES = 1200  # a little more than one n_fft frame (1024): every file decodes, and all stay tiny
SHORT = AudioConfig(seconds=0.1)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def write_sound(path, level=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(SAMPLES, level, dtype=np.float32), RATE)
    return path


def everything_reads(dataset):
    return all(not dataset[i][3] for i in range(len(dataset)))  # no clip replaced: every path is a file


# -- the layouts, as their documentation describes them ---------------------------------------------

# ESC-50 (github.com/karolpiczak/ESC-50, README "Repository content"): audio/{FOLD}-{CLIP_ID}-{TAKE}-{TARGET}.wav and
# meta/esc50.csv with the columns filename,fold,target,category,esc10,src_file,take; target is the class, 0..49
ESC_CLASSES = {0: ("dog", True), 1: ("rooster", True), 2: ("pig", False), 5: ("cat", False), 10: ("rain", True)}


@pytest.fixture
def esc50(tmp_path):
    root = tmp_path / "ESC-50-master"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, (category, esc10) in ESC_CLASSES.items():
            for take in "AB":
                name = f"{fold}-{1000 + target}-{take}-{target}.wav"
                write_sound(root / "audio" / name)
                rows.append(f"{name},{fold},{target},{category},{esc10},{1000 + target},{take}")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


# UrbanSound8K (its README): metadata/UrbanSound8K.csv with slice_file_name,fsID,start,end,salience,fold,classID,class
# and the clips in audio/fold1 .. audio/fold10; classID 0 = air_conditioner ... 9 = street_music
@pytest.fixture
def urbansound8k(tmp_path):
    root = tmp_path / "UrbanSound8K"
    rows = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    classes = [(9, "street_music"), (0, "air_conditioner"), (3, "dog_bark")]
    for fold in [3, 10, 1, 2, 4, 5, 6, 7, 8, 9]:  # the CSV is not in fold order
        for class_id, name in classes + ([(3, "dog_bark")] if fold == 10 else []):
            slice_name = f"{100 + fold}-{class_id}-0-{len(rows)}.wav"
            write_sound(root / "audio" / f"fold{fold}" / slice_name)
            rows.append(f"{slice_name},{100 + fold},0.0,0.1,1,{fold},{class_id},{name}")
    (root / "metadata").mkdir()
    (root / "metadata" / "UrbanSound8K.csv").write_text("\n".join(rows) + "\n")
    return root


# FSD50K (its README, "Files"): FSD50K.ground_truth/dev.csv (fname,labels,mids,split: train or val), eval.csv
# (fname,labels,mids), vocabulary.csv (index,label,mid; no header); clips FSD50K.{dev,eval}_audio/<fname>.wav
FSD_VOCABULARY = "2,Animal,/m/0jbk\n0,Bark,/m/05tny_\n1,Dog,/m/0bt9lr\n3,Music,/m/04rlf\n"
FSD_DEV = [
    ("64760", "Bark,Dog,Animal", "train"),
    ("16399", "Music", "train"),
    ("16401", "Dog,Animal", "val"),
    ("345111", "Music", "train"),
    ("5318", "Bark,Dog,Animal,Music", "val"),
]
FSD_EVAL = [("37199", "Music"), ("175151", "Dog,Animal")]


def write_fsd50k(root, dev=FSD_DEV, vocabulary=FSD_VOCABULARY):
    truth = root / "FSD50K.ground_truth"
    truth.mkdir(parents=True)
    (truth / "vocabulary.csv").write_text(vocabulary)
    mids = {line.split(",")[1]: line.split(",")[2] for line in vocabulary.splitlines()}
    lines = ["fname,labels,mids,split"]
    for fname, labels, split in dev:
        lines.append(f'{fname},"{labels}","{",".join(mids.get(x, "/m/x") for x in labels.split(","))}",{split}')
        write_sound(root / "FSD50K.dev_audio" / f"{fname}.wav")
    (truth / "dev.csv").write_text("\n".join(lines) + "\n")
    lines = ["fname,labels,mids"]
    for fname, labels in FSD_EVAL:
        lines.append(f'{fname},"{labels}","{",".join(mids[x] for x in labels.split(","))}"')
        write_sound(root / "FSD50K.eval_audio" / f"{fname}.wav")
    (truth / "eval.csv").write_text("\n".join(lines) + "\n")
    return root


# Speech Commands (its README, "Partitioning"): one folder of .wav files a word; validation_list.txt and
# testing_list.txt hold paths such as right/bbc30633_nohash_0.wav, and the clips in neither list are the
# training set; _background_noise_ holds longer noise recordings
@pytest.fixture
def speech_commands(tmp_path):
    root = tmp_path / "speech_commands_v0.02"
    for word, speakers in (("yes", ["aaa", "bbb", "ccc", "ddd"]), ("no", ["aaa", "eee", "fff"])):
        for speaker in speakers:
            write_sound(root / word / f"{speaker}_nohash_0.wav")
    write_sound(root / "_background_noise_" / "white_noise.wav")
    (root / "_background_noise_" / "README.md").write_text("noise\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    (root / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\nno/eee_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/ccc_nohash_0.wav\n")
    return root


@pytest.fixture
def class_folders(tmp_path):
    """3 classes x 10 clips, some a folder deeper, with a hidden folder and a text file to ignore."""
    root = tmp_path / "my sounds"
    for name in ("dog", "bird", "cat"):
        for i in range(10):
            write_sound(root / name / ("night" if i % 3 == 0 else "") / f"{name}{i:02d}.wav")
    write_sound(root / ".cache" / "x.wav")
    (root / "bird" / "notes.txt").write_text("not a sound\n")
    return root


def test_a_folder_of_class_folders_is_a_single_label_set_with_classes_sorted_by_name(class_folders):
    data = open_source(class_folders, SHORT)
    assert isinstance(data, LayoutClips) and data.layout == "class-folders" and len(data) == 30
    assert data.class_names == ["bird", "cat", "dog"] and not data.multi_label
    assert data.clip_name(0) == "bird/bird01" and data.labels(0) == ["bird"]  # clips by class, then path
    assert data.clip_name(len(data) - 1) == "dog/night/dog09" and data.labels(len(data) - 1) == ["dog"]
    assert data.clip_name(6) == "bird/night/bird00"  # named by the path below the root: names repeat in folders
    assert data.clip_path(6).endswith("bird/night/bird00.wav")  # any depth below the class folder
    assert data.target_matrix().sum(axis=0).tolist() == [10, 10, 10] and everything_reads(data)
    assert describe_data(str(class_folders)).as_dict() == {
        "layout": "class-folders",
        "classes": ["bird", "cat", "dog"],
        "multi_label": False,
        "clips": 30,
    }


def test_train_and_test_folders_of_class_folders_are_splits(tmp_path):
    root = tmp_path / "set"
    for split, names in (("train", ["a", "b", "b"]), ("test", ["a", "c"]), ("validation", ["b"])):
        for i, name in enumerate(names):
            write_sound(root / split / name / f"{split}{i}.wav")
    found = describe_data(root)
    assert found.layout == "class-folders" and found.classes == ["a", "b", "c"]  # all splits' classes, sorted
    assert found.splits == {"train": 3, "validation": 1, "test": 2} and found.folds is None and found.clips == 6
    train, test = open_source(f"{root}#split=train"), open_source(f"{root}#split=test")
    assert isinstance(train, ClipSubset) and [train.clip_name(i) for i in range(3)] == [
        "train/a/train0",
        "train/b/train1",
        "train/b/train2",
    ]
    assert train.class_names == test.class_names == ["a", "b", "c"]  # c is in no training clip, yet a class
    assert [test.labels(i) for i in range(2)] == [["a"], ["c"]]
    assert len(open_source(f"{root}#split=test,validation")) == 3
    with pytest.raises(DataError, match="has no split 'val'; its splits are train, validation, test"):
        open_source(f"{root}#split=val")


def test_classes_called_train_and_test_that_hold_their_sounds_are_classes(tmp_path):
    root = tmp_path / "vehicles"
    for i, name in enumerate(("train", "test", "train")):
        write_sound(root / name / f"{name}{i}.wav")
    found = describe_data(root)
    assert found.layout == "class-folders" and found.classes == ["test", "train"] and found.splits is None
    assert found.clips == 3
    write_sound(tmp_path / "no train" / "test" / "a" / "x.wav")  # splits need a train folder
    write_sound(tmp_path / "no train" / "validation" / "b" / "y.wav")
    assert describe_data(tmp_path / "no train").classes == ["test", "validation"]


def test_esc50_reads_its_folds_and_esc10(esc50):
    data = open_source(esc50, SHORT)
    assert data.layout == "esc50" and len(data) == 50 and not data.multi_label
    assert data.class_names == ["dog", "rooster", "pig", "cat", "rain"]  # by target, ESC-50's class numbers
    assert data.clip_name(0) == "1-1000-A-0" and data.labels(0) == ["dog"] and everything_reads(data)
    assert describe_data(esc50).folds == {str(fold): 10 for fold in range(1, 6)}
    fold5 = open_source(f"{esc50}#fold=5")
    assert len(fold5) == 10 and {fold5.clip_name(i)[0] for i in range(10)} == {"5"}
    esc10 = describe_data(f"{esc50}#subset=esc10")
    assert esc10.classes == ["dog", "rooster", "rain"] and esc10.clips == 30
    assert esc10.folds == {str(fold): 6 for fold in range(1, 6)}
    both = open_source(f"{esc50}#subset=esc10&fold=1,2")
    assert len(both) == 12 and both.class_names == ["dog", "rooster", "rain"]
    assert sorted({both.labels(i)[0] for i in range(12)}) == ["dog", "rain", "rooster"]
    assert describe_data(f"{esc50}#fold=05").clips == 10  # a fold number written with a zero


def test_training_and_evaluation_folds_are_disjoint_cover_the_set_and_share_the_classes(esc50):
    train, evaluation = open_source(f"{esc50}#fold=1,2,3,4", SHORT), open_source(f"{esc50}#fold=5", SHORT)
    training_clips = {train.clip_path(i) for i in range(len(train))}
    evaluation_clips = {evaluation.clip_path(i) for i in range(len(evaluation))}
    whole = open_source(esc50)
    assert len(train) == 40 and len(evaluation) == 10 and not training_clips & evaluation_clips
    assert training_clips | evaluation_clips == {whole.clip_path(i) for i in range(len(whole))}
    assert train.class_names == evaluation.class_names == whole.class_names
    assert (train.target_matrix().sum(axis=0) == 8).all() and (evaluation.target_matrix().sum(axis=0) == 2).all()


def test_a_selection_with_a_black_list_and_pack(esc50, tmp_path):
    (tmp_path / "black.csv").write_text("5-1000-A-0\n5-1010-B-10.wav\n1-1000-A-0\n")
    data = open_source(f"{esc50}#fold=5", SHORT, blacklist=tmp_path / "black.csv")
    assert len(data) == 8 and data.blacklisted.skipped == 2 and data.blacklisted.unmatched == 1  # fold 1's: not here
    report = pack(f"{esc50}#fold=5", tmp_path / "fold5.h5", audio=SHORT, workers=0)
    packed = HDF5Clips([tmp_path / "fold5.h5"])
    assert report.packed == 10 and packed.class_names == ["dog", "rooster", "pig", "cat", "rain"]
    assert packed.names[:3] == ["5-1000-A-0", "5-1000-B-0", "5-1001-A-1"] and not packed.multi_label


def test_urbansound8k_reads_its_ten_folds_from_the_csv(urbansound8k):
    data = open_source(urbansound8k, SHORT)
    assert data.layout == "urbansound8k" and len(data) == 31 and everything_reads(data)
    assert data.class_names == ["air_conditioner", "dog_bark", "street_music"]  # by classID: 0, 3, 9
    assert data.clip_path(0).endswith("audio/fold3/103-9-0-1.wav") and data.labels(0) == ["street_music"]
    assert data.clip_name(0) == "103-9-0-1"
    found = describe_data(f"{urbansound8k}#fold=10")
    assert found.folds == {**{str(fold): 3 for fold in range(1, 10)}, "10": 4} and found.clips == 4
    assert list(found.folds) == [str(fold) for fold in range(1, 11)]  # 10 after 9
    assert len(open_source(f"{urbansound8k}#fold=1,2,3,4,5,6,7,8,9")) == 27


def test_fsd50k_is_multi_label_with_train_val_and_eval(tmp_path):
    root = write_fsd50k(tmp_path / "FSD50K")
    data = open_source(root, SHORT)
    assert data.layout == "fsd50k" and data.multi_label and len(data) == 7 and everything_reads(data)
    assert data.class_names == ["Bark", "Dog", "Animal", "Music"]  # vocabulary.csv's index order
    assert data.clip_name(0) == "64760" and data.labels(0) == ["Bark", "Dog", "Animal"]
    assert data.clip_path(5).endswith("FSD50K.eval_audio/37199.wav")
    found = describe_data(f"{root}#split=eval")
    assert found.splits == {"train": 3, "val": 2, "eval": 2} and found.clips == 2 and found.multi_label
    val = open_source(f"{root}#split=val")
    assert [val.clip_name(i) for i in range(2)] == ["16401", "5318"] and val.labels(1) == [
        "Bark",
        "Dog",
        "Animal",
        "Music",
    ]
    assert val.target_matrix().tolist() == [[False, True, True, False], [True, True, True, True]]


def test_speech_commands_splits_follow_its_lists_and_noise_is_no_word(speech_commands):
    data = open_source(speech_commands, SHORT)
    assert data.layout == "speech-commands" and data.class_names == ["no", "yes"] and len(data) == 7
    assert everything_reads(data)
    found = describe_data(speech_commands)
    assert found.splits == {"train": 4, "validation": 2, "test": 1} and not found.multi_label
    test = open_source(f"{speech_commands}#split=test")
    assert len(test) == 1 and test.clip_name(0) == "yes/ccc_nohash_0" and test.labels(0) == ["yes"]
    validation = open_source(f"{speech_commands}#split=validation")
    assert sorted(validation.clip_path(i).rsplit("/", 2)[-2] for i in range(2)) == ["no", "yes"]
    train = open_source(f"{speech_commands}#split=train")
    assert sorted(train.clip_name(i) for i in range(4)) == [  # a speaker's clip of each word: two names apart
        "no/aaa_nohash_0",
        "no/fff_nohash_0",
        "yes/aaa_nohash_0",
        "yes/ddd_nohash_0",
    ]


def test_detect_layout_looks_at_what_is_inside(esc50, urbansound8k, speech_commands, class_folders, tmp_path):
    found = [detect_layout(p) for p in (esc50, urbansound8k, write_fsd50k(tmp_path / "f"), speech_commands)]
    assert found == ["esc50", "urbansound8k", "fsd50k", "speech-commands"]
    assert (
        detect_layout(class_folders) == "class-folders" and detect_layout(tmp_path / "f" / "FSD50K.dev_audio") is None
    )
    assert detect_layout(esc50 / "meta" / "esc50.csv") is None  # a file is no dataset folder


# -- selectors and k-fold --------------------------------------------------------------------------


def test_the_selector_grammar():
    assert split_selector("/data/ESC-50#subset=esc10&fold=1,2") == ("/data/ESC-50", "subset=esc10&fold=1,2")
    assert split_selector("/data/a.h5,/data/b.h5#kfold=5&fold=1") == ("/data/a.h5,/data/b.h5", "kfold=5&fold=1")
    assert split_selector("/data/ESC-50") == ("/data/ESC-50", None)
    selector = parse_selector(" fold = 1, 02 & kfold=5&kfold_seed=7&split=train")
    assert (selector.fold, selector.kfold, selector.kfold_seed, selector.split) == (("1", "2"), 5, 7, ("train",))


def test_a_path_that_exists_keeps_its_hash(class_folders, tmp_path):
    root = class_folders.rename(tmp_path / "take#2")
    assert split_selector(root) == (str(root), None) and len(open_source(root)) == 30
    assert len(open_source(f"{root}#kfold=5&fold=1")) == 6  # the last # starts the selector


def test_kfold_deals_any_data_into_stratified_folds_the_same_way_each_time(class_folders):
    found = describe_data(f"{class_folders}#kfold=5")
    assert found.folds == {str(fold): 6 for fold in range(1, 6)} and found.clips == 30
    folds = [open_source(f"{class_folders}#kfold=5&fold={fold}") for fold in range(1, 6)]
    for fold in folds:  # balanced classes: each fold holds each class's share, within one clip
        counts = fold.target_matrix().sum(axis=0)
        assert counts.max() - counts.min() <= 1 and fold.class_names == ["bird", "cat", "dog"]
    clips = [{f.clip_name(i) for i in range(len(f))} for f in folds]
    assert sum(len(c) for c in clips) == 30 and len(set().union(*clips)) == 30  # disjoint, covering
    again = open_source(f"{class_folders}#kfold=5&fold=3")
    assert again.indices.tolist() == folds[2].indices.tolist()  # a resumed run gets the same folds
    seeded = open_source(f"{class_folders}#kfold=5&fold=3&kfold_seed=1")
    assert seeded.indices.tolist() != folds[2].indices.tolist()
    rest = open_source(f"{class_folders}#kfold=5&fold=1,2,4,5")
    assert sorted(rest.indices.tolist() + folds[2].indices.tolist()) == list(range(30))


def test_kfold_sizes_differ_by_one_at_most_and_multi_label_clips_go_by_their_rarest_label():
    single = np.eye(3, dtype=bool)[np.arange(31) % 3]
    assert sorted(np.bincount(kfold_assignment(single, 5))[1:].tolist()) == [6, 6, 6, 6, 7]
    # every clip has label 0; half also label 1, half label 2: stratified on 1 and 2, each fold holds 2 of each
    multi = np.zeros((20, 3), dtype=bool)
    multi[:, 0], multi[:10, 1], multi[10:, 2] = True, True, True
    assignment = kfold_assignment(multi, 5, seed=3)
    for fold in range(1, 6):
        assert multi[assignment == fold].sum(axis=0).tolist() == [4, 2, 2]
    assert kfold_assignment(multi, 5, seed=3).tolist() == assignment.tolist()


def test_kfold_works_on_packed_files_too(tmp_path):
    with h5py.File(tmp_path / "set.h5", "w") as handle:
        handle["audio_name"] = np.array([f"clip{i}".encode() for i in range(12)])
        handle["waveform"] = np.zeros((12, 2048), dtype=np.int16)
        handle["target"] = np.eye(2, dtype=bool)[np.arange(12) % 2]
        handle.attrs.update(class_names=json.dumps(["on", "off"]))
    assert describe_data(tmp_path / "set.h5").as_dict() == {
        "layout": "hdf5",
        "classes": ["on", "off"],
        "multi_label": True,
        "clips": 12,
    }
    assert describe_data(f"{tmp_path / 'set.h5'}#kfold=3").folds == {"1": 4, "2": 4, "3": 4}
    fold = open_source(f"{tmp_path / 'set.h5'}#kfold=3&fold=2")
    assert isinstance(fold, ClipSubset) and isinstance(fold.dataset, HDF5Clips) and len(fold) == 4
    assert fold.target_matrix().sum(axis=0).tolist() == [2, 2]
    with pytest.raises(DataError, match="is packed already"):
        pack(f"{tmp_path / 'set.h5'}#kfold=3&fold=2", tmp_path / "again.h5")


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("fold=6", "ESC-50 has no fold '6'; its folds are 1, 2, 3, 4, 5"),
        ("split=train", "ESC-50 has no splits (it has folds: select with #fold=...)"),
        ("subset=esc20", "ESC-50 has no subset 'esc20'; the one there is is esc10"),
        ("colour=red", "unknown selector key 'colour'; the keys are split, fold, subset, kfold, kfold_seed"),
        ("fold", "'fold' is not key=value; a selector is #key=value&key=value"),
        ("fold=1&fold=2", "fold is given twice"),
        ("fold=1,", "fold= needs a value, or a comma list of values"),
        ("", "nothing after '#'"),
        ("kfold=1", "kfold takes one whole number of at least 2, not '1'"),
        ("kfold=5&kfold_seed=x", "kfold_seed takes one whole number of at least 0, not 'x'"),
        ("kfold_seed=3", "kfold_seed goes with kfold=K"),
        ("kfold=5&fold=6", "kfold=5 has no fold '6'; its folds are 1 to 5"),
        ("kfold=51", "kfold=51: there are only 50 clips to deal into 51 folds"),
    ],
)
def test_each_wrong_selector_is_one_clear_error(esc50, selector, message):
    with pytest.raises(DataError) as error:
        open_source(f"{esc50}#{selector}")
    assert str(error.value).startswith(f"{esc50}#{selector}: {message}"), str(error.value)


def test_errors_of_folders_and_selections(tmp_path, class_folders, speech_commands):
    (speech_commands / "testing_list.txt").write_text("")
    write_sound(tmp_path / "loose" / "a.wav")
    write_sound(tmp_path / "loose" / "b.wav")
    (tmp_path / "empty").mkdir()
    write_sound(tmp_path / "mixed" / "dog" / "d.wav")
    write_sound(tmp_path / "mixed" / "stray.flac")
    cases = [
        (
            f"{class_folders}#fold=1",
            "a folder of class folders has no folds (it has neither splits nor folds); #kfold=K&fold=1,2 deals any "
            "data into K folds of its own",
        ),
        (f"{class_folders}#subset=esc10", f"subset=esc10 is ESC-50's (esc10); {class_folders} is not ESC-50"),
        (f"{speech_commands}#split=test", "the selection 'split=test' holds no clip"),
        (f"{tmp_path / 'nothing'}#fold=1", f"no such file: {tmp_path / 'nothing'}"),
        (
            str(tmp_path / "empty"),
            "is a folder that matches no dataset layout. Looked for: class folders (ROOT/<class>/",
        ),
        (str(tmp_path / "loose"), "matches no dataset layout; its 2 sound files lie directly in it"),
        (str(tmp_path / "mixed"), "1 sound files lie directly in it, outside any class folder (such as stray.flac)"),
        (str(speech_commands.parent), f"{speech_commands} is Speech Commands: give that folder, not the one above it"),
    ]
    for path, message in cases:
        with pytest.raises(DataError) as error:
            open_source(path)
        assert message in str(error.value), (path, str(error.value))
    with pytest.raises(DataError) as error:
        describe_data(tmp_path / "empty")
    for looked_for in (
        "ESC-50 (meta/esc50.csv and audio/)",
        "UrbanSound8K (metadata/UrbanSound8K.csv",
        "FSD50K (FSD50K.",
    ):
        assert looked_for in str(error.value)
    assert "Speech Commands (word folders, validation_list.txt and testing_list.txt)" in str(error.value)


def test_errors_in_a_dataset_s_own_files_name_the_file_and_line(tmp_path, esc50):
    fsd = write_fsd50k(tmp_path / "FSD50K", dev=[("1", "Bark,Growl", "train")])
    with pytest.raises(DataError, match=r"dev\.csv, line 2: 'Growl' is not a class of vocabulary\.csv"):
        open_source(fsd)
    (esc50 / "meta" / "esc50.csv").write_text("filename,fold,category\n1-1-A-0.wav,1,dog\n")
    with pytest.raises(DataError, match=r"esc50\.csv, line 1: no target, esc10 column; ESC-50's meta/esc50\.csv has"):
        open_source(esc50)


# -- the command -------------------------------------------------------------------------------------


def test_data_command_prints_the_layout_and_json(esc50, tmp_path):
    result = runner.invoke(app, ["data", f"{esc50}#fold=5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "layout": "esc50",
        "classes": ["dog", "rooster", "pig", "cat", "rain"],
        "multi_label": False,
        "clips": 10,
        "folds": {"1": 10, "2": 10, "3": 10, "4": 10, "5": 10},
    }
    assert json.loads(result.output) == describe_data(f"{esc50}#fold=5").as_dict()
    result = runner.invoke(app, ["data", f"{esc50}#subset=esc10&fold=1,2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{esc50}#subset=esc10&fold=1,2: ESC-50 (esc50), 3 classes, one label a clip"
    assert lines[1] == "12 clips selected, of 30"
    assert [line.split() for line in lines[2:]][0] == ["fold", "clips"]
    assert [line.split() for line in lines[4:9]] == [[str(fold), "6"] for fold in range(1, 6)]
    assert lines[-1] == "classes: dog, rooster, rain"
    result = runner.invoke(app, ["data", f"{esc50}#fold=9"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert "ESC-50 has no fold '9'; its folds are 1, 2, 3, 4, 5" in result.output
    result = runner.invoke(app, ["data", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and f"no such file: {tmp_path / 'nowhere'}" in result.output


def test_data_layout_is_a_frozen_record():
    found = DataLayout("esc50", ["dog"], False, 1, None, {"1": 1})
    assert found.as_dict() == {
        "layout": "esc50",
        "classes": ["dog"],
        "multi_label": False,
        "clips": 1,
        "folds": {"1": 1},
    }
    with pytest.raises(AttributeError):
        found.clips = 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("1-9-A-0.wav,1,0\n", r"esc50.csv, line 52: no category, esc10 \(the line has too few fields\)"),
        (b"1-9-A-0.wav,1,0,caf\xe9,False,9,A\n", "not UTF-8 text"),
    ],
)
def test_a_damaged_dataset_file_is_one_error_naming_it(esc50, line, message):
    meta = esc50 / "meta" / "esc50.csv"
    with open(meta, "ab") as handle:
        handle.write(line if isinstance(line, bytes) else line.encode())
    with pytest.raises(DataError, match=message):
        open_source(esc50)
