"""Clinicians' traffic for the load test (bench/run_load.py runs it): upload a photo, poll its
status until the prediction is there, open the result, and browse lists in between.

Tokens come from LOAD_TOKENS_FILE (one per line; run_load.py writes it), one per simulated user.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import threading
import time

import numpy as np
from locust import HttpUser, between, task
from PIL import Image

_tokens_lock = threading.Lock()
_tokens = itertools.cycle(open(os.environ["LOAD_TOKENS_FILE"]).read().split())  # noqa: SIM115


def _photos(count: int = 16) -> list[bytes]:
    """Phone-like JPEGs (1024x768) of synthetic lesions, made once per process."""
    from mlcore.data import generate_lesion

    photos = []
    for seed in range(count):
        image = generate_lesion(np.random.default_rng(seed), malignant=bool(seed % 2), size=384).image
        buffer = io.BytesIO()
        image.resize((1024, 768), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=88)
        photos.append(buffer.getvalue())
    return photos


PHOTOS = _photos()
POLL_SECONDS = float(os.environ.get("LOAD_POLL_SECONDS", "0.5"))
POLL_TIMEOUT = float(os.environ.get("LOAD_POLL_TIMEOUT", "120"))


class Clinician(HttpUser):
    wait_time = between(1, 3)

    def on_start(self):
        with _tokens_lock:
            token = next(_tokens)
        self.client.headers["Authorization"] = f"Token {token}"

    @task(3)
    def upload_and_follow(self):
        photo = ("lesion.jpg", random.choice(PHOTOS), "image/jpeg")
        response = self.client.post("/api/v1/images/", files={"image": photo}, name="POST /api/v1/images/")
        if response.status_code != 202:
            return
        status_url = response.json()["status_url"]
        deadline = time.monotonic() + POLL_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            body = self.client.get(status_url, name="GET /api/v1/images/[id]/ (poll)").json()
            if body["state"] in ("done", "failed"):
                break
        image_id = response.json()["id"]
        self.client.get(f"/api/v1/images/{image_id}/explanations/", name="GET /api/v1/images/[id]/explanations/")

    @task(1)
    def browse(self):
        self.client.get("/api/v1/images/?state=done", name="GET /api/v1/images/?state=done")
        self.client.get("/api/v1/patients/", name="GET /api/v1/patients/")
