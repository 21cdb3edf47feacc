"""Official encoders by name: the registry, downloads from a local HTTP server (resume, size and
checksum checks), the offline error, conversion of a `.pth` in the official layout, and the
`pretrained` task."""

import dataclasses
import http.server
import io
import os
import socket
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from torch_resnet import random_torch_resnet, sequential_state_dict  # noqa: E402

from caco_jax import config as config_lib  # noqa: E402
from caco_jax.data.normalization import Normalization  # noqa: E402
from caco_jax.models import export, pretrained  # noqa: E402
from caco_jax.settings import SettingsError  # noqa: E402


class Server:
    """A threading HTTP server on 127.0.0.1 serving ``files`` with Range support; ``truncate``
    bytes-of-body makes the next response stop early (an interrupted transfer)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.truncate: int | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                start = int(requested[len("bytes=") : -1]) if requested else 0
                self.send_response(206 if requested else 200)
                if requested:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.truncate is not None:
                    payload, server.truncate = payload[: server.truncate], None
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/checkpoints/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    instance = Server({})
    yield instance
    instance.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/checkpoints/"


def test_registry_is_the_official_list():
    assert list(pretrained.CHECKPOINTS) == [
        "r18_100k_seco", "r18_100k_moco", "r18_100k_teco", "r18_100k_caco", "r18_1m_seco",
        "r18_1m_caco", "r50_100k_moco", "r50_100k_seco", "r50_100k_caco", "r50_1m_seco",
        "r50_1m_caco",
    ]  # fmt: skip
    caco = pretrained.get("r50_1m_caco")
    assert (caco.file, caco.depth, caco.method, caco.epochs) == (
        "resnet50_caco_geo_1m_200.pth",
        50,
        "caco",
        200,
    )
    assert (
        caco.url()
        == "https://research.cs.cornell.edu/caco/checkpoints/resnet50_caco_geo_1m_200.pth"
    )
    assert caco.normalization == Normalization.rgb() and caco.sha256 is None
    with pytest.raises(KeyError, match="neither an official encoder"):
        pretrained.get("r18_10k_caco")


def test_offline_error_names_the_url_and_the_cache_path(tmp_path):
    url = closed_port_url()
    with pytest.raises(pretrained.DownloadError) as caught:
        pretrained.load_pretrained("r18_100k_caco", cache=str(tmp_path), base_url=url)
    message = str(caught.value)
    assert "\n" not in message
    assert url + "resnet18_caco_geo_100k_1000.pth" in message
    assert os.path.join(tmp_path, "checkpoints", "resnet18_caco_geo_100k_1000.pth") in message


def test_download_resumes_then_converts_and_loads_from_the_cache(tmp_path, server):
    torch_model = random_torch_resnet(18, seed=3)
    buffer = io.BytesIO()
    torch.save(sequential_state_dict(torch_model), buffer)  # the official `.pth` layout
    payload = buffer.getvalue()
    server.files["checkpoints/resnet18_caco_geo_100k_1000.pth"] = payload
    half = len(payload) // 2
    server.truncate = half
    with pytest.raises(pretrained.DownloadError, match=f"received {half} of {len(payload)} bytes"):
        pretrained.load_pretrained("r18_100k_caco", cache=str(tmp_path), base_url=server.url)

    model, metadata = pretrained.load_pretrained(
        "r18_100k_caco", cache=str(tmp_path), base_url=server.url
    )
    assert server.ranges == [None, f"bytes={half}-"]
    cached = os.path.join(tmp_path, "checkpoints", "resnet18_caco_geo_100k_1000.pth")
    with open(cached, "rb") as f:
        assert f.read() == payload
    assert not os.path.exists(cached + ".part")
    assert (metadata["method"], metadata["epochs"], metadata["image_size"]) == ("caco", 1000, 224)
    assert export.input_normalization(metadata) == Normalization.rgb()

    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected, _ = torch_model.stages(torch.from_numpy(images).permute(0, 3, 1, 2))
    pooled = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
    assert np.abs(np.asarray(pooled) - expected.numpy()).max() < 1e-4

    # Offline now: the cached export loads without the network.
    again, _ = pretrained.load_pretrained(
        "r18_100k_caco", cache=str(tmp_path), base_url=closed_port_url()
    )
    assert again.depth == 18 and len(server.ranges) == 2


def test_size_and_checksum_mismatches_are_errors(tmp_path, server):
    payload = bytes(range(256)) * 40
    checkpoint = pretrained.get("r18_1m_seco")
    server.files[f"checkpoints/{checkpoint.file}"] = payload
    server.truncate = 1000
    with pytest.raises(pretrained.DownloadError, match=f"received 1000 of {len(payload)} bytes"):
        pretrained.download(checkpoint, cache=str(tmp_path), base_url=server.url)
    final = os.path.join(tmp_path, "checkpoints", checkpoint.file)
    assert not os.path.exists(final) and os.path.getsize(final + ".part") == 1000

    wrong = dataclasses.replace(checkpoint, sha256="0" * 64)
    with pytest.raises(pretrained.DownloadError, match=r"SHA-256 .* differs"):
        pretrained.download(wrong, cache=str(tmp_path), base_url=server.url)
    assert not os.path.exists(final) and not os.path.exists(final + ".part")

    import hashlib

    right = dataclasses.replace(checkpoint, sha256=hashlib.sha256(payload).hexdigest())
    assert pretrained.download(right, cache=str(tmp_path), base_url=server.url) == final
    assert server.ranges == [None, "bytes=1000-", None]


def test_pretrained_task_writes_an_export_and_reads_exports_by_path(tmp_path, server):
    buffer = io.BytesIO()
    torch.save(sequential_state_dict(random_torch_resnet(18, seed=4)), buffer)
    server.files["checkpoints/resnet18_moco_geo_100k_200.pth"] = buffer.getvalue()
    config = config_lib.for_tasks("pretrained")
    config.pretrained.name = "r18_100k_moco"
    config.pretrained.base_url = server.url
    config.pretrained.cache_dir = str(tmp_path / "cache")
    config_lib.validate(config)
    result = pretrained.run_task(config_lib.resolve(config), str(tmp_path))
    assert result["export"] == os.path.join(tmp_path, "encoder")
    _, metadata = pretrained.load_pretrained(result["export"])
    assert (metadata["pretrained_name"], metadata["method"]) == ("r18_100k_moco", "moco")

    config.pretrained.name = ""
    with pytest.raises(SettingsError, match=r"pretrained\.name"):
        config_lib.validate(config)


def test_every_official_encoder_says_what_it_is_without_downloading():
    from caco_jax.models import registry

    for name, checkpoint in registry.CHECKPOINTS.items():
        meta = checkpoint.meta()
        assert meta["name"] == name and meta["bands"] == ["B4", "B3", "B2"]
        assert meta["architecture"] == f"ResNet-{checkpoint.depth}" and meta["image_size"] == 224
        assert meta["licence"].startswith("MIT") and meta["url"].endswith(checkpoint.file)
        assert meta["publication"] and meta["pretraining_data"].startswith("CACo")
    assert registry.get("r50_1m_caco").describe() == (
        "CACo, ResNet-50, RGB 224 px, CACo 1M images (geography), 200 epochs"
    )


def test_another_file_under_an_official_name_is_refused(tmp_path, server):
    """A torchvision file (same architecture, other keys) saved under the official name converts,
    but is not labelled official; the official file's SHA-256 is recorded at first use and a file
    changed since is refused at the next load."""
    checkpoint = pretrained.get("r18_100k_caco")
    torch_model = random_torch_resnet(18, seed=6)
    cached = tmp_path / "checkpoints" / checkpoint.file
    cached.parent.mkdir()
    torch.save({k: v for k, v in torch_model.state_dict().items()}, cached)
    with pytest.raises(pretrained.DownloadError, match="in the torchvision layout"):
        pretrained.load_pretrained(checkpoint.name, cache=str(tmp_path), base_url=server.url)
    assert not (tmp_path / "exports" / checkpoint.name).exists()

    for path in (cached, cached.with_suffix(".pth.sha256")):
        path.unlink()
    buffer = io.BytesIO()
    torch.save(sequential_state_dict(torch_model), buffer)
    server.files[f"checkpoints/{checkpoint.file}"] = buffer.getvalue()
    _, metadata = pretrained.load_pretrained(
        checkpoint.name, cache=str(tmp_path), base_url=server.url
    )
    import hashlib

    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    assert cached.with_suffix(".pth.sha256").read_text().strip() == digest == metadata["sha256"]
    cached.write_bytes(buffer.getvalue()[:-10] + b"0123456789")  # changed after the download
    with pytest.raises(pretrained.DownloadError, match=f"differs from {digest}, recorded"):
        pretrained.load_pretrained(checkpoint.name, cache=str(tmp_path), base_url=server.url)
