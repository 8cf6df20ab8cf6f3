"""How local drivers are shown: start-up live on a terminal, else log lines; restarts as log lines.

Invariants
----------
* The live display is used only when progress is asked for *and* stdout is a terminal; then the
  per-driver progress lines go to DEBUG (the display shows them), failures are still logged.
  Otherwise the same progress is logged at INFO.
* The display only reads the drivers (state, seconds since start); it never changes them, so it
  cannot alter how a start-up ends.
* Restarts while `up` serves (after the live display has ended) are always log lines: an exit
  is a warning, a failed restart an error, a driver back a line at INFO.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.local.driver import LocalDriver

__all__ = [
    "exit_reason",
    "live_display",
    "log_exit",
    "log_restart_failed",
    "log_restarted",
    "log_state",
    "wants_live",
]

log = logging.getLogger(__name__)


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def wants_live(progress: bool) -> bool:
    """Whether to show a live display: progress was asked for and stdout is a terminal."""
    return progress and _stdout_is_tty()


def log_state(driver: LocalDriver, quiet: bool) -> None:
    """Log a state change; `quiet` (a live display shows it) turns progress lines to DEBUG."""
    level = logging.DEBUG if quiet else logging.INFO
    if driver.state == "port open":
        log.log(level, "driver %s port open after %.1f s", driver.address, driver.elapsed)
    elif driver.state == "ready":
        log.log(level, "driver %s ready after %.1f s", driver.address, driver.elapsed)
    elif driver.state == "failed":
        log.error("driver %s failed after %.1f s", driver.address, driver.elapsed)


def exit_reason(code: int) -> str:
    """A process's exit in a few words: "killed by SIGKILL" or "exit code 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def log_exit(address: str, code: int, delay: float, restart: int) -> None:
    """A running driver exited; it is started again after `delay` seconds."""
    log.warning(
        "driver %s exited (%s); restarting in %.1f s (restart %d)",
        address,
        exit_reason(code),
        delay,
        restart,
    )


def log_restart_failed(
    address: str, reason: str, log_path: Path | None, delay: float, restart: int
) -> None:
    """A restart failed; the next one is tried after `delay` seconds."""
    where = f" (log {log_path})" if log_path is not None else ""
    log.error(
        "driver %s did not restart: %s%s; retrying in %.1f s (restart %d)",
        address,
        reason,
        where,
        delay,
        restart,
    )


def log_restarted(address: str, ready_after: float) -> None:
    """A restarted driver answers again."""
    log.info("driver %s restarted (ready in %.1f s)", address, ready_after)


_STATE_STYLE = {
    "starting": "yellow",
    "port open": "cyan",
    "ready": "green",
    "failed": "bold red",
    "stopped": "dim",
}


@contextmanager
def live_display(drivers: Sequence[LocalDriver], use_rich: bool) -> Iterator[Callable[[], None]]:
    """Yields an update() callable: with use_rich a live rich display, else a no-op."""
    if not use_rich:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
    from rich.text import Text

    # Columns read the drivers themselves, so state and seconds stay live on every refresh
    # even while a readiness probe blocks the polling loop.
    class StateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            state: str = task.fields["driver"].state
            return Text(f"{state:<9}", style=_STATE_STYLE.get(state, ""))

    class ElapsedColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.fields['driver'].elapsed:6.1f} s")

    progress = Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("Spark Connect driver [bold]{task.description}"),
        StateColumn(),
        ElapsedColumn(),
        console=Console(file=sys.stdout),
        transient=False,
    )
    tasks = [
        (driver, progress.add_task(driver.address, total=1, driver=driver)) for driver in drivers
    ]

    def update() -> None:
        for driver, task in tasks:
            done = driver.state in ("ready", "failed")
            progress.update(task, completed=1 if done else 0)

    with progress:
        update()
        try:
            yield update
        finally:
            update()
