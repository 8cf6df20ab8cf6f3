"""Driver health: the pure probe state machine and the one Spark Connect probe.

Used by the router (router/health.py runs it for a replica's drivers), by the agent next
to each driver, and by `up` while it waits for its local drivers.

Invariants:
- `apply_probe` is pure: the state after one more probe result. Thresholds, never flips on
  one signal: `fail_threshold` failures in a row take a driver down, `recover_threshold`
  successes in a row bring a down driver back; a driver that never answered stays
  unregistered (`state is None`) until its first good probe.
- A probe is one real Spark Connect `Config` call (get `spark.connect.grpc.binding.port`)
  on a fresh channel with its own subchannel, bounded by its timeout (connecting included):
  a refused, failing or hung driver fails it, and so does an answer for another session.
- `diagnose` is the same probe saying why it failed (a short text, no secrets): the router
  keeps the last one per driver to name it when a pool has no live driver.
- A probe dials a driver the way calls do (`DriverDialing`: TLS or not, the backend token),
  so a driver that refuses the router's token or certificate fails its probes too. The
  token never appears in a log line or a repr.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import grpc
    import grpc.aio

__all__ = [
    "PLAINTEXT",
    "PROBE_CONF",
    "PROBE_SESSION_ID",
    "PROBE_USER_ID",
    "Diagnosis",
    "DriverDialing",
    "DriverState",
    "HealthState",
    "Probe",
    "Thresholds",
    "apply_probe",
    "ask_binding_port",
    "diagnose",
    "probe",
]

log = logging.getLogger(__name__)


class DriverState(str, enum.Enum):
    """Whether a driver takes new sessions."""

    ACTIVE = "active"
    DRAINING = "draining"
    DOWN = "down"


@dataclass(frozen=True)
class HealthState:
    """What is believed about a driver: the state announced and the current streaks."""

    state: DriverState | None = None  # None: never answered, so not registered
    good: int = 0  # consecutive successful probes
    bad: int = 0  # consecutive failed probes

    @property
    def registered(self) -> bool:
        """Whether the driver has answered once, so its record is written."""
        return self.state is not None


class Thresholds(Protocol):
    """How many probes in a row change a driver's state (the agent's and the router's)."""

    @property
    def fail_threshold(self) -> int: ...

    @property
    def recover_threshold(self) -> int: ...


def apply_probe(state: HealthState, ok: bool, settings: Thresholds) -> HealthState:
    """The health after one more probe result (pure; thresholds, never one-probe flips)."""
    if ok:
        good = state.good + 1
        current = state.state
        if current is None:
            current = DriverState.ACTIVE  # the first answer registers the driver
        elif current is DriverState.DOWN and good >= settings.recover_threshold:
            current = DriverState.ACTIVE
        return HealthState(current, good=good, bad=0)
    bad = state.bad + 1
    current = state.state
    if current is not None and current is not DriverState.DOWN and bad >= settings.fail_threshold:
        current = DriverState.DOWN
    return HealthState(current, good=0, bad=bad)


# --------------------------------------------------------------------------- dialing


@dataclass(frozen=True)
class DriverDialing:
    """How to dial a driver: TLS credentials (None: plaintext), channel options, call metadata.

    Built once from the settings (router/tls.py) and shared by the router's channels, its
    probes and the agent's, so every way of reaching a driver presents the same credentials.
    """

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = ()
    # The backend token travels here: kept out of repr() so no log line can show it.
    metadata: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A new channel to `address` with these credentials; `options` first, then ours."""
        import grpc.aio

        merged = [*options, *self.options]
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=merged)
        return grpc.aio.secure_channel(address, self.credentials, options=merged)


PLAINTEXT = DriverDialing()
"""Plaintext, no token: how drivers are dialed unless told otherwise."""

# --------------------------------------------------------------------------- the probe

PROBE_SESSION_ID = "0b6f3f5e-7a0c-4c55-9d8e-2f4a6c1b9e73"
"""Session id of every probe; a constant so probes reuse one server session per driver."""
PROBE_USER_ID = "spark-router-agent"
PROBE_CONF = "spark.connect.grpc.binding.port"
_CONFIG_METHOD = "/spark.connect.SparkConnectService/Config"
_PROBE_CHANNEL_OPTIONS = [
    # No proxy: an http_proxy in the environment would otherwise capture the probe.
    ("grpc.enable_http_proxy", 0),
    # Own subchannels: channels share the process-wide pool by default, and with it the
    # reconnect backoff (1 s and growing) of a driver that was down, which would keep failing
    # probes of a restarted driver whatever new channel they use.
    ("grpc.use_local_subchannel_pool", 1),
]

Probe = Callable[[str, float], Awaitable[bool]]
Diagnosis = Callable[[str, float], Awaitable[str | None]]
"""A probe that says why it failed: None when the driver answered, else the reason."""


@functools.cache
def _probe_request() -> bytes:
    """The serialized ConfigRequest every probe sends (pyspark is imported on first use)."""
    from pyspark.sql.connect.proto import base_pb2

    request = base_pb2.ConfigRequest(
        session_id=PROBE_SESSION_ID,
        user_context=base_pb2.UserContext(user_id=PROBE_USER_ID),
        operation=base_pb2.ConfigRequest.Operation(
            get=base_pb2.ConfigRequest.Get(keys=[PROBE_CONF])
        ),
        client_type=PROBE_USER_ID,
    )
    data: bytes = request.SerializeToString()
    return data


def _binding_port(raw: bytes) -> str | None:
    """The binding-port conf of a Config answer ("" if absent); None if not the probe's."""
    from pyspark.sql.connect.proto import base_pb2

    response = base_pb2.ConfigResponse.FromString(raw)
    if str(response.session_id) != PROBE_SESSION_ID:  # as pyspark checks its own answers
        return None
    for pair in response.pairs:
        if pair.key == PROBE_CONF:
            return str(pair.value)
    return ""


async def ask_binding_port(
    address: str, timeout: float, dialing: DriverDialing = PLAINTEXT
) -> str | None:
    """One probe of `address` within `timeout` s: the driver's binding port conf, None if none.

    "" when the driver answered without the conf. `up` compares the answer with the port it
    started the driver on: another answer means some other server holds the port.
    """
    answer, _ = await _ask(address, timeout, dialing)
    return answer


async def _ask(address: str, timeout: float, dialing: DriverDialing) -> tuple[str | None, str]:
    """(the binding port conf or None, why there is none: "" when answered)."""
    import grpc

    # A fresh channel per probe (with its own subchannel): a long-lived channel's reconnect
    # backoff would keep reporting a restarted driver as unreachable long after it is back.
    channel = dialing.channel(address, _PROBE_CHANNEL_OPTIONS)
    try:
        call = channel.unary_unary(_CONFIG_METHOD)  # bytes in, bytes out
        # The gRPC deadline covers connecting too; the outer bound is a safety net.
        pending = call(_probe_request(), timeout=timeout, metadata=dialing.metadata or None)
        raw = await asyncio.wait_for(pending, timeout + 1.0)
        answer = _binding_port(raw)
        if answer is None:
            log.debug("probe of %s: answer is not for the probe session", address)
            return None, "answered for another session (not a Spark Connect driver?)"
        return answer, ""
    except grpc.RpcError as exc:
        why = _rpc_error(exc)
        log.debug("probe of %s failed: %s", address, why)
        return None, why
    except asyncio.TimeoutError:
        log.debug("probe of %s: no answer within %ss", address, timeout)
        return None, f"no answer within {timeout:g}s"
    except Exception as exc:  # a probe reports; anything going wrong is a failed probe
        log.debug("probe of %s failed: %r", address, exc)
        return None, f"probe failed: {type(exc).__name__}"
    finally:
        await channel.close()


# How much of a gRPC error's details a reason keeps: enough for "Connection refused".
_MAX_REASON = 200


def _rpc_error(exc: grpc.RpcError) -> str:
    """A short reason from a failed probe call: its code and details (no metadata)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = getattr(code, "name", None) or "error"
    if name == "DEADLINE_EXCEEDED":  # connecting or answering took the whole timeout
        return "DEADLINE_EXCEEDED: no answer within the probe timeout (hung?)"
    text = " ".join(str(details or "").split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 1] + "…"
    return f"{name}: {text}" if text else name


async def diagnose(address: str, timeout: float, dialing: DriverDialing = PLAINTEXT) -> str | None:
    """One Spark Connect Config call to `address` within `timeout` s: None if it answered.

    Else why not, in one short line (e.g. "UNAVAILABLE: failed to connect ... refused").
    """
    answer, why = await _ask(address, timeout, dialing)
    return None if answer is not None else why


async def probe(address: str, timeout: float, dialing: DriverDialing = PLAINTEXT) -> bool:
    """One Spark Connect Config call to `address` within `timeout` s; True if it answered."""
    return await diagnose(address, timeout, dialing) is None
