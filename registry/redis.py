"""Redis registry: pins and driver membership shared by every replica (`redis://`).

Key schema (`P` is the `prefix` option, default "spark-router"; the braces are a Redis
Cluster hash tag, so every key and the channel hash to one slot and the Lua scripts below
may touch them together):

    {P}:pin:<session_id>    string  JSON [driver address, pool, server-side id alias or null,
                                    owner or null, created unix time or null, moves
                                    (, move token: moved pins only)],
                                    PEXPIRE pin_ttl
    {P}:sessions:<address>  set     session ids pinned to the driver (members whose pin has
                                    expired are dropped when it is listed); PEXPIRE pin_ttl,
                                    refreshed by binds, moves and `touch`
    {P}:expiry              zset    member = session key, driver and pool of every pin,
                                    joined by 0x1f (ASCII unit separator); score = a lower
                                    bound of its expiry (Redis time, s): `expired_pins`
                                    reports and drops the members whose pin is gone and
                                    re-scores those touched since; binds and moves write
                                    members, a release drops its own
    {P}:drivers             zset    member = driver address, score = expiry as unix time in
                                    seconds (Redis server clock), +inf for a static driver
    {P}:driver:<address>    hash    pool, weight, state; expires 60 s after its zset entry
                                    (never, for a static driver)
    {P}:draining            hash    address -> drain mode ("keep" | "move-idle") of the
                                    drivers an operator marked draining (spark-router drain)
    {P}:events              pub/sub channel: JSON {"kind", "driver", "pin", "session_id"}
    {P}:journal:<session_id>        list    the session's journal entries (raw bytes), in
                                            append order; PEXPIRE pin_ttl
    {P}:journal-bytes:<session_id>  string  their total size in bytes, or -1 once the journal
                                            overflowed (the list is then deleted); PEXPIRE
                                            pin_ttl
    {P}:quota:sessions:<user>  zset    member = session key counted against the user, score
                                       = its reservation's expiry (Redis time, s); a member
                                       counts while {P}:pin:<member> exists or until its
                                       score; PEXPIRE pin_ttl, refreshed by acquires and by
                                       `touch` of any of the user's sessions
    {P}:quota:replicas         zset    member = replica id, score = expiry of its slot leases
    {P}:quota:slots:<user>     hash    replica id -> "<held> <busy>" operation slots; fields of
                                       replicas whose lease expired are dropped by acquires;
                                       PEXPIRE lease_ttl, refreshed by every write
    {P}:quota:tokens:<bucket>  string  "<tokens> <time of the last refill>" (Redis time, s);
                                       PEXPIRE the time it takes to refill from empty, plus 1 s
                                       (a bucket left that long is full: forgetting it is exact)

Race rules:
- `bind` is one Lua script (GET, else SET PX): create-if-absent that returns the winner in
  one round trip. Redis 6.2 has no `SET NX GET`. Concurrent binds of a session all return
  the pin of whichever script ran first.
- `move` is a Lua compare-and-set: the pin is replaced only if it still names `expected`,
  and the script publishes PIN_MOVED in the same atomic step, so a replica never hears of a
  move that did not happen nor misses one that did (while it is subscribed).
- `release` and `remove_driver` delete and publish in one script; they publish only if
  something was there. `upsert_driver` writes the hash and the zset score in one script
  that compares with the previous record: DRIVER_JOINED if the driver was not live,
  DRIVER_CHANGED if pool, weight or state changed, nothing for a plain heartbeat.
- `journal_append` is one Lua script: check the byte counter against the cap, then RPUSH
  and update the counter (or delete the list and set the counter to -1), refreshing both
  TTLs, so concurrent appends from any replicas land each exactly once, in one order, and
  never beyond the cap. `journal` reads counter and list in one script (atomic: never a
  half-overflowed view), with decoding off since entries are bytes. `touch` refreshes
  the journal keys in the same pipeline as the pins.
- Quota counters are one Lua script each (`quota_session_acquire`, `quota_slots_acquire`,
  `quota_slots_sync`, `quota_tokens_lease`): purge what no longer counts, compare with the
  limit, write, all in one atomic step, so concurrent acquires from any replicas never
  count past a limit. A session counts from its pin: a released or expired pin frees its
  slot without any quota write. `quota_session_release` is one ZREM. `touch` refreshes
  the TTL of each touched user's session counter in the same pipeline as the pins.
- Expiry is judged by the Redis server's clock (TIME inside the scripts), never by the
  replicas' clocks. `drivers()` drops expired members (and their hashes) as it reads;
  an expired driver produces no event by itself: subscribers also poll `drivers()`.
- Scripts address keys they build from the prefix (not declared in KEYS: driver hashes,
  pins counted by a session counter, slot hashes written by a sync); this is safe on Redis
  Cluster only because the hash tag keeps them all in the slot of KEYS[1].

Connections: `from_url` builds the client with `socket_timeout` and
`socket_connect_timeout` (default 1 s each) and one retry on a refused or dropped
connection (never on a timeout). At most `max_in_flight` commands (default 64) run at once
per instance; further callers queue for up to `queue_timeout` (default 5 s). redis-py 8
speaks RESP3, so Redis >= 6 is required; Sentinel URLs are resolved through
`redis.asyncio.sentinel.Sentinel(...).master_for(name)`, which follows failovers.

When Redis is down or hung: every operation raises `RegistryUnavailable` (its message
names the server, never the password) after at most about `socket_timeout`; a refused
connection fails at once. Nothing else escapes. A write that timed out may still be
applied when a hung Redis resumes: its outcome is unknown, so callers re-read the pin
rather than assume. The first operation after a restart replaces stale pooled
connections without an error. `events()` does not raise: it logs one warning per outage,
reconnects with bounded exponential backoff (`events_max_backoff`, default 2 s) and keeps
yielding; events published during the outage are lost (callers also poll `drivers()`).
A subscription that stays silent is checked with PING every `events_ping_interval`
seconds (default 5), so a hung Redis is noticed within two intervals. Pins and drivers
written before a restart of a Redis without persistence are gone: replicas re-bind from
their caches and drivers re-register with their next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.client import NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from common.addresses import redact_url
from registry.base import DEFAULT_PIN_TTL, RegistryUnavailable, check_bucket
from registry.models import (
    DEFAULT_POOL,
    DrainMode,
    Driver,
    DriverState,
    Event,
    EventKind,
    Pin,
    SessionGrant,
    SlotGrant,
    TokenGrant,
    drain_marker,
    split_key,
)

__all__ = ["DEFAULT_PREFIX", "SCHEMES", "RedisRegistry"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "spark-router"
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_MAX_IN_FLIGHT = 64
# A driver hash outlives its zset entry by this much, so a live member never lacks its hash.
DRIVER_HASH_GRACE_MS = 60_000

T = TypeVar("T")

# KEYS: pin. ARGV: pin, ttl ms, session set key of the pin's driver, session id, expiry
# zset, the pin's expiry member
_BIND = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', ARGV[3], ARGV[4])
redis.call('PEXPIRE', ARGV[3], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', ARGV[5], now + tonumber(ARGV[2]) / 1000, ARGV[6])
return ARGV[1]
"""

# KEYS: pin. ARGV: expected driver, new pin, ttl ms, channel, PIN_MOVED event,
# session set key prefix, new driver, session id, expiry zset, the new pin's expiry member
_MOVE = """
local current = redis.call('GET', KEYS[1])
if not current then return false end
local old = cjson.decode(current)
if old[1] ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SREM', ARGV[6] .. ARGV[1], ARGV[8])
redis.call('SADD', ARGV[6] .. ARGV[7], ARGV[8])
redis.call('PEXPIRE', ARGV[6] .. ARGV[7], ARGV[3])
redis.call('ZREM', ARGV[9], ARGV[8] .. '\\31' .. old[1] .. '\\31' .. tostring(old[2]))
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', ARGV[9], now + tonumber(ARGV[3]) / 1000, ARGV[10])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return ARGV[2]
"""

# KEYS: pin. ARGV: channel, PIN_RELEASED event, session set key prefix, session id,
# expiry zset
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local pin = cjson.decode(current)
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[3] .. pin[1], ARGV[4])
redis.call('ZREM', ARGV[5], ARGV[4] .. '\\31' .. pin[1] .. '\\31' .. tostring(pin[2]))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# KEYS: expiry zset. ARGV: pin key prefix, limit, pin ttl ms.
# The members due whose pin is gone (or names another driver or pool: it lapsed and the
# session was pinned afresh) are dropped and returned; the others were touched since and
# get their pin's real expiry as score. Each lapsed pin is returned to one caller, once.
_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  local key, driver, pool = string.match(member, '^(.*)\\31([^\\31]*)\\31([^\\31]*)$')
  local pin = key and redis.call('GET', ARGV[1] .. key)
  local live = false
  if pin then
    local fields = cjson.decode(pin)
    live = fields[1] == driver and tostring(fields[2]) == pool
  end
  if live then
    local ttl = redis.call('PTTL', ARGV[1] .. key)
    if ttl < 0 then ttl = tonumber(ARGV[3]) end
    redis.call('ZADD', KEYS[1], now + ttl / 1000, member)
  else
    redis.call('ZREM', KEYS[1], member)
    out[#out + 1] = member
  end
end
return out
"""

# KEYS: session set of a driver. ARGV: pin key prefix, driver, limit.
# Returns a flat list: session id, pin, ...; drops members whose pin expired or moved away.
_SESSIONS = """
local out = {}
for _, session in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local pin = redis.call('GET', ARGV[1] .. session)
  if (not pin) or cjson.decode(pin)[1] ~= ARGV[2] then
    redis.call('SREM', KEYS[1], session)
  elseif #out < 2 * tonumber(ARGV[3]) then
    out[#out + 1] = session
    out[#out + 1] = pin
  end
end
return out
"""

# KEYS: drivers zset, driver hash. ARGV: address, pool, weight, state,
# ttl seconds ('' = static), hash ttl ms, channel, DRIVER_JOINED event, DRIVER_CHANGED event
_UPSERT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local old = redis.call('HMGET', KEYS[2], 'pool', 'weight', 'state')
local live = false
if score and old[1] then
  live = score == 'inf' or score == '+inf' or tonumber(score) > now
end
redis.call('HSET', KEYS[2], 'pool', ARGV[2], 'weight', ARGV[3], 'state', ARGV[4])
if ARGV[5] == '' then
  redis.call('PERSIST', KEYS[2])
  redis.call('ZADD', KEYS[1], '+inf', ARGV[1])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[5])), ARGV[1])
end
if not live then
  redis.call('PUBLISH', ARGV[7], ARGV[8])
  return 1
elseif old[1] ~= ARGV[2] or old[2] ~= ARGV[3] or old[3] ~= ARGV[4] then
  redis.call('PUBLISH', ARGV[7], ARGV[9])
  return 2
end
return 0
"""

# KEYS: drivers zset. ARGV: driver hash key prefix.
# Returns a flat list: address, pool, weight, state, address, ...
_DRIVERS = """
local t = redis.call('TIME')
local now = string.format('%.17g', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  for _, address in ipairs(expired) do redis.call('DEL', ARGV[1] .. address) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local out = {}
for _, address in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local h = redis.call('HMGET', ARGV[1] .. address, 'pool', 'weight', 'state')
  if h[1] then
    out[#out + 1] = address
    out[#out + 1] = h[1]
    out[#out + 1] = h[2] or '1'
    out[#out + 1] = h[3] or 'active'
  end
end
return out
"""

# KEYS: drivers zset, driver hash. ARGV: address, channel, DRIVER_LEFT kind, default pool
_REMOVE = """
local h = redis.call('HMGET', KEYS[2], 'pool', 'weight', 'state')
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if removed == 1 or h[1] then
  local driver = {address = ARGV[1], pool = h[1] or ARGV[4],
                  weight = tonumber(h[2]) or 1, state = h[3] or 'active'}
  redis.call('PUBLISH', ARGV[2], cjson.encode({kind = ARGV[3], driver = driver}))
  return 1
end
return 0
"""


# KEYS: journal list, byte counter. ARGV: entry, cap bytes, ttl ms. Returns 1 if appended.
_JOURNAL_APPEND = """
local size = tonumber(redis.call('GET', KEYS[2]) or '0')
if size < 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 0
end
size = size + string.len(ARGV[1])
if size > tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '-1', 'PX', ARGV[3])
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], size, 'PX', ARGV[3])
return 1
"""

# KEYS: journal list, byte counter. Returns {counter or false, {entries}}.
_JOURNAL_READ = """
return {redis.call('GET', KEYS[2]), redis.call('LRANGE', KEYS[1], 0, -1)}
"""


# KEYS: the user's session zset. ARGV: session key, limit, reservation ttl s, pin key
# prefix, zset ttl ms. Returns {granted 0/1, count}.
_SESSION_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local others, mine = 0, false
for i = 1, #members, 2 do
  local m = members[i]
  if tonumber(members[i + 1]) > now or redis.call('EXISTS', ARGV[4] .. m) == 1 then
    if m == ARGV[1] then mine = true else others = others + 1 end
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
if (not mine) and others >= tonumber(ARGV[2]) then return {0, others} end
local until_ = now + tonumber(ARGV[3])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) < until_ then
  redis.call('ZADD', KEYS[1], string.format('%.17g', until_), ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, others + 1}
"""

# KEYS: the user's slot hash, the replicas zset. ARGV: replica, limit, lease ttl s,
# lease ttl ms. Returns {granted 0/1, held, busy} over the replicas with live leases.
_SLOTS_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[2], string.format('%.17g', now + tonumber(ARGV[3])), ARGV[1])
local fields = redis.call('HGETALL', KEYS[1])
local held, busy, mine_h, mine_b = 0, 0, 0, 0
for i = 1, #fields, 2 do
  local replica = fields[i]
  local h, b = string.match(fields[i + 1], '^(%d+) (%d+)$')
  h, b = tonumber(h) or 0, tonumber(b) or 0
  if replica == ARGV[1] then
    mine_h, mine_b = h, b
  else
    local expiry = redis.call('ZSCORE', KEYS[2], replica)
    if expiry and tonumber(expiry) > now then
      held, busy = held + h, busy + b
    else
      redis.call('HDEL', KEYS[1], replica)
    end
  end
end
held, busy = held + mine_h, busy + mine_b
if held >= tonumber(ARGV[2]) then return {0, held, busy} end
redis.call('HSET', KEYS[1], ARGV[1], (mine_h + 1) .. ' ' .. (mine_b + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, held + 1, busy + 1}
"""

# KEYS: the replicas zset. ARGV: replica, lease ttl s, lease ttl ms, slot hash key prefix,
# then user, held, busy for each user. Returns how many replicas hold live leases.
_SLOTS_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
for i = 5, #ARGV, 3 do
  local key = ARGV[4] .. ARGV[i]
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', key, ARGV[1], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
    redis.call('PEXPIRE', key, ARGV[3])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: the bucket. ARGV: rate per s, burst, want. Returns {granted, retry after s (text)}.
_TOKENS_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, last = burst, now
local value = redis.call('GET', KEYS[1])
if value then
  local a, b = string.match(value, '^(%S+) (%S+)$')
  tokens, last = tonumber(a) or burst, tonumber(b) or now
end
if now > last then tokens = tokens + (now - last) * rate end
if tokens > burst then tokens = burst end
local granted = math.floor(tokens)
if granted > want then granted = want end
if granted < 0 then granted = 0 end
tokens = tokens - granted
local ttl = math.ceil((burst - tokens) / rate * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.17g %.17g', tokens, now), 'PX', ttl)
local retry = 0
if granted == 0 then retry = (1 - tokens) / rate end
return {granted, string.format('%.6f', retry)}
"""


class RedisRegistry:
    """Pins and drivers in Redis, shared by every replica that uses the same prefix."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        pin_ttl: float = DEFAULT_PIN_TTL,
        location: str | None = None,
        events_ping_interval: float = 5.0,
        events_max_backoff: float = 2.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        queue_timeout: float = 5.0,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty and without braces, got {prefix!r}")
        if not pin_ttl > 0:
            raise ValueError(f"pin_ttl must be > 0 seconds, got {pin_ttl!r}")
        if not events_ping_interval > 0 or not events_max_backoff > 0 or not queue_timeout > 0:
            raise ValueError("events_ping_interval, events_max_backoff, queue_timeout must be > 0")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        self._client = client
        self._tag = "{" + prefix + "}"
        self._pin_ttl_ms = max(1, round(pin_ttl * 1000))
        self._location = location or _describe(client)
        self._ping_interval = events_ping_interval
        self._max_backoff = events_max_backoff
        self._drivers_key = f"{self._tag}:drivers"
        self._driver_prefix = f"{self._tag}:driver:"
        self._channel = f"{self._tag}:events"
        self._draining_key = f"{self._tag}:draining"
        self._sessions_prefix = f"{self._tag}:sessions:"
        self._pin_prefix = f"{self._tag}:pin:"
        self._bind = client.register_script(_BIND)
        self._move = client.register_script(_MOVE)
        self._release = client.register_script(_RELEASE)
        self._expired = client.register_script(_EXPIRED)
        self._expiry_key = f"{self._tag}:expiry"
        self._sessions = client.register_script(_SESSIONS)
        self._upsert = client.register_script(_UPSERT)
        self._drivers = client.register_script(_DRIVERS)
        self._remove = client.register_script(_REMOVE)
        self._journal_append = client.register_script(_JOURNAL_APPEND)
        self._journal_read = client.register_script(_JOURNAL_READ)
        self._session_acquire = client.register_script(_SESSION_ACQUIRE)
        self._slots_acquire = client.register_script(_SLOTS_ACQUIRE)
        self._slots_sync = client.register_script(_SLOTS_SYNC)
        self._tokens_lease = client.register_script(_TOKENS_LEASE)
        self._quota_sessions_prefix = f"{self._tag}:quota:sessions:"
        self._quota_slots_prefix = f"{self._tag}:quota:slots:"
        self._quota_replicas_key = f"{self._tag}:quota:replicas"
        self._quota_tokens_prefix = f"{self._tag}:quota:tokens:"
        # Bounds concurrent commands (so connections) per instance; extra callers queue.
        self._max_in_flight = max_in_flight
        self._queue_timeout = queue_timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._closed = asyncio.Event()
        self._pubsubs: set[PubSub] = set()
        # Extra resources from_url() created next to the client (Sentinel connections).
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        retries: int = 1,
        **options: Any,
    ) -> RedisRegistry:
        """A registry on the Redis of a redis://, rediss://, unix:// or redis+sentinel:// URL."""
        scheme = urlsplit(url).scheme.lower()
        if scheme not in SCHEMES:
            accepted = ", ".join(f"{s}://" for s in SCHEMES)
            raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use one of {accepted}")
        timeouts: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
        }
        options.setdefault("location", redact_url(url))
        # Commands are bounded by max_in_flight; the rest is room for events() subscriptions.
        max_connections = int(options.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)) + 64
        if scheme != "redis+sentinel":
            client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                retry=_retry(retries),
                max_connections=max_connections,
                **timeouts,
            )
            return cls(client, **options)
        hosts, service, db, username, password = _parse_sentinel_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            hosts, sentinel_kwargs={**timeouts, "retry": _retry(retries), "decode_responses": True}
        )
        client = sentinel.master_for(
            service,
            db=db,
            username=username,
            password=password,
            decode_responses=True,
            retry=_retry(retries),
            max_connections=max_connections,
            **timeouts,
        )
        registry = cls(client, **options)
        registry._on_close.append(sentinel.aclose)
        return registry

    # --- pins ---------------------------------------------------------------------------

    def _pin_key(self, session_id: str) -> str:
        return f"{self._tag}:pin:{session_id}"

    async def get_pin(self, session_id: str) -> Pin | None:
        """The pin of a session, or None."""
        value = await self._call("get_pin", lambda: self._client.get(self._pin_key(session_id)))
        return None if value is None else _decode_pin(session_id, value)

    async def claim(self, session_id: str, owner: str) -> str:
        """Bind a session id to `owner` unless another user holds it: the owner in force."""
        key = f"{self._tag}:claim:{session_id}"

        async def set_or_get() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(key, owner, nx=True, px=self._pin_ttl_ms)
                pipe.get(key)
                return await pipe.execute()

        _, holder = await self._call("claim", set_or_get)
        return owner if holder is None else _text(holder)

    async def bind(self, pin: Pin) -> Pin:
        """Store `pin` unless the session is already pinned; return the pin in force."""
        value = await self._script(
            "bind",
            self._bind,
            keys=[self._pin_key(pin.key)],
            args=[
                _encode_pin(pin),
                self._pin_ttl_ms,
                self._sessions_prefix + pin.driver,
                pin.key,
                self._expiry_key,
                _expiry_member(pin.key, pin),
            ],
        )
        return _decode_pin(pin.key, value)

    async def move(self, session_id: str, expected: str, pin: Pin) -> Pin | None:
        """Replace the pin if it still names driver `expected`; return the pin in force."""
        event = Event(EventKind.PIN_MOVED, pin=pin, session_id=session_id)
        value = await self._script(
            "move",
            self._move,
            keys=[self._pin_key(session_id)],
            args=[
                expected,
                _encode_pin(pin),
                self._pin_ttl_ms,
                self._channel,
                _encode(event),
                self._sessions_prefix,
                pin.driver,
                session_id,
                self._expiry_key,
                _expiry_member(session_id, pin),
            ],
        )
        return None if value is None else _decode_pin(session_id, value)

    async def release(self, session_id: str) -> None:
        """Forget a session's pin and announce it (if it had one)."""
        event = Event(EventKind.PIN_RELEASED, session_id=session_id)
        await self._script(
            "release",
            self._release,
            keys=[self._pin_key(session_id)],
            args=[
                self._channel,
                _encode(event),
                self._sessions_prefix,
                session_id,
                self._expiry_key,
            ],
        )

    async def expired_pins(self, limit: int = 1000) -> list[Pin]:
        """Up to `limit` pins that lapsed by their TTL, each reported once, to one caller."""
        members = await self._script(
            "expired_pins",
            self._expired,
            keys=[self._expiry_key],
            args=[self._pin_prefix, limit, self._pin_ttl_ms],
        )
        lapsed = []
        for member in members:
            key, driver, pool = _text(member).rsplit("\x1f", 2)
            user, session_id = split_key(key)
            lapsed.append(Pin(session_id, driver, pool, owner=user))
        return lapsed

    async def sessions(self, driver: str | None = None, limit: int = 1000) -> list[Pin]:
        """Up to `limit` live pins: those on `driver` (one round trip), or any (a SCAN)."""
        if driver is not None:
            flat = await self._script(
                "sessions",
                self._sessions,
                keys=[self._sessions_prefix + driver],
                args=[self._pin_prefix, driver, limit],
            )
            return [_decode_pin(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

        async def scan() -> list[Pin]:
            found: list[Pin] = []
            async for key in self._client.scan_iter(match=self._pin_prefix + "*", count=1000):
                value = await self._client.get(key)
                if value is not None:
                    found.append(_decode_pin(_text(key)[len(self._pin_prefix) :], value))
                    if len(found) >= limit:
                        break
            return found

        return await self._call("sessions", scan)

    async def touch(self, session_ids: Collection[str], drivers: Collection[str] = ()) -> None:
        """Refresh the TTL of the live pins among `session_ids`, in one round trip."""
        if not session_ids:
            return

        async def pexpire_all() -> list[Any]:
            users: set[str] = set()
            async with self._client.pipeline(transaction=False) as pipe:
                for driver in drivers:
                    pipe.pexpire(self._sessions_prefix + driver, self._pin_ttl_ms)
                for session_id in session_ids:
                    pipe.pexpire(self._pin_key(session_id), self._pin_ttl_ms)
                    user, bare = split_key(session_id)
                    users.add(user or "")
                    if user is not None:
                        pipe.pexpire(f"{self._tag}:claim:{bare}", self._pin_ttl_ms)
                    for key in self._journal_keys(session_id):
                        pipe.pexpire(key, self._pin_ttl_ms)
                for user in users:  # a user's session counter lives as long as their pins
                    pipe.pexpire(self._quota_sessions_prefix + user, self._pin_ttl_ms)
                return await pipe.execute()

        await self._call("touch", pexpire_all)

    # --- journals -----------------------------------------------------------------------

    def _journal_keys(self, session_id: str) -> list[str]:
        return [f"{self._tag}:journal:{session_id}", f"{self._tag}:journal-bytes:{session_id}"]

    async def journal_append(self, session_id: str, entry: bytes, cap: int) -> bool:
        """Append an entry within `cap` bytes in all; False if refused (journal overflowed)."""
        keys = self._journal_keys(session_id)
        args: list[bytes | int] = [bytes(entry), int(cap), self._pin_ttl_ms]
        appended = await self._call(
            "journal_append", lambda: self._journal_append(keys=keys, args=args)
        )
        return bool(appended)

    async def journal(self, session_id: str) -> list[bytes] | None:
        """The session's entries in order; [] if none; None once the journal overflowed."""
        keys = self._journal_keys(session_id)
        script = self._journal_read

        async def read() -> Any:
            # The client decodes replies as text; entries are bytes, so this call must not.
            try:
                return await self._client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, len(keys), *keys, **{NEVER_DECODE: []}
                )
            except NoScriptError:  # a restarted or failed-over server: load it, as Script does
                script.sha = await self._client.script_load(script.script)
                return await self._client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, len(keys), *keys, **{NEVER_DECODE: []}
                )

        size, entries = await self._call("journal", read)
        if size is not None and int(size) < 0:
            return None
        return [bytes(e) for e in entries]

    async def journal_drop(self, session_id: str) -> None:
        """Forget a session's journal."""
        keys = self._journal_keys(session_id)
        await self._call("journal_drop", lambda: self._client.delete(*keys))

    # --- quota counters -----------------------------------------------------------------

    async def quota_session_acquire(
        self, user: str, key: str, limit: int, ttl: float
    ) -> SessionGrant:
        """Count session `key` against `user`'s `limit` unless that many count already."""
        granted, count = await self._script(
            "quota_session_acquire",
            self._session_acquire,
            keys=[self._quota_sessions_prefix + user],
            args=[
                key,
                int(limit),
                repr(max(0.0, float(ttl))),
                self._pin_prefix,
                max(self._pin_ttl_ms, _ms(ttl)),
            ],
        )
        return SessionGrant(bool(granted), int(count))

    async def quota_session_release(self, user: str, key: str) -> None:
        """Stop counting session `key` against `user` (one ZREM)."""
        counter = self._quota_sessions_prefix + user
        await self._call("quota_session_release", lambda: self._client.zrem(counter, key))

    async def quota_slots_acquire(
        self, user: str, replica: str, limit: int, lease_ttl: float
    ) -> SlotGrant:
        """Lease one more of `user`'s slots to `replica` if fewer than `limit` are leased."""
        granted, held, busy = await self._script(
            "quota_slots_acquire",
            self._slots_acquire,
            keys=[self._quota_slots_prefix + user, self._quota_replicas_key],
            args=[replica, int(limit), repr(float(lease_ttl)), _ms(lease_ttl)],
        )
        return SlotGrant(bool(granted), int(held), int(busy))

    async def quota_slots_sync(
        self, replica: str, held: Mapping[str, tuple[int, int]], lease_ttl: float
    ) -> int:
        """Set the slots `replica` holds per user, renew its leases: live replicas."""
        args: list[str | int] = [
            replica,
            repr(float(lease_ttl)),
            _ms(lease_ttl),
            self._quota_slots_prefix,
        ]
        for user, (count, busy) in held.items():
            args += [user, max(0, int(count)), max(0, int(busy))]
        replicas = await self._script(
            "quota_slots_sync", self._slots_sync, keys=[self._quota_replicas_key], args=args
        )
        return int(replicas)

    async def quota_tokens_lease(
        self, bucket: str, rate: float, burst: int, want: int
    ) -> TokenGrant:
        """Take up to `want` tokens from the bucket (refilled at `rate`/s, up to `burst`)."""
        check_bucket(rate, burst, want)
        granted, retry_after = await self._script(
            "quota_tokens_lease",
            self._tokens_lease,
            keys=[self._quota_tokens_prefix + bucket],
            args=[repr(float(rate)), int(burst), int(want)],
        )
        return TokenGrant(int(granted), float(retry_after))

    # --- drivers ------------------------------------------------------------------------

    async def set_draining(
        self, address: str, draining: bool, mode: DrainMode = DrainMode.KEEP
    ) -> None:
        """Mark a driver draining (a hash apart from its record), or not; announce it."""
        event = Event(EventKind.DRIVER_CHANGED, driver=drain_marker(address, draining))

        async def write() -> Any:
            pipe = self._client.pipeline(transaction=True)
            if draining:
                pipe.hset(self._draining_key, address, mode.value)
            else:
                pipe.hdel(self._draining_key, address)
            pipe.publish(self._channel, _encode(event))
            return await pipe.execute()

        await self._call("set_draining", write)

    async def draining(self) -> Mapping[str, DrainMode]:
        """The drivers marked draining, each with its mode (one round trip)."""
        marks = await self._call("draining", lambda: self._client.hgetall(self._draining_key))
        found: dict[str, DrainMode] = {}
        for address, mode in marks.items():
            try:
                found[_text(address)] = DrainMode(_text(mode))
            except ValueError:
                found[_text(address)] = DrainMode.KEEP  # a mode from a newer version
        return found

    async def drivers(self) -> Sequence[Driver]:
        """Every live driver (expired ones are dropped from Redis on the way)."""
        flat = await self._script(
            "drivers", self._drivers, keys=[self._drivers_key], args=[self._driver_prefix]
        )
        found: list[Driver] = []
        for i in range(0, len(flat), 4):
            address, pool, weight, state = (_text(x) for x in flat[i : i + 4])
            try:
                found.append(Driver(address, pool, int(weight), DriverState(state)))
            except ValueError:
                log.warning("skipping malformed driver record %r in Redis", address)
        return found

    async def upsert_driver(self, driver: Driver, ttl: float | None = None) -> None:
        """Register a driver or refresh its record (a heartbeat when `ttl` is given)."""
        if ttl is not None and math.isnan(ttl):
            raise ValueError("ttl must be a number of seconds or None, got nan")
        if ttl is not None and math.isinf(ttl):
            ttl = None  # live until removed, as for the memory store
        if ttl is not None:
            ttl = max(ttl, 0.0)  # zero or less: registered already expired, as in memory
        hash_ttl_ms = 0 if ttl is None else math.ceil(ttl * 1000) + DRIVER_HASH_GRACE_MS
        await self._script(
            "upsert_driver",
            self._upsert,
            keys=[self._drivers_key, self._driver_prefix + driver.address],
            args=[
                driver.address,
                driver.pool,
                driver.weight,
                driver.state.value,
                "" if ttl is None else repr(float(ttl)),
                hash_ttl_ms,
                self._channel,
                _encode(Event(EventKind.DRIVER_JOINED, driver=driver)),
                _encode(Event(EventKind.DRIVER_CHANGED, driver=driver)),
            ],
        )

    async def remove_driver(self, address: str) -> None:
        """Deregister a driver and announce it (if it was registered)."""
        await self._script(
            "remove_driver",
            self._remove,
            keys=[self._drivers_key, self._driver_prefix + address],
            args=[address, self._channel, EventKind.DRIVER_LEFT.value, DEFAULT_POOL],
        )

    # --- events -------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Changes made by any instance on this Redis, from subscription on, until close()."""
        closing = asyncio.ensure_future(self._closed.wait())
        backoff = 0.05
        outage = False
        try:
            while not self._closed.is_set():
                pubsub = self._client.pubsub()
                self._pubsubs.add(pubsub)
                try:
                    await pubsub.subscribe(self._channel)
                    if outage:
                        log.info("Redis at %s: event subscription restored", self._location)
                        outage = False
                    backoff = 0.05
                    async for event in self._listen(pubsub, closing):
                        yield event
                    return
                except (RedisError, OSError) as exc:
                    if self._closed.is_set():
                        return
                    if not outage:
                        log.warning(
                            "Redis at %s: event subscription lost (%s: %s); reconnecting, "
                            "events until then are lost",
                            self._location,
                            type(exc).__name__,
                            exc,
                        )
                        outage = True
                finally:
                    self._pubsubs.discard(pubsub)
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                await asyncio.wait({closing}, timeout=backoff)
                backoff = min(backoff * 2, self._max_backoff)
        finally:
            closing.cancel()

    async def _listen(self, pubsub: PubSub, closing: asyncio.Future[Any]) -> AsyncIterator[Event]:
        """Events from one subscription; raises RedisError when the connection is lost."""
        ping_sent = False
        while True:
            reading = asyncio.ensure_future(pubsub.get_message(timeout=self._ping_interval))
            try:
                await asyncio.wait({reading, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not reading.done():
                    reading.cancel()
            if closing.done():
                with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                    await reading
                return
            message = reading.result()
            if message is None:
                # Silence for a whole interval: a dead or hung server looks exactly like this.
                if ping_sent:
                    raise RedisConnectionError(f"no reply to PING in {self._ping_interval}s")
                await pubsub.ping()
                ping_sent = True
                continue
            ping_sent = False
            if message.get("type") != "message":
                continue  # subscribe confirmation or PONG
            event = _decode_event(message.get("data"))
            if event is not None:
                yield event

    async def close(self) -> None:
        """Close the connections; open events() iterators end."""
        self._closed.set()
        for pubsub in list(self._pubsubs):
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
        for close in self._on_close:
            with contextlib.suppress(RedisError, OSError):
                await close()
        self._on_close.clear()

    # --- plumbing -----------------------------------------------------------------------

    async def _script(
        self, what: str, script: AsyncScript, keys: list[str], args: list[str | int]
    ) -> Any:
        """Run one Lua script (EVALSHA; SCRIPT LOAD first on a server that lacks it)."""
        return await self._call(what, lambda: script(keys=keys, args=args))

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis round trip within the in-flight bound; failures: RegistryUnavailable."""
        try:
            if self._slots.locked():
                await asyncio.wait_for(self._slots.acquire(), self._queue_timeout)
            else:
                await self._slots.acquire()  # free slot: no timer, no extra task
        except asyncio.TimeoutError:
            raise RegistryUnavailable(
                f"Redis at {self._location}: {what} waited {self._queue_timeout}s behind "
                f"{self._max_in_flight} operations in flight (Redis slow or overloaded)"
            ) from None
        try:
            return await op()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise RegistryUnavailable(
                f"Redis at {self._location}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._slots.release()


def _describe(client: aioredis.Redis) -> str:
    """How error messages name the server of a client built elsewhere."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    if "host" in kwargs:
        return f"{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return repr(client.connection_pool)


def _retry(retries: int) -> Retry:
    # Retry only refused/dropped connections (stale pooled sockets after a restart), never a
    # timeout: a hung Redis must fail within one socket_timeout.
    return Retry(
        ExponentialBackoff(cap=0.1, base=0.01), retries, supported_errors=(RedisConnectionError,)
    )


def _parse_sentinel_url(
    url: str,
) -> tuple[list[tuple[str, int]], str, int, str | None, str | None]:
    """redis+sentinel://[user:password@]host:port[,host:port...]/mastername[/db]"""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or host.endswith(":") or (host.startswith("[") and not host.endswith("]")):
            host, port = item.strip(), str(DEFAULT_SENTINEL_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"bad Sentinel address {item!r} in {redact_url(url)}")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            f"Sentinel URL must name the master: redis+sentinel://host:port/mastername[/db], "
            f"got {redact_url(url)}"
        )
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"bad database number {path[1]!r} in {redact_url(url)}")
    return hosts, unquote(path[0]), int(path[1]) if len(path) == 2 else 0, username, password


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _expiry_member(key: str, pin: Pin) -> str:
    """A pin's member of the expiry zset (the Lua scripts build the same string)."""
    return f"{key}\x1f{pin.driver}\x1f{pin.pool}"


def _encode_pin(pin: Pin) -> str:
    # A list, so the Lua scripts find the driver as element 1 without field names.
    fields: list[Any] = [
        pin.driver,
        pin.pool,
        pin.server_side_id,
        pin.owner,
        pin.created,
        pin.moves,
    ]
    # Only moved pins carry a token and the drivers they left, only learned ones a seen id:
    # each is written only when it or a later one is set (older readers ignore them).
    tail: list[Any] = [
        pin.move_token,
        pin.seen_id,
        list(pin.moved_off) or None,
        list(pin.released_on) or None,
        pin.upstream_id,
    ]
    while tail and tail[-1] is None:
        tail.pop()
    return json.dumps([*fields, *tail], separators=(",", ":"))


def _decode_pin(key: str, value: str | bytes) -> Pin:
    fields = [*json.loads(value), *([None] * 9)][:11]  # older pins: 2 to 10 elements
    alias, owner, created, moves, token, seen, left, released, upstream = fields[2:11]
    user, session_id = split_key(key)
    if user is not None:  # the key names the owner; a keyless (older) pin keeps its own
        owner = user
    return Pin(
        session_id,
        str(fields[0]),
        str(fields[1]),
        None if alias is None else str(alias),
        None if token is None else str(token),
        None if owner is None else str(owner),
        None if created is None else float(created),
        int(moves or 0),
        None if seen is None else str(seen),
        tuple(str(a) for a in left or ()),
        tuple(str(a) for a in released or ()),
        None if upstream is None else str(upstream),
    )


def _encode(event: Event) -> str:
    record: dict[str, Any] = {"kind": event.kind.value}
    if event.driver is not None:
        d = event.driver
        record["driver"] = {
            "address": d.address,
            "pool": d.pool,
            "weight": d.weight,
            "state": d.state.value,
        }
    if event.pin is not None:
        p = event.pin
        record["pin"] = {"session_id": p.key, "value": _encode_pin(p)}
    if event.session_id is not None:
        record["session_id"] = event.session_id
    return json.dumps(record, separators=(",", ":"))


_DRIVER_EVENTS = {EventKind.DRIVER_JOINED, EventKind.DRIVER_LEFT, EventKind.DRIVER_CHANGED}
_PIN_EVENTS = {EventKind.PIN_MOVED, EventKind.PIN_RELEASED}


def _decode_event(data: Any) -> Event | None:
    """An Event from a channel message; None (and a warning) for anything malformed."""
    try:
        record = json.loads(data)
        driver = pin = None
        if record.get("driver"):
            d = record["driver"]
            driver = Driver(
                str(d["address"]),
                str(d.get("pool", DEFAULT_POOL)),
                int(d.get("weight", 1)),
                DriverState(d.get("state", DriverState.ACTIVE.value)),
            )
        if record.get("pin"):
            pin = _decode_pin(str(record["pin"]["session_id"]), record["pin"]["value"])
        session_id = record.get("session_id")
        kind = EventKind(record["kind"])
        if kind in _DRIVER_EVENTS and driver is None:
            raise ValueError("a driver event without its driver")
        if kind in _PIN_EVENTS and session_id is None:
            raise ValueError("a pin event without its session")
        if kind is EventKind.PIN_MOVED and pin is None:
            raise ValueError("a move event without its pin")
        return Event(
            kind,
            driver=driver,
            pin=pin,
            session_id=None if session_id is None else str(session_id),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("ignoring malformed registry event %.200r", data)
        return None
