"""Which tiers ``kvpipe demo`` / ``kvpipe serve`` open: the embedded default (CPU + a disk tier under the user cache
dir) only when nothing names a tier; a config file, or a tier set in the environment, is taken as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvpipe.integrations.demo import demo_config

_ENV = ("KVPIPE_CONFIG_FILE", "LMCACHE_CONFIG_FILE", "KVPIPE_LOCAL_DISK", "LMCACHE_LOCAL_DISK", "KVPIPE_REMOTE_URL",
        "LMCACHE_REMOTE_URL", "KVPIPE_LOCAL_CPU", "LMCACHE_LOCAL_CPU")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for v in _ENV:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("KVPIPE_CACHE_DIR", str(tmp_path / "user-cache"))


def test_nothing_configured_is_cpu_plus_disk(tmp_path: Path) -> None:
    cfg = demo_config(None, disk_dir="serve-disk")
    assert cfg.local_cpu and cfg.local_disk_path == tmp_path / "user-cache" / "serve-disk"
    assert cfg.remote_url is None and cfg.max_local_cpu_size == 2.0


def test_the_seeds_remote_only_file_gets_no_disk_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "redis-offload.yaml"
    f.write_text(yaml.safe_dump({"local_cpu": False, "chunk_size": 256, "remote_url": "redis://localhost:6379",
                                 "remote_serde": "naive"}))
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(f))
    cfg = demo_config(None)
    assert cfg.local_disk_path is None and not cfg.local_cpu and cfg.remote_url == "redis://localhost:6379"
    assert demo_config(str(f)).local_disk_path is None  # --config FILE: the same


def test_a_file_without_tiers_is_cpu_only(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 0.5}))
    cfg = demo_config(str(f))
    assert cfg.local_cpu and cfg.local_disk_path is None and cfg.max_local_cpu_size == 0.5


def test_a_tier_in_the_environment_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_REMOTE_URL", "lm://localhost:65432")  # the seed's environment-variable way
    cfg = demo_config(None)
    assert cfg.remote_url == "lm://localhost:65432" and cfg.local_disk_path is None
