"""The Java check: find Java the way spark-submit will and make sure Spark 4 can run on it.

Invariants
----------
* Java is looked up exactly as spark-submit looks it up (an explicit home, else JAVA_HOME, else
  `java` on PATH), so a check that passes means the drivers get that same Java.
* Every failure is a `LocalDriverError` whose message names what was found (path, version) and
  says how to install Java 17 or point JAVA_HOME at it.
* `LocalDriverError`, the base of every error of `router.local`, lives here: this module is the
  bottom of the package and imports nothing else of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

__all__ = [
    "MIN_JAVA_MAJOR",
    "JavaInfo",
    "JavaNotFound",
    "JavaTooOld",
    "LocalDriverError",
    "check_java",
    "java_major",
]

MIN_JAVA_MAJOR = 17

_JAVA_INSTALL_HINT = (
    "install Java 17 (e.g. `apt-get install openjdk-17-jre-headless`) "
    "or set JAVA_HOME to a Java 17+ installation"
)


class LocalDriverError(Exception):
    """Base error of local drivers; str() is a clear, actionable message."""


class JavaNotFound(LocalDriverError):
    """No usable `java` executable."""


class JavaTooOld(LocalDriverError):
    """The `java` found is older than Spark 4 needs."""


@dataclass(frozen=True)
class JavaInfo:
    """The Java found: executable path, version string and major version."""

    path: str
    version: str
    major: int


_VERSION_RE = re.compile(r'version "([^"]+)"')


def java_major(version: str) -> int:
    """Major version of a `java -version` string: '1.8.0_392' -> 8, '17.0.15' -> 17."""
    parts = re.split(r"[._+\-]", version)
    try:
        if parts[0] == "1" and len(parts) > 1:
            return int(parts[1])
        return int(parts[0])
    except ValueError:
        raise LocalDriverError(f"cannot parse Java version {version!r}") from None


def check_java(java_home: str | None = None) -> JavaInfo:
    """Find Java as spark-submit will (JAVA_HOME, else PATH) and check it is 17 or newer."""
    home = java_home or os.environ.get("JAVA_HOME") or None
    if home:
        source = "--java-home" if java_home else "JAVA_HOME"
        java = os.path.join(home, "bin", "java")
        if not (os.path.isfile(java) and os.access(java, os.X_OK)):
            raise JavaNotFound(
                f"{source}={home} has no executable bin/java: Spark needs Java 17+; "
                f"{_JAVA_INSTALL_HINT}"
            )
    else:
        found = shutil.which("java")
        if found is None:
            raise JavaNotFound(
                f"no `java` on PATH and JAVA_HOME is not set: Spark needs Java 17+; "
                f"{_JAVA_INSTALL_HINT}"
            )
        java = found
    try:
        result = subprocess.run(
            [java, "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise JavaNotFound(f"cannot run {java}: {exc}; {_JAVA_INSTALL_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalDriverError(f"`{java} -version` did not answer within 60 s") from exc
    output = (result.stderr + result.stdout).decode(errors="replace")
    match = _VERSION_RE.search(output)
    if result.returncode != 0 or match is None:
        raise LocalDriverError(
            f"`{java} -version` failed (exit code {result.returncode}) or printed no version: "
            f"{output.strip()[-500:]!r}; {_JAVA_INSTALL_HINT}"
        )
    version = match.group(1)
    major = java_major(version)
    if major < MIN_JAVA_MAJOR:
        where = java
        real = os.path.realpath(java)
        if real != java:
            where += f" (-> {real})"
        raise JavaTooOld(
            f"Java {version} found at {where}, but Spark 4 needs Java 17 or newer: "
            f"{_JAVA_INSTALL_HINT}"
        )
    return JavaInfo(path=java, version=version, major=major)
