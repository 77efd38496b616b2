"""``mooncakestore://`` against a real Mooncake Store (``mooncake_master`` + a ``mooncake_client`` storage node from
PyPI, TCP transport): settings as LMCache users write them, inspect, and faults: a storage node killed or hung, the
master killed and restarted. The tier contract suite runs over it too (``REMOTE_KINDS``)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import pytest
import torch
from mooncake_servers import MooncakeStore
from remote_fixtures import SHAPE, chunk, chunk_tensor, key, make_ctx, open_tier, read_checked, release_all

from kvpipe.config import Config
from kvpipe.connectors.inspect import inspect_remote
from kvpipe.connectors.mooncake import MooncakeConnector, parse_size
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.errors import ConfigError, TierUnavailable


def test_settings_precedence_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          mooncake: MooncakeStore) -> None:
    cfg_file = tmp_path / "mooncake.json"
    cfg_file.write_text(json.dumps({"local_hostname": "10.0.0.5", "metadata_server": "http://meta:1/metadata",
                                    "protocol": "tcp", "global_segment_size": "1GB", "master_server_address": "x"}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(cfg_file))
    c = connector_for_url("mooncakestore://127.0.0.1:50051", Config(extra_config={"local_buffer_size": 1 << 20}))
    assert isinstance(c, MooncakeConnector)
    s = c.settings
    assert (s.master, s.local_hostname, s.metadata_server) == ("127.0.0.1:50051", "10.0.0.5", "http://meta:1/metadata")
    assert (s.global_segment_size, s.local_buffer_size) == (1 << 30, 1 << 20)
    # extra_config beats the file, the URL beats both; the URL's ``device`` is Mooncake's device_name.
    c = MooncakeConnector.from_url("mooncakestore://127.0.0.1:50051?local_hostname=10.9.9.9&device=mlx5_1"
                                   "&protocol=rdma", {"local_hostname": "10.1.1.1", "protocol": "tcp"})
    assert (c.settings.local_hostname, c.settings.device_name, c.settings.protocol) == ("10.9.9.9", "mlx5_1", "rdma")
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH")
    d = MooncakeConnector.from_url("mooncakestore://127.0.0.1:50051").settings
    assert d.metadata_server == "http://127.0.0.1:8080/metadata" and d.local_hostname == "127.0.0.1"
    assert (d.global_segment_size, d.protocol, d.admin_port) == (0, "tcp", 9003)


@pytest.mark.parametrize(("url", "extra", "msg"), [
    ("mooncakestore://h", {}, "expected mooncakestore://MASTER_HOST:PORT"),
    ("mooncakestore://h:x", {}, "bad port"),
    ("mooncakestore://h:1?protocol=udp", {}, "protocol must be tcp or rdma"),
    ("mooncakestore://h:1?segment=1", {}, "unknown option 'segment'"),
    ("mooncakestore://h:1", {"global_segment_size": "lots"}, "global_segment_size: expected bytes or a size"),
    ("mooncakestore://h:1?max_transfers=0", {}, "max_transfers must be >= 1"),
])
def test_bad_settings_are_one_line_errors(url: str, extra: dict[str, object], msg: str,
                                          mooncake: MooncakeStore) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        MooncakeConnector.from_url(url, extra)
    assert "\n" not in str(e.value)


def test_parse_size() -> None:
    assert [parse_size("x", v) for v in (0, 5, "4 GB", "256MB", "1GiB", "16mb", "2k")] == [
        0, 5, 4 << 30, 256 << 20, 1 << 30, 16 << 20, 2048]
    with pytest.raises(ConfigError, match="must be >= 0"):
        parse_size("x", -1)


def test_bad_config_file_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             mooncake: MooncakeStore) -> None:
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(bad))
    with pytest.raises(ConfigError, match=r"MOONCAKE_CONFIG_PATH=.*cannot read it as JSON"):
        MooncakeConnector.from_url("mooncakestore://127.0.0.1:1")


async def test_inspect_lists_and_deletes_by_model(mooncake: MooncakeStore, key_model: str) -> None:
    tier = await open_tier(mooncake.url)
    try:
        keys = [key(key_model, i) for i in range(4)]
        assert await tier.put_many(keys, [chunk(i) for i in range(4)]) == 4
    finally:
        await tier.aclose()
    report = await inspect_remote(mooncake.url, Config(), model=key_model)
    assert report["chunks"] == 4 and report["groups"][0]["model"] == key_model
    assert report["bytes"] == 4 * (4096 + 80)  # header + payload of each 4 KiB chunk
    report = await inspect_remote(mooncake.url, Config(), model=key_model, delete=True)
    assert report["deleted"] == 4
    assert (await inspect_remote(mooncake.url, Config(), model=key_model))["chunks"] == 0


async def test_batches_bigger_than_the_transfer_slots_and_chunks_bigger_than_a_staging_buffer(
        mooncake: MooncakeStore, key_model: str) -> None:
    # Two staging buffers: a batch of 7 goes in groups; entries of 6 MiB outgrow the 4 MiB first guess (Mooncake
    # answers "buffer too small" and the entry is read again into a grown buffer).
    tier = await open_tier(mooncake.url + "&max_transfers=2", make_ctx(pool_bytes=96 << 20))
    reader = await open_tier(mooncake.url + "&max_transfers=2", make_ctx(pool_bytes=96 << 20))  # fresh buffers
    big = (2, 2, 16, 64, 384)  # 6 MiB of float32
    try:
        keys = [key(key_model, i) for i in range(7)]
        shapes = [big if i in (1, 4) else SHAPE for i in range(7)]
        stored = [i for i in range(7) if i != 5]  # 5 stays a miss
        assert await tier.put_many([keys[i] for i in stored], [chunk(i, shapes[i]) for i in stored]) == 6
        got = await reader.get_many(keys)
        try:
            for i, g in enumerate(got):
                if i == 5:
                    assert g is None
                else:
                    assert g is not None and torch.equal(g.tensor, chunk_tensor(i, shapes[i])), f"chunk {i}"
        finally:
            release_all(got)
        assert reader.statistics().corrupt == 0
    finally:
        await tier.aclose()
        await reader.aclose()


async def test_concurrent_reads_queue_for_one_staging_buffer(mooncake: MooncakeStore, key_model: str) -> None:
    # One staging buffer, eight concurrent readers: each waits for the buffer (woken when the call before it frees
    # it), and every one gets its own chunk back, bit-identical.
    tier = await open_tier(mooncake.url, make_ctx(pool_bytes=32 << 20))
    reader = await open_tier(mooncake.url + "&max_transfers=1", make_ctx(pool_bytes=32 << 20))
    try:
        keys = [key(key_model, i) for i in range(8)]
        assert await tier.put_many(keys, [chunk(i) for i in range(8)]) == 8
        ok: list[int] = []

        async def read(i: int) -> None:
            (g,) = await reader.get_many([keys[i]])
            assert g is not None
            try:
                assert torch.equal(g.tensor, chunk_tensor(i)), f"chunk {i}"
                ok.append(i)
            finally:
                g.release()

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(read, i)
        assert sorted(ok) == list(range(8))
        stats = reader.statistics()
        assert stats.hits == 8 and stats.extra["errors"] == 0 and stats.extra["timeouts"] == 0
    finally:
        await tier.aclose()
        await reader.aclose()


async def test_a_batch_of_big_chunks(mooncake: MooncakeStore, key_model: str) -> None:
    # 4 x 16 MiB: read first into short buffers (each grown and read again), then as one batch.
    shape = (2, 2, 16, 128, 512)  # 16 MiB of float32
    tier = await open_tier(mooncake.url, make_ctx(pool_bytes=80 << 20))
    reader = await open_tier(mooncake.url, make_ctx(pool_bytes=80 << 20))
    try:
        keys = [key(key_model, i) for i in range(4)]
        assert await tier.put_many(keys, [chunk(i, shape) for i in range(4)]) == 4
        for _ in range(2):  # the first read grows the reader's buffers (4 MiB at first); the second is one batch
            got = await reader.get_many(keys)
            try:
                assert all(g is not None and torch.equal(g.tensor, chunk_tensor(i, shape))
                           for i, g in enumerate(got))
            finally:
                release_all(got)
    finally:
        await tier.aclose()
        await reader.aclose()


async def test_a_killed_storage_node_makes_misses_not_errors(fresh_mooncake: MooncakeStore, key_model: str) -> None:
    tier = await open_tier(fresh_mooncake.url, make_ctx(timeout=2.0))
    try:
        keys = [key(key_model, i) for i in range(4)]
        assert await tier.put_many(keys, [chunk(i) for i in range(4)]) == 4
        assert sum(await read_checked(tier, keys, list(range(4)))) == 4
        fresh_mooncake.node.kill()
        with anyio.fail_after(30):  # a hang guard, not a timing
            assert await read_checked(tier, keys, list(range(4))) == [False] * 4
            assert await tier.put_many([key(key_model, 9)], [chunk(9)]) == 0  # nowhere to store it
        assert tier.statistics().corrupt == 0
    finally:
        await tier.aclose()


async def test_master_killed_then_restarted(fresh_mooncake: MooncakeStore, key_model: str) -> None:
    store = fresh_mooncake
    tier = await open_tier(store.url, make_ctx(timeout=1.0))
    try:
        # Serving first. With a fresh master, the client's setup can outlast the 1 s deadline of the open-time
        # ping on a busy machine, and so can the first put (seen in full CI runs): the tier is then down for a
        # moment and comes up in the background. What this test checks starts once the three chunks are stored.
        keys = [key(key_model, i) for i in range(3)]
        deadline = time.monotonic() + 30
        while not (tier.available and await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3):
            assert time.monotonic() < deadline, f"the tier never stored:\n{store.master.log_tail()}"
            await anyio.sleep(0.1)
        # A down event before this point (the open or a first put past the deadline) is not the one tested
        downs = tier.statistics().extra["down_events"]
        assert await read_checked(tier, keys, [0, 1, 2]) == [True] * 3
        store.master.kill()
        with anyio.fail_after(30):
            assert await read_checked(tier, keys, [0, 1, 2]) == [False] * 3
            assert await tier.put_many([key(key_model, 5)], [chunk(5)]) == 0
        assert not tier.available and tier.statistics().extra["down_events"] == downs + 1
        # Down: calls are misses at once (no Mooncake call is made), while the tier probes in the background.
        for _ in range(15):
            assert await read_checked(tier, keys, [0, 1, 2]) == [False] * 3
            await anyio.sleep(0.2)
        store.master.start()
        # A restarted master knows no objects; the node mounts its memory again and new chunks are stored.
        deadline = time.monotonic() + 40
        n = 100
        stored = False
        while time.monotonic() < deadline and not stored:
            n += 1
            k = key(key_model, n)
            if await tier.put_many([k], [chunk(n % 50)]) == 1:
                stored = (await read_checked(tier, [k], [n % 50])) == [True]
            await anyio.sleep(0.2)
        assert stored, f"no hits after the master restart:\n{store.master.log_tail()}"
        assert tier.available
    finally:
        await tier.aclose()


async def test_master_down_at_start_then_up(fresh_mooncake: MooncakeStore, key_model: str) -> None:
    store = fresh_mooncake
    store.master.kill()
    tier = await open_tier(store.url, make_ctx(timeout=1.0))
    try:
        k = key(key_model, 0)
        with anyio.fail_after(30):
            for _ in range(5):  # Mooncake's setup keeps retrying in its thread; calls meanwhile are misses
                assert await tier.put_many([k], [chunk(0)]) == 0
                assert await read_checked(tier, [k], [0]) == [False]
        assert not tier.available
        store.master.start()
        store.wait_node_mounted()
        deadline = time.monotonic() + 60  # the pending setup retries every ~4.5 s
        while time.monotonic() < deadline:
            if await tier.put_many([k], [chunk(0)]) == 1 and await read_checked(tier, [k], [0]) == [True]:
                break
            await anyio.sleep(0.5)
        else:
            pytest.fail("the tier never came up after the master started")
        assert tier.available
    finally:
        await tier.aclose()


async def test_a_setup_refused_for_lack_of_slots_does_not_block_later_ones(mooncake: MooncakeStore) -> None:
    c = MooncakeConnector.from_url(mooncake.url)
    c._control = 4  # as if four earlier calls were stuck waiting on Mooncake
    with pytest.raises(TierUnavailable, match="still waiting on Mooncake"):
        await c.ping()
    c._control = 0
    await c.ping()  # not "still connecting": the refused setup never started
    await c.aclose()


async def test_a_hung_storage_node_costs_at_most_the_deadline(fresh_mooncake: MooncakeStore, key_model: str) -> None:
    store = fresh_mooncake
    tier = await open_tier(store.url, make_ctx(timeout=1.0))
    proc = store.node.proc
    assert proc is not None
    try:
        keys = [key(key_model, i) for i in range(3)]
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
        proc.send_signal(signal.SIGSTOP)
        with anyio.fail_after(30):  # Mooncake itself waits 30 s per transfer: the tier must not
            for _ in range(6):  # more calls than transfer slots: stuck threads must not block new calls
                assert await read_checked(tier, keys, [0, 1, 2]) == [False] * 3
        assert tier.statistics().extra["timeouts"] >= 1
    finally:
        proc.send_signal(signal.SIGCONT)
        await tier.aclose()
