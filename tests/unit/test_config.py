"""Config: defaults, YAML file, KVPIPE_*/LMCACHE_* env, keyword overrides, sources, the seeds' snippets, unknown
keys and bad values."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest

from fixtures_core import DATA
from kvpipe import Config, ConfigError
from kvpipe.config import known_keys

SEEDS = DATA / "seeds"


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _env_file(path: Path) -> dict[str, str]:
    """The ``export NAME=VALUE  # comment`` lines of a seed snippet, parsed as a shell would."""
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def _config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvpipe.config" and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------------------------- defaults
def test_defaults() -> None:
    cfg = Config.load(None, env={})
    assert cfg.chunk_size == 256
    assert cfg.local_cpu is True
    assert cfg.max_local_cpu_size == 5.0
    assert cfg.local_cpu_use_hugepages is False
    assert cfg.local_disk is None and cfg.local_disk_path is None
    assert cfg.remote_url is None
    assert cfg.remote_serde == "naive"
    assert cfg.save_unfull_chunk is False
    assert cfg.blocking_timeout_secs > 0
    assert cfg.max_local_cpu_bytes == 5_000_000_000
    assert all(cfg.source_of(k) == "default" for k in cfg.as_dict())
    assert Config() == cfg


def test_every_key_is_documented() -> None:
    keys = known_keys()
    assert set(keys) == set(Config().as_dict())
    assert all(doc.strip() for doc in keys.values())


# ----------------------------------------------------------------------------------------------- sources
def test_yaml_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "chunk_size: 128\nlocal_disk: file:///tmp/kv\nsave_unfull_chunk: true\n")
    cfg = Config.load(p, env={})
    assert (cfg.chunk_size, cfg.save_unfull_chunk) == (128, True)
    assert cfg.local_disk_path == Path("/tmp/kv")
    assert cfg.source_of("chunk_size") == f"file {p}"
    assert cfg.source_of("local_cpu") == "default"


@pytest.mark.parametrize("var", ["KVPIPE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"])
def test_config_file_from_env(tmp_path: Path, var: str) -> None:
    p = _write(tmp_path, "chunk_size: 64\n")
    cfg = Config.load(env={var: str(p)})
    assert cfg.chunk_size == 64
    assert cfg.source_of("chunk_size") == f"file {p}"


def test_kvpipe_config_file_beats_lmcache(tmp_path: Path) -> None:
    a = _write(tmp_path, "chunk_size: 64\n", "a.yaml")
    b = _write(tmp_path, "chunk_size: 32\n", "b.yaml")
    assert Config.load(env={"KVPIPE_CONFIG_FILE": str(a), "LMCACHE_CONFIG_FILE": str(b)}).chunk_size == 64


def test_env_overrides_file_and_kvpipe_beats_lmcache(tmp_path: Path) -> None:
    p = _write(tmp_path, "chunk_size: 128\nmax_local_cpu_size: 2\nlocal_cpu: true\n")
    env = {"LMCACHE_CHUNK_SIZE": "64", "KVPIPE_CHUNK_SIZE": "32", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1.5",
           "LMCACHE_LOCAL_CPU": "False"}
    cfg = Config.load(p, env=env)
    assert cfg.chunk_size == 32
    assert cfg.source_of("chunk_size") == "env KVPIPE_CHUNK_SIZE"
    assert cfg.max_local_cpu_size == 1.5
    assert cfg.source_of("max_local_cpu_size") == "env LMCACHE_MAX_LOCAL_CPU_SIZE"
    assert cfg.local_cpu is False


def test_keywords_override_env_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "chunk_size: 128\nremote_serde: cachegen\n")
    cfg = Config.load(p, env={"KVPIPE_CHUNK_SIZE": "32"}, chunk_size=8)
    assert cfg.chunk_size == 8
    assert cfg.source_of("chunk_size") == "argument"
    assert cfg.remote_serde == "cachegen"
    assert cfg.source_of("remote_serde") == f"file {p}"


def test_replace_validates_and_records_source() -> None:
    cfg = Config.load(None, env={}).replace(chunk_size=64)
    assert cfg.chunk_size == 64 and cfg.source_of("chunk_size") == "argument"
    with pytest.raises(ConfigError, match="chunk_size"):
        cfg.replace(chunk_size=0)


def test_non_key_env_vars_are_not_keys(caplog: pytest.LogCaptureFixture) -> None:
    env = {"KVPIPE_LOG_LEVEL": "DEBUG", "KVPIPE_DISABLE_PLUGINS": "x", "LMCACHE_USE_EXPERIMENTAL": "True",
           "PATH": "/bin"}
    with caplog.at_level(logging.WARNING):
        assert Config.load(None, env=env) == Config()
    assert _config_warnings(caplog) == []


def test_aliases_of_lmcache_names() -> None:
    cfg = Config.from_mapping({"instance_id": "i1", "check_layers": [1], "recomp_ratios": [0.15]})
    assert cfg.lmcache_instance_id == "i1"
    assert cfg.blend_check_layers == (1,)
    assert cfg.blend_recompute_ratios == (0.15,)


# ----------------------------------------------------------------------------------------------- the seeds
def test_seed_snippets_are_all_present() -> None:
    assert len(list(SEEDS.glob("*.yaml"))) == 10
    assert len(list(SEEDS.glob("*.env"))) == 3


@pytest.mark.parametrize("path", sorted(SEEDS.glob("*.yaml")), ids=lambda p: p.name)
def test_seed_yaml_loads_unchanged_without_warnings(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = Config.load(path, env={})
    assert _config_warnings(caplog) == []
    assert all(cfg.source_of(k) == f"file {path}" for k in cfg.sources)
    assert cfg.sources  # something came from the file


def test_seed_values() -> None:
    redis = Config.load(SEEDS / "000_redis_config.yaml", env={})
    assert (redis.chunk_size, redis.remote_url, redis.remote_serde) == (256, "redis://your-redis-host:6379",
                                                                        "naive")
    sentinel = Config.load(SEEDS / "000_redis-sentinel-offload.yaml", env={})
    assert sentinel.remote_url == "redis-sentinel://localhost:26379,localhost:26380,localhost:26381"
    assert Config.load(SEEDS / "000_lmcache-server-offload.yaml", env={}).remote_url == "lm://localhost:65432"
    cpu = Config.load(SEEDS / "001_cpu_config.yaml", env={})
    assert (cpu.chunk_size, cpu.local_cpu, cpu.max_local_cpu_size) == (256, True, 5.0)
    assert Config.load(SEEDS / "001_hugepages.yaml", env={}).local_cpu_use_hugepages is True
    i1 = Config.load(SEEDS / "002_instance1.yaml", env={})
    assert i1.enable_controller and i1.enable_p2p
    assert i1.lmcache_instance_id == "lmcache_instance_1"
    assert (i1.controller_pull_url, i1.controller_reply_url) == ("localhost:8300", "localhost:8400")
    assert i1.lmcache_worker_ports == (8500,)
    assert (i1.p2p_host, i1.p2p_init_ports, i1.p2p_lookup_ports) == ("localhost", (8200,), (8201,))
    assert i1.transfer_channel == "nixl"
    assert i1.max_local_cpu_size == 5.0
    i2 = Config.load(SEEDS / "002_instance2.yaml", env={})
    assert (i2.lmcache_worker_ports, i2.p2p_init_ports, i2.p2p_lookup_ports) == ((8501,), (8202,), (8203,))
    inf = Config.load(SEEDS / "004_infinistore-config.yaml", env={})
    assert inf.remote_url == "infinistore://127.0.0.1:12345/?device=mlx5_1"
    assert inf.local_cpu is False and inf.max_local_cpu_size == 5.0


@pytest.mark.parametrize("path", sorted(SEEDS.glob("*.env")), ids=lambda p: p.name)
def test_seed_env_exports_load(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = _env_file(path)
    assert env and all(k.startswith("LMCACHE_") for k in env)
    with caplog.at_level(logging.WARNING):
        cfg = Config.load(None, env=env)
    assert _config_warnings(caplog) == []
    for var in env:
        key = var.removeprefix("LMCACHE_").lower()
        assert cfg.source_of(key) == f"env {var}"


def test_seed_env_values() -> None:
    cfg = Config.load(None, env=_env_file(SEEDS / "000_redis.env"))
    assert (cfg.chunk_size, cfg.remote_url, cfg.remote_serde) == (256, "redis://your-redis-host:6379", "naive")
    cfg = Config.load(None, env=_env_file(SEEDS / "001_cpu.env") | _env_file(SEEDS / "001_hugepages.env"))
    assert (cfg.chunk_size, cfg.local_cpu, cfg.max_local_cpu_size, cfg.local_cpu_use_hugepages) == (
        256, True, 5.0, True)


# ----------------------------------------------------------------------------------------------- mistakes
def test_unknown_yaml_key_warns_with_closest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _write(tmp_path, "chunk_sise: 128\nmax_local_cpu_size: 1\n")
    with caplog.at_level(logging.WARNING):
        cfg = Config.load(p, env={})
    [msg] = _config_warnings(caplog)
    assert "chunk_sise" in msg and "'chunk_size'" in msg
    assert cfg.chunk_size == 256 and cfg.max_local_cpu_size == 1.0


def test_unknown_env_var_warns_with_closest(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Config.load(None, env={"KVPIPE_REMOTE_UR": "redis://h:1"})
    [msg] = _config_warnings(caplog)
    assert "KVPIPE_REMOTE_UR" in msg and "KVPIPE_REMOTE_URL" in msg


def test_unknown_keyword_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Config.load(None, env={}, local_dsk="/tmp/x")
    [msg] = _config_warnings(caplog)
    assert "local_dsk" in msg and "'local_disk'" in msg


BAD = [
    ("chunk_size", -1, "-1", "integer"),
    ("chunk_size", "many", "'many'", "integer"),
    ("max_local_cpu_size", "lots", "'lots'", "number"),
    ("max_local_cpu_size", 0, "0", "> 0"),
    ("remote_url", "redis//x", "'redis//x'", "URL"),
    ("local_cpu", "maybe", "'maybe'", "true or false"),
    ("remote_serde", "zip", "'zip'", "naive"),
    ("controller_pull_url", "localhost", "'localhost'", "host:port"),
    ("p2p_init_ports", 70000, "70000", "port"),
    ("blend_recompute_ratios", [1.5], "1.5", "between 0 and 1"),
]


@pytest.mark.parametrize(("key", "value", "shown", "expected"), BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_values_name_key_value_and_expectation(key: str, value: object, shown: str, expected: str,
                                                   tmp_path: Path) -> None:
    for load in (lambda: Config(**{key: value}), lambda: Config.load(None, env={}, **{key: value})):
        with pytest.raises(ConfigError) as info:
            load()
        msg = str(info.value)
        assert key in msg and shown in msg and expected in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize(("text", "key", "shown"), [
    ("chunk_size: -1\n", "chunk_size", "-1"),
    ('max_local_cpu_size: "lots"\n', "max_local_cpu_size", "'lots'"),
    ('remote_url: "redis//x"\n', "remote_url", "'redis//x'"),
])
def test_bad_values_from_yaml(tmp_path: Path, text: str, key: str, shown: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: got {shown}"):
        Config.load(_write(tmp_path, text), env={})


def test_bad_value_from_env_names_the_key() -> None:
    with pytest.raises(ConfigError, match="chunk_size: got -1, expected an integer"):
        Config.load(None, env={"LMCACHE_CHUNK_SIZE": "-1"})


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        Config(chunk_size=0)


@pytest.mark.parametrize(("text", "match"), [
    ("chunk_size: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.load(_write(tmp_path, text), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(tmp_path / "nope.yaml", env={})


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert Config.load(_write(tmp_path, "# nothing\n"), env={}) == Config()


def test_hugepages_incompatible_with_p2p() -> None:
    with pytest.raises(ConfigError, match="local_cpu_use_hugepages"):
        Config(local_cpu_use_hugepages=True, enable_p2p=True)


def test_bad_kv_dtype() -> None:
    with pytest.raises(ConfigError, match="kv_dtype"):
        Config(kv_dtype="float13")
    assert Config(kv_dtype="bf16").kv_dtype == "bf16"


def test_remote_url_none_spellings() -> None:
    for v in (None, "None", "null", ""):
        assert Config(remote_url=v).remote_url is None
