"""The cache's lock excludes other writers, and its writes are all-or-nothing."""

import threading
import time
from pathlib import Path

import pytest

from memit_lab.cache import atomic_dir, locked, read_manifest, write_manifest


def test_locked_makes_a_second_writer_wait(tmp_path: Path) -> None:
    entry = tmp_path / "deep" / "entry"
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with locked(entry):
            events.append("first in")
            held.set()
            time.sleep(0.3)
            events.append("first out")

    def second() -> None:
        held.wait()
        with locked(entry):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert events == ["first in", "first out", "second in"]
    assert (tmp_path / "deep" / "entry.lock").exists()  # the marker stays, as with the former fcntl lock


def test_locked_is_released_on_errors(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    with pytest.raises(RuntimeError), locked(entry):
        raise RuntimeError
    done = threading.Event()

    def again() -> None:
        with locked(entry):
            done.set()

    thread = threading.Thread(target=again)
    thread.start()
    thread.join(timeout=10)
    assert done.is_set()


def test_atomic_dir_and_manifest(tmp_path: Path) -> None:
    final = tmp_path / "entry"

    def interrupted_write() -> None:
        with atomic_dir(final) as tmp:
            (tmp / "x.txt").write_text("half")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        interrupted_write()
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "x.txt").write_text("whole")
        write_manifest(tmp, {"n": 1})
    manifest = read_manifest(final, full_check=True)
    assert manifest is not None and manifest["n"] == 1
    (final / "x.txt").write_text("WHOLE")  # same size, different bytes: caught by the digest
    assert read_manifest(final, full_check=True) is None
