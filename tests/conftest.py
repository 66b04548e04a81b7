"""Shared fixtures: a real PostgreSQL server, a real headless Chromium, the feedback app served over HTTP.

Nothing here is a fake: the Postgres fixture runs initdb in a temporary folder
and starts the server on a free loopback port (as the `postgres` user when the
tests run as root, since postgres refuses to run as root); Chromium is Debian's,
driven by Playwright.
"""

import glob
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest


def pytest_configure(config):
    """Under pytest-xdist (tests/run.sh runs `-n auto`) each worker is a process of its own on the same
    cores: give each its share of them, in-process (torch) and in the commands it starts (OMP),
    so that two workers' OpenMP threads do not fight over the same cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def start_postgres(root):
    """Start a PostgreSQL server with its data in the empty folder `root`: returns (host, port, user, stop)."""
    bindir = _pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # postgres will not run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        for up in root.parents:  # it must reach its folder (pytest's are 0700; xdist's a level deeper)
            if not os.stat(up).st_mode & 0o001:
                os.chmod(up, os.stat(up).st_mode | 0o055)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    for attempt in range(3):  # a free port may be taken before the server binds it (pytest-xdist's other workers)
        port = free_port()
        try:
            run(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start", "-o",
                f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=300")
            break
        except subprocess.CalledProcessError:
            if attempt == 2:
                raise
    stop = lambda: subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],  # noqa: E731
                                  capture_output=True)
    return "127.0.0.1", port, "postgres", stop


def create_database(host, port, user, name):
    """A new database on the server; its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{user}@{host}:{port}/{name}"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """(host, port, user) of a PostgreSQL server started for this test session, stopped at its end."""
    if _pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (tests/run.sh installs them)")
    host, port, user, stop = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield host, port, user
    finally:
        stop()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: tiny models gain nothing from more, and on a
    loaded machine OpenMP's spinning threads make them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_db_counter = iter(range(1_000_000))


@pytest.fixture
def pg_url(postgres_server):
    """A fresh, empty database on the session's server, as a SQLAlchemy URL."""
    return create_database(*postgres_server, f"t{next(_db_counter)}_{os.getpid()}")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """Each test that takes it runs twice: on a SQLite file and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium under Playwright."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed (tests/run.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


class LiveServer:
    """The feedback app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app, **config):
        """`config`: more of uvicorn.Config's settings (proxy_headers, forwarded_allow_ips, ...)."""
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def engine(self):
        return self.app.state.engine

    @property
    def admin_url(self):
        return f"{self.url}/admin/sign-in/{self.app.state.sign_in_links.new()}"  # a one-time link

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.dispose()


@pytest.fixture
def live_app(db_url):
    """A running feedback app on a fresh database (SQLite and PostgreSQL both)."""
    from shoggoth.feedback.app import create_app

    srv = LiveServer(create_app(db_url, admin_token="admin-secret-token"))
    yield srv
    srv.stop()
