"""A throw-away MIT Kerberos realm on loopback for tests (Debian's krb5-kdc).

`KDC` writes krb5.conf and kdc.conf into a private temporary directory, creates the
database (`kdb5_util create -s`, random master password), and runs `krb5kdc -n` in the
foreground in its own process group on 127.0.0.1:<free port> (TCP and UDP). Nothing here
reads or writes /etc/krb5.conf or the machine's KDC: every command gets $KRB5_CONFIG and
$KRB5_KDC_PROFILE pointing at the temporary files (`env`). Readiness is polled (the TCP
port accepts) with a deadline; nothing sleeps to synchronise.

Missing binaries fail, never skip: `./dev test` installs them (apt).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from tests.helpers import free_port, reap

REALM = "ROUTER.TEST"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
APT_COMMAND = (
    "sudo apt-get install -y --no-install-recommends "
    "krb5-kdc krb5-admin-server krb5-user libkrb5-dev"
)
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def binary(name: str) -> str:
    """The path of a Kerberos tool; RuntimeError naming the apt command when it is missing."""
    path = shutil.which(name, path=_SEARCH)
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: the Kerberos tests need MIT Kerberos; run `./dev test` "
            f"(it installs it) or: {APT_COMMAND}"
        )
    return path


class KDC:
    """One MIT KDC for realm `realm` on 127.0.0.1, with helpers to add principals and kinit.

    `max_life` (e.g. "1m", "10h") caps every ticket of the realm; `add_principal(...,
    max_life=...)` caps one principal's, for short-lifetime tests. `clockskew` (seconds) is
    the tolerance of the KDC and of every acceptor that reads this krb5.conf: an expired
    ticket is refused only that long after its end.
    """

    def __init__(self, realm: str = REALM, *, max_life: str = "10h", clockskew: int = 300) -> None:
        self.realm = realm
        self.max_life = max_life
        self.clockskew = clockskew
        self.dir = Path(tempfile.mkdtemp(prefix="krb5kdc-"))
        self.port = free_port()
        self.krb5_conf = self.dir / "krb5.conf"
        self.kdc_conf = self.dir / "kdc.conf"
        self.log_path = self.dir / "krb5kdc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, reap, self._procs, self.dir)

    @property
    def env(self) -> dict[str, str]:
        """The environment for Kerberos subprocesses: this realm's config, never /etc's."""
        env = dict(os.environ)
        env["KRB5_CONFIG"] = str(self.krb5_conf)
        env["KRB5_KDC_PROFILE"] = str(self.kdc_conf)
        env["KRB5RCACHEDIR"] = str(self.dir)  # acceptors' replay caches, not /var/tmp
        env.pop("KRB5CCNAME", None)
        env.pop("KRB5_KTNAME", None)
        env.pop("KRB5_CLIENT_KTNAME", None)
        return env

    def _write_configs(self) -> None:
        realm, port, d = self.realm, self.port, self.dir
        self.krb5_conf.write_text(
            "[libdefaults]\n"
            f"  default_realm = {realm}\n"
            "  dns_lookup_kdc = false\n"
            "  dns_lookup_realm = false\n"
            "  dns_canonicalize_hostname = false\n"
            "  rdns = false\n"
            f"  clockskew = {self.clockskew}\n"
            "  ignore_acceptor_hostname = false\n"
            "  udp_preference_limit = 1\n"  # TCP first (the KDC listens on both)
            f"  default_ccache_name = FILE:{d}/ccache-default\n"
            f"  default_keytab_name = FILE:{d}/default.keytab\n"
            "[realms]\n"
            f"  {realm} = {{\n"
            f"    kdc = 127.0.0.1:{port}\n"
            f"    admin_server = 127.0.0.1:{port}\n"
            "  }\n"
        )
        self.kdc_conf.write_text(
            "[kdcdefaults]\n"
            f"  kdc_listen = 127.0.0.1:{port}\n"
            f"  kdc_tcp_listen = 127.0.0.1:{port}\n"
            "[realms]\n"
            f"  {realm} = {{\n"
            f"    database_name = {d}/principal\n"
            f"    key_stash_file = {d}/stash\n"
            f"    acl_file = {d}/kadm5.acl\n"
            f"    max_life = {self.max_life}\n"
            "    max_renewable_life = 7d\n"
            "    supported_enctypes = aes256-cts-hmac-sha1-96:normal"
            " aes128-cts-hmac-sha1-96:normal\n"
            "  }\n"
            "[logging]\n"
            f"  kdc = FILE:{self.log_path}\n"
        )
        (d / "kadm5.acl").write_text("")

    def _run(self, argv: list[str], what: str, timeout: float = 30.0) -> str:
        proc = subprocess.run(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def kadmin(self, query: str) -> str:
        """One kadmin.local query against this realm's database; its stdout."""
        return self._run(
            [binary("kadmin.local"), "-r", self.realm, "-q", query], f"kadmin {query!r}"
        )

    def start(self) -> None:
        """Create the realm's database and start krb5kdc; return once its TCP port accepts."""
        krb5kdc, kdb5_util = binary("krb5kdc"), binary("kdb5_util")
        binary("kadmin.local")
        binary("kinit")
        self._write_configs()
        master = secrets.token_urlsafe(24)
        self._run([kdb5_util, "-r", self.realm, "create", "-s", "-P", master], "kdb5_util create")
        self._proc = subprocess.Popen(
            [krb5kdc, "-n", "-r", self.realm],
            env=self.env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append(self._proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"krb5kdc exited ({self._proc.returncode}):\n{self._log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"krb5kdc did not listen within {START_TIMEOUT}s:\n{self._log_tail()}")

    def principal(self, name: str) -> str:
        """`name` with this realm appended unless it names one."""
        return name if "@" in name else f"{name}@{self.realm}"

    def add_principal(
        self, name: str, password: str | None = None, *, max_life: str | None = None
    ) -> Path:
        """Add `name` (random key, or `password`) and export its key to a keytab; its path.

        With a password the keytab still holds a key (ktadd -norandkey keeps the password's).
        """
        principal = self.principal(name)
        life = f" -maxlife {max_life}" if max_life else ""
        if password is None:
            self.kadmin(f"addprinc -randkey{life} {principal}")
        else:
            self.kadmin(f"addprinc -pw {password}{life} {principal}")
        keytab = self.dir / (principal.replace("/", "_").replace("@", "_") + ".keytab")
        norand = " -norandkey" if password is not None else ""
        self.kadmin(f"ktadd -k {keytab}{norand} {principal}")
        return keytab

    def kinit(
        self, principal: str, keytab: Path | str, ccache: Path | str, lifetime: str | None = None
    ) -> None:
        """Get a TGT for `principal` from `keytab` into the file ccache `ccache`."""
        argv = [binary("kinit"), "-k", "-t", str(keytab), "-c", f"FILE:{ccache}"]
        if lifetime:
            argv += ["-l", lifetime]
        argv.append(self.principal(principal))
        self._run(argv, f"kinit {principal}")

    def stop(self) -> None:
        """Stop krb5kdc: SIGTERM to its group, SIGKILL if it lingers. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)

    def _log_tail(self) -> str:
        texts = []
        with contextlib.suppress(OSError):
            texts.append(self.log_path.read_text(errors="replace")[-3000:])
        return "\n".join(texts) or "(no log)"

    def cleanup(self) -> None:
        """Stop the KDC and delete its directory (database, keytabs, ccaches)."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> KDC:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
