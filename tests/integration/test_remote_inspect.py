"""``kvpipe inspect --remote URL``: listing by model, sizes, verifying, delete by model and by pattern, and the
CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import attrs
import pytest
from remote_fixtures import chunk, key, open_tier, url_for
from servers import ValkeySentinel, redis_command, replication_settled

from kvpipe.config import Config
from kvpipe.connectors.inspect import inspect_remote
from kvpipe.serde.entry import EntryHeader, key_fingerprint


@pytest.mark.parametrize("kind", ["redis", "cluster", "lm", "mooncake", "mock"])
async def test_inspect_list_and_delete_by_model(kind: str, request: pytest.FixtureRequest, key_model: str) -> None:
    url = url_for(kind, request)
    tier = await open_tier(url)
    other = key_model + "x"
    try:
        await tier.put_many([key(key_model, i) for i in range(3)], [chunk(i) for i in range(3)])
        await tier.put_many([key(other, i) for i in range(2)], [chunk(i) for i in range(2)])
        cfg = Config()
        rep = await inspect_remote(url, cfg, model=key_model)
        assert rep["chunks"] == 3 and rep["deleted"] == 0
        (g,) = rep["groups"]
        assert g["model"] == key_model and g["dtype"] == "float32" and g["chunks"] == 3
        assert g["bytes"] == 3 * (4096 + 80)
        if kind in ("redis", "cluster", "lm"):  # the store's own memory figures, as `redis-cli INFO memory` gives
            assert rep["server"]["used_memory"] > 0 and rep["server"].get("masters", 1) == (3 if kind == "cluster"
                                                                                          else 1)
        else:
            assert rep["server"] is None
        one = key(other, 1).to_string()
        rep = await inspect_remote(url, cfg, pattern=one, delete=True)
        assert rep["chunks"] == 1 and rep["deleted"] == 1
        rep = await inspect_remote(url, cfg, model=key_model, delete=True)
        assert rep["deleted"] == 3
        assert (await inspect_remote(url, cfg, model=key_model))["chunks"] == 0
        assert (await inspect_remote(url, cfg, model=other))["chunks"] == 1
    finally:
        await tier.aclose()


@pytest.mark.parametrize("kind", ["redis", "sentinel", "cluster", "lm", "mooncake", "mock"])
async def test_inspect_verify_counts_tokens_and_names_bad_entries(kind: str, request: pytest.FixtureRequest,
                                                                   key_model: str) -> None:
    url = url_for(kind, request)
    tier = await open_tier(url)
    try:
        keys = [key(key_model, i) for i in range(4)]
        shapes = [(2, 2, 16, 2, 8), (2, 2, 8, 2, 8)]  # 16 and 8 tokens
        await tier.put_many(keys[:2], [chunk(i, s) for i, s in enumerate(shapes)])
        conn = tier.connector

        def into(header: bytes, _key: str | None = None) -> memoryview:
            return memoryview(bytearray(EntryHeader.from_bytes(header).payload_len))

        ((head0, payload0, *_),) = [r for r in await conn.get_many([keys[0].to_string()], into) if r is not None]
        hdr0 = EntryHeader.from_bytes(head0)
        flipped = bytearray(payload0)
        flipped[100] ^= 0x40
        # keys[2]: a header of its own, a payload with one bit flipped; keys[3]: entry 0 whole, under another key
        own = attrs.evolve(hdr0, key_fp=key_fingerprint(keys[2])).to_bytes()
        assert await conn.put_many([(keys[2].to_string(), own, memoryview(flipped)),
                                    (keys[3].to_string(), head0, payload0)]) == 2

        plain = await inspect_remote(url, Config(), model=key_model)
        assert plain["chunks"] == 4 and not plain["verified"] and plain["bad_entries"] == []
        assert "tokens" not in plain["groups"][0]  # a listing does not read entries: no token count to give
        rep = await inspect_remote(url, Config(), model=key_model, verify=True)
        assert rep["verified"] and rep["chunks"] == 4
        (g,) = rep["groups"]
        assert g["tokens"] == 16 + 8  # the intact entries'
        why = dict(line.split(": ", 1) for line in rep["bad_entries"])
        assert why == {keys[2].to_string(): "entry payload checksum mismatch",
                       keys[3].to_string(): f"entry belongs to another key than {keys[3].to_string()}"}
        # verifying deletes nothing: the bad entries are still listed (the tier deletes them when it reads them)
        assert (await inspect_remote(url, Config(), model=key_model))["chunks"] == 4
    finally:
        await tier.aclose()


def test_inspect_cli(request: pytest.FixtureRequest, key_model: str) -> None:
    url = url_for("redis", request)

    async def fill() -> None:
        tier = await open_tier(url)
        await tier.put_many([key(key_model, i) for i in range(2)], [chunk(i) for i in range(2)])
        await tier.aclose()

    import anyio

    anyio.run(fill)
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "inspect", "--remote", url, "--model", key_model,
                        "--json"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "No module named kvpipe.cli.__main__" in r.stderr:
        pytest.skip("kvpipe.cli has no __main__")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["chunks"] == 2 and rep["groups"][0]["model"] == key_model
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "inspect", "--remote", url, "--model", key_model,
                        "--verify"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "2 chunks, 32 tokens" in r.stdout and "verified 2 entries: 0 bad" in r.stdout, (
        r.stdout + r.stderr)
    # --delete with no filter would empty the shared store (every model's entries): refused, nothing deleted
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "inspect", "--remote", url, "--delete"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "would delete every entry" in r.stderr, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "inspect", "--remote", url, "--model", key_model,
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["chunks"] == 2, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "inspect", "--remote", url, "--model", key_model,
                        "--delete"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "deleted 2" in r.stdout, r.stdout + r.stderr


async def test_inspect_verify_reads_the_master_not_a_replica(fresh_sentinel: ValkeySentinel, key_model: str) -> None:
    s = fresh_sentinel
    tier = await open_tier(s.url)
    try:
        keys = [key(key_model, i) for i in range(2)]
        assert await tier.put_many(keys, [chunk(i) for i in range(2)]) == 2
        with anyio.fail_after(30):  # a hang guard, not a timing
            while not replication_settled(s.master.port):
                await anyio.sleep(0.05)
        # The replica's copy of entry 1 goes (as a replica that lags behind has not got it yet); the master's stays
        redis_command(s.replica.port, "CONFIG", "SET", "replica-read-only", "no")
        assert redis_command(s.replica.port, "DEL", keys[1].to_string() + "metadata") == b":1\r\n"
        rep = await inspect_remote(s.url + "?read_from_replicas=true", Config(), model=key_model, verify=True)
        assert rep["chunks"] == 2 and rep["bad_entries"] == [] and rep["groups"][0]["tokens"] == 2 * 16
    finally:
        await tier.aclose()
