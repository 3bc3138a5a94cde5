"""The restore drill (issue 22): manage.py backup while an upload is in flight, the database and the storage
wiped, manage.py restore into the empty database, and then every row count, file hash and audit event
checked, the API asked, and the in-flight upload finished by a worker. On PostgreSQL with local files (the
session's real workers, the commands in this process), on PostgreSQL with an S3 bucket (moto; a web process,
a worker and the commands in their own processes) and on the embedded default (SQLite, the filesystem
broker; everything in its own processes). Then: a restore refused on a target that is not empty, damaged
archives detected and named before anything changes, and bad arguments.

The upload in flight: on PostgreSQL the test holds the prediction table (LOCK ... EXCLUSIVE MODE, which
readers and pg_dump pass) so that the worker that claimed the upload waits to record it while the backup
runs; on the embedded default the worker is paused (SIGSTOP) with the upload queued.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from diagnosis.models import Clinic, Explanation, ImageState, LesionImage, ModelVersion
from diagnosis.services import backup_database
from diagnosis.services.backup_archive import MANIFEST, ArchiveReader
from tests.conftest import ROOT, lesion_jpeg, token_client, upload_file
from tests.factories import ClinicFactory, ClinicianFactory
from tests.test_faults import Processes, WebServer, free_port, wait_ready, wait_showing_log
from tests.test_storage_s3 import moto_bucket

pytestmark = pytest.mark.e2e

# Run in this process (exec) and in the embedded default's (manage.py shell -c): the service's state as the
# drill compares it. Every table's row count, every stored file's SHA-256, every audit event.
STATE = """
import hashlib, json, posixpath
from django.core.files.storage import default_storage
from diagnosis.models import AuditEvent
from diagnosis.services.backup_database import live_counts

def stored(folder=""):
    try:
        folders, files = default_storage.listdir(folder)
    except FileNotFoundError:
        return
    for name in files:
        yield posixpath.join(folder, name)
    for inner in folders:
        yield from stored(posixpath.join(folder, inner))

files = {}
for name in stored():
    with default_storage.open(name, "rb") as handle:
        files[name] = hashlib.sha256(handle.read()).hexdigest()
audit = [[event.pk, event.at.isoformat(), event.actor_username, event.action, event.object_type, event.object_id,
          event.via, event.ip_address] for event in AuditEvent.objects.order_by("pk")]
print(json.dumps({"tables": live_counts(), "files": files, "audit": audit}))
"""
# A drift report with its Evidently files (the reference set: the uploads' own features) and the portal's
# kept thumbnails of the photos: the stored files that are neither uploads nor explanations.
MONITOR = """
from diagnosis.models import LesionImage, ReferenceFeature, UploadFeatures
from diagnosis.services.monitoring import run_drift_report
from diagnosis.services.previews import preview_jpeg
from diagnosis.services.registry import active_model_version
version = active_model_version()
ReferenceFeature.objects.bulk_create([
    ReferenceFeature(model_version=version, split="validation", label="benign", path=f"reference/{index}.jpg",
                     values=row.values)
    for index, row in enumerate(UploadFeatures.objects.filter(model_version=version).order_by("pk"))
])
report = run_drift_report(triggered_by="restore drill")
assert report.snapshot and report.html, (report.status, report.message)
for image in LesionImage.objects.filter(state="done"):
    preview_jpeg(image, "thumb")
"""
# The embedded default's accounts and model, made by manage.py shell -c.
EMBEDDED_SETUP = """
import json, os
from pathlib import Path
from django.contrib.auth import get_user_model
from diagnosis.models import Clinic, ClinicMembership
from diagnosis.services.registry import register_model
from diagnosis.services.tokens import create_api_token
register_model(checkpoint=Path(os.environ["DRILL_CHECKPOINT"]).read_bytes(), version="embedded-drill", activate=True)
user = get_user_model().objects.create_user("drill", password="drill-password-0")
ClinicMembership.objects.create(user=user, clinic=Clinic.objects.create(name="Embedded drill"))
print(json.dumps({"token": create_api_token(user=user, name="drill")[1]}))
"""
DRILL_ENV = {"DRIFT_MIN_UPLOADS": "2", "DRIFT_MIN_REFERENCE": "2", "ALERT_EMAILS": "", "ALERT_WEBHOOK_URL": ""}


def run_here(code: str) -> str:
    """Run one of the code blocks above in this process; what it printed."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        exec(code, {"__name__": "drill"})  # the test's own code, shared with a subprocess
    return buffer.getvalue()


def state_here() -> dict:
    return json.loads(run_here(STATE))


def manage(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def command_here(name: str, *args: str) -> str:
    """A management command in this process; its output (CommandError propagates)."""
    out = io.StringIO()
    call_command(name, *args, stdout=out, stderr=out)
    return out.getvalue()


@dataclass
class Api:
    """The API as a client sees it: DRF's test client in this process, or httpx against a web process."""

    client: object
    http: bool

    def _body(self, response) -> bytes:
        if self.http:
            return response.content
        streamed = getattr(response, "streaming_content", None)
        return b"".join(streamed) if streamed is not None else response.content

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.client.get(path)
        return response.status_code, self._body(response)

    def json(self, path: str):
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def post(self, path: str, body: dict) -> dict:
        response = self.client.post(path, json=body) if self.http else self.client.post(path, body, format="json")
        assert response.status_code == 201, (path, response.status_code, self._body(response)[:300])
        return response.json()

    def upload(self, seed: int, lesion: str) -> str:
        data = lesion_jpeg(seed=seed, size=96)
        if self.http:
            response = self.client.post("/api/v1/images/", files={"image": ("lesion.jpg", data, "image/jpeg")},
                                        data={"lesion": lesion})  # fmt: skip
        else:
            response = self.client.post("/api/v1/images/", {"image": upload_file(data), "lesion": lesion},
                                        format="multipart")  # fmt: skip
        assert response.status_code == 202, (response.status_code, self._body(response)[:300])
        return response.json()["id"]


def populate(api: Api) -> tuple[str, list[str]]:
    """A patient, a lesion and three photos through the API; (lesion id, image ids)."""
    patient = api.post("/api/v1/patients/", {"reference": f"PT-DRILL-{uuid.uuid4().hex[:6]}"})
    lesion = api.post("/api/v1/lesions/", {"patient": patient["id"], "body_site": "back"})["id"]
    return lesion, [api.upload(70 + index, lesion) for index in range(3)]


def exercise(api: Api, ids: list[str]) -> None:
    """Feedback, the explanations' files (Grad-CAM's pictures are drawn at this first view), a download:
    the rows, files and audit events a clinic makes."""
    image = ids[0]
    api.post(f"/api/v1/images/{image}/feedback/", {"kind": "assessment", "agrees": True})
    api.post(f"/api/v1/images/{ids[1]}/feedback/", {"kind": "histopathology", "diagnosis": "melanoma"})
    for explanation in api.json(f"/api/v1/images/{image}/explanations/"):
        for kind in ("overlay", "heatmap", "attribution"):
            status, body = api.get(f"/api/v1/explanations/{explanation['id']}/{kind}/")
            assert status == 200 and body, (explanation["method"], kind, status)
    assert api.get(f"/api/v1/images/{image}/file/")[0] == 200


def processed(ids: list[str]) -> bool:
    """Each image done, with its Grad-CAM and Integrated Gradients done (read from the database)."""
    failed = list(LesionImage.objects.filter(pk__in=ids, state=ImageState.FAILED).values_list("error", flat=True))
    assert not failed, failed
    done = LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE).count() == len(ids)
    explained = Explanation.objects.filter(image_id__in=ids, state=Explanation.State.DONE,
                                           method__in=["gradcam", "integrated_gradients"]).count()  # fmt: skip
    return done and explained == 2 * len(ids)


def processed_via_api(api: Api, ids: list[str]) -> bool:
    for image in ids:
        if api.json(f"/api/v1/images/{image}/")["state"] != "done":
            return False
        listed = api.json(f"/api/v1/images/{image}/explanations/")
        if {item["method"] for item in listed if item["state"] == "done"} != {"gradcam", "integrated_gradients"}:
            return False
    return True


def the_archive(folder: Path) -> Path:
    archives = list(folder.glob("backup-*.tar"))
    assert len(archives) == 1 and not list(folder.glob("*.partial")), list(folder.iterdir())
    return archives[0]


def check_manifest(archive: Path, before: dict) -> dict:
    """The archive holds exactly what the service held at the backup: each table's rows, each file's hash."""
    with ArchiveReader(archive) as reader:
        manifest = reader.manifest
        assert reader.verify() == []
    assert manifest["tables"] == before["tables"]
    assert {entry["name"]: entry["sha256"] for entry in manifest["files"]} == before["files"]
    assert manifest["missing_files"] == []
    kinds = {name.split("/")[0] for name in before["files"]}
    assert kinds == {"images", "explanations", "models", "monitoring", "previews"}, kinds
    return manifest


def check_api_after_restore(api: Api, ids: list[str], in_flight: str, before: dict) -> None:
    """The restored service answers: every photo listed and done, the files as they were backed up."""
    listed = {item["id"]: item["state"] for item in api.json("/api/v1/images/")["results"]}
    assert listed == {image: "done" for image in [*ids, in_flight]}
    detail = api.json(f"/api/v1/images/{in_flight}/")
    assert detail["prediction"]["probability_malignant"] is not None
    status, body = api.get(f"/api/v1/images/{ids[0]}/file/")
    photos = {digest for name, digest in before["files"].items() if name.startswith("images/")}
    assert status == 200 and hashlib.sha256(body).hexdigest() in photos


# --- PostgreSQL ----------------------------------------------------------------------------------------


@pytest.fixture
def schema_guard(transactional_db):
    """The drills drop every table of the test database; should one fail before its restore, migrate
    rebuilds them so that the rest of the session has its tables."""
    yield
    with connection.cursor() as cursor:
        tables = backup_database.table_names(cursor, "postgresql")
    if "diagnosis_lesionimage" not in tables:
        call_command("migrate", verbosity=0)


def _raw_connection() -> psycopg.Connection:
    params = connection.settings_dict
    keys = {"dbname": params["NAME"], "host": params.get("HOST"), "port": params.get("PORT"),
            "user": params.get("USER"), "password": params.get("PASSWORD")}  # fmt: skip
    return psycopg.connect(**{key: value for key, value in keys.items() if value})


@contextmanager
def predictions_held():
    """Hold the prediction table: a worker that claimed an upload waits to record it, so the upload stays
    claimed and unrecorded while the backup runs (readers, pg_dump included, are not held)."""
    with _raw_connection() as raw:
        raw.execute("LOCK TABLE diagnosis_prediction IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            raw.rollback()


def worker_waits_on_predictions() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'diagnosis_prediction'::regclass AND NOT granted"
        )
        return cursor.fetchone()[0] > 0


def wipe_postgres() -> None:
    with connection.cursor() as cursor:
        tables = backup_database.table_names(cursor, "postgresql")
        cursor.execute("DROP TABLE " + ", ".join(f'"{table}"' for table in tables) + " CASCADE")
        assert backup_database.table_names(cursor, "postgresql") == []


def wipe_storage() -> None:
    for name in state_here()["files"]:
        default_storage.delete(name)
    assert state_here()["files"] == {}


def drill_settings(settings) -> None:
    settings.DRIFT_MIN_UPLOADS, settings.DRIFT_MIN_REFERENCE = 2, 2
    settings.ALERT_EMAILS, settings.ALERT_WEBHOOK_URL = [], ""


def postgres_drill(api: Api, tmp_path: Path, *, worker, backup, restore, sweeper: bool) -> None:
    """The drill on PostgreSQL; `backup(dest)` and `restore(archive)` run the commands and return their
    output. `sweeper`: the restore ran with --no-requeue, and the sweeper's command (requeue_stale) sends
    the upload that was in flight; else the restore sends it itself."""
    lesion, ids = populate(api)
    wait_showing_log(lambda: processed(ids), 180, "the uploads and their explanations", worker)
    exercise(api, ids)
    run_here(MONITOR)
    (tmp_path / "backups").mkdir()
    with predictions_held():
        in_flight = api.upload(90, lesion)
        wait_showing_log(worker_waits_on_predictions, 60, "the worker to claim the upload", worker)
        assert LesionImage.objects.get(pk=in_flight).state == ImageState.PROCESSING
        before = state_here()
        backup_output = backup(tmp_path / "backups")
    assert "Backed up" in backup_output, backup_output
    archive = the_archive(tmp_path / "backups")
    check_manifest(archive, before)
    wait_showing_log(lambda: processed([in_flight]), 120, "the live service to finish the upload", worker)
    live = backup_database.live_counts()

    wipe_storage()
    wipe_postgres()
    restore_output = restore(archive)
    assert "verified: every row count and file SHA-256 matches" in restore_output, restore_output
    assert "In flight at the backup: 1 upload and 0 explanations being processed, queued again" in restore_output
    after = state_here()
    assert after["audit"] == before["audit"]  # the audit log, event for event
    assert all(after["files"].get(name) == digest for name, digest in before["files"].items())
    if sweeper:  # restored with --no-requeue: nothing has moved since
        assert after == before
        assert "1 images enqueued again" in command_here("requeue_stale")
    wait_showing_log(lambda: processed([in_flight]), 120, "the worker to finish the upload after the restore", worker)
    assert backup_database.live_counts() == live  # every row the live service ended with, none twice
    check_api_after_restore(api, ids, in_flight, before)


@pytest.mark.django_db(transaction=True)
def test_restore_drill_on_postgresql_with_local_files(celery_worker, explain_worker, tiny_checkpoint, settings,
                                                      tmp_path, schema_guard):  # fmt: skip
    from diagnosis.services.registry import register_model

    drill_settings(settings)
    wipe_storage()  # files of earlier tests, which no row of this drill names
    register_model(checkpoint=tiny_checkpoint, version=f"drill-{uuid.uuid4().hex[:8]}", activate=True)
    api = Api(token_client(ClinicianFactory(membership__clinic=ClinicFactory(name="Drill clinic"))), http=False)

    postgres_drill(
        api, tmp_path, worker=celery_worker, backup=lambda dest: command_here("backup", str(dest)),
        restore=lambda archive: command_here("restore", str(archive), "--no-requeue"), sweeper=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def drill_bucket():
    yield from moto_bucket()


@dataclass
class S3Stack:
    env: dict
    web: WebServer
    worker: object


@pytest.fixture(scope="module")
def s3_drill_stack(worker_env, drill_bucket, tmp_path_factory):
    """A private Redis, a web process and one worker (every queue), all with the bucket as storage."""
    folder = tmp_path_factory.mktemp("s3-drill")
    with Processes(folder) as processes:
        redis = processes.redis()
        env = {**worker_env, **drill_bucket.env, **DRILL_ENV, "CELERY_BROKER_URL": redis.url,
               "MODEL_CACHE_DIR": str(folder / "model-cache")}  # fmt: skip
        web = processes.web(env)
        worker = wait_ready(processes.worker(env, queues="inference,explain,default"))
        yield S3Stack(env=env, web=web.wait_ready(), worker=worker)


@pytest.mark.django_db(transaction=True)
def test_restore_drill_on_postgresql_with_s3(s3_drill_stack, drill_bucket, tiny_checkpoint, settings, tmp_path,
                                             schema_guard):  # fmt: skip
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token

    stack = s3_drill_stack
    drill_settings(settings)
    settings.STORAGES = drill_bucket.storages()  # this process's files (model, drift report) go to the bucket
    register_model(checkpoint=tiny_checkpoint, version=f"s3-drill-{uuid.uuid4().hex[:8]}", activate=True)
    user = ClinicianFactory(membership__clinic=ClinicFactory(name="S3 drill clinic"))
    env = {**stack.env, "DJANGO_SETTINGS_MODULE": "webapp.settings.test"}

    def command(*args: str) -> str:
        result = manage(env, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    with stack.web.client(create_api_token(user=user, name="drill")[1]) as client:
        postgres_drill(Api(client, http=True), tmp_path, worker=stack.worker,
                       backup=lambda dest: command("backup", str(dest)),
                       restore=lambda archive: command("restore", str(archive)), sweeper=False)  # fmt: skip


# --- the embedded default -------------------------------------------------------------------------------


def embedded_env(var_dir: Path, checkpoint: Path) -> dict:
    dropped = ("DATABASE_URL", "CELERY_BROKER_URL", "MEDIA_ROOT", "MODEL_CACHE_DIR", "STATIC_ROOT")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    return {**env, **DRILL_ENV, "DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "VAR_DIR": str(var_dir),
            "PYTHONUNBUFFERED": "1", "DRILL_CHECKPOINT": str(checkpoint)}  # fmt: skip


def shell(env: dict, code: str) -> str:
    result = manage(env, "shell", "-v", "0", "-c", code)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def test_restore_drill_on_the_embedded_default(tiny_checkpoint, tmp_path):
    var_dir, checkpoint = tmp_path / "var", tmp_path / "model.pt"
    checkpoint.write_bytes(tiny_checkpoint)
    env = embedded_env(var_dir, checkpoint)
    migrated = manage(env, "migrate", "--noinput", "-v", "0")
    assert migrated.returncode == 0, migrated.stderr
    token = json.loads(shell(env, EMBEDDED_SETUP))["token"]
    with Processes(tmp_path) as processes:
        port = free_port()
        process, log_path = processes.popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}",
                                             "--noreload"], env=env, log_name="web.log")  # fmt: skip
        worker = processes.worker(env, queues="inference,explain,default")
        web = WebServer(process, log_path, port).wait_ready()
        wait_ready(worker)
        with web.client(token) as client:
            api = Api(client, http=True)
            lesion, ids = populate(api)
            wait_showing_log(lambda: processed_via_api(api, ids), 180, "the uploads and explanations", worker)
            exercise(api, ids)
            shell(env, MONITOR)
            os.killpg(worker.process.pid, signal.SIGSTOP)  # the worker takes nothing until SIGCONT
            try:
                in_flight = api.upload(90, lesion)
                before = json.loads(shell(env, STATE))
                (tmp_path / "backups").mkdir()
                backed_up = manage(env, "backup", str(tmp_path / "backups"))
                assert backed_up.returncode == 0, backed_up.stdout + backed_up.stderr
                archive = the_archive(tmp_path / "backups")
                manifest = check_manifest(archive, before)
                assert manifest["database"]["engine"] == "sqlite"

                for path in var_dir.glob("db.sqlite3*"):  # the database, its WAL and shared memory
                    path.unlink()
                shutil.rmtree(var_dir / "media")
                for message in (var_dir / "broker" / "queue").iterdir():  # messages in transit: a fresh machine
                    message.unlink()
                restored = manage(env, "restore", str(archive))
                assert restored.returncode == 0, restored.stdout + restored.stderr
                assert "verified: every row count and file SHA-256 matches" in restored.stdout
                assert "1 waiting upload and 0 explanations sent to the workers now" in restored.stdout
                assert json.loads(shell(env, STATE)) == before  # rows, files and audit log, exactly
            finally:
                os.killpg(worker.process.pid, signal.SIGCONT)
            wait_showing_log(lambda: processed_via_api(api, [in_flight]), 120, "the upload after the restore", worker)
            check_api_after_restore(api, ids, in_flight, before)


# --- refusals, damage and bad arguments -----------------------------------------------------------------


def backup_here(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    assert "Backed up" in command_here("backup", str(folder), "--no-progress")
    return the_archive(folder)


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_target_that_is_not_empty_unless_forced(active_model, tmp_path, schema_guard):
    archive = backup_here(tmp_path / "backups")

    with pytest.raises(CommandError) as refused:
        command_here("restore", str(archive))
    message = str(refused.value)
    assert "Refusing to restore over existing data" in message
    assert "diagnosis_modelversion (1 row)" in message and "holds files, for example" in message
    assert "--force" in message

    wipe_storage()
    with pytest.raises(CommandError) as refused:
        command_here("restore", str(archive))
    assert "diagnosis_modelversion (1 row)" in str(refused.value) and "holds files" not in str(refused.value)

    call_command("flush", "--noinput", verbosity=0)  # as freshly migrated: content types and permissions only
    assert backup_database.tables_with_rows() == {}
    output = command_here("restore", str(archive), "--no-progress")
    assert "verified" in output and ModelVersion.objects.get().weights.name == active_model.weights.name

    Clinic.objects.create(name="After the backup")
    output = command_here("restore", str(archive), "--force", "--no-progress")
    assert "verified" in output and not Clinic.objects.filter(name="After the backup").exists()


@pytest.mark.django_db(transaction=True)
def test_a_file_the_dump_names_but_storage_lacks_is_reported_and_listed(active_model, tmp_path, schema_guard):
    """A file deleted between the dump and the copy (a patient erased meanwhile): the backup goes on, says so
    and lists it; the restore brings its row back and says it has no file."""
    name = active_model.weights.name
    default_storage.delete(name)
    (tmp_path / "backups").mkdir()
    output = command_here("backup", str(tmp_path / "backups"), "--no-progress")
    assert "Not in the archive: 1 of the files the dump names were deleted before they could be copied" in output
    assert name in output
    archive = the_archive(tmp_path / "backups")
    manifest = ArchiveReader(archive).manifest
    assert manifest["missing_files"] == [name] and name not in {entry["name"] for entry in manifest["files"]}
    output = command_here("restore", str(archive), "--force", "--no-progress")
    assert "verified" in output and f"deleted while the backup was taken: 1 file: {name}" in output
    assert ModelVersion.objects.get().weights.name == name and not default_storage.exists(name)


def rewrite(archive: Path, target: Path, *, drop: str = "", manifest_changes: dict | None = None) -> Path:
    """A copy of the archive without the member `drop`, or with its manifest changed."""
    with tarfile.open(archive) as source, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as out:
        for member in source.getmembers():
            if member.name == drop:
                continue
            data = source.extractfile(member).read()
            if member.name == MANIFEST and manifest_changes:
                data = json.dumps({**json.loads(data), **manifest_changes}).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return target


def flipped(archive: Path, target: Path, member_name: str) -> Path:
    """A copy with one byte of a member changed, the size and everything else as they were."""
    with tarfile.open(archive) as source:
        offset = source.getmember(member_name).offset_data + 100
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.django_db(transaction=True)
def test_a_damaged_archive_is_named_and_changes_nothing(active_model, tmp_path, schema_guard):
    archive = backup_here(tmp_path / "backups")
    assert "is whole" in command_here("restore", str(archive), "--check")
    Clinic.objects.create(name="Made after the backup")  # a restore that went ahead would remove it
    weights = f"files/{active_model.weights.name}"
    damaged = {
        "truncated": (tmp_path / "truncated.tar", f"is truncated: it ends inside {weights}"),
        "weights": (flipped(archive, tmp_path / "weights.tar", weights), f"{weights}: its SHA-256 differs"),
        "dump": (flipped(archive, tmp_path / "dump.tar", "database/postgresql.dump"),
                 "database/postgresql.dump: its SHA-256 differs"),
        "manifest": (rewrite(archive, tmp_path / "no-manifest.tar", drop=MANIFEST), "has no manifest.json"),
        "version": (rewrite(archive, tmp_path / "v99.tar", manifest_changes={"format_version": 99}),
                    "format version 99; this release reads version 1"),
        "member": (rewrite(archive, tmp_path / "no-weights.tar", drop=weights),
                   f"{weights}: listed in the manifest but not in the archive"),
    }  # fmt: skip
    with tarfile.open(archive) as source:  # cut inside the weights, the member after the dump
        cut = source.getmember(weights).offset_data + 50
    damaged["truncated"][0].write_bytes(archive.read_bytes()[:cut])
    for kind, (path, expected) in damaged.items():
        with pytest.raises(CommandError) as failed:
            command_here("restore", str(path), "--force")
        assert expected in str(failed.value), (kind, str(failed.value))
        assert str(path) in str(failed.value), kind
    assert Clinic.objects.filter(name="Made after the backup").exists()  # nothing was restored


@pytest.mark.django_db(transaction=True)
def test_bad_arguments_get_clear_errors(active_model, tmp_path, schema_guard):
    def refused(*args: str) -> str:
        with pytest.raises(CommandError) as error:
            command_here(*args)
        return str(error.value)

    assert "is not a folder: create it first" in refused("backup", str(tmp_path / "missing" / "b.tar"))
    (tmp_path / "taken.tar").write_bytes(b"")
    assert "exists already" in refused("backup", str(tmp_path / "taken.tar"))
    assert "Cannot write" in refused("backup", "/proc")  # a folder nobody can create a file in
    assert "pg_dump is not in" in refused("backup", str(tmp_path), "--pg-bin-dir", str(tmp_path / "nothing"))
    old = tmp_path / "old-client"
    old.mkdir()
    (old / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    (old / "pg_dump").chmod(0o755)
    assert "is version 9 and cannot dump the PostgreSQL" in refused("backup", str(tmp_path), "--pg-bin-dir", str(old))
    assert not list(tmp_path.glob("backup-*")), "a failed backup left an archive behind"

    assert "does not exist" in refused("restore", str(tmp_path / "nothing.tar"))
    assert "is not a file" in refused("restore", str(tmp_path))
    (tmp_path / "photo.tar").write_bytes(lesion_jpeg(seed=1))
    assert "is not a readable tar archive" in refused("restore", str(tmp_path / "photo.tar"))
    archive = backup_here(tmp_path / "backups")
    sqlite = rewrite(archive, tmp_path / "sqlite.tar", manifest_changes={
        "database": {**ArchiveReader(archive).manifest["database"], "engine": "sqlite"}})  # fmt: skip
    assert "holds a sqlite database and the configured one is postgresql" in refused("restore", str(sqlite), "--force")
    assert ModelVersion.objects.filter(pk=active_model.pk).exists()
