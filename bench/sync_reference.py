"""The synchronous reference of bench/client_view.py (issue 19): the least a service could do for one photo,
in one process, inside the request. POST (any path) a multipart/form-data body (its first part, as the API's
`image` field) or the raw JPEG; the answer, 200, is {"probability_malignant": p} once the photo is decoded
and the model has run on it:

    .venv/bin/python bench/sync_reference.py --port 8095      # prints "ready 8095" once it listens

- decode, `--decode plain` (the default): the original project's design, as a minimal endpoint is written:
  `Image.open(...).convert("RGB")` at full size, then torchvision's Resize((size, size)), ToTensor and
  Normalize. `--decode tuned`: the inference worker's own, mlcore.preprocessing.decode_image in Pillow's
  draft mode at the worker's decode side, then to_tensor (bench.inprocess.InProcess.prepare): a reference
  that borrows this project's decoding, about 10 ms less per 1528x1360 photo;
- forward: the same model as the system under test (build_model(arch) after torch.manual_seed(0), the
  checkpoint bench/system.py registers), at batch 1, under torch.inference_mode (Predictor.predict_tensors);
- no database, no storage, no broker, no Grad-CAM, no drift features: a floor, not a service;
- server: wsgiref's, a thread per connection (so 8 clients are served at once, their forward passes
  overlapping as torch lets them; --serial runs one photo at a time instead). wsgiref speaks HTTP/1.0:
  a client reconnects for every request, about 0.1 ms on loopback;
- torch threads: TORCH_NUM_THREADS when set (bench/client_view.py sets it to what the system's worker
  gets: every core), else every core (mlcore.inference.configure_torch_threads). On the 2-core
  development machine that is 2, torch's own default there.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inprocess import InProcess


def jpeg_from(body: bytes, content_type: str) -> bytes:
    """The photo in a request body: a multipart body's first part, or the body itself."""
    if not content_type.startswith("multipart/form-data"):
        return body
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    start = body.index(b"\r\n\r\n") + 4  # the first part's headers end here
    return body[start : body.index(b"\r\n--" + boundary, start)]


def plain_prepare(spec):
    """The original project's preprocessing: a full decode, then torchvision's transforms."""
    import io

    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((spec.input_size, spec.input_size)), transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])  # fmt: skip

    def prepare(data: bytes):
        return transform(Image.open(io.BytesIO(data)).convert("RGB"))

    return prepare


def application(model: InProcess, serial: bool, decode: str = "plain"):
    """The WSGI app: GET answers "ok" (a health check), POST a prediction."""
    lock = threading.Lock() if serial else nullcontext()
    prepare = plain_prepare(model.predictor.spec) if decode == "plain" else model.prepare

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] != "POST":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        try:
            photo = jpeg_from(body, environ.get("CONTENT_TYPE", ""))
            with lock:
                probabilities = model.predictor.predict_tensors(prepare(photo).unsqueeze(0))
        except Exception as error:  # a bad body: say so, as a service would
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [json.dumps({"error": f"{type(error).__name__}: {error}"}).encode()]
        answer = {"probability_malignant": float(probabilities[0, model.predictor.meta.positive_index])}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    return app


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, hence per request (wsgiref closes each connection after its answer)."""

    daemon_threads = True
    request_queue_size = 128


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        pass  # a line per request on stderr would cost this process CPU the measurement counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--serial", action="store_true", help="one photo at a time (a lock around the work)")
    parser.add_argument("--decode", choices=("plain", "tuned"), default="plain")
    args = parser.parse_args()
    import torch

    model = InProcess(arch=args.arch, input_size=args.input_size, threads=1)
    model.predictor.predict_tensors(torch.zeros(1, 3, args.input_size, args.input_size))  # warm up
    server = make_server(
        "127.0.0.1", args.port, application(model, args.serial, args.decode), ThreadingServer, QuietHandler
    )
    print(f"ready {args.port} (torch threads {torch.get_num_threads()}, {args.decode} decode)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
