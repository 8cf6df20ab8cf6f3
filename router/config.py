"""All settings of a replica in one frozen, validated object.

Every setting has one name here and is read from, in order of precedence: a command-line
flag, the environment (`SPARK_ROUTER_<NAME>`, lists comma-separated), a YAML file
(`--config FILE` / `SPARK_ROUTER_CONFIG`, keys are the names below), then the default.
`cli.py` builds the Settings once and passes it down; nothing reads the environment later.
A bad value fails at start-up with one clear line per problem.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common.addresses import split_host_port

MiB = 1024 * 1024
# pyspark and the Spark Connect server both accept messages up to 128 MiB.
SPARK_MAX_MESSAGE_BYTES = 128 * MiB

_MEMORY = re.compile(r"^\d+[kmgtKMGT]?$")
# The admin_listen value that turns the admin listener off.
ADMIN_OFF = "off"


AuthMode = Literal["none", "token", "jwt", "trusted-header", "mtls"]


class ConfigError(Exception):
    """Settings could not be built; str() lists every problem, one per line."""


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_address(value: str, allow_port_zero: bool) -> str:
    _, port = split_host_port(value)
    if port == 0 and not allow_port_zero:
        raise ValueError(f"{value!r}: port 0 is not a driver address")
    return value.strip()


_config_file: ContextVar[Path | None] = ContextVar("spark_router_config_file", default=None)
# Set while building the Settings of `spark-router authz`: there mtls is Envoy's (the source
# principal it verified), so the router's own listener needs no client certificates.
_for_authz: ContextVar[bool] = ContextVar("spark_router_for_authz", default=False)


class _YamlFile(PydanticBaseSettingsSource):
    """Values from the YAML file named by --config, if any."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must be a mapping of setting: value")
            self._values = {str(k).replace("-", "_"): v for k, v in loaded.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    """Everything a replica (and `spark-router up`) can be told."""

    model_config = SettingsConfigDict(
        env_prefix="SPARK_ROUTER_", frozen=True, extra="forbid", validate_default=True
    )

    # --- serve ---
    listen: str = Field("0.0.0.0:15002", description="HOST:PORT the router listens on")
    drivers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="static Spark Connect drivers, HOST:PORT each"
    )
    workers: int = Field(1, ge=1, le=64, description="processes sharing the listen port")
    registry: str = Field(
        "memory://",
        description="where pins and drivers live: memory://, redis://, rediss://, unix://, "
        "redis+sentinel://",
    )
    default_pool: str = Field(
        "default", min_length=1, description="pool of sessions that send no x-spark-pool"
    )
    pin_ttl_seconds: float = Field(
        7200.0, gt=0, description="how long an idle session's pin lives in the registry"
    )
    pin_touch_interval_seconds: float = Field(
        30.0, gt=0, description="how often active sessions' pins are refreshed, in one batch"
    )
    membership_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="how often drivers are re-read (catches expired heartbeats)"
    )
    max_message_bytes: int = Field(
        SPARK_MAX_MESSAGE_BYTES,
        ge=SPARK_MAX_MESSAGE_BYTES,
        description="largest request or response message forwarded",
    )
    max_metadata_bytes: int = Field(
        16 * 1024, ge=8 * 1024, le=1024 * 1024, description="largest request metadata accepted"
    )
    max_identifier_length: int = Field(
        256,
        ge=36,
        le=64 * 1024,
        description="longest user_id, x-spark-pool and operation id accepted (characters); "
        "session ids are UUIDs",
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, le=3600, description="how long in-flight calls may finish on shutdown"
    )
    session_cache_size: int = Field(
        100_000, ge=1, description="session pins each replica keeps in memory"
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="uvloop when installed (auto), or force asyncio's own or uvloop"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json lines, plain text, or auto: text on a terminal, else json"
    )
    admin_listen: str = Field(
        "127.0.0.1:9464",
        description="HOST:PORT of the admin HTTP listener (/metrics, /healthz, /readyz, "
        "the admin API): loopback by default, 0.0.0.0:9464 for probes and scrapes from "
        "elsewhere; off turns it off",
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token every admin API call must carry (unset: none)"
    )
    probe_interval_seconds: float = Field(
        2.0, gt=0, le=600, description="how often the router probes each driver"
    )
    probe_timeout_seconds: float = Field(
        2.0, gt=0, le=600, description="a probe slower than this fails (a hung driver)"
    )
    fail_threshold: int = Field(
        3, ge=1, le=100, description="failed probes in a row before a driver is down"
    )
    recover_threshold: int = Field(
        2, ge=1, le=100, description="good probes in a row before a down driver is live again"
    )
    max_ejection_percent: int = Field(
        50,
        description="share of a pool's drivers, in percent (at least one), probes alone may "
        "mark down",
    )
    migration: str = Field(
        "replay",
        description="replay: move sessions off a dead driver and replay their state; "
        "strict: move them but let Spark answer SESSION_CHANGED",
    )
    journal_max_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="per-session cap of replayable state; larger sessions move strictly",
    )
    no_driver_wait_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="how long a call finding no live driver in its pool waits for one that "
        "went down in that time to come back, before it fails (FAILED_PRECONDITION)",
    )
    # Keepalive (router/server.py): pyspark 4.3 pings every 60 s, idle or not, and Spark
    # accepts pings down to every 10 s; grpc's defaults (5 min, none while idle) would answer
    # it with GOAWAY too_many_pings after three pings.
    keepalive_time_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="idle time after which the router pings a client connection (and a "
        "driver connection, at most every 10 s) to check it is alive",
    )
    keepalive_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="how long a keepalive ping may go unanswered before the connection is "
        "closed as dead",
    )
    min_client_ping_interval_seconds: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="the most often a client may ping a connection, with or without calls "
        "(pyspark: every 60 s); more often earns GOAWAY too_many_pings",
    )

    # --- the memory budget (router/dataplane/budget.py; the worst case is in the README) ---
    stream_window_bytes: int = Field(
        256 * 1024,
        ge=16 * 1024,
        le=16 * MiB,
        description="HTTP/2 flow-control window of each call, towards clients and drivers "
        "(fixed: gRPC's BDP probing, which grows it to megabytes, is off): what one stalled "
        "stream can make the router buffer beyond the message in hand",
    )
    max_streams: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="calls in flight on the replica; more are refused (RESOURCE_EXHAUSTED)",
    )
    max_streams_per_connection: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description="calls in flight on one client connection; more are refused "
        "(RESOURCE_EXHAUSTED)",
    )
    max_request_bytes_in_flight: int = Field(
        256 * MiB,
        ge=SPARK_MAX_MESSAGE_BYTES,
        description="bytes of requests the replica holds while it routes and forwards them "
        "(at least max_message_bytes); a request beyond it is refused (RESOURCE_EXHAUSTED)",
    )
    memory_trim_seconds: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="how often freed memory is handed back to the system (glibc malloc_trim, "
        "off the event loop); 0 turns it off",
    )

    # --- TLS (the listener, and the way to drivers) ---
    tls_cert_file: Path | None = Field(
        None, description="certificate chain (PEM) the router serves; with tls_key_file: TLS on"
    )
    tls_key_file: Path | None = Field(None, description="private key (PEM) of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) client certificates must chain to (mTLS)"
    )
    tls_client_auth: Literal["none", "optional", "require"] = Field(
        "none",
        description="client certificates: none (not asked) or require (a client without a "
        "valid one is refused); optional is refused: grpc's Python server cannot ask for one "
        "without requiring it",
    )
    driver_tls: bool = Field(
        False,
        description="dial drivers over TLS (Spark Connect has none itself: a TLS sidecar "
        "in front of each driver terminates it)",
    )
    driver_tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) drivers' certificates chain to (unset: system roots)"
    )
    driver_tls_cert_file: Path | None = Field(
        None, description="client certificate (PEM) the router shows drivers (mTLS)"
    )
    driver_tls_key_file: Path | None = Field(
        None, description="private key of driver_tls_cert_file"
    )
    driver_tls_server_name: str | None = Field(
        None, description="name drivers' certificates are checked against (unset: their host)"
    )
    driver_token: SecretStr | None = Field(
        None,
        description="bearer token sent to drivers (their spark.connect.authenticate.token); "
        "environment or config file only",
    )

    # --- who is calling (router/admit/auth.py) ---
    auth: Annotated[list[AuthMode], NoDecode] = Field(
        default_factory=lambda: list[AuthMode](["none"]),
        description="how callers prove who they are: none, or one or more of token, jwt, "
        "trusted-header, mtls (tried in order)",
    )
    identity: Literal["rewrite", "reject"] = Field(
        "rewrite",
        description="with auth on: rewrite user_context.user_id to the authenticated user, "
        "or reject a request that claims another user",
    )
    token_file: Path | None = Field(
        None, description="YAML file of token hashes → user and groups (`spark-router token add`)"
    )
    jwt_jwks_url: str | None = Field(None, description="JWKS URL of the JWT issuer's keys")
    jwt_issuer: str | None = Field(
        None,
        description="required iss claim; without jwks URL, key file or secret, its OIDC "
        "discovery document names the JWKS",
    )
    jwt_audience: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted aud claims (unset: aud not checked)"
    )
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted signature algorithms (unset: HS256 with jwt_secret, else RS256, "
        "ES256, EdDSA)",
    )
    jwt_key_file: Path | None = Field(None, description="PEM public key verifying JWTs (no JWKS)")
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret (env/config file)")
    jwt_user_claim: str = Field("sub", min_length=1, description="claim naming the user")
    jwt_groups_claim: str = Field("groups", min_length=1, description="claim listing the groups")
    jwt_leeway_seconds: float = Field(
        30.0, ge=0, le=600, description="clock skew allowed on exp and nbf"
    )
    jwks_refresh_seconds: float = Field(
        300.0, ge=5, le=86400, description="how often the JWKS is re-read (and on an unknown kid)"
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="addresses/CIDRs whose trusted_user_header is believed (trusted-header)",
    )
    trusted_user_header: str = Field("x-spark-user", description="header naming the user")
    trusted_groups_header: str = Field(
        "x-spark-groups", description="header listing the groups, comma-separated"
    )
    mtls_user_from: Literal["cn", "san"] = Field(
        "cn", description="mtls: the user is the certificate's subject CN or its first SAN"
    )
    admin_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="authenticated users who may use the admin API"
    )
    admin_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="groups whose members may use the admin API"
    )

    # --- the Envoy ext_authz server (`spark-router authz`, router/authz.py) ---
    authz_listen: str = Field(
        "127.0.0.1:15003",
        description="HOST:PORT the ext_authz server (`spark-router authz`) listens on: "
        "loopback by default, for an Envoy on the same machine or pod",
    )

    # --- may they (router/admit/policy.py) ---
    policy_file: Path | None = Field(
        None,
        description="YAML file of roles (users, groups, pools, default_pool, admin) and deny "
        "lists; reloaded when it changes (needs auth)",
    )
    policy_reload_seconds: float = Field(
        2.0, gt=0, le=3600, description="how often the policy file is checked for changes"
    )

    # --- within quota (router/admit/quotas.py; the limits are the policy file's quotas:) ---
    quota_lease_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="calls per second: a replica leases at most this many seconds' worth of "
        "a bucket's rate at a time (more: fewer registry round trips, a looser bound)",
    )
    quota_token_hold_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="calls per second: how long leased tokens stay usable before they lapse "
        "unspent (they are never handed back)",
    )
    quota_slot_lease_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="running operations: how long a replica's leased slots stay taken after "
        "its last renewal (a dead replica's slots free themselves after it)",
    )
    quota_sync_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often a replica hands back idle operation slots, renews its leases "
        "(every quota_slot_lease_seconds / 3) and counts the replicas sharing quotas",
    )
    quota_idle_seconds: float = Field(
        1.0,
        ge=0,
        le=600,
        description="running operations: how long a slot stays leased to a replica, unused, "
        "before it goes back at the next sync",
    )
    quota_slot_wait_seconds: float = Field(
        3.0,
        ge=0,
        le=60,
        description="running operations: how long an ExecutePlan of a user at the limit waits "
        "for slots idle on other replicas to come back before it is refused",
    )

    # --- on the record (router/admit/audit.py) ---
    audit_file: Path | None = Field(
        None,
        description="append the audit trail here, one JSON line per event (reopened when "
        "logrotate renames it)",
    )
    audit_stdout: bool = Field(False, description="write the audit trail to stdout too")
    audit_queue_size: int = Field(
        10_000, ge=1, le=10_000_000, description="audit events that may wait to be written"
    )
    audit_when_full: Literal["drop", "refuse"] = Field(
        "drop",
        description="a full audit queue drops events (counted) or refuses new calls "
        "(RESOURCE_EXHAUSTED: fail closed, for sites that must not lose a record)",
    )
    audit_sql: Literal["sha256", "text", "off"] = Field(
        "sha256",
        description="an execution's SQL in the audit: its SHA-256, its text (cut, secrets "
        "blanked where a secret-looking name precedes them) or nothing",
    )
    audit_sql_max_chars: int = Field(
        4096, ge=1, le=1_000_000, description="audit_sql text: SQL cut to this many characters"
    )
    audit_redact_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*password*", "*secret*", "*token*", "*key*"],
        description="conf and parameter names whose values the audit writes as [redacted] "
        "(globs, case-insensitive)",
    )
    audit_retry_seconds: float = Field(
        1.0, gt=0, le=600, description="a failed audit write is retried this often"
    )
    audit_close_timeout_seconds: float = Field(
        5.0, ge=0, le=600, description="on stop, how long queued audit events may take to write"
    )

    # --- up (local drivers) ---
    local_drivers: int = Field(2, ge=1, le=16, description="drivers `up` starts")
    driver_memory: str = Field("1g", description="heap of each local driver (spark-submit)")
    driver_startup_timeout_seconds: float = Field(
        180.0, gt=0, le=3600, description="how long `up` waits for its drivers"
    )
    java_home: str | None = Field(None, description="Java 17+ for local drivers (else PATH)")
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description="extra --conf for local drivers"
    )

    @field_validator("drivers", mode="before")
    @classmethod
    def _split_drivers(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("drivers")
    @classmethod
    def _check_drivers(cls, value: list[str]) -> list[str]:
        checked = [_check_address(v, allow_port_zero=False) for v in value]
        seen: set[str] = set()
        for address in checked:
            if address in seen:
                raise ValueError(f"driver {address} is listed twice")
            seen.add(address)
        return checked

    @field_validator(
        "auth",
        "jwt_audience",
        "jwt_algorithms",
        "trusted_proxies",
        "admin_users",
        "admin_groups",
        "audit_redact_keys",
        mode="before",
    )
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, value: list[str]) -> list[str]:
        if not value:
            return ["none"]
        if "none" in value and len(value) > 1:
            raise ValueError("none cannot be combined with other modes")
        if len(set(value)) != len(value):
            raise ValueError("a mode is listed twice")
        return value

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        problems = []
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("tls_cert_file and tls_key_file go together")
        if self.tls_client_auth == "optional":
            # grpc's Python server credentials either never ask for a client certificate or
            # require and verify one (router/tls.py): "optional" would silently mean "none".
            problems.append(
                "tls_client_auth optional is not supported: grpc's Python server cannot ask "
                "for a client certificate without requiring one; use require or none"
            )
        elif self.tls_client_auth != "none" and self.tls_client_ca_file is None:
            problems.append(f"tls_client_auth {self.tls_client_auth} needs tls_client_ca_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if (self.driver_tls_cert_file is None) != (self.driver_tls_key_file is None):
            problems.append("driver_tls_cert_file and driver_tls_key_file go together")
        modes = set(self.auth)
        if self.policy_file is not None and modes == {"none"}:
            problems.append(
                "policy_file needs auth (a policy of who may use which pool cannot trust a "
                "user_id that clients choose themselves)"
            )
        if self.quota_slot_lease_seconds < 3 * self.quota_sync_seconds:
            # Leases are renewed by the sync every slot lease / 3: a slower sync lets them
            # lapse while in use, and other replicas would lease those slots again.
            problems.append(
                "quota_slot_lease_seconds must be at least 3 x quota_sync_seconds (leases "
                "are renewed by the sync)"
            )
        if "token" in modes and self.token_file is None:
            problems.append("auth token needs token_file")
        if "jwt" in modes and not (
            self.jwt_jwks_url or self.jwt_key_file or self.jwt_secret or self.jwt_issuer
        ):
            problems.append(
                "auth jwt needs jwt_jwks_url, jwt_key_file, jwt_secret or jwt_issuer (discovery)"
            )
        if "trusted-header" in modes and not self.trusted_proxies:
            problems.append("auth trusted-header needs trusted_proxies")
        if "mtls" in modes and self.tls_client_auth == "none" and not _for_authz.get():
            problems.append("auth mtls needs tls_client_auth require")
        if self.max_request_bytes_in_flight < self.max_message_bytes:
            problems.append(
                "max_request_bytes_in_flight must be at least max_message_bytes "
                "(else the largest request allowed could never be forwarded)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether callers must authenticate (any mode but none)."""
        return self.auth != ["none"]

    @property
    def tls_enabled(self) -> bool:
        """Whether the listener serves TLS."""
        return self.tls_cert_file is not None

    @field_validator("registry")
    @classmethod
    def _check_registry(cls, value: str) -> str:
        schemes = ("memory://", "redis://", "rediss://", "unix://", "redis+sentinel://")
        if not value.startswith(schemes):
            raise ValueError(f"{value!r} is not a registry URL ({', '.join(schemes)})")
        return value

    @field_validator("admin_listen")
    @classmethod
    def _check_admin_listen(cls, value: str) -> str:
        if value.strip().lower() == ADMIN_OFF:
            return ADMIN_OFF
        return _check_address(value, allow_port_zero=True)

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token is most likely a missing secret: refuse it rather than run open.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (unset it to run the admin API without a token)")
        return value

    @field_validator("max_ejection_percent")
    @classmethod
    def _check_max_ejection_percent(cls, value: int) -> int:
        if not 0 <= value <= 100:
            raise ValueError(f"{value} is not a percentage from 0 to 100")
        return value

    @field_validator("migration")
    @classmethod
    def _check_migration(cls, value: str) -> str:
        if value not in ("replay", "strict"):
            raise ValueError(f"{value!r} is not replay or strict")
        return value

    @field_validator("listen", "authz_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _check_address(value, allow_port_zero=True)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        lowered = value.lower()
        if lowered not in ("debug", "info", "warning", "error"):
            raise ValueError(f"{value!r} is not one of debug, info, warning, error")
        return lowered

    @field_validator("driver_memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        if not _MEMORY.match(value):
            raise ValueError(f"{value!r} is not a JVM memory size such as 512m or 2g")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFile(settings_cls, _config_file.get())

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """The listen address split into host and port."""
        return split_host_port(self.listen)

    @property
    def authz_host_port(self) -> tuple[str, int]:
        """The ext_authz server's address split into host and port."""
        return split_host_port(self.authz_listen)

    @property
    def admin_host_port(self) -> tuple[str, int] | None:
        """The admin listener's address split into host and port; None when it is off."""
        return None if self.admin_listen == ADMIN_OFF else split_host_port(self.admin_listen)


def load_settings(
    config_file: Path | None = None, *, for_authz: bool = False, **overrides: Any
) -> Settings:
    """Build Settings from flags (`overrides`, None values ignored), env, a YAML file, defaults.

    `for_authz`: the Settings of `spark-router authz`, whose mtls mode reads the client
    certificate Envoy verified, so it needs no `tls_client_auth` of its own.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    token = _config_file.set(config_file)
    authz = _for_authz.set(for_authz)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _for_authz.reset(authz)
        _config_file.reset(token)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def settings_table() -> list[tuple[str, str, str]]:
    """(name, default, description) of every setting, for the README and `--help`."""
    rows = []
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        rows.append((name, repr(default), info.description or ""))
    return rows


def as_mapping(settings: Settings) -> Mapping[str, Any]:
    """The settings as plain data (to hand to worker processes)."""
    return settings.model_dump()
