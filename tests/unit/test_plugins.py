"""Plugins: built-ins and the real entry-point plugin (kvpipe-example), hand-registered plugins, duplicate names,
KVPIPE_DISABLE_PLUGINS, invalid plugins, and plugin stages in the pipelines."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe import plugins
from kvpipe.errors import ConfigError, PluginError
from kvpipe.hookspecs import hookimpl
from kvpipe.memory.eviction import LruPolicy
from kvpipe.pipeline.stages import Batch, StageBase
from kvpipe.plugins import registries


@pytest.fixture(autouse=True)
def _fresh_registries() -> Iterator[None]:
    """Every test sees registries built from its own environment, and leaves the default ones behind."""
    yield
    registries(reload=True)


def _install(monkeypatch: pytest.MonkeyPatch, name: str, **hooks: Any) -> types.ModuleType:
    """A plugin module registered by hand: importable by name and listed in DEFAULT_PLUGINS."""
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", [*plugins.DEFAULT_PLUGINS, name])
    return mod


def test_builtins_register_through_hooks() -> None:
    regs = registries(reload=True)
    assert "file" in regs.tiers and regs.tiers.owners["file"] == "kvpipe.builtin_plugin"
    assert "naive" in regs.serdes
    assert {"lru", "fifo"} <= set(regs.eviction.names())
    assert regs.pm.get_plugin("kvpipe.builtin_plugin") is not None


def test_entry_point_plugin_is_loaded() -> None:
    try:
        importlib.metadata.distribution("kvpipe-example")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("plugins/kvpipe-example is not installed")
    assert "example" in {ep.name for ep in importlib.metadata.entry_points(group="kvpipe")}
    regs = registries(reload=True)
    assert regs.tiers.owners["dict"] == "example"
    assert "count_bytes" in regs.stages


def test_hand_registered_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    async def factory(url: str, ctx: Any) -> Any:
        raise AssertionError("not opened here")

    _install(monkeypatch, "handmade_plugin", kvpipe_register_tiers=lambda registry: registry.add("null", factory),
             kvpipe_register_eviction_policies=lambda registry: registry.add("mru", LruPolicy))
    regs = registries(reload=True)
    assert regs.tiers.get("null") is factory
    assert regs.tiers.get("NULL") is factory  # names are case-insensitive
    assert regs.tiers.owners["null"] == "handmade_plugin"
    assert "mru" in regs.eviction


def test_duplicate_names_name_both_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "dup_plugin", kvpipe_register_tiers=lambda registry: registry.add("file", object()))
    with pytest.raises(PluginError) as info:
        registries(reload=True)
    msg = str(info.value)
    assert "'file'" in msg and "kvpipe.builtin_plugin" in msg and "dup_plugin" in msg


def test_disable_plugins_blocks_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "blocked_plugin",
             kvpipe_register_tiers=lambda registry: registry.add("blocked", lambda url, ctx: None))
    assert "blocked" in registries(reload=True).tiers
    monkeypatch.setenv("KVPIPE_DISABLE_PLUGINS", "blocked_plugin, example")
    regs = registries(reload=True)
    assert "blocked" not in regs.tiers
    assert "dict" not in regs.tiers  # the entry-point plugin is blocked by its name too
    assert "file" in regs.tiers


def test_disable_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPIPE_DISABLE_PLUGINS", "kvpipe.builtin_plugin")
    regs = registries(reload=True)
    assert "file" not in regs.tiers and "naive" not in regs.serdes
    with pytest.raises(ConfigError, match="unknown tier 'file'"):
        regs.tiers.get("file")


def test_invalid_plugin_is_a_plugin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "typo_plugin", kvpipe_register_tierz=lambda registry: None)
    with pytest.raises(PluginError, match="kvpipe_register_tierz"):
        registries(reload=True)


def test_unknown_stage_pipeline_is_a_plugin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "stage_plugin",
             kvpipe_register_stages=lambda registry: registry.add("s", lambda c: None, pipeline="sideways"))
    with pytest.raises(PluginError, match="sideways"):
        registries(reload=True)


class _Recorder(StageBase):
    def __init__(self, name: str, seen: list[tuple[str, int]]) -> None:
        self.name = name
        self.seen = seen

    async def process(self, batch: Batch) -> Batch:
        self.seen.append((self.name, len(batch.keys)))
        return batch


async def test_plugin_stages_run_in_their_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []

    def register(registry: Any) -> None:
        registry.add("rec_store", lambda config: _Recorder("rec_store", seen), pipeline="store")
        registry.add("rec_retrieve", lambda config: _Recorder("rec_retrieve", seen), pipeline="retrieve")
        registry.add("rec_always", lambda config: _Recorder("rec_always", seen), pipeline="store", always=True)

    _install(monkeypatch, "recorder_plugin", kvpipe_register_stages=register)
    registries(reload=True)
    tokens, kv = make_tokens(3 * CHUNK), make_kv(3 * CHUNK)
    async with kvpipe.open_cache(small_config(extra_stages=["rec_store", "REC_RETRIEVE"])) as cache:
        await cache.store(tokens, kv)
        res = await cache.retrieve(tokens)
        assert torch.equal(res.kv, kv)
    assert sorted(seen) == [("rec_always", 3), ("rec_retrieve", 3), ("rec_store", 3)]
    seen.clear()
    async with kvpipe.open_cache(small_config()) as cache:  # not enabled: only the always-on stage runs
        await cache.store(tokens, kv)
    assert seen == [("rec_always", 3)]


async def test_unknown_extra_stage_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        async with kvpipe.open_cache(small_config(extra_stages=["nope"])):
            pass
