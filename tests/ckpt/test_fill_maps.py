"""The worker's cache of fill-file mappings (``FillMaps``): a recycled file is mapped once,
a deleted one is let go, a resized one is mapped anew."""

import os

from zentrain.ckpt.fillmaps import FillMaps


def _open(path, nbytes=None):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return fd


def test_recycled_file_reuses_its_mapping_and_keeps_the_bytes(tmp_path):
    maps = FillMaps()
    a = tmp_path / "fill-1"
    fd = _open(a)
    mm = maps.get(fd, 4096)
    os.close(fd)
    mm[:5] = b"hello"
    os.rename(a, tmp_path / "free-1")            # what the agent does with a dropped shard
    os.rename(tmp_path / "free-1", tmp_path / "fill-2")  # what the worker does to claim it
    fd = _open(tmp_path / "fill-2")
    again = maps.get(fd, 4096)
    os.close(fd)
    assert again is mm
    assert (tmp_path / "fill-2").read_bytes()[:5] == b"hello"   # a shared mapping
    maps.close()


def test_a_new_file_gets_its_own_mapping_and_a_deleted_one_is_unmapped(tmp_path):
    maps = FillMaps()
    fd = _open(tmp_path / "a")
    first = maps.get(fd, 4096)
    os.close(fd)
    fd = _open(tmp_path / "b")
    second = maps.get(fd, 4096)
    os.close(fd)
    assert second is not first and len(maps.maps) == 2
    os.unlink(tmp_path / "a")
    maps.prune()
    assert len(maps.maps) == 1 and first.closed
    maps.close()
    assert second.closed and not maps.maps


def test_a_resized_state_maps_the_file_again_at_the_new_size(tmp_path):
    maps = FillMaps()
    fd = _open(tmp_path / "a")
    small = maps.get(fd, 4096)
    big = maps.get(fd, 3 * 4096)
    os.close(fd)
    assert big is not small and len(big) == 3 * 4096 and small.closed
    assert os.path.getsize(tmp_path / "a") == 3 * 4096
    maps.close()


def test_the_cache_is_bounded(tmp_path):
    maps = FillMaps(keep=2)
    kept = []
    for i in range(4):
        fd = _open(tmp_path / f"f{i}")
        kept.append(maps.get(fd, 4096))
        os.close(fd)
    assert len(maps.maps) == 2 and kept[0].closed and not kept[3].closed
    maps.close()
