"""Any unpacked source -> one HDF5 file in the PANNs / DCLS-Audio layout, in parallel, resumable.

The clips are decoded by a pool of processes and written, in the source's order, to
``OUT.partial``; every few seconds the rows written so far are committed (flushed, and
their count recorded). An interrupted pack run again with the same arguments continues
after the last commit. Only a complete pack is renamed to ``OUT``. Clips that cannot be
used are left out and listed, with the reason, in ``OUT.skipped.csv``; clips a black list
names are left out before (and counted in the report).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from ..surgery.files import atomic_path
from .datasets import open_source
from .frontend import AudioConfig
from .sources import (
    BlacklistReport,
    ClipDataset,
    ClipError,
    ClipSubset,
    DataError,
    LabelledFiles,
    decode,
    read_blacklist,
    skip_blacklisted,
)

COMMIT_SECONDS = 5.0
WRITE_ROWS = 64


@dataclass
class PackReport:
    output: Path
    packed: int  # clips in the output
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, path, reason)
    resumed_from: int = 0  # clips (packed or skipped) already done by an earlier, interrupted run
    seconds: float = 0.0  # this run's time
    blacklisted: BlacklistReport | None = None  # the clips a black list left out, never decoded

    @property
    def clips_per_second(self) -> float:
        done_now = self.packed + len(self.skipped) - self.resumed_from
        return done_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def skip_report(self) -> Path:
        return skip_report_path(self.output)


def skip_report_path(output: Path) -> Path:
    return output.with_name(output.name + ".skipped.csv")


def _decode_or_reason(path: str, audio: AudioConfig) -> np.ndarray | str:
    try:
        return decode(path, audio)
    except ClipError as error:
        return str(error)


def _quiet_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def _identity(dataset: ClipDataset, source, audio: AudioConfig) -> str:
    """What a partial file must have been started from to be continued (a black list changes the clips)."""
    paths = [dataset.clip_path(i) for i in range(len(dataset))]
    text = json.dumps([str(source), paths, dataset.class_names, audio.as_dict()])
    return hashlib.sha256(text.encode()).hexdigest()


def layout_attributes(audio: AudioConfig, class_names: list[str], multi_label: bool) -> dict:
    """The attributes of a dclsify HDF5 file, which :class:`~dclsify.pipeline.sources.HDF5Clips` reads back."""
    return dict(
        sample_rate=audio.sample_rate,
        clip_seconds=audio.seconds,
        class_names=json.dumps(class_names),
        multi_label=multi_label,
        dclsify_version=__version__,
    )


def _create(path: Path, dataset: ClipDataset, audio: AudioConfig, identity: str):
    import h5py

    handle = h5py.File(path, "w")
    name_length = max(len(dataset.clip_name(i).encode()) for i in range(len(dataset)))
    handle.create_dataset("audio_name", (0,), dtype=f"S{max(name_length, 1)}", maxshape=(None,), chunks=(4096,))
    handle.create_dataset(
        "waveform", (0, audio.samples), dtype=np.int16, maxshape=(None, audio.samples), chunks=(1, audio.samples)
    )
    classes = len(dataset.class_names)
    handle.create_dataset("target", (0, classes), dtype=bool, maxshape=(None, classes), chunks=(256, classes))
    handle.create_dataset("source_index", (0,), dtype=np.int64, maxshape=(None,), chunks=(4096,))
    handle.create_dataset("skipped_index", (0,), dtype=np.int64, maxshape=(None,), chunks=(1024,))
    handle.create_dataset("skipped_reason", (0,), dtype=h5py.string_dtype(), maxshape=(None,), chunks=(1024,))
    handle.attrs.update(
        **layout_attributes(audio, dataset.class_names, dataset.multi_label),
        pack_identity=identity,
        committed=0,
        committed_skips=0,
    )
    return handle


def _append(handle, name: str, values) -> None:
    data = handle[name]
    start = data.shape[0]
    data.resize(start + len(values), axis=0)
    data[start:] = values


def _open_partial(partial: Path, dataset, audio, identity: str):
    """The partial file to continue, truncated to its last commit, or a new one."""
    import h5py

    if partial.exists():
        try:
            handle = h5py.File(partial, "a")
        except OSError:
            handle = None  # damaged by a hard kill: start again
        if handle is not None and handle.attrs.get("pack_identity") == identity:
            rows, skips = int(handle.attrs["committed"]), int(handle.attrs["committed_skips"])
            for name in ("audio_name", "waveform", "target", "source_index"):
                handle[name].resize(rows, axis=0)
            for name in ("skipped_index", "skipped_reason"):
                handle[name].resize(skips, axis=0)
            return handle
        if handle is not None:
            handle.close()
        partial.unlink()
    return _create(partial, dataset, audio, identity)


def pack(
    source: str | os.PathLike,
    output: str | os.PathLike,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    audio: AudioConfig | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    blacklist: str | os.PathLike | None = None,
) -> PackReport:
    """Decode every clip of ``source`` (an AudioSet segment CSV with ``audio_dir``, a manifest with an
    optional class list ``classes``, or a dataset folder, selector and all; see
    :func:`~dclsify.pipeline.datasets.open_source`)
    into ``output``, an HDF5 file of int16 clips of ``audio.samples`` at ``audio.sample_rate``.

    ``blacklist``: a file of clip ids (:func:`~dclsify.pipeline.sources.read_blacklist`) whose clips
    are left out, undecoded, and counted in ``PackReport.blacklisted``.
    ``workers`` decoding processes (default: one per core; 0 decodes in this process).
    ``progress(done, total)`` is called as clips are done. Interrupted (an exception or
    Ctrl-C), the work committed so far stays in ``OUT.partial``, and the same call
    continues it. Returns a :class:`PackReport`.
    """
    started = time.perf_counter()
    audio = audio or AudioConfig()
    output = Path(output)
    dataset = open_source(source, audio, audio_dir, classes)
    whole = dataset.dataset if isinstance(dataset, ClipSubset) else dataset  # a selection (ROOT#fold=5) of what?
    if not isinstance(whole, LabelledFiles):
        raise DataError(f"{source} is packed already: pack reads a segment CSV, a manifest or a dataset folder")
    if blacklist is not None:
        dataset = skip_blacklisted(dataset, read_blacklist(blacklist))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot write {output}: {error.strerror or error}") from None
    if output.is_dir():
        raise DataError(f"cannot write {output}: it is a folder")
    partial = output.with_name(output.name + ".partial")
    identity = _identity(dataset, source, audio)
    try:
        handle = _open_partial(partial, dataset, audio, identity)
    except OSError as error:
        raise DataError(f"cannot write {partial}: {error.strerror or error}") from None
    total = len(dataset)
    done = set(handle["source_index"][:].tolist()) | set(handle["skipped_index"][:].tolist())
    report = PackReport(output, packed=handle["waveform"].shape[0], resumed_from=len(done))
    report.blacklisted = dataset.blacklisted
    targets = dataset.target_matrix()
    todo = [i for i in range(total) if i not in done]
    pool = None
    rows: list[tuple[int, np.ndarray]] = []
    skips: list[tuple[int, str]] = []

    def commit() -> None:
        if rows:
            _append(handle, "audio_name", [dataset.clip_name(i).encode() for i, _ in rows])
            _append(handle, "waveform", np.stack([clip for _, clip in rows]))
            _append(handle, "target", targets[[i for i, _ in rows]])
            _append(handle, "source_index", [i for i, _ in rows])
        if skips:
            _append(handle, "skipped_index", [i for i, _ in skips])
            _append(handle, "skipped_reason", [reason for _, reason in skips])
        handle.attrs["committed"] = handle["waveform"].shape[0]
        handle.attrs["committed_skips"] = handle["skipped_index"].shape[0]
        handle.flush()
        rows.clear()
        skips.clear()

    try:
        paths = [dataset.clip_path(i) for i in todo]
        if workers is None:
            workers = os.cpu_count() or 1
        if workers > 0 and len(todo) > 1:
            # fork, as DataLoader's workers: no re-import of torch or of the caller's __main__ per worker
            context = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(context).Pool(min(workers, len(todo)), initializer=_quiet_worker)
            results = pool.imap(functools.partial(_decode_or_reason, audio=audio), paths, chunksize=8)
        else:
            results = (_decode_or_reason(p, audio) for p in paths)
        last_commit = time.monotonic()
        for count, (index, result) in enumerate(zip(todo, results, strict=True), start=len(done) + 1):
            if isinstance(result, str):
                skips.append((index, result))
            else:
                rows.append((index, result))
            if len(rows) >= WRITE_ROWS or time.monotonic() - last_commit > COMMIT_SECONDS:
                commit()
                last_commit = time.monotonic()
            if progress is not None:
                progress(count, total)
        commit()
        packed = handle["waveform"].shape[0]
        reasons = handle["skipped_reason"].asstr()[:]
        report.skipped = [
            (dataset.clip_name(i), dataset.clip_path(i), reason)
            for i, reason in zip(handle["skipped_index"][:].tolist(), reasons, strict=True)
        ]
        report.packed = packed
    except BaseException:
        try:  # keep what was decoded: the same call continues from here
            commit()
        finally:
            handle.close()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if report.packed == 0:
        handle.close()
        partial.unlink()
        first = report.skipped[0] if report.skipped else ("", str(source), "no clips")
        raise DataError(f"no clip of {source} could be packed (the first: {first[1]}: {first[2]})")
    for name in ("pack_identity", "committed", "committed_skips"):
        del handle.attrs[name]
    for name in ("skipped_index", "skipped_reason"):
        del handle[name]
    handle.close()
    _write_skip_report(skip_report_path(output), report.skipped)
    os.replace(partial, output)
    report.seconds = time.perf_counter() - started
    return report


def _write_skip_report(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    if not skipped:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["name", "path", "reason"])
    writer.writerows(skipped)
    with atomic_path(path) as temporary:
        temporary.write_text(text.getvalue())
