"""`spark-router`: parse flags, build the Settings once, run the requested thing.

Exit codes: 0 done, 2 bad usage or configuration, 3 could not start (port taken, no Java,
a driver that would not come up), 130/143 stopped by a signal during start-up.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from common.addresses import split_host_port
from common.lifecycle import EXIT_CONFIG, EXIT_STARTUP_FAILURE
from router.config import ConfigError, Settings, load_settings
from router.logs import configure_logging
from router.server import run_replica
from router.supervisor import run_workers

log = logging.getLogger("spark_router")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"spark-router: {message}", err=True)
    sys.exit(code)


def _settings(config: Path | None, for_authz: bool = False, **flags: Any) -> Settings:
    try:
        return load_settings(config, for_authz=for_authz, **flags)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        _fail("invalid configuration:\n  " + "\n  ".join(lines), EXIT_CONFIG)


_config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPARK_ROUTER_CONFIG",
    help="YAML file of settings (flags and SPARK_ROUTER_* env win over it).",
)
_listen_option = click.option(
    "--listen", help="HOST:PORT to listen on [default: 0.0.0.0:15002, Spark Connect's port]."
)
_log_option = click.option("--log-level", help="debug, info, warning or error [default: info].")
_ADMIN_LISTEN_HELP = (
    "HOST:PORT of /metrics, /healthz, /readyz and the admin API, or off [default: "
    "127.0.0.1:9464, this machine only; 0.0.0.0:9464 for probes and scrapes from elsewhere]."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spark-session-router")
def cli() -> None:
    """A session router for Apache Spark Connect: one endpoint in front of many drivers."""


@cli.command()
@_listen_option
@click.option(
    "--driver",
    "drivers",
    multiple=True,
    help="Spark Connect driver HOST:PORT; repeat for more [env: SPARK_ROUTER_DRIVERS=a,b].",
)
@click.option(
    "--registry",
    help="memory:// (default, one replica) or a shared redis://, rediss://, unix://, "
    "redis+sentinel://host:port/master.",
)
@click.option(
    "--default-pool", help="pool of sessions that send no x-spark-pool [default: default]."
)
@click.option("--workers", type=int, help="processes sharing the port (SO_REUSEPORT) [default: 1].")
@click.option("--max-message-bytes", type=int, help="largest message forwarded [default: 128 MiB].")
@click.option("--admin-listen", help=_ADMIN_LISTEN_HELP)
@_config_option
@_log_option
def serve(
    listen: str | None,
    drivers: tuple[str, ...],
    registry: str | None,
    default_pool: str | None,
    workers: int | None,
    max_message_bytes: int | None,
    admin_listen: str | None,
    config: Path | None,
    log_level: str | None,
) -> None:
    """Route Spark Connect clients to the given drivers."""
    settings = _settings(
        config,
        listen=listen,
        drivers=list(drivers) or None,
        registry=registry,
        default_pool=default_pool,
        workers=workers,
        max_message_bytes=max_message_bytes,
        admin_listen=admin_listen,
        log_level=log_level,
    )
    configure_logging(settings.log_level, settings.log_format)
    if not settings.drivers and settings.registry.startswith("memory://"):
        _fail(
            "no drivers: give --driver HOST:PORT (repeatable), SPARK_ROUTER_DRIVERS, "
            "or a shared --registry that agents register drivers in",
            EXIT_CONFIG,
        )
    code = run_workers(settings) if settings.workers > 1 else run_replica(settings)
    sys.exit(code)


@cli.command()
@click.option(
    "--listen",
    help="HOST:PORT to listen on [default: 127.0.0.1:15003, this machine only: next to Envoy].",
)
@_config_option
@_log_option
def authz(listen: str | None, config: Path | None, log_level: str | None) -> None:
    """Answer Envoy's ext_authz checks with the router's auth and policy (needs auth)."""
    settings = _settings(config, for_authz=True, authz_listen=listen, log_level=log_level)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.auth_enabled:
        _fail(
            "authz needs auth: set auth (token, jwt, trusted-header or mtls) with "
            "SPARK_ROUTER_AUTH or the config file; with auth none there is nobody to vouch for "
            "a caller",
            EXIT_CONFIG,
        )
    from router.authz import run_authz

    sys.exit(run_authz(settings))


@cli.command()
@click.option("--drivers", "local_drivers", type=int, help="local drivers to start [default: 2].")
@click.option(
    "--listen",
    help="HOST:PORT to listen on [default: 127.0.0.1:15002, this machine only; "
    "0.0.0.0:15002 shares it].",
)
@click.option("--admin-listen", help=_ADMIN_LISTEN_HELP)
@click.option("--driver-memory", help="heap per driver, e.g. 1g or 2g [default: 1g].")
@click.option("--java-home", help="Java 17+ installation [default: JAVA_HOME, else java on PATH].")
@click.option(
    "--conf", "confs", multiple=True, metavar="KEY=VALUE", help="extra Spark conf for the drivers."
)
@_config_option
@_log_option
def up(
    local_drivers: int | None,
    listen: str | None,
    admin_listen: str | None,
    driver_memory: str | None,
    java_home: str | None,
    confs: tuple[str, ...],
    config: Path | None,
    log_level: str | None,
) -> None:
    """Start local Spark Connect drivers and a router in front of them (Ctrl-C stops all)."""
    spark_conf: dict[str, str] = {}
    for item in confs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--conf {item!r} is not KEY=VALUE", EXIT_CONFIG)
        spark_conf[key] = value
    from router.local.up import UP_LISTEN, run_up

    flags: dict[str, Any] = {
        "local_drivers": local_drivers,
        "admin_listen": admin_listen,
        "driver_memory": driver_memory,
        "java_home": java_home,
        "spark_conf": spark_conf or None,
        "log_level": log_level,
    }
    settings = _settings(config, listen=listen, **flags)
    if "listen" not in settings.model_fields_set:  # no flag, env or file chose: this machine only
        settings = _settings(config, listen=UP_LISTEN, **flags)
    configure_logging(settings.log_level, settings.log_format)

    sys.exit(run_up(settings))


@cli.command()
@click.option(
    "--driver",
    required=True,
    envvar="SPARK_ROUTER_AGENT_DRIVER",
    help="the Spark Connect driver to probe, HOST:PORT.",
)
@click.option(
    "--registry",
    required=True,
    envvar="SPARK_ROUTER_REGISTRY",
    help="the shared registry routers read, e.g. redis://redis:6379/0.",
)
@click.option(
    "--pool", envvar="SPARK_ROUTER_AGENT_POOL", help="the driver's pool [default: default]."
)
@click.option(
    "--advertise",
    envvar="SPARK_ROUTER_AGENT_ADVERTISE",
    help="HOST:PORT routers dial [default: --driver].",
)
@click.option(
    "--weight",
    type=int,
    envvar="SPARK_ROUTER_AGENT_WEIGHT",
    help="share of new sessions [default: 1].",
)
@click.option(
    "--heartbeat-interval",
    type=float,
    envvar="SPARK_ROUTER_AGENT_HEARTBEAT_INTERVAL",
    help="seconds between probes and heartbeats [default: 2].",
)
@click.option(
    "--ttl",
    type=float,
    envvar="SPARK_ROUTER_AGENT_TTL",
    help="seconds a heartbeat keeps the driver live [default: 3 intervals].",
)
@click.option(
    "--probe-timeout",
    type=float,
    envvar="SPARK_ROUTER_AGENT_PROBE_TIMEOUT",
    help="seconds a probe may take before the driver counts as failing [default: 2].",
)
@click.option(
    "--driver-tls/--no-driver-tls",
    default=False,
    envvar="SPARK_ROUTER_DRIVER_TLS",
    help="probe the driver over TLS (through its TLS sidecar). The driver's token, if it has "
    "one, comes from the environment only: SPARK_ROUTER_DRIVER_TOKEN.",
)
@click.option(
    "--driver-tls-ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPARK_ROUTER_DRIVER_TLS_CA_FILE",
    help="CA bundle the driver's certificate chains to [default: system roots].",
)
@click.option(
    "--driver-tls-cert-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPARK_ROUTER_DRIVER_TLS_CERT_FILE",
    help="client certificate shown to the driver (mTLS), with --driver-tls-key-file.",
)
@click.option(
    "--driver-tls-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SPARK_ROUTER_DRIVER_TLS_KEY_FILE",
    help="private key of --driver-tls-cert-file.",
)
@click.option(
    "--driver-tls-server-name",
    envvar="SPARK_ROUTER_DRIVER_TLS_SERVER_NAME",
    help="name the driver's certificate is checked against [default: its host].",
)
@_log_option
def agent(
    driver: str,
    registry: str,
    pool: str | None,
    advertise: str | None,
    weight: int | None,
    heartbeat_interval: float | None,
    ttl: float | None,
    probe_timeout: float | None,
    driver_tls: bool,
    driver_tls_ca_file: Path | None,
    driver_tls_cert_file: Path | None,
    driver_tls_key_file: Path | None,
    driver_tls_server_name: str | None,
    log_level: str | None,
) -> None:
    """Run next to a Spark Connect driver: probe it, register it, heartbeat, deregister on exit."""
    from agent.sidecar import AgentSettings, run_agent
    from router.tls import TLSConfigError, build_dialing

    configure_logging(log_level or "info")
    try:
        dialing = build_dialing(
            tls=driver_tls,
            ca_file=driver_tls_ca_file,
            cert_file=driver_tls_cert_file,
            key_file=driver_tls_key_file,
            server_name=driver_tls_server_name,
            token=os.environ.get("SPARK_ROUTER_DRIVER_TOKEN") or None,
        )
    except TLSConfigError as exc:
        _fail(f"invalid agent settings: {exc}", EXIT_CONFIG)
    try:
        settings = AgentSettings(
            driver=driver,
            pool=pool,
            advertise=advertise,
            weight=weight,
            heartbeat_interval=heartbeat_interval,
            ttl=ttl,
            probe_timeout=probe_timeout,
            dialing=dialing,
        )
    except ValueError as exc:
        _fail(f"invalid agent settings: {exc}", EXIT_CONFIG)
    sys.exit(run_agent(settings, registry))


def _target_options(fn: Any) -> Any:
    """--admin / --registry / --admin-token: where the operator commands get their answers."""
    fn = click.option(
        "--admin-token",
        envvar="SPARK_ROUTER_ADMIN_TOKEN",
        help="bearer token for the admin API: the replica's admin_token, or (auth on) the "
        "token or JWT of a user in admin_users / admin_groups.",
    )(fn)
    fn = click.option(
        "--registry",
        envvar="SPARK_ROUTER_REGISTRY",
        help="or the shared registry itself, e.g. redis://redis:6379/0 (no health view).",
    )(fn)
    return click.option(
        "--admin",
        envvar="SPARK_ROUTER_ADMIN_URL",
        help="a replica's admin API, e.g. http://router:9464 (adds its health view).",
    )(fn)


def _control(admin: str | None, registry: str | None, token: str | None) -> Any:
    from registry import open_registry
    from router.admin.client import AdminControl, RegistryControl

    if admin:
        return AdminControl(admin, token)
    if not registry:
        _fail("give --admin URL (a replica's admin API) or --registry URL", EXIT_CONFIG)
    if registry.startswith("memory://"):
        _fail("memory:// is private to one replica: give --admin URL of that replica", EXIT_CONFIG)
    try:
        open_registry(registry)  # validate the URL now, before any command runs
    except ValueError as exc:
        _fail(str(exc), EXIT_CONFIG)
    return RegistryControl(lambda: open_registry(registry))


def _controlled(work: Any) -> Any:
    from router.admin.client import ControlError

    try:
        return work()
    except ControlError as exc:
        _fail(str(exc), EXIT_STARTUP_FAILURE)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@cli.command()
@click.argument("driver")
@_target_options
@click.option(
    "--move-idle",
    is_flag=True,
    help="also move each session, with its state, on its next call that starts no operation.",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    default=None,
    help="with --move-idle: wait up to this many seconds for the driver to hold no session.",
)
@click.option(
    "--undo", is_flag=True, help="take the drain mark off: the driver takes new sessions again."
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON.")
def drain(
    driver: str,
    admin: str | None,
    registry: str | None,
    admin_token: str | None,
    move_idle: bool,
    wait_seconds: float | None,
    undo: bool,
    as_json: bool,
) -> None:
    """Stop new sessions on DRIVER (HOST:PORT); with --move-idle move its sessions off too."""
    import json as jsonlib

    from registry.models import DrainMode

    try:
        split_host_port(driver)
    except ValueError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if undo and (move_idle or wait_seconds is not None):
        _fail("--undo takes no --move-idle or --wait", EXIT_CONFIG)
    control = _control(admin, registry, admin_token)
    mode = None if undo else DrainMode.MOVE_IDLE if move_idle else DrainMode.KEEP
    result = _controlled(lambda: control.drain(driver, mode))
    if wait_seconds is not None and result["sessions"]:
        result["sessions"] = _wait_empty(control, driver, result["sessions"], wait_seconds)
    if as_json:
        click.echo(jsonlib.dumps(result))
    elif undo:
        click.echo(f"driver {driver} takes new sessions again")
    elif move_idle:
        click.echo(
            f"driver {driver} is draining: no new sessions; its {result['sessions']} session(s) "
            "move with their state on their next call (undo with --undo)"
        )
    else:
        click.echo(
            f"driver {driver} is draining: routers place no new sessions there; its "
            f"{result['sessions']} session(s) stay until they end (undo with --undo)"
        )
    if wait_seconds is not None and result["sessions"]:
        sys.exit(1)  # still holds sessions: not safe to retire yet


def _wait_empty(control: Any, driver: str, first: int, seconds: float) -> int:
    """Poll the driver's session count with a progress bar until 0 or `seconds` pass."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    deadline = time.monotonic() + seconds
    left = first
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(f"sessions moved off {driver}", total=first)
        while left and time.monotonic() < deadline:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))  # a poll interval
            left = len(_controlled(lambda: control.sessions(driver, first + 1)))
            progress.update(task, completed=max(first - left, 0))
    return left


@cli.command("drivers")
@_target_options
@click.option("--json", "as_json", is_flag=True, help="print the drivers as JSON.")
def list_drivers(
    admin: str | None, registry: str | None, admin_token: str | None, as_json: bool
) -> None:
    """List drivers with pool, weight, state, drain mode and session count."""
    import json as jsonlib

    control = _control(admin, registry, admin_token)
    drivers = _controlled(control.drivers)
    if as_json:
        click.echo(jsonlib.dumps(drivers))
        return
    rows = [("ADDRESS", "POOL", "WEIGHT", "STATE", "HEALTH", "DRAIN", "SESSIONS")]
    for d in drivers:
        rows.append(
            (
                d["address"],
                d["pool"] or "-",
                "-" if d["weight"] is None else str(d["weight"]),
                d["state"] or "static or not registered",
                d.get("health") or "-",
                d["drain"] or "-",
                str(d["sessions"]),
            )
        )
    _table(rows)


@cli.command("sessions")
@_target_options
@click.option("--driver", help="only the sessions pinned to this driver (HOST:PORT).")
@click.option("--session", "session_id", help="only this session.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the sessions as JSON.")
def list_sessions(
    admin: str | None,
    registry: str | None,
    admin_token: str | None,
    driver: str | None,
    session_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List pinned sessions: driver, pool, owner, created, moves."""
    import json as jsonlib

    control = _control(admin, registry, admin_token)
    if session_id is not None:
        found = _controlled(lambda: control.session(session_id))
        if found is None:
            _fail(f"no session {session_id!r} is pinned", 1)
        sessions = [found]
    else:
        sessions = _controlled(lambda: control.sessions(driver, limit))
    if as_json:
        click.echo(jsonlib.dumps(sessions))
        return
    rows = [("SESSION", "DRIVER", "POOL", "OWNER", "CREATED", "MOVES")]
    for s in sessions:
        rows.append(
            (
                s["session_id"],
                s["driver"],
                s["pool"],
                s["owner"] or "-",
                s["created"] or "-",
                str(s["moves"]),
            )
        )
    _table(rows)


@cli.command("quotas")
@click.option(
    "--admin",
    envvar="SPARK_ROUTER_ADMIN_URL",
    required=True,
    help="a replica's admin API, e.g. http://router:9464: the counts are that replica's.",
)
@click.option(
    "--admin-token",
    envvar="SPARK_ROUTER_ADMIN_TOKEN",
    help="bearer token for the admin API: the replica's admin_token, or (auth on) the "
    "token or JWT of a user in admin_users / admin_groups.",
)
@click.option("--json", "as_json", is_flag=True, help="print the answer as JSON.")
def list_quotas(admin: str, admin_token: str | None, as_json: bool) -> None:
    """Show the quotas, each user's open sessions and what one replica counts (its own view)."""
    import json as jsonlib

    from router.admin.client import AdminControl

    found = _controlled(AdminControl(admin, admin_token).quotas)
    if as_json:
        click.echo(jsonlib.dumps(found))
        return
    if not found.get("active"):
        click.echo(found.get("note") or "no quota is set in the policy file")
        return
    click.echo(
        f"replica {found['replica']}: one of {found['replicas']} sharing the quotas"
        + ("; registry unreachable: enforcing its share of each limit" if found["degraded"] else "")
    )
    click.echo("limits: " + jsonlib.dumps(found["limits"], sort_keys=True))
    if found["users"]:
        click.echo("")
        rows: list[tuple[str, ...]] = [
            ("USER", "SESSIONS", "RUNNING HERE", "SLOTS LEASED HERE", "SESSIONS OPENED IN OUTAGE")
        ]
        for u in found["users"]:
            outage = u.get("sessions_opened_in_outage")
            rows.append(
                (
                    u["user"] or "-",
                    str(u.get("sessions", "-")),
                    str(u["running"]),
                    str(u["slots_leased"]),
                    "-" if outage is None else str(outage),
                )
            )
        _table(rows)
    if found["buckets"]:
        click.echo("")
        rows = [("BUCKET", "TOKENS HELD HERE", "CALLS HERE LAST SECOND")]
        for b in found["buckets"]:
            rows.append(
                (f"{b['kind']} {b['name']}", str(b["tokens_held"]), str(b["calls_last_second"]))
            )
        _table(rows)


@cli.group("token")
def token_group() -> None:
    """Issue, list and revoke the bearer tokens of `auth: token` (the token_file)."""


def _token_file_option(fn: Any) -> Any:
    fn = _config_option(fn)
    return click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="the token file [default: the token_file setting].",
    )(fn)


def _token_file(token_file: Path | None, config: Path | None) -> Path:
    if token_file is not None:
        return token_file
    found = _settings(config).token_file
    if found is None:
        _fail(
            "no token file: give --token-file PATH or set token_file "
            "(SPARK_ROUTER_TOKEN_FILE or the config file)",
            EXIT_CONFIG,
        )
    return found


@token_group.command("add")
@click.argument("user")
@click.option("--group", "groups", multiple=True, help="a group of the user; repeat for more.")
@_token_file_option
def token_add(
    user: str, groups: tuple[str, ...], token_file: Path | None, config: Path | None
) -> None:
    """Issue a token for USER: printed once on stdout, only its hash is kept."""
    from router.admit import tokens

    path = _token_file(token_file, config)
    try:
        new = tokens.add(path, user, list(groups))
    except tokens.TokenFileError as exc:
        _fail(str(exc), EXIT_CONFIG)
    click.echo(new)
    # The hint goes to stderr, so `TOKEN=$(spark-router token add alice)` captures the token alone.
    click.echo(
        f"token for {user} added to {path} (shown only now); pyspark: "
        "SparkSession.builder.remote('sc://ROUTER:15002/;use_ssl=true;token=<the token above>')",
        err=True,
    )


@token_group.command("list")
@_token_file_option
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON.")
def token_list(token_file: Path | None, config: Path | None, as_json: bool) -> None:
    """List the tokens' users, groups, creation times and hash prefixes (never the tokens)."""
    import json as jsonlib

    from router.admit import tokens

    path = _token_file(token_file, config)
    try:
        entries = tokens.list_entries(path)
    except tokens.TokenFileError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if as_json:
        click.echo(
            jsonlib.dumps(
                [
                    {
                        "user": e.user,
                        "groups": list(e.groups),
                        "created": e.created,
                        "hash": e.sha256[:12],
                    }
                    for e in entries
                ]
            )
        )
        return
    rows = [("USER", "GROUPS", "CREATED", "HASH")]
    for e in entries:
        rows.append((e.user, ",".join(e.groups) or "-", e.created or "-", e.sha256[:12]))
    _table(rows)


@token_group.command("remove")
@click.argument("user_or_hash")
@_token_file_option
def token_remove(user_or_hash: str, token_file: Path | None, config: Path | None) -> None:
    """Revoke every token of a USER, or the one token whose hash starts with HASHPREFIX."""
    from router.admit import tokens

    path = _token_file(token_file, config)
    try:
        gone = tokens.remove(path, user_or_hash)
    except tokens.TokenFileError as exc:
        _fail(str(exc), 1)
    for e in gone:
        click.echo(f"removed the token of {e.user} ({e.sha256[:12]})")
    click.echo("replicas stop accepting it within about a second (they reload on change)", err=True)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
