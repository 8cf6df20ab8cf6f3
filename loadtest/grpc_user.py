"""A gRPC ``User`` for Locust (it has none): every call and every stream is a Locust request.

Locust runs users as gevent greenlets in a monkey-patched process. gRPC's C core does not
cooperate with gevent unless ``grpc.experimental.gevent.init_gevent()`` runs before the first
channel is made; importing this module does that (the ``locust`` command has monkey-patched
the process before it loads a locustfile). Never import this module into a process that is
not a Locust process.

:class:`GrpcUser` gives each simulated user one channel (one HTTP/2 connection of its own, like
one pyspark client; all of the user's calls reuse it) and two call helpers:

* :meth:`GrpcUser.unary` sends request bytes and reports one request (``response_length`` = the
  response's size);
* :meth:`GrpcUser.stream` reads a whole server stream and reports it as one request
  (``response_length`` = all bytes of the stream, ``context["messages"]`` = how many).

Requests and responses are raw ``bytes`` (gRPC generic calls, no serializers): the load
generator spends its CPU on gRPC, not protobuf. A failed call is reported with its
``grpc.RpcError`` as the exception and the helper returns ``None``; it does not raise.

Stopping is bounded: every call has a deadline (``call_timeout``), and ``on_stop`` closes the
channel, which cancels whatever the user still had in flight (Locust kills a user's greenlet
mid-call at the end of a run unless ``--stop-timeout`` is given).

:func:`measure` reports any other timed block (the pyspark user uses it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc.experimental import gevent as grpc_gevent
from locust import User
from locust.env import Environment

__all__ = ["GrpcUser", "Measured", "grpc_target", "measure"]

grpc_gevent.init_gevent()

Metadata = Sequence[tuple[str, str | bytes]]


def grpc_target(host: str | None, default_port: int = 15002) -> str:
    """``HOST:PORT`` for a channel from Locust's ``--host``.

    Accepts ``HOST:PORT``, ``HOST``, ``grpc://HOST:PORT``, ``http://…`` and a Spark Connect URL
    ``sc://HOST:PORT/;k=v`` (its parameters are ignored here).
    """
    if not host:
        raise ValueError("no host: give --host 127.0.0.1:15002 (or sc://HOST:PORT)")
    text = host if "://" in host else f"grpc://{host}"
    parts = urlsplit(text)
    if not parts.hostname:
        raise ValueError(f"cannot read a host from {host!r}")
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{name}:{parts.port or default_port}"


class Measured:
    """What a measured block reports besides its time (set inside the block)."""

    def __init__(self) -> None:
        self.response_length = 0
        self.context: dict[str, Any] = {}


@contextlib.contextmanager
def measure(
    environment: Environment,
    request_type: str,
    name: str,
    context: Mapping[str, Any] | None = None,
) -> Iterator[Measured]:
    """Time the block and fire one Locust request event for it.

    An ``Exception`` raised in the block is reported as the request's failure and swallowed;
    anything else (``GreenletExit`` when Locust stops the user, ``StopUser``) is not reported
    and propagates.
    """
    measured = Measured()
    start_time = time.time()
    t0 = time.perf_counter()
    exception: Exception | None = None
    try:
        yield measured
    except Exception as exc:
        exception = exc
    environment.events.request.fire(  # type: ignore[no-untyped-call]
        request_type=request_type,
        name=name,
        start_time=start_time,
        response_time=(time.perf_counter() - t0) * 1000,
        response_length=measured.response_length,
        response=None,
        context={**(context or {}), **measured.context},
        exception=exception,
    )


class GrpcUser(User):
    """A Locust user with one gRPC channel to ``--host``; see the module docstring."""

    abstract = True
    request_type = "grpc"
    call_timeout = 60.0
    """Deadline of every call, in seconds: nothing a user does can hang the run."""
    channel_options: Sequence[tuple[str, Any]] = (
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        # One connection per user (without it, every channel to the same target shares one).
        ("grpc.use_local_subchannel_pool", 1),
    )

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.target = grpc_target(self.host)
        self.channel = grpc.insecure_channel(self.target, options=list(self.channel_options))
        self._unary: dict[str, Any] = {}
        self._streams: dict[str, Any] = {}

    def unary(
        self,
        method: str,
        request: bytes,
        *,
        name: str | None = None,
        metadata: Metadata | None = None,
        timeout: float | None = None,
    ) -> bytes | None:
        """Call a unary method with raw request bytes; the response bytes, or None on failure."""
        fn = self._unary.get(method)
        if fn is None:
            fn = self._unary[method] = self.channel.unary_unary(method)
        response: bytes | None = None
        with measure(self.environment, self.request_type, name or _short(method)) as m:
            response = fn(request, metadata=metadata, timeout=timeout or self.call_timeout)
            m.response_length = len(response or b"")
        return response

    def stream(
        self,
        method: str,
        request: bytes,
        *,
        name: str | None = None,
        metadata: Metadata | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """Read a whole server stream; its size in bytes, or None on failure."""
        fn = self._streams.get(method)
        if fn is None:
            fn = self._streams[method] = self.channel.unary_stream(method)
        total: int | None = None
        with measure(self.environment, self.request_type, name or _short(method)) as m:
            call = fn(request, metadata=metadata, timeout=timeout or self.call_timeout)
            size = messages = 0
            try:
                for message in call:
                    size += len(message)
                    messages += 1
            finally:
                m.response_length = size
                m.context["messages"] = messages
                call.cancel()  # no-op when complete; frees the call if the user was stopped
            total = size
        return total

    def on_stop(self) -> None:
        """Close the channel: cancels anything still in flight."""
        self.channel.close()


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]
