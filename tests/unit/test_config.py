"""Settings: defaults, precedence flag > env > file > default, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, Settings, load_settings, settings_table


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SPARK_ROUTER_"):
            monkeypatch.delenv(key)


def test_defaults_work_on_a_laptop() -> None:
    s = load_settings()
    assert s.listen == "0.0.0.0:15002"
    assert s.max_message_bytes == 128 * 1024 * 1024
    assert s.workers == 1 and s.drivers == [] and s.local_drivers == 2


def test_precedence_flag_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "router.yaml"
    f.write_text("listen: 127.0.0.1:1000\nworkers: 3\ndrivers: [127.0.0.1:1, 127.0.0.1:2]\n")
    monkeypatch.setenv("SPARK_ROUTER_WORKERS", "4")
    monkeypatch.setenv("SPARK_ROUTER_DRIVERS", "127.0.0.1:7, 127.0.0.1:8")
    s = load_settings(f, listen="127.0.0.1:2000")
    assert s.listen == "127.0.0.1:2000"  # flag
    assert s.workers == 4  # env over file
    assert s.drivers == ["127.0.0.1:7", "127.0.0.1:8"]  # env, comma separated
    assert load_settings(f).listen == "127.0.0.1:1000"  # file over default


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.workers = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": "nope"}, "listen: 'nope' is not HOST:PORT"),
        ({"drivers": ["127.0.0.1:0"]}, "port 0 is not a driver address"),
        ({"drivers": ["a:1", "a:1"]}, "driver a:1 is listed twice"),
        ({"drivers": ["127.0.0.1:70000"]}, "out of range"),
        ({"max_message_bytes": 1024}, "max_message_bytes: Input should be greater than or equal"),
        ({"workers": 0}, "workers: Input should be greater than or equal to 1"),
        ({"log_level": "loud"}, "not one of debug"),
        ({"driver_memory": "lots"}, "not a JVM memory size"),
        ({"policy_file": "policy.yaml"}, "policy_file needs auth"),
        (
            {"quota_slot_lease_seconds": 2, "quota_sync_seconds": 1},
            "quota_slot_lease_seconds must be at least 3 x quota_sync_seconds",
        ),
        ({"quota_lease_seconds": 0}, "quota_lease_seconds: Input should be greater than 0"),
    ],
)
def test_bad_values_fail_with_one_clear_line(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**kwargs)


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text("lisen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError, match="lisen: unknown setting"):
        load_settings(f)


def test_missing_or_broken_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(bad)


def test_ipv6_listen() -> None:
    assert load_settings(listen="[::]:15002").listen_host_port == ("[::]", 15002)


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name, _, description in settings_table():
        assert description, f"{name} has no description"
        assert f"SPARK_ROUTER_{name.upper()}" in readme, f"{name} missing from README"
    assert set(Settings.model_fields) == {row[0] for row in settings_table()}


def test_admin_listener_defaults_on_loopback_and_can_be_turned_off() -> None:
    # This machine only unless asked: the admin API can drain drivers and move sessions.
    assert load_settings().admin_listen == "127.0.0.1:9464"
    assert load_settings().admin_host_port == ("127.0.0.1", 9464)
    shared = load_settings(admin_listen="0.0.0.0:9464")  # a container's probes and scrapes
    assert shared.admin_host_port == ("0.0.0.0", 9464)
    assert load_settings(admin_listen="127.0.0.1:0").admin_host_port == ("127.0.0.1", 0)
    off = load_settings(admin_listen="OFF")
    assert off.admin_listen == "off" and off.admin_host_port is None
    # One listener per worker process, sharing the port like the gRPC one.
    assert load_settings(workers=4).admin_host_port == ("127.0.0.1", 9464)


def test_bad_admin_listen_fails_with_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="admin_listen: 'nope' is not HOST:PORT"):
        load_settings(admin_listen="nope")


def test_admin_token_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_ROUTER_ADMIN_TOKEN", "s3cret-token")
    s = load_settings()
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(s) and "s3cret-token" not in str(s.model_dump())
    assert load_settings(admin_token=None).admin_token is not None  # unset flag: env holds
    monkeypatch.delenv("SPARK_ROUTER_ADMIN_TOKEN")
    assert load_settings().admin_token is None


def test_an_empty_admin_token_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="admin_token: must not be empty"):
        load_settings(admin_token=" ")


def test_metrics_listen_is_gone() -> None:
    with pytest.raises(ConfigError, match="metrics_listen: unknown setting"):
        load_settings(metrics_listen="127.0.0.1:9000")


def test_the_readme_table_lists_no_setting_that_is_gone() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {row.split("`")[1] for row in rows if "`SPARK_ROUTER_" in row}
    assert listed == set(Settings.model_fields)


def test_the_request_budget_must_hold_the_largest_message() -> None:
    with pytest.raises(ConfigError, match="max_request_bytes_in_flight must be at least"):
        load_settings(max_message_bytes=512 * 1024 * 1024)
    assert load_settings().max_request_bytes_in_flight == 256 * 1024 * 1024
