"""The disk tier across processes: entries written by one process are read bit-identical by the next one
(index rebuilt from the files), a process killed mid-write leaves no torn entry, and leftover temp files go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config

_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import kvpipe
    from fixtures_core import make_kv, make_tokens, small_config
    from pathlib import Path
    cfg = small_config(Path({tmp!r}), disk=True, max_local_cpu_size=0.05)
    cache = kvpipe.Cache(cfg)
    for doc in range({docs}):
        cache.store(make_tokens({n}, seed=doc), make_kv({n}, seed=doc))
    if {flush}:
        cache.flush()
    print("stored", flush=True)
    if {hang}:
        time.sleep(600)  # killed here by the test
    os._exit(0)  # no close(): a crash right after the stores
""")


def _writer(tmp_path: Path, *, docs: int, n: int, flush: bool, hang: bool) -> subprocess.Popen[str]:
    code = _WRITER.format(tests=str(Path(__file__).parents[1]), tmp=str(tmp_path), docs=docs, n=n, flush=flush,
                          hang=hang)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


async def test_entries_survive_a_process_exit(tmp_path: Path) -> None:
    proc = _writer(tmp_path, docs=3, n=4 * CHUNK, flush=True, hang=False)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stored" in out
    cfg = small_config(tmp_path, disk=True)
    async with kvpipe.open_cache(cfg) as cache:
        assert cache.statistics().tiers["disk"].chunks == 12
        for doc in range(3):
            tokens = make_tokens(4 * CHUNK, seed=doc)
            assert await cache.lookup(tokens) == 4 * CHUNK
            res = await cache.retrieve(tokens)
            assert res.hits_by_tier == {"disk": 4 * CHUNK}
            assert torch.equal(res.kv, make_kv(4 * CHUNK, seed=doc))
        assert cache.statistics().tiers["disk"].corrupt == 0


async def test_killed_writer_leaves_no_torn_entry(tmp_path: Path) -> None:
    """SIGKILL while write-behind may still be writing: whatever is on disk reads back right or not at all."""
    proc = _writer(tmp_path, docs=6, n=8 * CHUNK, flush=False, hang=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "stored"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # Pretend a write was torn mid-way too: a temp file like the tier's, with half an entry in it.
    (tmp_path / "disk").mkdir(exist_ok=True)
    torn = tmp_path / "disk" / f"whatever.kvpe.tmp.{proc.pid}"
    torn.write_bytes(b"KVPE" + b"\0" * 100)
    cfg = small_config(tmp_path, disk=True)
    async with kvpipe.open_cache(cfg) as cache:
        assert not torn.exists()  # leftover temp files are removed at open
        assert not list((tmp_path / "disk").glob("*.tmp.*"))
        for doc in range(6):
            tokens = make_tokens(8 * CHUNK, seed=doc)
            res = await cache.retrieve(tokens)
            if res.num_tokens:
                assert torch.equal(res.kv, make_kv(8 * CHUNK, seed=doc)[:, :, : res.num_tokens])
        assert cache.statistics().tiers["disk"].corrupt == 0


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
async def test_restart_reads_after_page_cache_drop(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens, kv = make_tokens(3 * CHUNK), make_kv(3 * CHUNK)
    with kvpipe.Cache(cfg) as cache:
        assert cache.store(tokens, kv) == 3 * CHUNK
        cache.flush()
    for p in (tmp_path / "disk").glob("*.kvpe"):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    with kvpipe.Cache(cfg) as cache:
        res = cache.retrieve(tokens)
        assert res.hits_by_tier == {"disk": 3 * CHUNK} and torch.equal(res.kv, kv)


async def test_stray_files_in_the_directory_are_ignored(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "README.txt").write_text("not an entry")
    (disk / "x@m@0@0@zz@float32.kvpe").write_bytes(b"bad name")  # not a key: world size 0, bad hash
    (disk / f"kvpipe@m@0@0@{'a' * 64}@float32.kvpe").write_bytes(b"bad")
    async with kvpipe.open_cache(small_config(tmp_path, disk=True)) as cache:
        assert cache.statistics().tiers["disk"].chunks == 0
        assert await cache.store(make_tokens(CHUNK), make_kv(CHUNK)) == CHUNK
