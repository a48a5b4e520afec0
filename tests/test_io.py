"""latentlab.io: atomic writes, tensors + sidecars, fingerprints."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentlab.errors import LatentlabError
from latentlab.io import (
    atomic_path,
    current_umask,
    ensure_writable_dir,
    fingerprint_weights,
    load_tensors,
    make_temp_dir,
    read_json,
    replace_dir,
    save_tensors,
    write_json,
    write_text,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    write_json(target, {"version": 1})

    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "half', encoding="utf-8")  # half-written
            raise RuntimeError("writer died")

    assert read_json(target) == {"version": 1}
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_write_keyboard_interrupt_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("partial", encoding="utf-8")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_text_replaces_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "note.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text(encoding="utf-8") == "two"
    assert _leftovers(target.parent) == []


def test_write_json_handles_paths_and_tensors(tmp_path: Path) -> None:
    obj = {"path": Path("/x/y"), "t": torch.tensor([1.5, 2.0]), "scalar": torch.tensor(3)}
    write_json(tmp_path / "o.json", obj)
    assert read_json(tmp_path / "o.json") == {"path": "/x/y", "t": [1.5, 2.0], "scalar": 3}


def test_save_load_tensors_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "acts": torch.randn(5, 3, 8, generator=g),
        "offsets": torch.tensor([0, 2, 5]),
        "half": torch.randn(4, generator=g).to(torch.bfloat16),
        "view": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
    }
    path = save_tensors(tmp_path / "shard-00000", tensors, {"rows": 5, "note": "x"})
    assert path.suffix == ".safetensors"
    assert (tmp_path / "shard-00000.json").exists()
    loaded, meta = load_tensors(tmp_path / "shard-00000")
    assert meta == {"rows": 5, "note": "x"}
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)


def test_missing_sidecar_is_a_latentlab_error(tmp_path: Path) -> None:
    save_tensors(tmp_path / "s", {"a": torch.zeros(2)}, {"rows": 2})
    (tmp_path / "s.json").unlink()
    with pytest.raises(LatentlabError, match="sidecar"):
        load_tensors(tmp_path / "s")


def test_missing_tensor_file_is_a_latentlab_error(tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="missing"):
        load_tensors(tmp_path / "nothing")


def test_ensure_writable_dir(tmp_path: Path) -> None:
    d = ensure_writable_dir(tmp_path / "new" / "run")
    assert d.is_dir() and list(d.iterdir()) == []  # the write probe is cleaned up
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LatentlabError, match="cannot write to output folder"):
        ensure_writable_dir(blocker / "sub")


def test_fingerprint_weights_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 200_000)
    fp1 = fingerprint_weights(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')  # not a weight file
    assert fingerprint_weights(tmp_path) == fp1
    data = bytearray(b"\0" * 200_000)
    data[-10] = 1  # a change near the end must be caught by the sampled chunks
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint_weights(tmp_path) != fp1


def test_replace_dir(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask  # still the same: reading it did not reset it


def test_written_files_respect_umask(tmp_path: Path, umask: int) -> None:
    """Results and tensors get the mode a plain open() would give (0644 / 0664), not mkstemp's 0600."""
    want = 0o666 & ~umask
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(tmp_path / "plain.txt") == want  # what "respect the umask" means
    write_json(tmp_path / "results.json", {"a": 1})
    write_text(tmp_path / "notes.txt", "hi")
    save_tensors(tmp_path / "probe", {"w": torch.zeros(3)}, {"layer": 1})
    for name in ("results.json", "notes.txt", "probe.safetensors", "probe.json"):
        assert _mode(tmp_path / name) == want, (name, oct(_mode(tmp_path / name)))
    with atomic_path(tmp_path / "raw.bin") as tmp:
        tmp.unlink()  # a writer that replaces the file instead of writing into it
        tmp.write_bytes(b"\0")
    assert _mode(tmp_path / "raw.bin") == want
    assert _leftovers(tmp_path) == []


def test_make_temp_dir_respects_umask_and_moves_into_place(tmp_path: Path, umask: int) -> None:
    tmp = make_temp_dir(tmp_path / "cache", ".model.tmp-")  # the parent is created
    assert tmp.parent == tmp_path / "cache" and tmp.name.startswith(".model.tmp-") and tmp.is_dir()
    assert _mode(tmp) == 0o777 & ~umask  # 0755 / 0775, not mkdtemp's 0700
    (tmp / "weights.bin").write_bytes(b"\0")
    replace_dir(tmp, tmp_path / "cache" / "model")
    assert _mode(tmp_path / "cache" / "model") == 0o777 & ~umask
    assert _mode(tmp_path / "cache" / "model" / "weights.bin") == 0o666 & ~umask
    other = make_temp_dir(None, ".sae-")  # the system temp folder, as for an SAE without --out
    try:
        assert _mode(other) == 0o777 & ~umask
    finally:
        other.rmdir()


def test_current_umask_without_proc(monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    """Where /proc is missing, the umask is read by setting and restoring it."""
    real_open = open

    def no_proc(path: object, *a: object, **kw: object) -> object:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", no_proc)
    assert current_umask() == umask
    assert current_umask() == umask


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left on device"),
                                             (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_is_one_latentlab_error_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          code: int, words: str) -> None:
    """ENOSPC/EDQUOT from a writer (or safetensors' SafetensorError for one) is a LatentlabError; no temp is left."""
    from safetensors import SafetensorError

    import latentlab.io

    def full(*a: object, **k: object) -> None:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        for write in (lambda: write_text(tmp_path / "r.txt", "x"), lambda: write_json(tmp_path / "r.json", {})):
            with pytest.raises(LatentlabError, match=f"{words} writing {tmp_path}/r") as e:
                write()
            assert e.value.fix == "free space or choose another --out"
    with monkeypatch.context() as m:
        m.setattr(latentlab.io, "save_file", full)
        with pytest.raises(LatentlabError, match=f"{words} writing {tmp_path / 't.safetensors'}"):
            save_tensors(tmp_path / "t", {"x": torch.zeros(2)}, {})

        def st_full(tensors: object, path: str, metadata: object = None) -> None:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}) at path "
                                  f'"{path}"')

        m.setattr(latentlab.io, "save_file", st_full)
        with pytest.raises(LatentlabError, match=f"{words} writing"):
            save_tensors(tmp_path / "t", {"x": torch.zeros(2)}, {})
    with monkeypatch.context() as m:
        m.setattr(os, "replace", full)
        with pytest.raises(LatentlabError, match=words), atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    # any other failure stays itself
    with pytest.raises(PermissionError), atomic_path(tmp_path / "b.bin"):
        raise PermissionError(errno.EACCES, "denied")
