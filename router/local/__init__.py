"""Local Spark Connect drivers run from the installed pyspark package.

Backs `spark-router up` and the test suite's Spark fixtures. One `LocalDriver` is one
`SparkConnectServer` JVM started with the pyspark package's own `bin/spark-submit` (the pip
package bundles Spark, so nothing is downloaded); `LocalDrivers` starts a set of them together
and waits until every one answers a real Spark Connect call.

Modules: `java` (the Java check), `driver` (LocalDriver, LocalDrivers), `display` (start-up
progress), `up` (the `spark-router up` command). The process toolkit they rely on (PDEATHSIG,
the spawner thread, /proc readings) is `common.procs`. This package re-exports the public names,
so `from router.local import LocalDrivers` works; `up` is not imported here (it pulls in the
whole router).

Invariants
----------
* **No orphan JVMs.** Every driver is started
  - in its own session and process group (`start_new_session=True`): a Ctrl-C in the terminal
    reaches only the router, which then stops the drivers itself; stopping sends SIGTERM to the
    whole group, waits, then SIGKILLs the group;
  - with `prctl(PR_SET_PDEATHSIG, SIGKILL)` set in the child before exec (Linux only; skipped
    silently elsewhere). spark-submit `exec`s into the JVM, so the flag survives and the JVM is
    killed by the kernel even if the router is SIGKILLed. PDEATHSIG fires when the *thread*
    that forked the child ends, so every driver is forked from one long-lived daemon thread
    (`common.procs.spawn`), never from the caller's thread, which may be short-lived.
  - The pyspark daemon that runs Python UDF workers puts itself in a process group of its own
    (`os.setpgid(0, 0)` in `pyspark/daemon.py`), so the group kill does not reach it. It exits
    when its stdin (a pipe from the JVM) closes, i.e. when the JVM dies, and then SIGHUPs its
    workers. `stop()` also snapshots the JVM's descendants before signalling and SIGKILLs any
    that outlive the JVM.
  - An `atexit` hook stops drivers still running when the interpreter exits normally; a
    SIGTERM/SIGKILL of the router leaves the rest to PDEATHSIG.
  - spark-class leaves its process-substitution subshell as a *zombie* child of the JVM (the
    JVM never reaps it); it holds no resources and disappears with the JVM.
* **Failure is total and explained.** If any driver of a `LocalDrivers.start()` exits or is not
  ready within `startup_timeout`, *all* drivers are stopped, then `DriverFailedToStart` is
  raised naming the driver, the exit code (or "not ready after N s"), the log path and the last
  log lines. Logs (`<work_dir>/driver-<port>.log`) are always kept. An interrupt
  (KeyboardInterrupt, SystemExit) during start also stops all drivers before propagating.
  Java is checked before any JVM starts, and a port already in use fails before its JVM starts.
* **Ready means answering.** A driver is ready when its port accepts TCP *and* a Spark Connect
  `Config` call (get `spark.connect.grpc.binding.port`) answers this driver's own port; a
  different answer means another server holds the port and is a start failure.
"""

from __future__ import annotations

from common.procs import spawn
from router.local.driver import (
    PROBE_SESSION_ID,
    PROBE_USER_ID,
    SERVER_CLASS,
    DriverFailedToStart,
    LocalDriver,
    LocalDrivers,
    driver_command,
    driver_env,
    free_port,
    probe_driver,
    spark_home,
)
from router.local.java import (
    JavaInfo,
    JavaNotFound,
    JavaTooOld,
    LocalDriverError,
    check_java,
    java_major,
)

__all__ = [
    "PROBE_SESSION_ID",
    "PROBE_USER_ID",
    "SERVER_CLASS",
    "DriverFailedToStart",
    "JavaInfo",
    "JavaNotFound",
    "JavaTooOld",
    "LocalDriver",
    "LocalDriverError",
    "LocalDrivers",
    "check_java",
    "driver_command",
    "driver_env",
    "free_port",
    "java_major",
    "probe_driver",
    "spark_home",
    "spawn",
]
