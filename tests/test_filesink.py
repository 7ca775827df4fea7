"""The output file: direct I/O through an aligned stage, and its buffered fallbacks.

Every mode must append exactly the bytes given, in order, whatever the sizes of the
pieces, and say which side failed when a copy's source breaks.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from lora_tools.io import output_file as filesink
from lora_tools.io.output_file import OutputFile, SourceReadError

MODES = ["direct", "buffered"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A small stage (so that tests fill it many times); "buffered" refuses direct I/O."""
    monkeypatch.setattr(filesink, "STAGE_BYTES", 2 * filesink.ALIGNMENT)
    if request.param == "buffered":
        monkeypatch.setattr(filesink, "_set_direct", lambda fd, on: False)
    else:
        probe = OutputFile(tmp_path / "probe")
        direct = probe.direct
        probe.abort()
        if not direct:
            pytest.skip("this file system refuses O_DIRECT")
    return str(request.param)


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < total:
        piece = rng.randbytes(rng.choice([1, 7, 4095, 4096, 4097, 9000, 20000]))
        pieces.append(piece)
        size += len(piece)
    return pieces


def test_appends_exactly_the_bytes(tmp_path: Path, mode: str) -> None:
    pieces = _pieces(0, 100_000)
    out = OutputFile(tmp_path / "out")
    assert out.direct == (mode == "direct")
    for piece in pieces:
        out.write(memoryview(piece))
    assert out.position == sum(map(len, pieces))
    out.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_copies_ranges_of_another_file(tmp_path: Path, mode: str) -> None:
    source = tmp_path / "source"
    data = random.Random(1).randbytes(70_000)
    source.write_bytes(data)
    out = OutputFile(tmp_path / "out")
    fd = os.open(source, os.O_RDONLY)
    try:
        out.write(memoryview(b"head"))
        out.copy_from(fd, 5, 30_000)
        out.write(memoryview(b"middle"))
        out.copy_from(fd, 40_001, 29_999)
        out.copy_from(fd, 0, 0)
    finally:
        os.close(fd)
    out.close()
    assert (tmp_path / "out").read_bytes() == b"head" + data[5:30_005] + b"middle" + data[40_001:]


def test_a_source_that_ends_early(tmp_path: Path, mode: str) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"x" * 10_000)
    out = OutputFile(tmp_path / "out")
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(SourceReadError) as caught:
            out.copy_from(fd, 9_000, 5_000)
        assert caught.value.cause is None
    finally:
        os.close(fd)
        out.abort()


def test_refused_direct_write_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that accepts O_DIRECT at open but refuses the writes (EINVAL, as
    for an alignment it wants larger) gets the bytes through the page cache instead."""
    monkeypatch.setattr(filesink, "STAGE_BYTES", filesink.ALIGNMENT)
    out = OutputFile(tmp_path / "out")
    if not out.direct:
        out.abort()
        pytest.skip("this file system refuses O_DIRECT")
    real = out._file

    class Refusing:
        def write(self, view: Any) -> int:
            if out.direct:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return int(real.write(view))

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    out._file = Refusing()
    pieces = _pieces(2, 30_000)
    for piece in pieces:
        out.write(memoryview(piece))
    assert not out.direct
    out.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_write_errors_other_than_alignment_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    out = OutputFile(tmp_path / "out")
    real = out._file

    class Full:
        def write(self, view: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    out._file = Full()
    with pytest.raises(OSError) as caught:
        for piece in _pieces(3, 50_000):
            out.write(memoryview(piece))
        out.close()
    assert caught.value.errno == errno.ENOSPC
    out.abort()
