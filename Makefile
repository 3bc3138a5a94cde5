# The two commands a new user needs: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip here warns about local package mirrors it cannot use; the warnings are noise.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
PIP := $(PY) -m pip install --disable-pip-version-check -q

# Browser tests drive the system Chromium; playwright cannot download browsers here.
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test lint format install install-dev clean-var chromium docker-compose load chaos images check-images

$(PY):
	$(PYTHON) -m venv $(VENV)

# Install stamps: each install runs again only when a requirements file it reads is newer than its stamp
# (dev.txt reads prod.txt, which reads base.txt), so a second `make run` or `make test` installs nothing.
$(VENV)/.installed-base: requirements/base.txt | $(PY)
	$(PIP) -r requirements/base.txt $(PIP_QUIET)
	touch $@

$(VENV)/.installed-dev: requirements/base.txt requirements/prod.txt requirements/dev.txt | $(PY)
	$(PIP) -r requirements/dev.txt $(PIP_QUIET)
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base
install-dev: $(VENV)/.installed-dev

## make run: install what is missing, prepare the embedded default, start web server + worker.
run: $(VENV)/.installed-base
	DJANGO_SETTINGS_MODULE=webapp.settings.dev $(PY) manage.py rundemo

## make test: install the dev requirements, lint, check the import layers, and run the whole suite with a coverage summary.
test: $(VENV)/.installed-dev chromium docker-compose
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest --cov --cov-report=term:skip-covered

## Debian's Chromium for the browser tests, installed when it is missing (needs root or sudo).
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "Installing Chromium for the browser tests..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; \
	fi

## Debian's docker-compose (1.29) for tests/test_deploy.py, which validates docker-compose.yml with it.
docker-compose:
	@if ! command -v docker-compose >/dev/null; then \
	  echo "Installing docker-compose for the deployment tests..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q docker-compose >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q docker-compose >/dev/null; }; \
	fi

$(VENV)/.installed-load: requirements/base.txt requirements/prod.txt requirements/load.txt | $(PY)
	$(PIP) -r requirements/load.txt $(PIP_QUIET)
	touch $@

## make load: the load test (locust, 50 users, 5 minutes) against gunicorn, PostgreSQL, Redis and a worker.
load: $(VENV)/.installed-load
	$(PY) bench/run_load.py --users 50 --minutes 5

## make chaos: the fault run under load (bench/chaos.py: 20 locust users for 5 minutes; the worker killed,
## Redis stopped, PostgreSQL cut), then every accepted upload checked; figures in bench/README.md.
chaos: $(VENV)/.installed-dev $(VENV)/.installed-load
	$(PY) bench/chaos.py --users 20 --minutes 5

## make images: build docker/Dockerfile and docker/Dockerfile.gpu with podman, as lesion-triage:latest and
## lesion-triage-gpu:latest (needs root or sudo: installs podman; docs/deployment.md, "Checking the images").
images:
	docker/check-images.sh --build-only

## make check-images: build both images, run every role of the CPU image, upload a photo, remove it all (CI).
check-images:
	docker/check-images.sh

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## Forget the embedded default's database, files, broker and demo model.
clean-var:
	rm -rf var
