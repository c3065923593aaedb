"""Embeddings of many sound files in one .npz: what ``dclsify embed`` writes.

Clip embeddings (``frames=False``): ``names`` (files,) the files' paths as given, and ``embeddings``
(files, embedding_size) float32, row i for ``names[i]``. Frame embeddings (``frames=True``): ``names``,
and for the i-th file ``embeddings_i`` (frames, embedding_size) float32 with ``timestamps_i`` (frames,)
float64, the time in seconds where each frame starts. See :meth:`~dclsify.pipeline.predict.Tagger.embed`
for what an embedding is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..surgery.files import atomic_path
from .predict import Tagger
from .sources import ClipError


@dataclass
class EmbedReport:
    """What :func:`embed_files` wrote: ``written`` files embedded, ``failures`` (path, reason) not read."""

    output: Path
    written: int
    embedding_size: int
    failures: list[tuple[str, str]] = field(default_factory=list)


def embed_files(
    tagger: Tagger,
    paths: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    frames: bool = False,
    step: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Embed each file with ``tagger`` and write the .npz (layout in the module's doc) atomically.

    A file that cannot be read is left out and reported; where none can be read nothing is written
    (``written`` is 0). ``progress(done, total)`` is called after each file. A head that frame outputs do
    not know is a :class:`~dclsify.pipeline.frames.FrameError` before any file is read."""
    size = tagger.embedding_size  # a head that frame outputs do not know (FrameError) fails before any file
    paths = [str(path) for path in paths]
    names, arrays, failures = [], {}, []
    for done, path in enumerate(paths, 1):
        try:
            embedded = tagger.embed(path, frames=frames, step=step)
        except ClipError as error:
            failures.append((path, str(error)))
        else:
            if frames:
                times, vectors = embedded
                arrays[f"embeddings_{len(names)}"] = vectors.astype(np.float32)
                arrays[f"timestamps_{len(names)}"] = times.astype(np.float64)
            else:
                arrays.setdefault("rows", []).append(embedded.astype(np.float32))
            names.append(path)
        if progress is not None:
            progress(done, len(paths))
    report = EmbedReport(Path(output), len(names), size, failures)
    if not names:
        return report
    if not frames:
        arrays = {"embeddings": np.stack(arrays["rows"])}
    with atomic_path(output) as temporary, open(temporary, "wb") as file:  # np.savez(path) would add ".npz"
        np.savez(file, names=np.array(names), **arrays)
    return report
