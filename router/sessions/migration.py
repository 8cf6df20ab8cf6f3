"""The one mover: how a session leaves its driver for another, whatever asked for it.

The data plane (dataplane/proxy.py) decides *whether* a session moves — its driver is down,
its driver is drained with move-idle and the call can move it unnoticed, or an operator
asked (admin API). `Mover.move` then does the same five steps for every reason:

1. re-read the session's pin (if another replica moved it already, follow it and stop),
   read its journal (in `migration: replay` only) and, for an operator's move, which has
   no call to read it from, ask the old driver which server-side id its client saw (as
   the session's owner) when neither an earlier move nor the data plane (which learns it
   from the session's first response: Pin.seen_id) recorded one;
2. decide, in `plan` (pure: no I/O, no clock): the id the client keeps seeing (the alias
   the data plane rewrites, or none, and Spark answers SESSION_CHANGED), the journal
   entries replayed, and how the old driver is told (`Release`: not at all when it is
   dead, in the background for a drain, awaited for an operator's move);
3. compare-and-set the pin from the old driver to the new one, alias included
   (Placement.move);
4. replay the journal on the new driver, in order;
5. release the session on the old driver as planned.

Order: the pin is committed first, the replay comes after. The compare-and-set is what
makes two replicas never send one session to two drivers; replaying before it would let
every racing replica replay (interleaved, on the same driver) before learning it lost. So:
- of several replicas moving one session, one wins the compare-and-set; only the winner
  replays and releases; the others follow its pin at once and replay nothing. A replica
  that comes after the winner (its cache not told yet) sees so when it re-reads the pin.
  Two replicas that both re-read before either's compare-and-set build the same new pin
  (same ring, same id) but for its `move_token`, fresh per move: `Registry.move` answers
  the pin in force, and only the winner finds its own token there;
- on one replica, moves of one session run one at a time: a second caller waits for the
  move under way and follows its pin (so it does not reach the new driver mid-replay);
- a move, once begun, runs to its end even if the call that began it is cancelled (its
  client went away): a committed alias must never be left over half a replay.

A replay that fails is never silent. A replayed call that fails is retried once on the
same new driver, resuming at that call: the calls before it were acknowledged. Not from
the start: a half-applied replay re-run from the start fails where the first run had
succeeded — `CREATE TEMP VIEW`, `df.createTempView`, `CREATE TEMPORARY FUNCTION` and
`DECLARE VARIABLE` without OR REPLACE refuse a name that now exists — and the half-built
session cannot be dropped to start clean (Spark refuses a released session id for good:
SESSION_CLOSED). Re-sending only the failed call is safe even if it had taken effect
before its answer was lost: every journaled call sets state to a value (set, unset,
create-or-replace, drop, use), so twice is once; a create that is not or-replace then
fails, which is the honest outcome below. If the retry fails too, the pin is
compare-and-set again, on the same driver, without its alias ("strict"): the router stops
rewriting ids, so Spark itself answers the client's next call — pyspark sends its observed
id on every call — with INVALID_HANDLE.SESSION_CHANGED, and pyspark closes the session.
`spark_router_replays_failed_total{pool,reason}` counts it and one warning is logged. If
that second compare-and-set finds the pin changed (another replica moved it on: the new
driver died too), the mover follows it.

The call that moved the session then goes on, on the pin in force: after a failed replay
it gets Spark's SESSION_CHANGED from the new driver (INTERNAL with Spark's error class),
or, if the new driver is unreachable, the data plane's UNAVAILABLE naming it and a move
as from any dead driver on the next try — with the full journal and the id the client
sends. Never UNAVAILABLE for the failed replay itself: pyspark retries UNAVAILABLE for
minutes, and the retry would reach the half-built session with its id still rewritten.

Known windows, left open: (a) between the compare-and-set and the end of the replay,
calls of the session that follow the new pin without moving it (through other replicas,
or this one's cache) reach the new driver before its state is complete; (b) for a drain
or an operator's move the old driver is alive, and a state-building call that completes
there after the journal was read (a replica that has not heard of the move yet) is not
replayed. A single client's sequential calls (pyspark's own) open neither: the moving call
is the only one. Clients that never send their observed id are not told by Spark, here
as after any strict move.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import grpc
import grpc.aio

from registry.base import Registry, RegistryUnavailable
from registry.models import Pin
from router.dataplane import protocol, wire
from router.errors import NoLiveDriver
from router.sessions import journal
from router.sessions.placement import Placement, choose
from router.telemetry import Telemetry
from router.upstreams import Upstreams

__all__ = ["REPLAY_ATTEMPTS", "MovePlan", "Mover", "Reason", "Release", "plan"]

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]

REPLAY_ATTEMPTS = 2  # the replay and one retry, resuming at the call that failed
_REPLAY_TIMEOUT = 60.0  # seconds per replayed call: a temp view's plan may take a while
_OLD_DRIVER_TIMEOUT = 10.0  # asking or releasing the old driver, which may be going away


class Reason(str, enum.Enum):
    """Why a session moves: the `reason` label of the move metrics."""

    DRIVER_DOWN = "driver_down"
    DRAIN = "drain"
    ADMIN = "admin"


class Release(enum.Enum):
    """How the driver a session left is told to release it."""

    NONE = "none"  # it is dead
    BACKGROUND = "background"  # a drain: the client's call does not wait for the old driver
    AWAIT = "await"  # an operator's move: the answer means the old driver let it go


# The most drivers a pin remembers its session moved off, or released on (the latest kept).
MAX_MOVED_OFF = 8


def _latest(drivers: tuple[str, ...], address: str) -> tuple[str, ...]:
    """`drivers` with `address` as its latest, at most MAX_MOVED_OFF of them."""
    return (*(a for a in drivers if a != address), address)[-MAX_MOVED_OFF:]


_RELEASES = {
    Reason.DRIVER_DOWN: Release.NONE,
    Reason.DRAIN: Release.BACKGROUND,
    Reason.ADMIN: Release.AWAIT,
}


@dataclass(frozen=True)
class MovePlan:
    """What one move does, decided before it touches anything."""

    alias: str | None  # the server-side id the client keeps seeing; None: SESSION_CHANGED
    replay: tuple[bytes, ...]  # journal entries rebuilt on the new driver, in order
    release: Release


def plan(
    pin: Pin,
    reason: Reason,
    migration: str,
    entries: Sequence[bytes] | None,
    observed: str | None,
) -> MovePlan | None:
    """How a session moves (`entries` None: overflowed); None: a drain leaves it where it is.

    The state comes along when it can (replay mode, complete journal); the identity too
    when, besides, an id is known — an earlier move's alias first, else the one the call
    observed, else the one the router saw the first driver give the client (Pin.seen_id).
    A state replayed without an identity is still right: a client that saw no id yet gets
    its whole session, one that did gets SESSION_CHANGED from Spark. A drain moves only a
    session that keeps both, since it must go unnoticed.
    """
    replay: tuple[bytes, ...] = ()
    if migration == "replay" and entries is not None:
        replay = tuple(entries)
        alias = pin.server_side_id or observed or pin.seen_id or None
    else:
        alias = None
    if reason is Reason.DRAIN and alias is None:
        return None
    return MovePlan(alias, replay, _RELEASES[reason])


class Mover:
    """Moves sessions between drivers: the I/O around `plan` (registry, channels, metrics)."""

    def __init__(
        self,
        placement: Placement,
        registry: Registry,
        upstreams: Upstreams,
        migration: str,
        telemetry: Telemetry,
    ) -> None:
        self._placement = placement
        self._registry = registry
        self._upstreams = upstreams
        self._migration = migration
        self._telemetry = telemetry
        # Called with (old pin, new pin, reason) after each move this replica made (audit).
        self.on_moved: Callable[[Pin, Pin, str], None] | None = None
        self._moving: dict[str, asyncio.Future[tuple[Pin, bool]]] = {}  # session -> its move
        self._background: set[asyncio.Future[None]] = set()  # drains' releases

    async def move(
        self,
        pin: Pin,
        reason: Reason,
        *,
        observed: str | None = None,
        target: str | None = None,
        metadata: Metadata = (),
    ) -> tuple[Pin, bool]:
        """Move a session off `pin.driver`: (the pin in force, whether this call moved it).

        `observed` is the server-side id the moving call carries; `target` an operator's
        driver, else the ring chooses; `metadata` goes with the replay and the release (the
        moving call's, so its credentials reach the new driver). Raises NoLiveDriver when
        there is nowhere to go.
        """
        # An operator's move brings no call: the router's own driver credentials go instead.
        metadata = metadata or self._upstreams.auth_metadata
        key = pin.key
        running = self._moving.get(key)
        if running is not None:
            winner, _ = await asyncio.shield(running)
            return winner, False
        task = asyncio.ensure_future(self._move(pin, reason, observed, target, metadata))
        self._moving[key] = task
        task.add_done_callback(lambda done: self._moved(key, done))
        # Shielded: a client that goes away must not stop a replay behind a committed alias.
        return await asyncio.shield(task)

    def _moved(self, key: str, task: asyncio.Future[tuple[Pin, bool]]) -> None:
        if self._moving.get(key) is task:
            del self._moving[key]
        if not task.cancelled():
            task.exception()  # retrieved: its callers, if any are left, have it

    async def _move(
        self,
        pin: Pin,
        reason: Reason,
        observed: str | None,
        target: str | None,
        metadata: Metadata,
    ) -> tuple[Pin, bool]:
        if target is None:
            rings = self._placement.rings
            target = choose(
                pin.session_id, pin.pool, rings, pin.driver, pin.moved_off, pin.released_on
            )
        elif not self._placement.is_live(target):
            raise NoLiveDriver(f"driver {target} is down")
        current = await self._current(pin)
        if current is not None and current.driver != pin.driver:
            # Another replica moved it already (its event is not here yet): follow it.
            self._placement.cache.put(current)
            return current, False
        if current is not None and pin.seen_id is None and current.seen_id is not None:
            pin = replace(pin, seen_id=current.seen_id)  # learned by another replica
        entries = None
        if self._migration == "replay":
            entries = await self._registry.journal(pin.key)
            if entries is not None:
                entries = journal.settle(entries)
            if (
                entries is not None
                and reason is Reason.ADMIN
                and not (pin.server_side_id or pin.seen_id)
            ):
                observed = observed or await self._server_side_id(pin)
        decided = plan(pin, reason, self._migration, entries, observed)
        if decided is None:
            return pin, False
        moved_off, released_on = pin.moved_off, pin.released_on
        upstream = pin.upstream_id
        if target != pin.driver:  # not a rebuild on a restarted driver (Proxy._rebuilt)
            moved_off = _latest(moved_off, pin.driver)
            if decided.release is not Release.NONE:
                released_on = _latest(released_on, pin.driver)
        if target in released_on:
            # That driver refuses the id for good (SESSION_CLOSED): the session goes there
            # under an id of its own, unknown to every driver, so nothing is left to avoid.
            upstream, moved_off, released_on = str(uuid.uuid4()), (), ()
        new = replace(
            pin,
            driver=target,
            server_side_id=decided.alias,
            move_token=uuid.uuid4().hex,  # tells this move's pin from a racing replica's
            moves=pin.moves + 1,
            moved_off=moved_off,
            released_on=released_on,
            upstream_id=upstream,
        )
        winner, moved_here = await self._placement.move(pin, new)
        if not moved_here:
            return winner, False  # another replica moved it first: follow, replay nothing
        self._telemetry.sessions_moved.labels(pin.pool, reason.value).inc()
        if self.on_moved is not None:
            self.on_moved(pin, winner, reason.value)
        log.info(
            "session %s moved from %s to %s (%s)",
            pin.session_id,
            pin.driver,
            winner.driver,
            reason.value.replace("_", " "),
        )
        if decided.replay:
            winner = await self._replay(winner, decided.replay, metadata, reason)
        if decided.release is Release.AWAIT:
            await self.release_on(pin, metadata)
        elif decided.release is Release.BACKGROUND:
            task = asyncio.ensure_future(self.release_on(pin, metadata))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return winner, True

    async def _current(self, pin: Pin) -> Pin | None:
        """The session's pin as the registry has it now (`pin` itself when it cannot say)."""
        try:
            return await self._registry.get_pin(pin.key)
        except RegistryUnavailable:
            return pin  # degraded: the compare-and-set moves it locally, as for a new session

    async def _replay(
        self, pin: Pin, entries: Sequence[bytes], metadata: Metadata, reason: Reason
    ) -> Pin:
        """Rebuild a moved session's state on its new driver; the pin in force afterwards."""
        start = time.perf_counter()
        done = 0
        failure: Exception | None = None
        with self._telemetry.span(
            "journal.replay", **{"spark.session_id": pin.session_id, "router.driver": pin.driver}
        ) as span:
            for _ in range(REPLAY_ATTEMPTS):
                failure = None
                channel = self._upstreams.channel(pin.driver)
                try:
                    for raw in entries[done:]:
                        await _send(channel, raw, metadata, pin.upstream_id)
                        done += 1
                    break
                except (grpc.aio.AioRpcError, ValueError) as exc:  # ValueError: a bad entry
                    failure = exc
            if span is not None:
                span.set_attribute("router.replayed_calls", done)
        self._telemetry.replay_seconds.observe(time.perf_counter() - start)
        if failure is None:
            log.info("session %s: replayed %d calls on %s", pin.session_id, done, pin.driver)
            return pin
        self._telemetry.replays_failed.labels(pin.pool, reason.value).inc()
        log.warning(
            "session %s moved to %s, but replaying its state failed at call %d of %d, "
            "%d times (%s): it goes on there without its identity; its client gets "
            "SESSION_CHANGED",
            pin.session_id,
            pin.driver,
            done + 1,
            len(entries),
            REPLAY_ATTEMPTS,
            _describe(failure),
        )
        if pin.server_side_id is None:
            return pin  # nothing rewritten: Spark already tells a client that saw an id
        winner, _ = await self._placement.move(pin, replace(pin, server_side_id=None))
        return winner

    async def _server_side_id(self, pin: Pin) -> str | None:
        """The server-side id a session has on its driver (asked as its owner), or None."""
        from pyspark.sql.connect.proto import base_pb2

        request = base_pb2.ConfigRequest(session_id=pin.driver_session_id)
        request.user_context.user_id = pin.owner or ""
        request.operation.is_modifiable.keys.append("spark.sql.shuffle.partitions")
        try:
            response = await self._upstreams.channel(pin.driver).unary_unary(
                protocol.PATH_PREFIX + "Config"
            )(
                request.SerializeToString(),
                metadata=self._upstreams.auth_metadata,
                timeout=_OLD_DRIVER_TIMEOUT,
            )
        except grpc.aio.AioRpcError:
            return None
        field = protocol.METHODS["Config"].response_server_side_field
        return wire.read_string(response, field) or None

    async def release_on(self, pin: Pin, metadata: Metadata) -> None:
        """Close a session on `pin.driver` (a moved one there, a refused clone; best effort)."""
        from pyspark.sql.connect.proto import base_pb2

        request = base_pb2.ReleaseSessionRequest(session_id=pin.driver_session_id)
        request.user_context.user_id = pin.owner or ""
        path = protocol.PATH_PREFIX + "ReleaseSession"
        try:
            await self._upstreams.channel(pin.driver).unary_unary(path)(
                request.SerializeToString(), metadata=tuple(metadata), timeout=_OLD_DRIVER_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            log.info("session %s: release on %s failed: %s", pin.session_id, pin.driver, exc)


async def _send(
    channel: grpc.aio.Channel, raw: bytes, metadata: Metadata, upstream: str | None
) -> None:
    """Replay one journal entry (as session `upstream` if set); raises what the driver
    answered if it failed."""
    entry = journal.JournalEntry.decode(raw)
    path = protocol.PATH_PREFIX + entry.method
    md = tuple(metadata)
    if entry.method == journal.ARTIFACTS:
        chunks = [
            journal.for_replay(entry.method, m, upstream) for m in journal.unframe(entry.request)
        ]
        await channel.stream_unary(path)(_each(chunks), metadata=md, timeout=_REPLAY_TIMEOUT)
        return
    body = journal.for_replay(entry.method, entry.request, upstream)
    if entry.method == "ExecutePlan":
        async for _ in channel.unary_stream(path)(body, metadata=md, timeout=_REPLAY_TIMEOUT):
            pass
    else:
        await channel.unary_unary(path)(body, metadata=md, timeout=_REPLAY_TIMEOUT)


async def _each(messages: list[bytes]) -> AsyncIterator[bytes]:
    """A request stream of the given messages."""
    for message in messages:
        yield message


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"a damaged journal entry: {exc}"
