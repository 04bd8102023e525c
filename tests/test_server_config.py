"""The configuration parser and the export registry, without a server running."""

import logging

import pytest

from helpers import run
from qcownbd.config import ExportConfig, load_config, parse_config, parse_listen
from qcownbd.errors import ConfigError
from qcownbd.exports import ExportRegistry


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:10809", ("127.0.0.1", 10809)),
    ("[::1]:10810", ("::1", 10810)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["::1:10809", "host:0", "host:99999", "host:port", "host:",
                                  ""])
def test_parse_listen_refuses(text):
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_config_fields_and_relative_paths(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1234"]\nunix = "/tmp/s"\n'
                      'max_connections = 5\nhandshake_timeout = 2.5\npayload_timeout = 7\n'
                      'metadata_cache = "1.5M"\n'
                      '[exports.vm]\npath = "img/vm.qcow"\nformat = "qcow1"\nread_only = true\n'
                      'description = "a VM"\nbacking_format = "raw"\n')
    parsed = load_config(str(config))
    assert parsed.listen == ["127.0.0.1:1234"] and parsed.unix == "/tmp/s"
    assert (parsed.max_connections, parsed.handshake_timeout, parsed.payload_timeout) == (5, 2.5, 7)
    assert parsed.metadata_cache == 1536 * 1024
    assert parsed.exports["vm"] == ExportConfig(
        name="vm", path=str(tmp_path / "img" / "vm.qcow"), format="qcow1", read_only=True,
        description="a VM", backing_format="raw")


@pytest.mark.parametrize("data, needle", [
    ({"exports": {"a": {"path": "x", "colour": "red"}}}, "colour"),
    ({"server": {"max_connections": "many"}}, "max_connections"),
    ({"server": {"max_connections": True}}, "max_connections"),
    ({"server": {"max_connections": 0}}, "positive"),
    ({"server": {"payload_timeout": 0}}, "payload_timeout"),
    ({"server": {"metadata_cache": "lots"}}, "metadata_cache: invalid size"),
    ({"server": {"metadata_cache": 100}}, "below the minimum"),
    ({"server": {"metadata_cache": True}}, "metadata_cache has the wrong type"),
    ({"exports": {"a\0b": {"path": "x"}}}, "export name"),
    ({"listen": []}, "listen"),
])
def test_config_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(data)


def _image(tmp_path, name):
    path = tmp_path / f"{name}.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", path, "1M"])
    return str(path)


def test_the_retired_l2_cache_tables_key_still_loads_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qcownbd.config"):
        config = parse_config({"exports": {"a": {"path": "x", "l2_cache_tables": 8}}})
    assert config.exports["a"].path.endswith("x")
    assert "[exports.a]: l2_cache_tables is ignored" in caplog.text
    assert "metadata_cache" in caplog.text


def test_registry_reload_retires_and_keeps(tmp_path):
    registry = ExportRegistry()
    a = ExportConfig(name="a", path=_image(tmp_path, "a"))
    b = ExportConfig(name="b", path=_image(tmp_path, "b"))
    broken = ExportConfig(name="c", path=str(tmp_path / "missing"))
    registry.apply({"a": a, "c": broken})
    assert registry.counts() == (1, 1)
    with pytest.raises(LookupError, match="unavailable"):
        registry.lookup("c")
    with pytest.raises(LookupError):
        registry.lookup("")          # two configured exports: no default
    export_a = registry.lookup("a")
    export_a.attach()
    registry.apply({"b": b})
    assert registry.lookup("") is registry.lookup("b")
    with pytest.raises(LookupError):
        registry.lookup("a")
    assert export_a.retired and not export_a.closed     # its client goes on
    assert export_a in registry.open_exports()
    export_a.detach()
    assert export_a.closed
    kept = registry.lookup("b")
    registry.apply({"b": b})
    assert registry.lookup("b") is kept
    registry.close_all()
    assert kept.closed
