"""A local GCS server for the bucket tests: gcp-storage-emulator on 127.0.0.1, taught the object
generations that TensorStore (Orbax's checkpoints and exports) relies on.

Clients reach it through environment variables: gcsfs (etils epath's ``gs://``) and
google-cloud-storage (tensorboardX's) follow ``STORAGE_EMULATOR_HOST``; TensorStore's ``gcs``
driver follows ``TENSORSTORE_GCS_HTTP_URL`` and takes ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its
token. ``NO_GCE_CHECK`` keeps google-auth from looking for a metadata server off this machine.

Why the emulator needs a patch: TensorStore reads an object with ``alt=media`` and takes the
object's generation from the ``x-goog-generation`` response header, then conditions later reads
(``ifGenerationNotMatch``: 304 when unchanged) and writes (``ifGenerationMatch``: 412 when the
object changed, ``0`` = only if absent) on it. The emulator (gcp-storage-emulator 2026.7) sends no
such header and ignores both preconditions, so TensorStore records generation 0 and its next
conditional read of the same object (the OCDBT manifest of an Orbax checkpoint, read back while
the checkpoint is written) fails with "Malformed StorageGeneration". `generation_aware` wraps the
emulator's object handlers with the header and the two preconditions as GCS defines them
(https://cloud.google.com/storage/docs/request-preconditions); the emulator already gives every
upload a new ``generation`` (its clock in ns) and serves requests one at a time, so a check before
the handler runs sees the object the handler acts on.
"""

from __future__ import annotations

import contextlib
import functools
import os
from http import HTTPStatus
from unittest import mock

from helpers import free_port

BUCKET = "caco"


def _live_generation(storage, bucket: str, name: str) -> int | None:
    """The generation of the live object ``name``, None when there is none."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _upload_name(request) -> str | None:
    """The object an upload names: in the query, or in the metadata part of a multipart body."""
    if "name" in request.query:
        return request.query["name"][0]
    if request.query.get("uploadType") == ["multipart"]:
        return request.data["meta"].get("name")
    return None


def generation_aware(handler):
    """``handler`` (an emulator object handler) with GCS's generation preconditions and the
    ``x-goog-generation`` header of media downloads."""

    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        query = request.query
        bucket = request.params["bucket_name"]
        name = request.params.get("object_id") or _upload_name(request)
        generation = _live_generation(storage, bucket, name) if name else None
        is_read = request.method == "GET"
        if "ifGenerationMatch" in query:
            expected = int(query["ifGenerationMatch"][0])
            if generation != (expected or None):  # 0: only if there is no live object
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        if "ifGenerationNotMatch" in query and generation is not None:
            if generation == int(query["ifGenerationNotMatch"][0]):
                response.status = (
                    HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
                )
                return None
        result = handler(request, response, storage, *args, **kwargs)
        if is_read and generation is not None:
            response["x-goog-generation"] = str(generation)
            response["x-goog-metageneration"] = "1"
        return result

    return wrapped


def move(request, response, storage, *args, **kwargs):
    """GCS's ``objects.move`` (``POST .../o/SOURCE/moveTo/o/DESTINATION``), which gcsfs tries
    first for every rename: a copy, then the source deleted."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    bucket, source = request.params["bucket_name"], request.params["object_id"]
    try:
        moved = objects._copy(
            request.base_url, storage, bucket, source, bucket, request.params["dest_object_id"]
        )
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


class Emulator:
    """A running emulator: the ``environment`` that points clients at it, and the bytes of every
    upload request it received (``uploads``: object name or upload id, Content-Length)."""

    def __init__(self, environment: dict):
        self.environment = environment
        self.uploads: list[tuple[str, int]] = []

    def counted(self, handler):
        """``handler`` (an upload route's) recording each request's size in `uploads`."""

        @functools.wraps(handler)
        def wrapped(request, response, storage, *args, **kwargs):
            name = _upload_name(request) or request.query.get("upload_id", [""])[0]
            self.uploads.append((name, int(request.get_header("Content-Length", 0))))
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    def uploaded_bytes(self, prefix: str) -> int:
        """Bytes sent in uploads of the objects whose names start with ``prefix``."""
        return sum(size for name, size in self.uploads if name.startswith(prefix))


def _routes(emulator: Emulator):
    """The emulator's routes, its object reads, writes and deletes `generation_aware`, its
    uploads counted, and `move` added."""
    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.handlers import objects

    patched = {objects.get, objects.download, objects.insert, objects.delete}

    def patch(handler):
        patched_handler = generation_aware(handler) if handler in patched else handler
        if handler in (objects.insert, objects.upload_partial):
            return emulator.counted(patched_handler)
        return patched_handler

    move_route = (
        rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
        r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
        {"POST": move},
    )
    return (
        move_route,  # before the object route, which would take ".../moveTo/o/..." for a name
        *(
            (regex, {method: patch(handler) for method, handler in methods.items()})
            for regex, methods in server.HANDLERS
        ),
    )


@contextlib.contextmanager
def running(bucket: str = BUCKET):
    """A fresh in-memory emulator with ``bucket`` on a free port, the environment pointing every
    client at it; yields its `Emulator`. Stopped on exit."""
    from gcp_storage_emulator import server
    from google.auth.compute_engine import _metadata

    url = f"http://127.0.0.1:{free_port()}"
    environment = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "NO_GCE_CHECK": "true",
    }
    emulator = Emulator(environment)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(server, "HANDLERS", _routes(emulator)))
        stack.enter_context(mock.patch.dict(os.environ, environment))
        # google-auth reads NO_GCE_CHECK when imported: set here for a process that already did.
        stack.enter_context(mock.patch.object(_metadata, "_NO_GCE_CHECK", True))
        instance = server.create_server(
            "127.0.0.1", int(url.rsplit(":", 1)[1]), in_memory=True, default_bucket=bucket
        )
        instance.start()
        stack.callback(instance.stop)
        yield emulator
