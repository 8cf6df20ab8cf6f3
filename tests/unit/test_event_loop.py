"""The replica's event loop: uvloop when installed, asyncio's own when asked."""

from __future__ import annotations

import asyncio

from router.server import run_async


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_and_asyncio_can_be_forced() -> None:
    assert run_async(_loop_module(), "auto").startswith("uvloop")
    assert run_async(_loop_module(), "uvloop").startswith("uvloop")
    assert run_async(_loop_module(), "asyncio").startswith("asyncio")
