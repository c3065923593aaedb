"""Datasets as they come: public sound sets read in the folders they unpack to, and a selector after
``#`` that picks a split or folds of any source.

:func:`open_source` is the one door to the data: a path that names a folder is read by its layout,
found from what is inside it (:func:`detect_layout`), and anything else goes to the file sources of
:mod:`~dclsify.pipeline.sources` (HDF5, an AudioSet segment CSV, a manifest). The layouts:

- ``class-folders``: ``ROOT/<class>/**/*.wav|flac|mp3|ogg...``, one label a clip, classes sorted by
  name; with ``ROOT/train/<class>`` and ``ROOT/test/<class>`` (or ``validation``, ``val``, ``eval``),
  those folders are the splits;
- ``esc50``: ESC-50 (``meta/esc50.csv``, ``audio/``), its 5 folds, and ESC-10 as ``subset=esc10``;
- ``urbansound8k``: UrbanSound8K (``metadata/UrbanSound8K.csv``, ``audio/fold1`` .. ``fold10``), its 10 folds;
- ``fsd50k``: FSD50K (``FSD50K.ground_truth/{dev,eval,vocabulary}.csv``, ``FSD50K.dev_audio/``,
  ``FSD50K.eval_audio/``), multi-label, splits ``train`` and ``val`` (dev.csv's split column) and ``eval``;
- ``speech-commands``: Speech Commands v2 (word folders, ``validation_list.txt``, ``testing_list.txt``),
  splits ``train`` (the clips in neither list), ``validation`` and ``test``; ``_background_noise_`` is no word.

A selector is ``PATH#key=value&key=value``, a value a comma list (:func:`parse_selector`): ``split=train``,
``fold=1,2,3,4``, ``subset=esc10``, and for any source ``kfold=K`` (``kfold_seed=S``, default 0), which
deals the clips into K stratified folds (:func:`kfold_assignment`) that ``fold=`` then names. A selection
is a :class:`~dclsify.pipeline.sources.ClipSubset` of the whole dataset: its class list is the whole
dataset's, so the training and evaluation selections of one folder have the same classes.
:func:`describe_data` says what a path holds.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .frontend import AudioConfig
from .sources import (
    AUDIO_EXTENSIONS,
    Blacklist,
    ClipDataset,
    ClipSubset,
    DataError,
    HDF5Clips,
    LabelledFiles,
    ManifestClips,
    SegmentClips,
    open_file_source,
    read_blacklist,
    skip_blacklisted,
)

SELECTOR_KEYS = ("split", "fold", "subset", "kfold", "kfold_seed")
# The folders that make ROOT/<split>/<class> a split layout, in the order splits are listed.
SPLIT_FOLDERS = ("train", "validation", "val", "test", "eval")
LAYOUT_TITLES = {
    "class-folders": "a folder of class folders",
    "esc50": "ESC-50",
    "urbansound8k": "UrbanSound8K",
    "fsd50k": "FSD50K",
    "speech-commands": "Speech Commands",
    "hdf5": "packed clips (HDF5)",
    "segments": "an AudioSet segment CSV",
    "manifest": "a manifest",
}
LAYOUTS_LOOKED_FOR = (
    "class folders (ROOT/<class>/*.wav, flac, mp3, ogg..., or ROOT/train/<class> and ROOT/test/<class>), "
    "ESC-50 (meta/esc50.csv and audio/), UrbanSound8K (metadata/UrbanSound8K.csv and audio/fold1..10/), "
    "FSD50K (FSD50K.ground_truth/ with dev.csv, eval.csv and vocabulary.csv, FSD50K.dev_audio/, FSD50K.eval_audio/), "
    "Speech Commands (word folders, validation_list.txt and testing_list.txt)"
)


# layouts whose file names repeat from folder to folder: a clip is named by its path below the root
FOLDER_NAMED = ("class-folders", "speech-commands")


@dataclass(frozen=True)
class DataLayout:
    """What a data path holds: its ``layout`` (``class-folders``, ``esc50``, ``urbansound8k``, ``fsd50k``,
    ``speech-commands``; for files ``hdf5``, ``segments``, ``manifest``), the whole dataset's ``classes``,
    whether a clip may have several labels, the ``clips`` its selector selects (all without one), and
    the clips of each split or fold (None where it has none; with ``kfold=K``, ``folds`` are those K)."""

    layout: str
    classes: list[str]
    multi_label: bool
    clips: int
    splits: dict[str, int] | None = None
    folds: dict[str, int] | None = None

    def as_dict(self) -> dict:
        """One JSON-ready object: layout, classes, multi_label, clips, and splits and/or folds where there are any."""
        found = {"layout": self.layout, "classes": list(self.classes), "multi_label": self.multi_label}
        found["clips"] = self.clips
        if self.splits is not None:
            found["splits"] = dict(self.splits)
        if self.folds is not None:
            found["folds"] = dict(self.folds)
        return found


class LayoutClips(LabelledFiles):
    """The clips of a dataset folder, in a fixed order, each in the split or fold its dataset puts it in.

    ``layout`` names the layout; ``part_kind`` is ``"split"``, ``"fold"`` or None (a dataset with
    neither); ``parts`` holds each clip's split or fold name and ``part_names`` them all, in order.
    A clip's name is its file's stem (``1-100032-A-0``) where the dataset's file names are unique (ESC-50,
    UrbanSound8K, FSD50K), and its path below the root without the extension (``right/bbc30633_nohash_0``,
    ``train/dog/0``) where they repeat from folder to folder (class folders, Speech Commands): a
    teacher file matches clips by these names.
    """

    def __init__(
        self,
        root: Path,
        layout: str,
        paths: list[Path],
        labels: list[list[int]],
        class_names: list[str],
        multi_label: bool,
        audio: AudioConfig | None,
        part_kind: str | None = None,
        parts: Sequence[str] | None = None,
        part_names: Sequence[str] = (),
    ) -> None:
        super().__init__(paths, labels, class_names, multi_label, audio)
        self.root, self.layout, self.part_kind = root, layout, part_kind
        self.parts = np.asarray(parts if parts is not None else [], dtype=str)
        self.part_names = list(part_names)

    def clip_name(self, index: int) -> str:
        if self.layout in FOLDER_NAMED:  # 0.wav in every class folder: the folders keep names apart
            return self.paths[index].relative_to(self.root).with_suffix("").as_posix()
        return self.paths[index].stem

    def part_counts(self) -> dict[str, int] | None:
        if self.part_kind is None:
            return None
        return {name: int((self.parts == name).sum()) for name in self.part_names}


# -- selectors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """A parsed ``#key=value&key=value``: the splits, folds, ESC-50 subset and k-fold asked for."""

    text: str
    split: tuple[str, ...] = ()
    fold: tuple[str, ...] = ()
    subset: str | None = None
    kfold: int | None = None
    kfold_seed: int = 0


def split_selector(path: str | os.PathLike) -> tuple[str, str | None]:
    """``ROOT#fold=5`` -> (``ROOT``, ``fold=5``). A path that exists as written keeps its ``#``
    (a file may be called ``a#b.h5``); otherwise the last ``#`` starts the selector."""
    text = os.fspath(path)
    if "#" not in text or os.path.exists(text):
        return text, None
    base, _, selector = text.rpartition("#")
    return base, selector


def _fold_name(value: str) -> str:
    return str(int(value)) if value.isdigit() else value  # fold=05 is fold 5


def _integer(where: str, key: str, values: list[str], least: int) -> int:
    if len(values) != 1 or not values[0].lstrip("-").isdigit() or int(values[0]) < least:
        raise DataError(f"{where}: {key} takes one whole number of at least {least}, not {','.join(values)!r}")
    return int(values[0])


def parse_selector(text: str, where: str = "") -> Selector:
    """``fold=1,2&kfold=5`` -> a :class:`Selector`. ``where`` (the path as given) opens each error."""
    where = where or f"#{text}"
    if not text.strip():
        raise DataError(f"{where}: nothing after '#'; a selector is #key=value&key=value, e.g. #fold=1,2,3,4")
    values: dict[str, list[str]] = {}
    for part in text.split("&"):
        key, equals, value = (piece.strip() for piece in part.partition("="))
        if not equals or not key:
            raise DataError(f"{where}: {part!r} is not key=value; a selector is #key=value&key=value, e.g. #fold=1,2")
        if key not in SELECTOR_KEYS:
            raise DataError(f"{where}: unknown selector key {key!r}; the keys are {', '.join(SELECTOR_KEYS)}")
        if key in values:
            raise DataError(f"{where}: {key} is given twice")
        items = [item.strip() for item in value.split(",")]
        if not all(items):
            raise DataError(f"{where}: {key}= needs a value, or a comma list of values")
        values[key] = items
    if "subset" in values and len(values["subset"]) != 1:
        raise DataError(f"{where}: subset takes one name, not {','.join(values['subset'])!r}")
    kfold = _integer(where, "kfold", values["kfold"], 2) if "kfold" in values else None
    if "kfold_seed" in values and kfold is None:
        raise DataError(f"{where}: kfold_seed goes with kfold=K (the folds it shuffles)")
    return Selector(
        text=text,
        split=tuple(values.get("split", ())),
        fold=tuple(_fold_name(v) for v in values.get("fold", ())),
        subset=values["subset"][0] if "subset" in values else None,
        kfold=kfold,
        kfold_seed=_integer(where, "kfold_seed", values["kfold_seed"], 0) if "kfold_seed" in values else 0,
    )


def kfold_assignment(targets: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each clip's fold, 1..``folds``, from scikit-learn's ``StratifiedKFold(shuffle=True,
    random_state=seed)`` over the clips in their order: a pure function of the (clips, classes) bool
    ``targets``, ``folds`` and ``seed``, so that a resumed run gets the same folds.

    A clip is stratified by its rarest label (the one with fewest clips in ``targets``; the first such
    class on a tie), which for single-label data is its label; clips with no label form one more
    stratum. A class with fewer clips than folds cannot be in every fold (it is spread as far as it goes).
    """
    from sklearn.model_selection import StratifiedKFold

    clips = len(targets)
    if folds > clips:
        raise DataError(f"kfold={folds}: there are only {clips} clips to deal into {folds} folds")
    counts = targets.sum(axis=0)
    rarest = np.where(targets, counts, np.iinfo(np.int64).max).argmin(axis=1) if targets.shape[1] else 0
    strata = np.where(targets.any(axis=1), rarest, -1)
    assignment = np.zeros(clips, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)  # documented above
        try:
            for number, (_, held_out) in enumerate(splitter.split(np.zeros(clips), strata), start=1):
                assignment[held_out] = number
        except ValueError as error:
            raise DataError(f"kfold={folds}: {error}") from None
    return assignment


# -- the layouts ----------------------------------------------------------------------------------


def _sound_files(folder: Path) -> list[Path]:
    """The sound files in ``folder`` and below, hidden folders left out, sorted by path."""
    found = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, name) for name in names if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _holds_sound(folder: Path) -> bool:
    """Whether ``folder`` or a folder below it (not a hidden one) holds a sound file; stops at the first."""
    for _, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        if any(os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS for name in names):
            return True
    return False


def _loose_sound_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def _marked_layout(root: Path) -> str | None:
    """The layout of a public dataset whose own files are in ``root``, else None."""
    if (root / "meta" / "esc50.csv").is_file():
        return "esc50"
    if (root / "metadata" / "UrbanSound8K.csv").is_file():
        return "urbansound8k"
    if (root / "FSD50K.ground_truth").is_dir():
        return "fsd50k"
    if (root / "validation_list.txt").is_file() and (root / "testing_list.txt").is_file():
        return "speech-commands"
    return None


def detect_layout(root: str | os.PathLike) -> str | None:
    """The layout of the dataset folder ``root`` (see the module's description), from the files that
    mark each: None when it matches none (or is no folder)."""
    root = Path(root)
    if not root.is_dir():
        return None
    marked = _marked_layout(root)
    if marked is not None:
        return marked
    if any(_holds_sound(folder) for folder in _subfolders(root)):
        return "class-folders"
    return None


def _read_csv(path: Path, columns: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV with a header that has ``columns``; ``what`` names the file's layout in errors."""
    if not path.is_file():
        raise DataError(f"no {path}: {what}")
    reader = csv.DictReader(_text_lines(path))
    missing = [column for column in columns if column not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}, line 1: no {', '.join(missing)} column; {what}")
    rows = list(enumerate(reader, start=2))
    for line, row in rows:
        short = [column for column in columns if row.get(column) is None]
        if short:
            raise DataError(f"{path}, line {line}: no {', '.join(short)} (the line has too few fields); {what}")
    return rows


def _text_lines(path: Path) -> list[str]:
    """A dataset's text file as lines; one that is not UTF-8 text is a :class:`DataError` naming it."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); is it the dataset's own file?") from None


def _number(path: Path, line: int, column: str, value: str | None) -> int:
    try:
        return int((value or "").strip())
    except ValueError:
        raise DataError(f"{path}, line {line}: {column} is {value!r}, not a whole number") from None


def _numbered_classes(path: Path, rows: list[tuple[int, int, str]]) -> tuple[list[str], dict[int, int]]:
    """(class names in the order of their numbers, number -> class index) from (line, number, name) rows."""
    names: dict[int, str] = {}
    for line, number, name in rows:
        if names.setdefault(number, name) != name:
            raise DataError(f"{path}, line {line}: class {number} is {name!r} here and {names[number]!r} before")
    numbers = sorted(names)
    return [names[n] for n in numbers], {n: i for i, n in enumerate(numbers)}


def _ordered_parts(found: Sequence[str], numeric: bool) -> list[str]:
    names = set(found)
    if numeric:
        return sorted(names, key=int)
    order = {name: i for i, name in enumerate(SPLIT_FOLDERS)}
    return sorted(names, key=lambda name: (order.get(name, len(order)), name))


def _read_class_folders(root: Path, audio: AudioConfig | None) -> LayoutClips:
    folders = {folder.name: folder for folder in _subfolders(root)}
    for folder in folders.values():  # the folder above a dataset is no dataset of one class
        if (inside := _marked_layout(folder)) is not None:
            raise DataError(f"{folder} is {LAYOUT_TITLES[inside]}: give that folder, not the one above it ({root})")
    holding = [name for name, folder in folders.items() if _holds_sound(folder)]
    loose = _loose_sound_files(root)
    if loose:
        raise DataError(
            f"{root}: {len(loose)} sound files lie directly in it, outside any class folder (such as {loose[0].name}): "
            "put each in the folder of its class"
        )
    splits = [name for name in holding if name in SPLIT_FOLDERS]
    # ROOT/train/<class> and ROOT/test/<class>: only split folders, each holding class folders (a class
    # called "train" holds its sounds itself)
    split_layout = (
        "train" in splits
        and len(splits) >= 2
        and len(splits) == len(holding)
        and not any(_loose_sound_files(folders[name]) for name in splits)
    )
    groups: list[tuple[str | None, str, list[Path]]] = []  # (split, class, files)
    if split_layout:
        for split in _ordered_parts(splits, numeric=False):
            for folder in _subfolders(folders[split]):
                groups.append((split, folder.name, _sound_files(folder)))
    else:
        groups = [(None, name, _sound_files(folders[name])) for name in holding]
    class_names = sorted({name for _, name, files in groups if files})
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, parts = [], [], []
    for split, name, files in groups:
        paths += files
        labels += [[index[name]]] * len(files)
        parts += [split] * len(files)
    if not split_layout:
        return LayoutClips(root, "class-folders", paths, labels, class_names, False, audio)
    part_names = _ordered_parts(splits, numeric=False)
    return LayoutClips(root, "class-folders", paths, labels, class_names, False, audio, "split", parts, part_names)


def _read_esc50(root: Path, subset: str | None, audio: AudioConfig | None) -> LayoutClips:
    meta = root / "meta" / "esc50.csv"
    what = "ESC-50's meta/esc50.csv has the columns filename, fold, target, category, esc10, src_file, take"
    rows = _read_csv(meta, ("filename", "fold", "target", "category", "esc10"), what)
    if subset is not None:
        if subset.lower() != "esc10":
            raise DataError(f"{root}: ESC-50 has no subset {subset!r}; the one there is is esc10")
        rows = [(line, row) for line, row in rows if row["esc10"].strip().lower() == "true"]
    if not rows:
        raise DataError(f"{meta}: no clips" + (" of ESC-10 (no row has esc10 True)" if subset else ""))
    numbered = [(line, _number(meta, line, "target", row["target"]), row["category"].strip()) for line, row in rows]
    class_names, index = _numbered_classes(meta, numbered)
    folds = [str(_number(meta, line, "fold", row["fold"])) for line, row in rows]
    paths = [root / "audio" / row["filename"].strip() for _, row in rows]
    labels = [[index[number]] for _, number, _ in numbered]
    return LayoutClips(
        root, "esc50", paths, labels, class_names, False, audio, "fold", folds, _ordered_parts(folds, numeric=True)
    )


def _read_urbansound8k(root: Path, audio: AudioConfig | None) -> LayoutClips:
    meta = root / "metadata" / "UrbanSound8K.csv"
    what = (
        "UrbanSound8K's metadata/UrbanSound8K.csv has the columns slice_file_name, fsID, start, end, salience, "
        "fold, classID, class"
    )
    rows = _read_csv(meta, ("slice_file_name", "fold", "classID", "class"), what)
    if not rows:
        raise DataError(f"{meta}: no clips")
    numbered = [(line, _number(meta, line, "classID", row["classID"]), row["class"].strip()) for line, row in rows]
    class_names, index = _numbered_classes(meta, numbered)
    folds = [str(_number(meta, line, "fold", row["fold"])) for line, row in rows]
    paths = [
        root / "audio" / f"fold{fold}" / row["slice_file_name"].strip()
        for fold, (_, row) in zip(folds, rows, strict=True)
    ]
    labels = [[index[number]] for _, number, _ in numbered]
    return LayoutClips(
        root, "urbansound8k", paths, labels, class_names, False, audio, "fold", folds, _ordered_parts(folds, True)
    )


def _read_fsd50k(root: Path, audio: AudioConfig | None) -> LayoutClips:
    truth = root / "FSD50K.ground_truth"
    vocabulary = truth / "vocabulary.csv"
    if not vocabulary.is_file():
        raise DataError(f"no {vocabulary}: FSD50K lists its 200 classes there (index,label,mid, no header)")
    numbered = []
    for line, row in enumerate(csv.reader(_text_lines(vocabulary)), start=1):
        if not row:
            continue
        if len(row) != 3:
            raise DataError(f"{vocabulary}, line {line}: expected index,label,mid; got {row}")
        numbered.append((line, _number(vocabulary, line, "index", row[0]), row[1].strip()))
    class_names, _ = _numbered_classes(vocabulary, numbered)
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, splits = [], [], []
    for name, columns in (("dev", ("fname", "labels", "mids", "split")), ("eval", ("fname", "labels", "mids"))):
        table = truth / f"{name}.csv"
        what = f"FSD50K's {name}.csv has the columns {', '.join(columns)}"
        for line, row in _read_csv(table, columns, what):
            names = [label.strip() for label in (row["labels"] or "").split(",") if label.strip()]
            unknown = [label for label in names if label not in index]
            if unknown:
                raise DataError(f"{table}, line {line}: {unknown[0]!r} is not a class of {vocabulary.name}")
            paths.append(root / f"FSD50K.{name}_audio" / f"{row['fname'].strip()}.wav")
            labels.append([index[label] for label in names])
            splits.append(row["split"].strip() if name == "dev" else "eval")
    if not paths:
        raise DataError(f"{truth}: no clips in dev.csv or eval.csv")
    part_names = _ordered_parts(splits, numeric=False)
    return LayoutClips(root, "fsd50k", paths, labels, class_names, True, audio, "split", splits, part_names)


def _read_speech_commands(root: Path, audio: AudioConfig | None) -> LayoutClips:
    listed = {}
    for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt")):
        for entry in _text_lines(root / name):
            if entry.strip():
                listed.setdefault(entry.strip().replace("\\", "/"), split)  # a clip in both lists: validation
    # word folders; _background_noise_ holds long noise recordings, no word
    words = [folder for folder in _subfolders(root) if not folder.name.startswith("_")]
    groups = [(folder.name, sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav")) for folder in words]
    class_names = [word for word, files in groups if files]
    if not class_names:
        raise DataError(f"{root}: no word folder holds .wav files (Speech Commands keeps each word's in a folder)")
    paths, labels, splits = [], [], []
    for index, (word, files) in enumerate((word, files) for word, files in groups if files):
        paths += files
        labels += [[index]] * len(files)
        splits += [listed.get(f"{word}/{path.name}", "train") for path in files]
    names = ["train", "validation", "test"]
    return LayoutClips(root, "speech-commands", paths, labels, class_names, False, audio, "split", splits, names)


def open_folder(root: str | os.PathLike, audio: AudioConfig | None = None, subset: str | None = None) -> LayoutClips:
    """The whole dataset in the folder ``root``, read by its layout (:func:`detect_layout`); ``subset``
    is ESC-50's (``esc10``). A folder that matches no layout is one :class:`DataError` saying what was looked for."""
    root = Path(root)
    layout = detect_layout(root)
    if subset is not None and layout != "esc50":
        raise DataError(f"{root}: subset={subset} is ESC-50's (esc10); this folder is not ESC-50")
    if layout == "esc50":
        return _read_esc50(root, subset, audio)
    if layout == "urbansound8k":
        return _read_urbansound8k(root, audio)
    if layout == "fsd50k":
        return _read_fsd50k(root, audio)
    if layout == "speech-commands":
        return _read_speech_commands(root, audio)
    if layout == "class-folders":
        return _read_class_folders(root, audio)
    loose = _loose_sound_files(root)
    hint = f"; its {len(loose)} sound files lie directly in it: put each class's in a folder" if loose else ""
    raise DataError(f"{root} is a folder that matches no dataset layout{hint}. Looked for: {LAYOUTS_LOOKED_FOR}")


# -- selection -------------------------------------------------------------------------------------


def _file_layout(dataset: ClipDataset) -> str:
    if isinstance(dataset, HDF5Clips):
        return "hdf5"
    if isinstance(dataset, SegmentClips):
        return "segments"
    if isinstance(dataset, ManifestClips):
        return "manifest"
    return type(dataset).__name__


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


@dataclass
class _Selection:
    dataset: ClipDataset  # the whole dataset: its class list is the selection's
    layout: str
    indices: np.ndarray | None  # the clips selected, in the dataset's order; None: all
    splits: dict[str, int] | None
    folds: dict[str, int] | None


def _select(path, audio, audio_dir, classes) -> _Selection:
    if isinstance(path, (list, tuple)):  # several files read as one: no folder, no selector
        dataset = open_file_source(path, audio, audio_dir, classes)
        return _Selection(dataset, _file_layout(dataset), None, None, None)
    where = os.fspath(path)
    base, text = split_selector(where)
    selector = parse_selector(text, where) if text is not None else Selector("")
    if text is not None and not base:
        raise DataError(f"{where}: no path before '#'")
    if selector.subset is not None and (not Path(base).is_dir() or detect_layout(base) != "esc50"):
        raise DataError(f"{where}: subset={selector.subset} is ESC-50's (esc10); {base} is not ESC-50")
    if selector.subset is not None and selector.subset.lower() != "esc10":
        raise DataError(f"{where}: ESC-50 has no subset {selector.subset!r}; the one there is is esc10")
    if Path(base).is_dir():
        dataset = open_folder(base, audio, selector.subset)
    else:
        dataset = open_file_source(base, audio, audio_dir, classes)
    if isinstance(dataset, LayoutClips):
        layout, kind, parts, counts = dataset.layout, dataset.part_kind, dataset.parts, dataset.part_counts()
    else:
        layout, kind, parts, counts = _file_layout(dataset), None, None, None
    title = LAYOUT_TITLES.get(layout, layout)
    chosen = np.ones(len(dataset), dtype=bool)
    for key, wanted in (("split", selector.split), ("fold", () if selector.kfold else selector.fold)):
        if not wanted:
            continue
        if kind != key:
            other = f"it has {kind}s: select with #{kind}=..." if kind else "it has neither splits nor folds"
            own = "; #kfold=K&fold=1,2 deals any data into K folds of its own" if key == "fold" else ""
            raise DataError(f"{where}: {title} has no {key}s ({other}){own}")
        missing = [name for name in wanted if name not in counts]
        if missing:
            raise DataError(f"{where}: {title} has no {key} {missing[0]!r}; its {key}s are {_names(list(counts))}")
        chosen &= np.isin(parts, wanted)
    selected = np.flatnonzero(chosen) if selector.split or (selector.fold and not selector.kfold) else None
    folds = counts if kind == "fold" else None
    if selector.kfold:
        pool = selected if selected is not None else np.arange(len(dataset))
        try:
            assignment = kfold_assignment(dataset.target_matrix()[pool], selector.kfold, selector.kfold_seed)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
        names = [str(number) for number in range(1, selector.kfold + 1)]
        folds = {name: int((assignment == int(name)).sum()) for name in names}
        if selector.fold:
            missing = [name for name in selector.fold if name not in folds]
            if missing:
                raise DataError(
                    f"{where}: kfold={selector.kfold} has no fold {missing[0]!r}; its folds are 1 to {len(names)}"
                )
            selected = pool[np.isin(assignment, [int(name) for name in selector.fold])]
    if selected is not None and len(selected) == 0:
        raise DataError(f"{where}: the selection {selector.text!r} holds no clip")
    return _Selection(dataset, layout, selected, counts if kind == "split" else None, folds)


def open_source(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    audio: AudioConfig | None = None,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    blacklist: str | os.PathLike | Blacklist | None = None,
) -> ClipDataset:
    """The dataset a path names, whatever its kind: HDF5 (``a.h5,b.h5`` or a glob), an AudioSet segment
    CSV (clips in ``audio_dir``), a manifest (class list ``classes``), all as
    :func:`dclsify.pipeline.sources.open_file_source` reads them, or a dataset folder read by its layout
    (:func:`open_folder`). A selector after ``#`` picks clips (:func:`parse_selector`): ``ROOT#fold=1,2,3,4``,
    ``ROOT#split=train``, ``ROOT#subset=esc10&fold=5``, ``data.h5#kfold=5&fold=1``; the selection is a
    :class:`~dclsify.pipeline.sources.ClipSubset` with the whole dataset's class list.

    With a ``blacklist`` (a file :func:`~dclsify.pipeline.sources.read_blacklist` reads, or what it
    returned), the clips it names are left out of the selection (:func:`~dclsify.pipeline.sources.skip_blacklisted`).
    """
    selection = _select(path, audio, audio_dir, classes)
    dataset = selection.dataset if selection.indices is None else ClipSubset(selection.dataset, selection.indices)
    if blacklist is None:
        return dataset
    return skip_blacklisted(dataset, blacklist if isinstance(blacklist, Blacklist) else read_blacklist(blacklist))


def describe_data(
    path: str | os.PathLike,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
) -> DataLayout:
    """What ``path`` (as :func:`open_source` takes it, selector and all) holds: a :class:`DataLayout`.
    Nothing is decoded; a folder's sound files are listed, not opened."""
    selection = _select(path, None, audio_dir, classes)
    dataset = selection.dataset
    clips = len(dataset) if selection.indices is None else len(selection.indices)
    return DataLayout(
        selection.layout, list(dataset.class_names), dataset.multi_label, clips, selection.splits, selection.folds
    )
