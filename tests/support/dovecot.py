"""A private dovecot IMAP server for tests: 127.0.0.1, a free port, everything in a temp dir.

    with DovecotServer() as imap:                # plain IMAP (no TLS at all)
        uid = imap.append(b"Subject: x\\r\\n\\r\\nhello\\r\\n")
        ...  # read it through imap.host / imap.port, user imap.username / imap.password
        assert imap.uids() == []

    with DovecotServer(tls=True) as imap:        # STARTTLS on imap.port, implicit TLS on imap.imaps_port
        ...  # the certificate is signed by a private CA: trust imap.ca_file

Dovecot runs in the foreground (``dovecot -F -c <tmp>/dovecot.conf``) with its own base_dir,
state_dir and log file, a passwd-file with one test user, and Maildir mail under the temp dir;
nothing of the machine's own dovecot (/etc/dovecot, /run/dovecot) is read or touched. As root
its processes run as the ``dovecot`` / ``dovenull`` users the Debian package creates (dovecot
will not run mail or login processes as root); otherwise everything runs as the current user.

The binary comes from Debian's ``dovecot-imapd``, which ``scripts/ensure-system-deps.sh``
installs. Like the servers of tests/support/services.py, the process carries a parent-death
signal and is stopped at interpreter exit, so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import imaplib
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.services import (
    LOOPBACK,
    ServiceError,
    _die_with_parent_prefix,
    _make_temp_dir,
    _register,
    _tail,
    _terminate,
    _unregister,
    free_port,
)

__all__ = ["DovecotServer", "make_test_ca"]

_START_TIMEOUT = 15.0


def _find_dovecot() -> str:
    for candidate in (shutil.which("dovecot"), "/usr/sbin/dovecot", "/sbin/dovecot"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError("dovecot not found: run scripts/ensure-system-deps.sh (Debian package dovecot-imapd)")


# --------------------------------------------------------------------------- certificates


def make_test_ca(directory: Path, hostname: str = "localhost") -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed, for ``hostname`` and 127.0.0.1.

    Returns (ca.pem, server.pem, server.key); the key is unencrypted, the files are PEM.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dispatch test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------- the server


class DovecotServer:
    """A private dovecot serving IMAP for one user on 127.0.0.1."""

    host = LOOPBACK

    def __init__(
        self,
        *,
        tls: bool = False,
        username: str = "bounces",
        password: str | None = None,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self.tls = tls
        #: top-level dovecot settings added last (e.g. ``imap_capability`` to hide one)
        self.extra_config = dict(extra_config or {})
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.port = 0
        #: implicit TLS (IMAPS) port; 0 without ``tls``
        self.imaps_port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    # -- what tests use

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = _make_temp_dir("dispatch-dovecot-")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / "dovecot.log"

    @property
    def ca_file(self) -> str:
        """The CA that signed the server's certificate (only with ``tls``)."""
        if not self.tls:
            raise ServiceError("this dovecot runs without TLS")
        return str(self.dir / "tls" / "ca.pem")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @contextlib.contextmanager
    def client(self, folder: str = "INBOX") -> Iterator[imaplib.IMAP4]:
        """A logged-in imaplib connection with ``folder`` selected (the test's own view)."""
        imap = imaplib.IMAP4(self.host, self.port, timeout=10)
        try:
            imap.login(self.username, self.password)
            typ, data = imap.select(folder)
            if typ != "OK":
                raise ServiceError(f"cannot select {folder}: {data!r}")
            yield imap
        finally:
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                imap.logout()

    def append(self, raw: bytes, folder: str = "INBOX") -> int:
        """Store ``raw`` as a new message in ``folder``; returns its UID."""
        with self.client(folder) as imap:
            typ, data = imap.append(folder, None, None, raw)
            if typ != "OK":
                raise ServiceError(f"APPEND refused: {data!r}")
            found = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
            if found is None:
                raise ServiceError(f"no APPENDUID in {data!r}")
            return int(found.group(1))

    def create_folder(self, folder: str) -> None:
        with self.client() as imap:
            typ, data = imap.create(folder)
            if typ != "OK":
                raise ServiceError(f"CREATE refused: {data!r}")

    def uids(self, folder: str = "INBOX") -> list[int]:
        """UIDs of the messages in ``folder`` now, flagged \\Deleted or not."""
        with self.client(folder) as imap:
            _, data = imap.uid("SEARCH", "ALL")
            return sorted(int(u) for u in (data[0] or b"").split())

    def flags(self, uid: int, folder: str = "INBOX") -> set[str]:
        with self.client(folder) as imap:
            _, data = imap.uid("FETCH", str(uid), "(FLAGS)")
            found = re.search(rb"FLAGS \(([^)]*)\)", data[0] if isinstance(data[0], bytes) else b"")
            return set(found.group(1).decode().split()) if found else set()

    def bytes_sent(self, timeout: float = 10.0) -> list[int]:
        """What dovecot sent to each IMAP session of our user, by its own ``out=`` accounting.

        Logged when a session ends: this waits until every session that logged in has its
        line (all clients must have logged out or hung up before)."""
        user = re.escape(self.username)
        logins = re.compile(rf"imap-login: Info: Login: user=<{user}>")
        ends = re.compile(rf"imap\({user}\).*Disconnected.* out=(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            text = self._log_text()
            counts = [int(m.group(1)) for m in ends.finditer(text)]
            if len(counts) >= len(logins.findall(text)) or time.monotonic() >= deadline:
                return counts
            time.sleep(0.05)

    def log_lines(self, contains: str) -> list[str]:
        return [line for line in self._log_text().splitlines() if contains in line]

    # -- lifecycle

    def start(self) -> Self:
        if self.running:
            return self
        if self.tls and not (self.dir / "tls" / "ca.pem").exists():
            make_test_ca(self.dir / "tls")
        restart = self.port != 0  # a restart keeps its ports, as a real server's restart does
        for _ in range(1 if restart else 5):
            if not restart:
                self.port = free_port()
                self.imaps_port = free_port() if self.tls else 0
            if self._spawn_and_wait():
                _register(self)
                return self
        raise ServiceError(f"dovecot did not start\n{self._why()}")

    def stop(self) -> None:
        """Stop the server (as an outage would: clients are cut off); ``start()`` brings it back
        on the same ports with the same mail."""
        if self._proc is not None:
            # dovecot's own SIGTERM shutdown lingers a second for its children; the whole
            # process group at once is as good for a test and keeps the suite quick
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            _terminate(self._proc, signal.SIGKILL, 10.0)
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def close(self) -> None:
        _unregister(self)
        self.stop()
        self.port = self.imaps_port = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _atexit_cleanup(self) -> None:
        self.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DovecotServer {self.host}:{self.port} tls={self.tls} {'running' if self.running else 'stopped'}>"

    # -- internals

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _why(self) -> str:
        return f"{_tail(self.dir / 'dovecot.out')}\n{_tail(self.log_path)}"

    def _users(self) -> tuple[str, str, str]:
        """(internal user, login user, mail user): dovecot's own users as root, else ourselves."""
        if os.geteuid() != 0:
            me = getpass.getuser()
            return me, me, me
        try:
            pwd.getpwnam("dovecot")
            pwd.getpwnam("dovenull")
        except KeyError:
            raise ServiceError(
                "users dovecot/dovenull missing: install Debian's dovecot-imapd (scripts/ensure-system-deps.sh)"
            ) from None
        return "dovecot", "dovenull", "dovecot"

    def _write_config(self) -> Path:
        base = self.dir
        internal, login, mail_user = self._users()
        mail = base / "mail"
        mail.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # dovecot's mail processes run as mail_user: they must reach and own the Maildir
            os.chmod(base, 0o711)  # noqa: S103 - traverse only, nothing listed or written
            entry = pwd.getpwnam(mail_user)
            os.chown(mail, entry.pw_uid, entry.pw_gid)
        users = base / "users"
        users.write_text(f"{self.username}:{{PLAIN}}{self.password}::::::\n")
        lines = [
            "protocols = imap",
            f"listen = {self.host}",
            f"base_dir = {base / 'run'}",
            f"state_dir = {base / 'state'}",
            f"instance_name = dispatch-test-{base.name}",
            f"log_path = {self.log_path}",
            f"default_internal_user = {internal}",
            f"default_login_user = {login}",
            f"mail_uid = {mail_user}",
            f"mail_gid = {pwd.getpwnam(mail_user).pw_gid}",
            "first_valid_uid = 0",
            f"mail_location = maildir:{mail}/%u",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            # no brute-force slowdown: a wrong-password test would otherwise wait out the first
            # failure's delay and then slow every later login from 127.0.0.1
            "auth_failure_delay = 0",
            "service anvil {",
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            "}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN {users}",
            "}",
            "userdb {",
            "  driver = static",
            f"  args = uid={mail_user} gid={pwd.getpwnam(mail_user).pw_gid} home={mail}/%u",
            "}",
            "service imap-login {",
            "  chroot =",
            "  inet_listener imap {",
            f"    address = {self.host}",
            f"    port = {self.port}",
            "  }",
        ]
        if self.tls:
            lines += [
                "  inet_listener imaps {",
                f"    address = {self.host}",
                f"    port = {self.imaps_port}",
                "    ssl = yes",
                "  }",
            ]
        lines.append("}")
        if self.tls:
            tls = base / "tls"
            lines += [
                "ssl = yes",
                f"ssl_cert = <{tls / 'server.pem'}",
                f"ssl_key = <{tls / 'server.key'}",
                "ssl_min_protocol = TLSv1.2",
            ]
        else:
            lines.append("ssl = no")
        lines += [f"{key} = {value}" for key, value in self.extra_config.items()]
        conf = base / "dovecot.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _spawn_and_wait(self) -> bool:
        """Start dovecot; True once it greets on its port, False if it died (port taken)."""
        conf = self._write_config()
        self.stop()
        self._out = open(self.dir / "dovecot.out", "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [*_die_with_parent_prefix(), _find_dovecot(), "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "in use" in self._why():
                    return False
                raise ServiceError(f"dovecot exited with {self._proc.returncode}\n{self._why()}")
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                imaplib.IMAP4(self.host, self.port, timeout=1).logout()
                return True
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"dovecot did not answer on {self.host}:{self.port} in {_START_TIMEOUT:g} s\n{self._why()}")
