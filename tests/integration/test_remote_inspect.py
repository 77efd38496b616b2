"""``kvpipe inspect --remote URL``: listing by model, sizes, delete by model and by pattern, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from remote_fixtures import chunk, key, open_tier, url_for

from kvpipe.config import Config
from kvpipe.connectors.inspect import inspect_remote


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
        one = key(other, 1).to_string()
        rep = await inspect_remote(url, cfg, pattern=one, delete=True)
        assert rep["chunks"] == 1 and rep["deleted"] == 1
        rep = await inspect_remote(url, cfg, model=key_model, delete=True)
        assert rep["deleted"] == 3
        assert (await inspect_remote(url, cfg, model=key_model))["chunks"] == 0
        assert (await inspect_remote(url, cfg, model=other))["chunks"] == 1
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
