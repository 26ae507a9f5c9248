"""A throwaway PostgreSQL cluster for the tests that need one: initdb'd in a temp dir, serving on a
Unix socket only, with a password (so the tests go through libpq's PGPASSWORD like a team would),
stopped and started again mid-test for outage tests, removed at the end of the session.

Tests that use it are marked `postgres` and `xdist_group("postgres")`: under `--dist loadgroup`
they all run in one worker, so one cluster serves them and an outage test stops it for no one
else. Without the server binaries they skip, saying so; with CI=true they fail instead.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER = "tokenwatch"
"""The cluster's superuser, the role the tests and their supervisors connect as."""
SERVER_USER = "postgres"
"""PostgreSQL refuses to run as root: as root the server runs as this account."""
PORT = 5432
"""Only names the socket file: the cluster listens on no TCP port, in a directory of its own."""
START_TIMEOUT = 60

pytestmark_postgres = [pytest.mark.postgres, pytest.mark.xdist_group("postgres")]
"""`pytestmark = pytestmark_postgres` in a module whose tests need the cluster."""


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: pg_config's bindir, Debian's
    /usr/lib/postgresql/*/bin (newest first), or PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def missing(reason: str) -> None:
    """Skip (locally) or fail (CI=true) a test whose cluster cannot be had."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests)")
    pytest.skip(reason)


@dataclass
class PgCluster:
    """One initdb'd cluster and the commands that start and stop it."""

    bindir: Path
    root: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=START_TIMEOUT, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def init(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
            "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        options = (
            f"-k {self.socket_dir} -c listen_addresses='' -p {PORT} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                  str(START_TIMEOUT), "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate`: as if its machine lost power)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def env(self, dbname: str = "postgres") -> dict[str, str]:
        """libpq's variables for a client of this cluster (the password among them)."""
        return {
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(PORT),
            "PGUSER": USER,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
        }

    def url(self, dbname: str) -> str:
        """The database's URL as a [fleet] url gives it: no password."""
        return f"postgresql://{USER}@/{dbname}?host={self.socket_dir}&port={PORT}"

    def create_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self.names)}"
        info = self.env()
        with psycopg.connect(
            host=info["PGHOST"], port=PORT, user=USER, password=self.password, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return name


@dataclass
class PgDatabase:
    """A fresh database of the session's cluster, for one test."""

    cluster: PgCluster
    name: str

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    def env(self) -> dict[str, str]:
        return self.cluster.env(self.name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = find_bindir()
    if bindir is None:
        missing(
            "PostgreSQL server binaries not found (initdb, pg_ctl, postgres): `make test` installs "
            "Debian's postgresql package as root; elsewhere install PostgreSQL's server"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            missing(f"running as root and there is no {SERVER_USER} account to run PostgreSQL as")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="twpg-"))
    cluster = PgCluster(bindir, root)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> PgDatabase:
    """A fresh database on a running cluster (a test that stopped it and failed left it down)."""
    pg_cluster.ensure_running()
    return PgDatabase(pg_cluster, pg_cluster.create_database())
