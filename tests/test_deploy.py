"""The production deployment: docker-compose.yml validates, and every process it starts runs here, without
Docker, started the same way with the same environment.

Every app service of the compose file runs docker/entrypoint.sh with one role. These tests start the same
roles with the environment a container of that service gets: the image's ENV (its Dockerfile), then the
service's `environment` from docker-compose.yml, interpolated from .env.example as compose does. Only the
addresses, ports and folders change to this machine's: PostgreSQL (its user, a database of its own), a
Redis server of its own started with the compose file's redis command (so no worker of the rest of the
suite can take its tasks), an S3-protocol server (moto) in place of MinIO with the bucket create-bucket
would make, and temporary folders. One schedule changes too: beat's sweeper is due every second instead of
every minute, so that beat sends it while the test watches.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import yaml

from tests.conftest import IN_CI, ROOT, lesion_jpeg, reachable, wait_for
from tests.test_faults import free_port, stop_group, tail

pytestmark = pytest.mark.e2e

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
APP_SERVICES = ("migrate", "web", "worker-cpu", "worker-gpu", "beat")
ALL_SERVICES = {"db", "redis", "storage", "create-bucket", *APP_SERVICES}
# What web, workers and beat wait for before they start.
APP_DEPENDENCIES = {
    "db": "service_healthy",
    "redis": "service_healthy",
    "storage": "service_healthy",
    "create-bucket": "service_completed_successfully",
    "migrate": "service_completed_successfully",
}
MODEL_VERSION = "deploy-tiny"


# --- reading the compose file as compose does ------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, operator, argument = match["braced"] or match["named"], match["operator"], match["argument"]
        value = variables.get(name)
        missing = value is None or (operator is not None and operator.startswith(":") and value == "")
        if operator in (":-", "-"):
            return argument if missing else value
        if operator in (":?", "?") and missing:
            raise ValueError(f"{name} is required: {argument}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def read_env_file(path: Path) -> dict[str, str]:
    variables = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            variables[name.strip()] = value
    return variables


def image_environment(dockerfile: Path) -> dict[str, str]:
    """The ENV instructions of a Dockerfile: what every container of that image starts with."""
    environment = {}
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[len("ENV ") :]):
                name, _, value = item.partition("=")
                environment[name] = value
    return environment


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    """A service's env_file and environment, interpolated."""
    definition = compose_file()["services"][service]
    environment: dict[str, str] = {}
    env_files = definition.get("env_file") or []
    for env_file in [env_files] if isinstance(env_files, str) else env_files:
        environment.update(read_env_file(ROOT / interpolate(env_file, variables)))
    entries = definition.get("environment") or {}
    if isinstance(entries, list):
        entries = dict(entry.partition("=")[::2] for entry in entries)
    for name, value in entries.items():
        if value is None:  # taken from the shell running compose: absent here
            continue
        environment[name] = interpolate(str(value), variables)
    return environment


def container_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    """What a container of the service sees: the image's ENV, then the compose file's environment."""
    build = compose_file()["services"][service]["build"]
    return {**image_environment(ROOT / build["dockerfile"]), **compose_environment(service, variables)}


def entrypoint_roles() -> set[str]:
    return set(re.findall(r"^    ([a-z-]+)\)$", ENTRYPOINT.read_text(), flags=re.MULTILINE))


# --- docker-compose config -------------------------------------------------------------------------------


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        message = "docker-compose is not installed (make test installs it: apt-get install -y docker-compose)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    # Nothing from this shell (CELERY_BROKER_URL, DATABASE_URL, ...) may leak into the interpolation.
    return subprocess.run(
        [docker_compose(), "--project-directory", str(ROOT), "--env-file", str(env_file), "-f", str(COMPOSE_FILE),
         "config"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_config_validates_with_the_example_env(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    result = compose_config(env_file)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == ALL_SERVICES

    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    redis = services["redis"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert services["storage"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert services["create-bucket"]["depends_on"] == {"storage": {"condition": "service_healthy"}}
    assert Path(services["create-bucket"]["volumes"][0].split(":")[0]) == ROOT / "docker" / "create-bucket.sh"
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"

    roles = entrypoint_roles()
    for name in APP_SERVICES:
        service = services[name]
        assert Path(service["build"]["context"]) == ROOT
        assert service["command"][0] in roles, name
        assert service["environment"]["DJANGO_SETTINGS_MODULE"] == "webapp.settings.prod"
        assert service["environment"]["STORAGE_BACKEND"] == "s3"
        if name != "migrate":
            conditions = {dependency: spec["condition"] for dependency, spec in service["depends_on"].items()}
            assert conditions == APP_DEPENDENCIES, name
        # The test below reads the compose file itself: it must see what docker-compose sees.
        assert {key: str(value) for key, value in service["environment"].items()} == compose_environment(
            name, read_env_file(env_file)
        ), name

    assert services["web"]["healthcheck"]["test"] == ["CMD", "/app/docker/entrypoint.sh", "web-health"]
    for name, queues in (("worker-cpu", "default"), ("worker-gpu", "inference,explain")):
        assert services[name]["environment"]["WORKER_QUEUES"] == queues
        assert services[name]["healthcheck"]["test"] == ["CMD", "/app/docker/entrypoint.sh", "worker-health"]
        # Its own model cache, where the image's MODEL_CACHE_DIR points.
        cache_dir = image_environment(ROOT / services[name]["build"]["dockerfile"])["MODEL_CACHE_DIR"]
        assert any(volume.split(":")[1] == cache_dir for volume in services[name]["volumes"]), name

    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    ]
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpu["environment"]["WORKER_CONCURRENCY"] == "2"
    # Batches of 128 and a memory cap above what a warmed CUDA process holds (measured on an H200, issue 17).
    assert gpu["environment"]["INFERENCE_BATCH_SIZE"] == "128"
    assert gpu["environment"]["WORKER_MAX_MEMORY_GROWTH_MB"] == "2048"
    assert "WORKER_MAX_MEMORY_GROWTH_MB" not in services["worker-cpu"]["environment"]  # the CPU default
    # Integrated Gradients on the GPU: bf16, batches of 32 explanations of 50 steps.
    assert gpu["environment"]["EXPLAIN_PRECISION"] == "auto"
    assert int(gpu["environment"]["EXPLAIN_BATCH_MAX_STEPS"]) == 50 * int(gpu["environment"]["EXPLAIN_BATCH_SIZE"])
    assert gpu["environment"]["WORKER_HOSTNAME"] != services["worker-cpu"]["environment"]["WORKER_HOSTNAME"]


def test_compose_config_refuses_to_start_without_a_secret(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(re.sub(r"^POSTGRES_PASSWORD=.*$", "POSTGRES_PASSWORD=", ENV_EXAMPLE.read_text(), flags=re.M))
    result = compose_config(env_file)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


def test_cpu_and_gpu_images_build_the_same_app():
    def instructions(dockerfile: str) -> list[str]:
        text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    cpu, gpu = instructions("Dockerfile"), instructions("Dockerfile.gpu")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130" in gpu
    differences = set(cpu) ^ set(gpu)
    assert all(line.startswith(("ARG TORCH_INDEX_URL=", "ENV NVIDIA_")) for line in differences), differences
    assert cpu[0] == "FROM python:3.11-slim" and "USER app" in cpu
    assert cpu[-2:] == ['ENTRYPOINT ["/app/docker/entrypoint.sh"]', 'CMD ["web"]']


# --- the roles, started here ----------------------------------------------------------------------------


@dataclass
class Stack:
    folder: Path
    variables: dict[str, str]
    overrides: dict[str, dict[str, str]]
    bucket_client: object
    bucket: str
    migrate_runs: list[subprocess.CompletedProcess] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""

    def env(self, service: str) -> dict[str, str]:
        return {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.folder),
            **container_environment(service, self.variables),
            **self.overrides[service],
        }

    def run(self, service: str, role: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ENTRYPOINT), role, *args], env=self.env(service), capture_output=True, text=True, timeout=timeout
        )

    def start(self, service: str, role: str) -> subprocess.Popen:
        with open(self.log_path(service), "wb") as log:
            process = subprocess.Popen(
                [str(ENTRYPOINT), role], env=self.env(service), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes[service] = process
        return process

    def log_path(self, service: str) -> Path:
        return self.folder / f"{service}.log"

    def log(self, service: str) -> str:
        return self.log_path(service).read_text(errors="replace")

    def logs(self, *services: str) -> str:
        return "".join(f"\n--- {service} log ---\n{tail(self.log_path(service))}" for service in services)

    def wait_for(self, predicate, timeout: float, message: str, *services: str, interval: float = 0.5):
        """wait_for, with the services' logs in the failure message."""
        try:
            return wait_for(predicate, timeout, interval=interval, message=message)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self.logs(*services)}") from None

    @property
    def web_url(self) -> str:
        return f"http://{self.overrides['web']['GUNICORN_BIND']}"

    def client(self, **headers: str) -> httpx.Client:
        """As the TLS-terminating proxy in front of web would send it: the site's name, over HTTPS."""
        host = self.variables["ALLOWED_HOSTS"].split(",")[0]
        return httpx.Client(
            base_url=self.web_url, headers={"Host": host, "X-Forwarded-Proto": "https", **headers}, timeout=30
        )


def with_address(url: str, host: str, port: int, *, user: str | None = None, password: str | None = None,
                 path: str | None = None) -> str:  # fmt: skip
    """The same URL on another host and port (and, where given, another user and path)."""
    parts = urlsplit(url)
    user = parts.username if user is None else user
    password = parts.password if password is None else password
    credentials = f"{user or ''}:{password}@" if password else (f"{user}@" if user else "")
    return urlunsplit(parts._replace(netloc=f"{credentials}{host}:{port}", path=parts.path if path is None else path))


def compose_redis_command(variables: dict[str, str]) -> list[str]:
    return [interpolate(str(part), variables) for part in compose_file()["services"]["redis"]["command"]]


def on_the_server(*statements: str) -> None:
    """SQL statements on this machine's PostgreSQL, outside any database (CREATE/DROP DATABASE)."""
    import psycopg
    from django.conf import settings

    database = settings.DATABASES["default"]
    with psycopg.connect(
        host=database["HOST"] or "127.0.0.1", port=database["PORT"] or 5432, user=database["USER"],
        password=database.get("PASSWORD") or None, dbname="postgres", autocommit=True,
    ) as connection:  # fmt: skip
        for statement in statements:
            connection.execute(statement)


def docker_build_collectstatic(folder: Path, static_root: str) -> subprocess.CompletedProcess:
    """The image's collectstatic step (a RUN line of docker/Dockerfile), run here as written, with the
    environment a build step has: the image's ENV, nothing from compose."""
    dockerfile = ROOT / "docker" / "Dockerfile"
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(folder),
        **image_environment(dockerfile),
        "STATIC_ROOT": static_root,
        "VAR_DIR": str(folder / "build-var"),
    }
    text = dockerfile.read_text().replace("\\\n", " ")
    (command,) = [
        line[len("RUN ") :] for line in text.splitlines() if line.startswith("RUN ") and "collectstatic" in line
    ]
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One set of processes for the module: migrate (run to the end), then web, worker-gpu (the inference
    and explain queues), worker-cpu (default) and beat, each from docker/entrypoint.sh."""
    from django.conf import settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: one line per request otherwise
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)", pytrace=False)
    folder = tmp_path_factory.mktemp("deploy")
    variables = read_env_file(ENV_EXAMPLE)
    machine_db = settings.DATABASES["default"]
    database = f"{machine_db['NAME'].removeprefix('test_')}_deploy"
    redis_port, web_port = free_port(), free_port()

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    started: list[subprocess.Popen] = []
    try:
        # MinIO's place: an S3-protocol server with the private bucket create-bucket would make.
        import boto3

        s3_endpoint = "http://{}:{}".format(*server.get_host_and_port())
        bucket_client = boto3.client(
            "s3", endpoint_url=s3_endpoint, region_name=variables["S3_REGION"],
            aws_access_key_id=variables["AWS_ACCESS_KEY_ID"], aws_secret_access_key=variables["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        bucket_client.create_bucket(Bucket=variables["S3_BUCKET"])
        # Redis as the compose file starts it (AOF, password), on a port and in a folder of its own.
        redis_dir = folder / "redis"
        redis_dir.mkdir()
        with open(folder / "redis.log", "wb") as log:
            redis = subprocess.Popen(
                [*compose_redis_command(variables), "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--dir", str(redis_dir), "--save", ""],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        started.append(redis)
        wait_for(lambda: reachable("127.0.0.1", redis_port, 0.2), 15, message="redis-server")
        on_the_server(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', f'CREATE DATABASE "{database}"')

        def addresses(service: str) -> dict[str, str]:
            compose = compose_environment(service, variables)
            changes = {
                "DATABASE_URL": with_address(
                    compose["DATABASE_URL"],
                    machine_db["HOST"] or "127.0.0.1",
                    int(machine_db["PORT"] or 5432),
                    user=machine_db["USER"],
                    password=machine_db.get("PASSWORD") or "",
                    path=f"/{database}",
                ),  # this machine's server, its user, a database of this module's own
                "CELERY_BROKER_URL": with_address(compose["CELERY_BROKER_URL"], "127.0.0.1", redis_port),
                "CACHE_URL": with_address(compose["CACHE_URL"], "127.0.0.1", redis_port),
                "S3_ENDPOINT_URL": s3_endpoint,
                "VAR_DIR": str(folder / service / "var"),
                "STATIC_ROOT": str(folder / "static"),
                "MODEL_CACHE_DIR": str(folder / service / "model-cache"),
                "WORKER_METRICS_PORT": str(free_port()),
                "TMPDIR": str(folder / service / "tmp"),
            }
            if "GUNICORN_BIND" in compose:
                changes["GUNICORN_BIND"] = f"127.0.0.1:{web_port}"
            for name in ("VAR_DIR", "MODEL_CACHE_DIR", "TMPDIR"):  # the image makes its folders
                Path(changes[name]).mkdir(parents=True, exist_ok=True)
            return changes

        overrides = {service: addresses(service) for service in APP_SERVICES}
        # Beat's schedule is a minute or more; its housekeeping task is made due every second here.
        overrides["beat"]["REQUEUE_INTERVAL_SECONDS"] = "1"
        stack = Stack(folder, variables, overrides, bucket_client, variables["S3_BUCKET"])

        built = docker_build_collectstatic(folder, overrides["web"]["STATIC_ROOT"])
        assert built.returncode == 0, built.stderr[-3000:]

        stack.migrate_runs.append(stack.run("migrate", "migrate"))
        assert stack.migrate_runs[0].returncode == 0, stack.migrate_runs[0].stderr[-3000:]
        # Like compose, web, workers and beat start once migrate has finished.
        for service, role in (("web", "web"), ("worker-gpu", "worker"), ("worker-cpu", "worker"), ("beat", "beat")):
            started.append(stack.start(service, role))
        # Meanwhile the operator's first steps (docs/deployment.md): register a model, create a user and a token.
        import torch

        from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes

        torch.manual_seed(0)
        checkpoint = folder / "model.pt"
        checkpoint.write_bytes(
            checkpoint_bytes(build_model("resnet_tiny").eval(), CheckpointMeta(arch="resnet_tiny", input_size=64))
        )
        registered = stack.run(
            "web", "manage", "register_model", str(checkpoint), "--name", MODEL_VERSION, "--activate"
        )
        assert registered.returncode == 0, registered.stderr[-3000:]
        created = stack.run("web", "manage", "shell", "-c", CREATE_CLINICIAN)
        assert created.returncode == 0, created.stderr[-3000:]
        stack.token = created.stdout.strip().splitlines()[-1]

        for service in ("worker-gpu", "worker-cpu"):
            wait_for(
                lambda service=service: " ready." in stack.log(service) or stack.processes[service].poll() is not None,
                90, message=f"{service} to start",
            )  # fmt: skip
            assert stack.processes[service].poll() is None, tail(stack.log_path(service))
        wait_for(
            lambda: "beat: Starting..." in stack.log("beat") or stack.processes["beat"].poll() is not None,
            60, message="beat to start",
        )  # fmt: skip
        assert stack.processes["beat"].poll() is None, tail(stack.log_path("beat"))
        wait_for(
            lambda: stack.run("web", "web-health").returncode == 0 or stack.processes["web"].poll() is not None,
            60, interval=0.5, message="web to answer /healthz",
        )  # fmt: skip
        assert stack.processes["web"].poll() is None, tail(stack.log_path("web"))
        yield stack
    finally:
        for process in reversed(started):
            stop_group(process)
        server.stop()
        on_the_server(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


CREATE_CLINICIAN = """
from diagnosis.models import Clinic
from diagnosis.services.clinics import create_clinician
from diagnosis.services.tokens import create_api_token
user = create_clinician(clinic=Clinic.objects.create(name="Deploy clinic"), username="deploy-clinician", password=None)
print(create_api_token(user=user, name="deploy-test")[1])
"""


def test_migrate_role_migrates_and_exits_and_runs_again_as_a_no_op(stack):
    first = stack.migrate_runs[0]
    assert first.returncode == 0
    assert "Applying diagnosis.0001_initial... OK" in first.stdout
    again = stack.run("migrate", "migrate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "No migrations to apply." in again.stdout


def test_collected_static_files_are_readable_by_the_apps_own_user(stack):
    """The image collects static files as root and runs the app as uid 10001: with the media's private
    modes (0600 files, 0700 folders) every gunicorn worker died on PermissionError at its first start."""
    static = stack.folder / "static"
    paths = [static, *static.rglob("*")]
    assert len(paths) > 10
    needed = {True: 0o005, False: 0o004}  # others may list and enter folders, and read files
    private = [f"{path.relative_to(static)} {path.stat().st_mode & 0o777:o}" for path in paths
               if path.stat().st_mode & needed[path.is_dir()] != needed[path.is_dir()]]  # fmt: skip
    assert private == []


def test_web_role_serves_healthz_readyz_and_static_files_with_production_settings(stack):
    with stack.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
            "database": True, "broker": True, "storage": True, "model": True,
        }  # fmt: skip
        # Collected at build time, served by WhiteNoise.
        static = client.get("/static/admin/css/base.css")
        assert static.status_code == 200 and b"body" in static.content
    # Production settings: plain HTTP is redirected to HTTPS (probes and scrapes inside the deployment's
    # network are exempt), an unknown host is refused.
    with httpx.Client(base_url=stack.web_url, timeout=30) as bare:
        redirected = bare.get("/api/v1/", headers={"Host": stack.variables["ALLOWED_HOSTS"]})
        assert redirected.status_code == 301
        assert redirected.headers["location"].startswith("https://")
        for probe in ("/healthz", "/readyz"):
            assert bare.get(probe, headers={"Host": stack.variables["ALLOWED_HOSTS"]}).status_code == 200
        assert bare.get("/healthz", headers={"X-Forwarded-Proto": "https"}).status_code == 400
    assert stack.run("web", "web-health").returncode == 0


def raw_request(stack, head: str, first_body: bytes) -> tuple[bytes, bool]:
    """Send a request's head and the start of its body over a plain socket, as a client that would go on
    sending; return what gunicorn answers and whether it then closed the connection."""
    host, port = stack.overrides["web"]["GUNICORN_BIND"].split(":")
    with socket.create_connection((host, int(port)), timeout=15) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + first_body)
        answer, closed = b"", False
        connection.settimeout(5)
        try:
            while chunk := connection.recv(65536):
                answer += chunk
            closed = True  # gunicorn closed it: the rest of the body is never read
        except TimeoutError:
            pass
    return answer, closed


def test_gunicorn_refuses_an_oversized_or_chunked_body_without_reading_it(stack):
    host = stack.variables["ALLOWED_HOSTS"].split(",")[0]
    common = f"Host: {host}\nX-Forwarded-Proto: https\nAuthorization: Token {stack.token}\n"
    # A client announcing 315 MB: answered after the first kilobyte, not after the whole body.
    answer, closed = raw_request(stack, f"POST /api/v1/images/ HTTP/1.1\n{common}Content-Type: multipart/form-data; "
                                 "boundary=x\nContent-Length: 330301440\n", b"--x\r\n" + b"\0" * 1024)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request_too_large" in answer and closed
    chunked_head = f"POST /api/v1/images/batch/ HTTP/1.1\n{common}Content-Type: multipart/form-data; boundary=x\n"
    answer, closed = raw_request(stack, chunked_head + "Transfer-Encoding: chunked\n", b"400\r\n" + b"\0" * 1024)
    assert answer.startswith(b"HTTP/1.1 411"), answer[:300]
    assert closed


def test_worker_roles_process_an_upload_made_through_the_api(stack):
    with stack.client(Authorization=f"Token {stack.token}") as client:
        image = ("lesion.jpg", lesion_jpeg(seed=5, size=96), "image/jpeg")
        response = client.post("/api/v1/images/", files={"image": image})
        assert response.status_code == 202, response.text
        status_path = urlsplit(response.json()["status_url"]).path

        def finished():
            body = client.get(status_path).json()
            return body if body["state"] in ("done", "failed") else None

        body = stack.wait_for(finished, 90, "the upload to be processed", "worker-gpu", "web")
        assert body["state"] == "done", (body, tail(stack.log_path("worker-gpu")))
        assert body["prediction"]["model_version"] == MODEL_VERSION
        # The inference queue is worker-gpu's alone.
        stack.wait_for(
            lambda: re.search(r"predict_image_task\[[^\]]+\] succeeded", stack.log("worker-gpu")),
            30, "worker-gpu to log the task", "worker-gpu",
        )  # fmt: skip

        # Integrated Gradients goes to the explain queue: worker-gpu.
        def integrated_gradients_finished():
            listing = client.get(f"{status_path}explanations/").json()
            entries = listing["results"] if isinstance(listing, dict) else listing
            states = {entry["method"]: entry["state"] for entry in entries}
            return states if states.get("integrated_gradients") in ("done", "failed") else None

        states = stack.wait_for(integrated_gradients_finished, 90, "Integrated Gradients", "worker-gpu")
        assert states["integrated_gradients"] == "done", tail(stack.log_path("worker-gpu"))
        stack.wait_for(
            lambda: re.search(r"explain_image_task\[[^\]]+\] succeeded", stack.log("worker-gpu")),
            30, "worker-gpu to log the task", "worker-gpu",
        )  # fmt: skip
        # Grad-CAM's pictures are drawn at their first view (GRADCAM_PICTURES=on_view), by the web tier.
        listing = client.get(f"{status_path}explanations/").json()
        entries = listing["results"] if isinstance(listing, dict) else listing
        gradcam = next(entry for entry in entries if entry["method"] == "gradcam")
        overlay = client.get(urlsplit(gradcam["overlay_url"]).path)
        assert overlay.status_code == 200 and overlay.content[:2] == b"\xff\xd8", overlay.text[:300]

        downloaded = client.get(f"{status_path}file/")
        assert downloaded.status_code == 200 and downloaded.content[:2] == b"\xff\xd8"
    # Everything lives in the bucket (STORAGE_BACKEND=s3, as compose sets it), nothing on local disk.
    keys = [entry["Key"] for entry in stack.bucket_client.list_objects_v2(Bucket=stack.bucket).get("Contents", [])]
    assert len(keys) >= 3, keys  # the weights, the photo, the heatmaps
    assert not any((stack.folder / service / "var" / "media").exists() for service in APP_SERVICES)


def test_beat_role_sends_scheduled_tasks_that_worker_cpu_runs(stack):
    stack.wait_for(
        lambda: re.search(r"requeue_stale_images_task\[[^\]]+\] succeeded", stack.log("worker-cpu")),
        60, "a scheduled task to run on worker-cpu", "beat", "worker-cpu",
    )  # fmt: skip
    assert "Sending due task requeue-stale-images" in stack.log("beat")
    assert stack.processes["beat"].poll() is None


def test_worker_health_role_pings_only_its_own_worker(stack):
    assert stack.run("worker-gpu", "worker-health").returncode == 0
    assert stack.run("worker-cpu", "worker-health").returncode == 0

    worker = stack.processes["worker-gpu"]
    worker.send_signal(signal.SIGTERM)  # as `docker compose stop` does: a warm shutdown
    assert worker.wait(timeout=60) == 0, tail(stack.log_path("worker-gpu"))

    # worker-cpu still answers pings, but not for worker-gpu's node.
    stopped = stack.run("worker-gpu", "worker-health")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert stack.run("worker-cpu", "worker-health").returncode == 0


def test_web_workers_and_beat_stop_cleanly_on_sigterm(stack):
    running = {service: stack.processes[service] for service in ("web", "worker-cpu", "beat")}
    for process in running.values():
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    for service, process in running.items():
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert returncode == 0, f"{service} exited with {returncode}:\n{tail(stack.log_path(service))}"
    assert stack.run("web", "web-health").returncode == 1


def test_an_unknown_role_is_refused():
    result = subprocess.run([str(ENTRYPOINT), "serve"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 64
    assert "unknown role 'serve'" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${SET}", "value"),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),
        ("$SET/$$literal", "value/$literal"),
        ("redis://:${SET}@${HOST:-redis}:6379/0", "redis://:value@redis:6379/0"),
    ],
)
def test_interpolation_reads_the_compose_file_as_compose_does(text, expected):
    assert interpolate(text, {"SET": "value", "EMPTY": ""}) == expected


def test_interpolation_refuses_a_missing_required_variable():
    with pytest.raises(ValueError, match="SECRET_KEY is required: set it"):
        interpolate("${SECRET_KEY:?set it}", {"SECRET_KEY": ""})
