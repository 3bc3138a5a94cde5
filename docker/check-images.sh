#!/usr/bin/env bash
# Builds the two images (docker/Dockerfile and docker/Dockerfile.gpu) with podman and starts every role of
# the CPU image against this machine's PostgreSQL and Redis, then removes all it built and started.
# CI runs it after `make test` (.ci/run); docs/deployment.md ("Checking the images") says what it covers.
#
#   docker/check-images.sh               build both images, run migrate (twice), web, worker, beat and the
#                                        health checks, upload a photo through the API, clean up
#   docker/check-images.sh --build-only  build both images and keep them as lesion-triage:latest and
#                                        lesion-triage-gpu:latest (what docker-compose.yml names them);
#                                        `make images` runs this
#
# What is particular to this machine lives here, never in the Dockerfiles: the stand-in base image
# (debootstrap of Debian bookworm, imported as python:3.11-slim, which cannot be pulled here), pip's
# configuration and local wheel folders mounted into the build, the default package index as
# TORCH_INDEX_URL (the PyTorch wheel index cannot be reached), and `default_ulimits = []` in
# /etc/containers/containers.conf (this VM refuses to set rlimits).
#
# It runs podman and apt-get as root (sudo when not root). Settings (environment):
#   CHECK_IMAGES_POSTGRES       the PostgreSQL server, trust auth    (postgres://postgres@127.0.0.1:5432)
#   CHECK_IMAGES_REDIS          the Redis database this check owns   (redis://127.0.0.1:6379/14; flushed)
#   CHECK_IMAGES_LOGS           where build and container logs go    (test-artifacts/check-images)
#   CHECK_IMAGES_MIRROR         Debian mirror for the stand-in base  (the one the apt sources name)
#   CHECK_IMAGES_BUILD_TIMEOUT  seconds each image's build may take  (1200)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=check
case "${1:-}" in
    "") ;;
    --build-only) MODE=build ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "usage: $0 [--build-only]" >&2; exit 64 ;;
esac

POSTGRES="${CHECK_IMAGES_POSTGRES:-postgres://postgres@127.0.0.1:5432}"
REDIS="${CHECK_IMAGES_REDIS:-redis://127.0.0.1:6379/14}"
LOGS="${CHECK_IMAGES_LOGS:-test-artifacts/check-images}"
RUN_ID="melanoma-images-check-$$"
DATABASE="melanoma_images_check_$$"
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
PODMAN=(${SUDO:+"$SUDO"} podman)
STARTED=$SECONDS

if [ "$MODE" = build ]; then
    CPU_IMAGE="localhost/${APP_IMAGE:-lesion-triage}:${APP_VERSION:-latest}"
    GPU_IMAGE="localhost/${APP_GPU_IMAGE:-lesion-triage-gpu}:${APP_VERSION:-latest}"
else
    CPU_IMAGE="localhost/melanoma-images-check:cpu-$$"
    GPU_IMAGE="localhost/melanoma-images-check:gpu-$$"
fi

# --- reporting ----------------------------------------------------------------------------------------

CHECKED=()
step() { printf '\n== %s\n' "$*"; }
ok() {
    CHECKED+=("$1")
    printf '  ok    %s\n' "$1"
}
fail() {
    printf '  FAIL  %s\n' "$1" >&2
    shift
    for detail in "$@"; do printf '%s\n' "$detail" | sed 's/^/        /' >&2; done
    exit 1
}
seconds() { echo "$((SECONDS - $1))s"; }

# --- cleanup: whatever this run started or built, also when it fails ----------------------------------

WORK=""
CONTAINERS=() # started with --detach: their logs are saved before they go
ONE_SHOTS=()  # run with --rm: gone once they exit, unless this run was interrupted
IMAGES_BUILT=()
DATABASE_CREATED=""
REDIS_TOUCHED=""
BUILD_TIMES=()
BUILDING=""
PASSED=""

cleanup() {
    local status=$? name removed=()
    set +e
    trap - EXIT INT TERM
    for name in "${CONTAINERS[@]}"; do
        "${PODMAN[@]}" logs "$name" >"$LOGS/$name.log" 2>&1
        if [ "$status" != 0 ]; then
            printf '\n-- the last lines of %s (all of them: %s/%s.log)\n' "$name" "$LOGS" "$name" >&2
            tail -n 25 "$LOGS/$name.log" | cut -c1-300 >&2
        fi
    done
    for name in "${CONTAINERS[@]}" "${ONE_SHOTS[@]}"; do
        if "${PODMAN[@]}" container exists "$name"; then
            "${PODMAN[@]}" rm --force --time 10 "$name" >/dev/null 2>&1 && removed+=("container $name")
        fi
    done
    if [ "$MODE" = check ]; then
        for name in "${IMAGES_BUILT[@]}"; do
            "${PODMAN[@]}" image exists "$name" && "${PODMAN[@]}" rmi --force "$name" >/dev/null 2>&1 \
                && removed+=("image $name")
        done
    fi
    if [ -n "$DATABASE_CREATED" ]; then
        psql "$POSTGRES/postgres" -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$DATABASE\" WITH (FORCE)" \
            >/dev/null && removed+=("database $DATABASE")
    fi
    if [ -n "$REDIS_TOUCHED" ]; then
        redis-cli -u "$REDIS" FLUSHDB >/dev/null && removed+=("the keys of $REDIS")
    fi
    if [ -n "$BUILDING" ] && [ -f "$WORK/containers-before-build" ]; then
        # An interrupted build leaves buildah's working container (podman ps --external) behind.
        for name in $("${PODMAN[@]}" ps --all --external --format '{{.ID}}:{{.Names}}' \
            | grep -v -F -f "$WORK/containers-before-build" | grep -- '-working-container$'); do
            "${PODMAN[@]}" rm --force "${name%%:*}" >/dev/null 2>&1 && removed+=("build container ${name#*:}")
        done
    fi
    [ -n "$WORK" ] && $SUDO rm -rf "$WORK"
    if [ ${#removed[@]} -gt 0 ]; then
        step "Cleaned up"
        printf '  removed %s\n' "${removed[@]}"
    fi
    if [ -n "$PASSED" ]; then
        step "PASSED: ${#CHECKED[@]} checks in $(seconds "$STARTED") (builds: ${BUILD_TIMES[*]})"
    elif [ "$status" != 0 ]; then
        printf '\nFAILED after %s (%s checks had passed). Logs: %s/\n' "$(seconds "$STARTED")" "${#CHECKED[@]}" "$LOGS" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.err # the previous run's
WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/$RUN_ID.XXXXXX")"

# --- podman on this machine ---------------------------------------------------------------------------

install_missing() {
    local -A package=(
        [podman]=podman [debootstrap]=debootstrap [catatonit]=catatonit [curl]=curl [jq]=jq
        [psql]=postgresql-client [redis-cli]=redis-tools
    )
    local missing=() command
    for command in "${!package[@]}"; do
        if [ "$command" = catatonit ]; then
            # `podman run --init` (compose's `init: true`) runs catatonit.
            [ -x /usr/libexec/podman/catatonit ] || [ -x /usr/bin/catatonit ] || missing+=(catatonit)
        elif ! command -v "$command" >/dev/null; then
            missing+=("${package[$command]}")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "  installing ${missing[*]} (log: $LOGS/apt.log)"
    local apt=(${SUDO:+"$SUDO"} env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get -q)
    {
        "${apt[@]}" install -y "${missing[@]}" || { "${apt[@]}" update && "${apt[@]}" install -y "${missing[@]}"; }
    } >"$LOGS/apt.log" 2>&1 || fail "apt-get install ${missing[*]}" "$(tail -n 5 "$LOGS/apt.log")"
}

# This VM refuses to set rlimits: containers keep the engine's own instead of podman's defaults.
# Merged into the [containers] section of /etc/containers/containers.conf; running it again changes nothing.
configure_ulimits() {
    local conf=/etc/containers/containers.conf merged="$WORK/containers.conf"
    {
        [ -f "$conf" ] && cat "$conf"
        true
    } | awk '
        skipping { if ($0 ~ /\]/) skipping = 0; next }
        /^[[:space:]]*\[/ {
            in_containers = ($0 ~ /^[[:space:]]*\[containers\][[:space:]]*(#.*)?$/)
            print
            if (in_containers && !done) { print "default_ulimits = []"; done = 1 }
            next
        }
        in_containers && /^[[:space:]]*default_ulimits[[:space:]]*=/ {
            value = $0; sub(/^[^=]*=/, "", value)
            if (value !~ /\]/) skipping = 1       # an array over several lines
            next
        }
        { print }
        END { if (!done) { print "[containers]"; print "default_ulimits = []" } }
    ' >"$merged"
    if ! cmp -s "$merged" "$conf"; then
        $SUDO mkdir -p "$(dirname "$conf")"
        $SUDO install -m 644 "$merged" "$conf"
        echo "  $conf: default_ulimits = [] in [containers]"
    fi
}

# The first http(s) mirror that the apt sources name for bookworm (one-line and deb822 formats).
debian_mirror() {
    local file line words
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        while read -r line; do
            read -ra words <<<"${line%%#*}"
            [ "${words[0]:-}" = deb ] || continue
            words=("${words[@]:1}")
            if [ "${words[0]:0:1}" = "[" ]; then # [ options ]
                while [ ${#words[@]} -gt 0 ] && [ "${words[0]: -1}" != "]" ]; do words=("${words[@]:1}"); done
                words=("${words[@]:1}")
            fi
            if [[ "${words[0]:-}" == http* ]] && [ "${words[1]:-}" = bookworm ]; then
                echo "${words[0]%/}"
                return
            fi
        done <"$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk 'BEGIN { RS = "" }
        {
            types = uris = suites = ""; enabled = "yes"
            n = split($0, lines, "\n")
            for (i = 1; i <= n; i++) {
                line = lines[i]
                if (line ~ /^[[:space:]]*#/) continue
                field = tolower(line); sub(/:.*/, "", field)
                value = line; sub(/^[^:]*:/, "", value)
                if (field == "types") types = " " value " "
                else if (field == "uris") uris = value
                else if (field == "suites") suites = " " value " "
                else if (field == "enabled") enabled = value
            }
            gsub(/[[:space:]]+/, " ", types); gsub(/[[:space:]]+/, " ", suites)
            if (types ~ / deb / && suites ~ / bookworm / && enabled !~ /no/) {
                split(uris, list, " ")
                for (j = 1; j in list; j++) if (list[j] ~ /^https?:/) { sub(/\/$/, "", list[j]); print list[j]; exit }
            }
        }' "$file" | head -n 1 | grep . && return
    done
    echo http://deb.debian.org/debian
}

# python:3.11-slim cannot be pulled here. Its stand-in: Debian bookworm (whose python3 is 3.11) with python,
# venv and pip, python at /usr/local/bin/python as in the real image, and pip allowed to install into the
# system's Python. Kept between runs: debootstrap runs only when the image is missing.
ensure_base_image() {
    local from base rootfs mirror started=$SECONDS
    from="$(awk '$1 == "FROM" { print $2; exit }' docker/Dockerfile)"
    base="$from"
    if [[ "$base" != */* ]]; then
        base="docker.io/library/$base"
    elif [[ "${base%%/*}" != *[.:]* ]] && [ "${base%%/*}" != localhost ]; then
        base="docker.io/$base"
    fi
    if "${PODMAN[@]}" image exists "$base"; then
        ok "base image $from: $base is present (the stand-in from an earlier run, or the real one)"
        return
    fi
    mirror="${CHECK_IMAGES_MIRROR:-$(debian_mirror)}"
    rootfs="$WORK/rootfs"
    echo "  debootstrap bookworm from $mirror (log: $LOGS/debootstrap.log)"
    if ! $SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$LOGS/debootstrap.log" 2>&1; then
        fail "debootstrap of the stand-in base image" "$(tail -n 5 "$LOGS/debootstrap.log")"
    fi
    $SUDO ln -sf python3 "$rootfs/usr/bin/python"
    $SUDO ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    $SUDO tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet \
        --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' - "$base" >/dev/null
    $SUDO rm -rf "$rootfs"
    ok "base image $from: stand-in built with debootstrap and imported as $base ($(seconds "$started"))"
}

# --- pip inside the build: this machine's configuration, wheels and CA bundle ------------------------

# Writes one pip.conf with what pip on this machine uses (its configuration files and PIP_* variables,
# the variables winning), and prints "index URL" and "mount PATH" lines: the files and local folders
# that configuration names, read-only in the build.
PIP_INSPECT='
import ast, configparser, os, subprocess, sys, urllib.parse

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
sections, env = {}, {}
for line in listed.stdout.splitlines():
    key, _, value = line.partition("=")
    section, _, option = key.rpartition(".")
    value = ast.literal_eval(value)
    if section == ":env:":
        env[option] = value
    else:
        sections.setdefault(section, {})[option] = value
sections.setdefault("global", {}).update(env)
for options in sections.values():
    options.update({option: value for option, value in env.items() if option in options})
config = configparser.ConfigParser(interpolation=None)
config.read_dict(sections)
with open(sys.argv[1], "w") as out:
    config.write(out)

index = next((o["index-url"] for o in sections.values() if o.get("index-url")), "https://pypi.org/simple")
print("index", index.split()[0])
mounts = set()
for options in sections.values():
    for option in ("cert", "client-cert", "constraint", "requirement", "find-links", "index-url", "extra-index-url"):
        for item in options.get(option, "").split():
            url = urllib.parse.urlparse(item)
            if url.scheme not in ("", "file"):
                continue
            path = os.path.abspath(urllib.parse.unquote(url.path) if url.scheme else item)
            if not os.path.exists(path):
                continue
            # An index links its files relative to itself (../../files/...): its parent folder goes too.
            mounts.add(os.path.dirname(path) if option.endswith("index-url") and os.path.isdir(path) else path)
for path in sorted(mounts):
    if not any(path.startswith(other.rstrip("/") + "/") for other in mounts if other != path):
        print("mount", path)
'

BUILD_ARGS=()
prepare_build() {
    local python kind value
    python=.venv/bin/python
    [ -x "$python" ] || python=python3
    BUILD_ARGS=(--pull=never --network host --force-rm -v "$WORK/pip.conf:/etc/pip.conf:ro")
    while read -r kind value; do
        case "$kind" in
            index) BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$value"); TORCH_INDEX="$value" ;;
            mount) BUILD_ARGS+=(-v "$value:$value:ro"); PIP_MOUNTS+=("$value") ;;
        esac
    done < <("$python" -c "$PIP_INSPECT" "$WORK/pip.conf")
    if [ "$MODE" = check ]; then
        BUILD_ARGS+=(--layers=false) # nothing cached: the check leaves no intermediate images behind
    fi
}

build_image() {
    local label="$1" dockerfile="$2" tag="$3" log started=$SECONDS
    log="$LOGS/build-$label.log"
    echo "  $dockerfile -> $tag (log: $log)"
    IMAGES_BUILT+=("$tag")
    "${PODMAN[@]}" ps --all --external --format '{{.ID}}' >"$WORK/containers-before-build"
    BUILDING=1
    set +e
    timeout --foreground "${CHECK_IMAGES_BUILD_TIMEOUT:-1200}" "${PODMAN[@]}" build "${BUILD_ARGS[@]}" -f "$dockerfile" -t "$tag" . 2>&1 \
        | tee "$log" | awk '/^(STEP|COMMIT)/ { print "    " substr($0, 1, 110); fflush() }'
    local status=${PIPESTATUS[0]}
    set -e
    if [ "$status" != 0 ] || ! "${PODMAN[@]}" image exists "$tag"; then
        [ "$status" = 124 ] && status="timed out after ${CHECK_IMAGES_BUILD_TIMEOUT:-1200}s"
        fail "build of $dockerfile (exit $status)" "$(grep -v 'is ignored: it is neither' "$log" | tail -n 15)"
    fi
    BUILDING=""
    BUILD_TIMES+=("$label $(seconds "$started")")
    ok "$dockerfile builds ($(seconds "$started"), $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$tag" \
        | awk '{ printf "%.1f GB", $1 / 1e9 }'))"
}

# --- the checks ---------------------------------------------------------------------------------------

step "Podman"
install_missing
if [ "$MODE" = check ]; then # before the builds, so that a missing server fails in seconds
    psql "$POSTGRES/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1 || fail "PostgreSQL answers at $POSTGRES"
    [ "$(redis-cli -u "$REDIS" PING 2>/dev/null)" = PONG ] || fail "Redis answers at $REDIS"
    ok "PostgreSQL ($POSTGRES) and Redis ($REDIS) answer"
fi
configure_ulimits
ok "podman $("${PODMAN[@]}" version --format '{{.Client.Version}}') with default_ulimits = [] (this VM refuses rlimits)"
ensure_base_image

step "Building the images"
TORCH_INDEX=""
PIP_MOUNTS=()
prepare_build
[ -n "$TORCH_INDEX" ] || fail "pip's configuration on this machine could be read"
echo "  TORCH_INDEX_URL=$TORCH_INDEX; pip's configuration and, read-only: ${PIP_MOUNTS[*]:-nothing}"
build_image cpu docker/Dockerfile "$CPU_IMAGE"
build_image gpu docker/Dockerfile.gpu "$GPU_IMAGE"

if [ "$MODE" = build ]; then
    printf '\nBuilt %s and %s in %s.\n' "$CPU_IMAGE" "$GPU_IMAGE" "$(seconds "$STARTED")"
    exit 0
fi

free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

WEB_PORT="$(free_port)"
SHARED="$WORK/shared" # media, the checkpoint and the photo: one folder for every container, owned by the app
$SUDO mkdir -m 755 "$SHARED"
$SUDO chown 10001:10001 "$SHARED"
cat >"$WORK/app.env" <<EOF
SECRET_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
ALLOWED_HOSTS=localhost
CSRF_TRUSTED_ORIGINS=https://localhost
DATABASE_URL=$POSTGRES/$DATABASE
CELERY_BROKER_URL=$REDIS
CACHE_URL=$REDIS
STORAGE_BACKEND=local
MEDIA_ROOT=/srv/check/media
METRICS_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
LOG_FORMAT=json
LOG_LEVEL=INFO
GUNICORN_BIND=127.0.0.1:$WEB_PORT
GUNICORN_WORKERS=2
EOF
# As compose runs the app containers: an init process, no new privileges; here on the host's network.
RUN_ARGS=(--network host --init --security-opt no-new-privileges:true --env-file "$WORK/app.env"
    -v "$SHARED:/srv/check")

run_role() { # a one-shot container of the CPU image: stdout to $LOGS/NAME.log, stderr to $LOGS/NAME.err
    local name="$RUN_ID-$1"
    shift
    ONE_SHOTS+=("$name")
    "${PODMAN[@]}" run --rm --name "$name" "${RUN_ARGS[@]}" "$CPU_IMAGE" "$@" >"$LOGS/$name.log" 2>"$LOGS/$name.err"
}

start_role() { # a long-running container of the CPU image, like a compose service
    local name="$RUN_ID-$1"
    shift
    CONTAINERS+=("$name")
    "${PODMAN[@]}" run --detach --name "$name" "${RUN_ARGS[@]}" "$@" >/dev/null
}

running() { [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$RUN_ID-$1" 2>/dev/null)" = true ]; }

wait_for() { # wait_for WHAT SECONDS CONTAINER COMMAND...: until COMMAND succeeds, while CONTAINER runs
    local what="$1" limit="$2" container="$3" started=$SECONDS
    shift 3
    until "$@" >/dev/null 2>&1; do
        running "$container" || fail "$what: container $RUN_ID-$container exited"
        [ $((SECONDS - started)) -lt "$limit" ] || fail "$what: not within ${limit}s"
        sleep 1
    done
}

in_log() { "${PODMAN[@]}" logs "$RUN_ID-$1" 2>&1 | grep -q -- "$2"; }

step "The CPU image's roles, against PostgreSQL ($POSTGRES) and Redis ($REDIS)"
psql "$POSTGRES/postgres" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DATABASE\"" >/dev/null \
    || fail "create the database $DATABASE on $POSTGRES"
DATABASE_CREATED=1
REDIS_TOUCHED=1
redis-cli -u "$REDIS" FLUSHDB >/dev/null

started=$SECONDS
run_role migrate-1 migrate || fail "migrate exits 0" "$(tail -n 15 "$LOGS/$RUN_ID-migrate-1.err")"
grep -q "Applying diagnosis.0001_initial... OK" "$LOGS/$RUN_ID-migrate-1.log" \
    || fail "migrate applies the migrations" "$(tail -n 5 "$LOGS/$RUN_ID-migrate-1.log")"
ok "migrate applies every migration to an empty database and exits 0 ($(seconds "$started"))"
started=$SECONDS
run_role migrate-2 migrate || fail "migrate runs again" "$(tail -n 15 "$LOGS/$RUN_ID-migrate-2.err")"
grep -q "No migrations to apply." "$LOGS/$RUN_ID-migrate-2.log" \
    || fail "a second migrate is a no-op" "$(tail -n 5 "$LOGS/$RUN_ID-migrate-2.log")"
ok "migrate again: \"No migrations to apply.\" ($(seconds "$started"))"

# The operator's first steps (docs/deployment.md): a model, a clinician, an API token. The checkpoint is a
# tiny ResNet at 64 px, made by the image's own mlcore; the photo by its Pillow.
SETUP='
import os
import storages.backends.s3  # noqa: F401  compose stores in S3: its packages must be in the image
import torch
from PIL import Image, ImageDraw
from diagnosis.models import Clinic
from diagnosis.services.clinics import create_clinician
from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes

torch.manual_seed(0)
meta = CheckpointMeta(arch="resnet_tiny", input_size=64)
with open("/srv/check/model.pt", "wb") as out:
    out.write(checkpoint_bytes(build_model("resnet_tiny").eval(), meta))
photo = Image.new("RGB", (160, 120), (205, 170, 150))
ImageDraw.Draw(photo).ellipse((50, 30, 110, 90), fill=(90, 55, 40))
photo.save("/srv/check/lesion.jpg", quality=90)
os.chmod("/srv/check/lesion.jpg", 0o644)
create_clinician(clinic=Clinic.objects.create(name="Image check"), username="image-check", password=None)
print("uid", os.getuid(), "torch", torch.__version__)
'
started=$SECONDS
run_role setup manage shell -c "$SETUP" || fail "manage shell -c (checkpoint, photo, clinician)" \
    "$(tail -n 15 "$LOGS/$RUN_ID-setup.err")"
ok "manage shell: a resnet_tiny checkpoint (64 px), a photo and a clinician; $(tail -n 1 "$LOGS/$RUN_ID-setup.log") ($(seconds "$started"))"
started=$SECONDS
run_role register manage register_model /srv/check/model.pt --name image-check-tiny --activate \
    || fail "manage register_model" "$(tail -n 15 "$LOGS/$RUN_ID-register.err")"
ok "manage register_model --activate: $(tail -n 1 "$LOGS/$RUN_ID-register.log") ($(seconds "$started"))"
run_role token manage create_api_token image-check --name image-check \
    || fail "manage create_api_token" "$(tail -n 15 "$LOGS/$RUN_ID-token.err")"
TOKEN="$(tail -n 1 "$LOGS/$RUN_ID-token.log")"
echo "(the token is not kept)" >"$LOGS/$RUN_ID-token.log"
[ -n "$TOKEN" ] || fail "manage create_api_token prints the token"
ok "manage create_api_token prints a token"

started=$SECONDS
start_role web "$CPU_IMAGE" web
start_role worker -e WORKER_QUEUES=inference,explain,default -e WORKER_CONCURRENCY=1 \
    -e WORKER_HOSTNAME=image-check@%h -e "WORKER_METRICS_PORT=$(free_port)" "$CPU_IMAGE" worker
start_role beat "$CPU_IMAGE" beat

wait_for "web answers web-health" 120 web "${PODMAN[@]}" exec "$RUN_ID-web" /app/docker/entrypoint.sh web-health
ok "web: gunicorn up, entrypoint.sh web-health exits 0 ($(seconds "$started"))"
web_users="$("${PODMAN[@]}" top "$RUN_ID-web" user | tail -n +2 | sort -u | tr '\n' ' ')"
web_uid="$("${PODMAN[@]}" exec "$RUN_ID-web" id -u)"
{ [ "$web_uid" = 10001 ] && [ "$web_users" = "app " ]; } \
    || fail "web runs as its non-root user" "uid $web_uid, process users: $web_users"
gunicorn_workers="$("${PODMAN[@]}" top "$RUN_ID-web" args | grep -c 'gunicorn' || true)"
ok "web runs as uid 10001 (app): $gunicorn_workers gunicorn processes, none as root"

# Requests as the TLS-terminating proxy sends them; prints the status code (000: no answer).
http() { curl -sS --max-time 30 -H "Host: localhost" -H "X-Forwarded-Proto: https" -w '%{http_code}' "$@" || true; }
BASE="http://127.0.0.1:$WEB_PORT"
code="$(http -o "$WORK/static.css" "$BASE/static/admin/css/base.css")"
{ [ "$code" = 200 ] && [ -s "$WORK/static.css" ]; } || fail "a static file is served" "GET /static/admin/css/base.css: $code"
ok "WhiteNoise serves the collected static files (GET /static/admin/css/base.css: 200)"

wait_for "worker ready" 180 worker in_log worker " ready."
ok "worker: \" ready.\" in its log ($(seconds "$started"))"
wait_for "worker answers worker-health" 60 worker \
    "${PODMAN[@]}" exec "$RUN_ID-worker" /app/docker/entrypoint.sh worker-health
ok "worker: entrypoint.sh worker-health exits 0 (its own node answers a ping)"
wait_for "beat starts" 60 beat in_log beat "beat: Starting..."
sleep 3
running beat || fail "beat keeps running" "$("${PODMAN[@]}" logs --tail 10 "$RUN_ID-beat" 2>&1)"
ok "beat: \"beat: Starting...\" in its log, still running (its schedule file is writable)"

code="$(http -o "$WORK/readyz.json" "$BASE/readyz")"
[ "$code" = 200 ] || fail "GET /readyz answers 200" "$code $(cat "$WORK/readyz.json")"
ok "GET /readyz: 200 (database, broker, storage, active model)"

step "An upload through the API"
API=(-H "Authorization: Token $TOKEN")
started=$SECONDS
code="$(http "${API[@]}" -o "$WORK/upload.json" \
    -F "image=@$SHARED/lesion.jpg;type=image/jpeg" "$BASE/api/v1/images/")"
[ "$code" = 202 ] || fail "POST /api/v1/images/ answers 202" "$code $(head -c 500 "$WORK/upload.json")"
IMAGE_ID="$(jq -r .id "$WORK/upload.json")"
ok "POST /api/v1/images/: 202, image $IMAGE_ID $(jq -r .state "$WORK/upload.json")"
state=""
until [ "$state" = "done" ] || [ "$state" = "failed" ]; do
    [ $((SECONDS - started)) -lt 180 ] || fail "the upload is processed within 180s" "state: $state"
    running worker || fail "the upload is processed: the worker exited"
    sleep 1
    [ "$(http "${API[@]}" -o "$WORK/status.json" "$BASE/api/v1/images/$IMAGE_ID/status/")" = 200 ] || continue
    state="$(jq -r .state "$WORK/status.json")"
done
[ "$state" = "done" ] || fail "the upload's state is done" "$(head -c 500 "$WORK/status.json")"
ok "state done after $(seconds "$started"): probability $(jq -r .prediction.probability_malignant "$WORK/status.json"), model $(jq -r .prediction.model_version "$WORK/status.json")"
code="$(http "${API[@]}" -o "$WORK/photo.jpg" "$BASE/api/v1/images/$IMAGE_ID/file/")"
magic="$(head -c 3 "$WORK/photo.jpg" | od -An -tx1 | tr -d ' \n')"
{ [ "$code" = 200 ] && [ "$magic" = ffd8ff ]; } || fail "GET .../file/ returns the photo" "HTTP $code, starts with $magic"
ok "GET /api/v1/images/$IMAGE_ID/file/: 200, a JPEG of $(wc -c <"$WORK/photo.jpg") bytes"

step "The GPU image (no GPU here: its packages and settings only)"
started=$SECONDS
GPU_CHECK='import os, torch, torchvision; print("uid", os.getuid(), "torch", torch.__version__, "CUDA", torch.version.cuda, "torchvision", torchvision.__version__)'
"${PODMAN[@]}" run --rm --name "$RUN_ID-gpu" "${RUN_ARGS[@]}" "$GPU_IMAGE" manage shell -c "$GPU_CHECK" \
    >"$LOGS/$RUN_ID-gpu.log" 2>"$LOGS/$RUN_ID-gpu.err" || fail "GPU image: manage shell" "$(tail -n 15 "$LOGS/$RUN_ID-gpu.err")"
gpu_line="$(tail -n 1 "$LOGS/$RUN_ID-gpu.log")"
{ [[ "$gpu_line" == "uid 10001 "* ]] && [[ "$gpu_line" != *"CUDA None"* ]]; } \
    || fail "GPU image: a CUDA build of torch, as uid 10001" "$gpu_line"
ok "GPU image: settings load, $gpu_line ($(seconds "$started"))"

PASSED=1
