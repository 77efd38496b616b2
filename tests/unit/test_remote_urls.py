"""Remote URL parsing and the RESP command encoder (no network)."""

from __future__ import annotations

import re

import pytest

from kvpipe.config import Config
from kvpipe.connectors.lm import LmConnector
from kvpipe.connectors.mock import MockConnector
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.connectors.redis import RedisConnector
from kvpipe.connectors.resp import encode_command
from kvpipe.errors import ConfigError


def test_redis_family_urls() -> None:
    c = RedisConnector.from_url("redis://:pw@h:6380/2?max_connections=3")
    assert (c.mode, str(c.addrs[0]), c.password, c.db, c.max_connections) == ("single", "h:6380", "pw", 2, 3)
    assert RedisConnector.from_url("valkey://h").addrs[0].port == 6379
    assert RedisConnector.from_url("rediss://h:1?ssl_cert_reqs=none").ssl_context is not None
    u = RedisConnector.from_url("unix:///tmp/r.sock?db=1")
    assert u.addrs[0].path == "/tmp/r.sock" and u.db == 1
    s = RedisConnector.from_url("redis-sentinel://a:26379,b:26380,c")
    assert s.mode == "sentinel" and [str(a) for a in s.addrs] == ["a:26379", "b:26380", "c:26379"]
    assert s.master_name == "mymaster"
    assert RedisConnector.from_url("redis-sentinel://a:1/other").master_name == "other"
    assert RedisConnector.from_url("redis-sentinel://a:1?master_name=m2", master_name="cfg").master_name == "m2"
    assert RedisConnector.from_url("redis-sentinel://a:1", master_name="cfg").master_name == "cfg"
    cl = RedisConnector.from_url("redis-cluster://[::1]:7000,h2:7001")
    assert cl.mode == "cluster" and str(cl.addrs[0]) == "::1:7000"


@pytest.mark.parametrize("url", ["redis://h:notaport", "redis://a:1,b:2", "redis-cluster://h:1/3", "ftp://h",
                                 "redis://h:1/x", "unix://", "redis-sentinel://"])
def test_bad_redis_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisConnector.from_url(url)


def test_lm_and_mock_urls() -> None:
    c = LmConnector.from_url("lm://:tok@localhost:65432")
    assert (c.host, c.port, c.auth_token) == ("localhost", 65432, "tok")
    assert LmConnector.from_url("lm://h:1?auth_token=x").auth_token == "x"
    with pytest.raises(ConfigError):
        LmConnector.from_url("lm://h")
    m = MockConnector.from_url("mock://s1?latency_ms=5&bandwidth_gbps=8")
    assert m.latency_s == 0.005 and m.bandwidth_bps == 1e9
    assert MockConnector.from_url("mock://s1").store is m.store
    with pytest.raises(ConfigError):
        MockConnector.from_url("mock://x?latency_ms=-1")


@pytest.mark.parametrize(("url", "msg"), [
    ("lm://h:1?max_connections=lots", "max_connections must be an integer, got 'lots'"),
    ("redis://h:1?max_connections=2.5", "max_connections must be an integer, got '2.5'"),
    ("mock://x?latency_ms=-1", "latency_ms must be >= 0, got '-1'"),
    ("mock://x?bandwidth_gbps=fast", "bandwidth_gbps must be a number, got 'fast'"),
    ("mock://x?fail_every=-2", "fail_every must be >= 0"),
    ("redis://h:1?ssl=maybe", "ssl must be true or false, got 'maybe'"),
    ("redis://h:1", "expected a URL starting with lm://"),
])
def test_url_option_errors_name_the_option(url: str, msg: str) -> None:
    """Every connector's query options go through one parser: one line naming the URL, the option and the value."""
    parse = {"lm": LmConnector.from_url, "redis": RedisConnector.from_url, "mock": MockConnector.from_url}
    scheme = url.split(":", 1)[0]
    fn = LmConnector.from_url if "lm://" in msg else parse[scheme]
    with pytest.raises(ConfigError, match=re.escape(msg)) as e:
        fn(url)
    assert str(e.value).startswith(f"remote_url={url!r}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(("url", "option"), [
    ("redis://h:1?max_conections=3", "max_conections"),
    ("redis-sentinel://a:1,b:2?master=m", "master"),
    ("lm://h:1?auth_tokn=x", "auth_tokn"),
    ("mock://x?latency=5", "latency"),
])
def test_unknown_url_options_are_errors(url: str, option: str) -> None:
    """A misspelt option is named, with the ones the connector knows, instead of being ignored."""
    with pytest.raises(ConfigError, match=re.escape(f"unknown option {option!r} (known: ")) as e:
        connector_for_url(url)
    assert str(e.value).startswith(f"remote_url={url!r}: ") and "\n" not in str(e.value)


def test_redis_py_options_without_meaning_here_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kvpipe.connectors.redis_url"):
        c = RedisConnector.from_url("redis://:s3cret@h:1?socket_timeout=5&health_check_interval=10&db=2")
    assert c.db == 2 and c.password == "s3cret"
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "health_check_interval, socket_timeout ignored" in msg and "redis://h:1" in msg
    assert "s3cret" not in msg


@pytest.mark.parametrize("query", ["ssl_ca_certs=/etc/ca.pem", "ssl_certfile=/etc/client.pem", "ssl_cert_reqs=none"])
def test_tls_options_on_a_plaintext_url_are_errors(query: str) -> None:
    """Certificates on a ``redis://`` URL would otherwise be dropped and the connection made in plaintext."""
    with pytest.raises(ConfigError, match=re.escape(f"{query.split('=')[0]} needs TLS: use rediss://")):
        RedisConnector.from_url(f"redis://h:1?{query}")
    assert RedisConnector.from_url("redis://h:1?ssl=true&ssl_cert_reqs=none").ssl_context is not None  # TLS asked


def test_username_from_the_query() -> None:
    assert RedisConnector.from_url("redis://h:1?username=app&password=pw").username == "app"
    assert RedisConnector.from_url("redis://app:pw@h:1").username == "app"


def test_url_options_last_value_wins() -> None:
    assert LmConnector.from_url("lm://h:1?max_connections=2&max_connections=5").max_connections == 5
    assert MockConnector.from_url("mock://lw?fail_every=3&fail_every=0").fail_every == 0


def test_plugin_dispatch() -> None:
    assert isinstance(connector_for_url("redis-sentinel://a:1"), RedisConnector)
    assert isinstance(connector_for_url("lm://a:1"), LmConnector)
    assert isinstance(connector_for_url("mock://z"), MockConnector)
    assert connector_for_url("infinistore://a:1") is None
    pytest.importorskip("mooncake.store", reason="no Mooncake client here (mooncake-transfer-engine-non-cuda, "
                        "libibverbs)", exc_type=ImportError)
    assert type(connector_for_url("mooncakestore://a:1")).__name__ == "MooncakeConnector"


@pytest.mark.parametrize(("value", "url_opt", "want"), [(True, "", True), ("yes", "", True), ("false", "", False),
                                                        (True, "?read_from_replicas=false", False),
                                                        (None, "?read_from_replicas=true", True)])
def test_read_from_replicas_config_key(value: object, url_opt: str, want: bool) -> None:
    cfg = Config(extra_config={"redis_read_from_replicas": value} if value is not None else {})
    c = connector_for_url("redis-sentinel://a:1" + url_opt, cfg)
    assert isinstance(c, RedisConnector) and c.read_from_replicas is want


def test_read_from_replicas_config_key_errors() -> None:
    with pytest.raises(ConfigError, match="redis_read_from_replicas: got 'maybe', expected true or false"):
        connector_for_url("redis-sentinel://a:1", Config(extra_config={"redis_read_from_replicas": "maybe"}))
    with pytest.raises(ConfigError, match="a single server has no replicas to read from"):
        connector_for_url("redis://a:1", Config(extra_config={"redis_read_from_replicas": True}))


def test_encode_command_references_big_values() -> None:
    big = memoryview(bytes(1 << 20))
    parts = encode_command("SET", "k", big)
    assert any(p is big for p in parts)  # sent by reference, not copied
    assert b"".join(bytes(p) for p in parts) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n" + bytes(big) + b"\r\n"
    assert b"".join(bytes(p) for p in encode_command("GET", b"x", 5)) == b"*3\r\n$3\r\nGET\r\n$1\r\nx\r\n$1\r\n5\r\n"
