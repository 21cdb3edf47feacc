"""The official pretrained encoders by name: download, convert, load.

`CHECKPOINTS` holds exactly the weights the official repository lists
(`utkarshmall13/CACo`, `src/utils/pretrained_checkpoints.py`, `saved_torch_ckpts`), served as
`.pth` files of the `nn.Sequential` query encoder from the project page's `checkpoints/` folder
(`OFFICIAL_BASE_URL`, the link in the official README). `load_pretrained(name)` downloads one into
the cache (progress bar; an interrupted transfer resumes with an HTTP Range request; the size is
checked against the server's, the SHA-256 where one is known), converts it once into an encoder
export (`models.convert`) and loads it. Any other encoder export, e.g. `<workdir>/encoder` of a
pretraining run, loads the same way from its path.

The cache is `$CACO_JAX_CACHE` or `~/.cache/caco_jax`: `checkpoints/<file>.pth` (the downloads),
`exports/<name>/` (the converted exports). Offline, put a file downloaded elsewhere at the path the
error names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import urllib.error
import urllib.request

from caco_jax.data.normalization import Normalization
from caco_jax.models import convert, export
from caco_jax.runtime import errors, progress, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

OFFICIAL_BASE_URL = "https://research.cs.cornell.edu/caco/checkpoints/"
CACHE_ENV = "CACO_JAX_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published encoder: its file, architecture, how and on what it was pretrained."""

    name: str
    file: str
    depth: int
    method: str
    data: str  # the pretraining archive
    epochs: int
    normalization: Normalization = dataclasses.field(default_factory=Normalization.rgb)
    image_size: int = convert.OFFICIAL_IMAGE_SIZE
    sha256: str | None = None  # the official repository publishes no checksums

    def url(self, base_url: str = OFFICIAL_BASE_URL) -> str:
        return base_url.rstrip("/") + "/" + self.file

    def metadata(self, base_url: str = OFFICIAL_BASE_URL) -> dict:
        """What the converted export records about its origin."""
        return {
            "pretrained_name": self.name,
            "method": self.method,
            "pretraining_data": self.data,
            "epochs": self.epochs,
            "url": self.url(base_url),
        }


def _official(depth: int, data: str, method: str, epochs: int) -> Checkpoint:
    archive = {"100k": "CACo 100k images (geography)", "1m": "CACo 1M images (geography)"}[data]
    return Checkpoint(
        name=f"r{depth}_{data}_{method}",
        file=f"resnet{depth}_{method}_geo_{data}_{epochs}.pth",
        depth=depth,
        method=method,
        data=archive,
        epochs=epochs,
    )


# In the official file's order.
CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        _official(18, "100k", "seco", 1000),
        _official(18, "100k", "moco", 200),
        _official(18, "100k", "teco", 1000),
        _official(18, "100k", "caco", 1000),
        _official(18, "1m", "seco", 200),
        _official(18, "1m", "caco", 200),
        _official(50, "100k", "moco", 200),
        _official(50, "100k", "seco", 1000),
        _official(50, "100k", "caco", 1000),
        _official(50, "1m", "seco", 200),
        _official(50, "1m", "caco", 200),
    )
}


@dataclasses.dataclass(frozen=True)
class PretrainedSettings(Section):
    """`config.pretrained`: an official encoder by name (task pretrained), its cache and server,
    and the torchvision-layout PyTorch export (`torch_export`); `embed` and `change_map` read the
    cache and server."""

    SECTION = "pretrained"
    name: str = ""  # an official name (CHECKPOINTS) or an export path
    cache_dir: str = ""  # "" = $CACO_JAX_CACHE or ~/.cache/caco_jax
    base_url: str = OFFICIAL_BASE_URL
    output: str = ""  # export folder of an official encoder; "" = <workdir>/encoder
    torch_output: str = ""  # also write a .pth / .safetensors torchvision state dict
    overwrite: bool = False

    def validate(self) -> None:
        self.require(
            not storage.is_url(self.cache_dir),
            "cache_dir",
            "the download cache is a local folder (downloads resume from partial files), not a URL",
        )
        self.require(
            not storage.is_url(self.torch_output),
            "torch_output",
            "the torch weights are written as a local file, not a URL",
        )
        self.require(
            self.torch_output == "" or self.torch_output.endswith((".pth", ".safetensors")),
            "torch_output",
            "must end in .pth or .safetensors",
        )


class DownloadError(errors.UserError, RuntimeError):
    """A checkpoint could not be fetched or failed its checks; the message says where to put it."""


def cache_dir(override: str = "") -> str:
    return os.path.abspath(
        override or os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/caco_jax")
    )


class UnknownEncoderError(errors.UserError, KeyError):
    """A name that is neither an official encoder nor an export path."""

    def __str__(self) -> str:  # KeyError's own quotes the message
        return str(self.args[0])


def get(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise UnknownEncoderError(
            f"{name!r} is neither an official encoder ({', '.join(CHECKPOINTS)}) "
            "nor the path of an encoder export"
        )
    return CHECKPOINTS[name]


def download(checkpoint: Checkpoint, *, cache: str = "", base_url: str = OFFICIAL_BASE_URL) -> str:
    """The path of ``checkpoint``'s file in the cache, downloaded first if it is not there.

    The transfer goes to ``<file>.part`` and is renamed once complete, so a file under its final
    name is whole; a rerun after an interruption asks only for the missing bytes.
    """
    folder = os.path.join(cache_dir(cache), "checkpoints")
    path = os.path.join(folder, checkpoint.file)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    url = checkpoint.url(base_url)
    partial = path + ".part"
    offset = os.path.getsize(partial) if os.path.isfile(partial) else 0
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the partial file is not a prefix of this one: start again
            os.remove(partial)
            return download(checkpoint, cache=cache, base_url=base_url)
        raise DownloadError(
            f"cannot download {url}: HTTP {error.code} {error.reason}; "
            f"download it by other means and place it at {path}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"cannot download {url} ({reason}); download it by other means and place it at {path}"
        ) from None
    with response:
        resumed = response.status == 206
        if not resumed:
            offset = 0  # the server ignored the Range request: the body is the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(partial, "ab" if resumed else "wb") as out,
            progress.bar(total=total, initial=offset, unit="B", desc=checkpoint.file) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError):
                pass  # the size check below reports it
    size = os.path.getsize(partial)
    if total is not None and size != total:
        raise DownloadError(
            f"{url}: received {size} of {total} bytes; rerun to resume from {partial}"
        )
    if checkpoint.sha256 is not None:
        digest = _sha256(partial)
        if digest != checkpoint.sha256:
            os.remove(partial)
            raise DownloadError(
                f"{url}: SHA-256 {digest} differs from the published {checkpoint.sha256}; "
                "the corrupt download was removed"
            )
    os.replace(partial, path)
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def export_path(name: str, *, cache: str = "", base_url: str = OFFICIAL_BASE_URL) -> str:
    """The encoder export of an official checkpoint (downloaded and converted once), or ``name``
    itself when it is the path of an export."""
    if name not in CHECKPOINTS and os.path.exists(name):
        return os.path.abspath(name)
    checkpoint = get(name)
    target = os.path.join(cache_dir(cache), "exports", checkpoint.name)
    if not os.path.isdir(target):
        source = download(checkpoint, cache=cache, base_url=base_url)
        write_official_export(checkpoint, source, target, base_url=base_url)
    return target


def write_official_export(
    checkpoint: Checkpoint,
    source: str,
    output: str,
    *,
    base_url: str = OFFICIAL_BASE_URL,
    overwrite: bool = False,
) -> str:
    """Converts the downloaded ``source`` of ``checkpoint`` into an export at ``output``."""
    convert.write_export(
        source,
        output,
        depth=checkpoint.depth,
        overwrite=overwrite,
        metadata={
            **checkpoint.metadata(base_url),
            "input": checkpoint.normalization.to_json(),
            export.IMAGE_SIZE_KEY: checkpoint.image_size,
        },
    )
    return output


def load_pretrained(name: str, *, cache: str = "", base_url: str = OFFICIAL_BASE_URL, **kwargs):
    """``(model, metadata)`` of an official encoder by name (see `CHECKPOINTS`) or of an export by
    path; ``kwargs`` go to `export.load_encoder` (dtype, sharding, ...). The input the encoder
    expects is ``export.input_normalization(metadata)`` at ``metadata["image_size"]`` px."""
    return export.load_encoder(export_path(name, cache=cache, base_url=base_url), **kwargs)


def check_task(settings) -> None:
    """Before any work: the `pretrained` task needs a name (the section also serves `embed` and
    `change_map`, which need none)."""
    if not settings.pretrained.name:
        raise SettingsError(
            "config.pretrained.name: the pretrained task needs an official name (e.g. "
            "r18_100k_caco) or an export path"
        )


def run_task(settings, workdir) -> dict:
    """Task `pretrained`: the encoder `config.pretrained.name` as an export at
    `config.pretrained.output` (default `<workdir>/encoder`), and optionally as a torchvision state
    dict at `config.pretrained.torch_output`."""
    p = settings.pretrained
    kept = False
    if p.name in CHECKPOINTS:
        checkpoint = CHECKPOINTS[p.name]
        output = os.fspath(storage.path(p.output or Workdir.of(workdir).encoder))
        kept = not p.overwrite and _holds(output, p.name)
        if kept:  # a rerun: the same encoder is there
            print(f"pretrained: {output} holds {p.name} already (kept)", flush=True)
        else:
            source = download(checkpoint, cache=p.cache_dir, base_url=p.base_url)
            write_official_export(
                checkpoint, source, output, base_url=p.base_url, overwrite=p.overwrite
            )
    else:
        output = export_path(p.name)
    result = {"name": p.name, "export": output, "kept": kept}
    if p.torch_output:
        from caco_jax.models import torch_export

        weights = os.path.abspath(p.torch_output)
        sidecar = os.path.splitext(weights)[0] + ".json"
        if kept and os.path.exists(weights) and os.path.exists(sidecar):
            print(f"pretrained: {weights} written from it already (kept)", flush=True)
            result["torch"] = {"weights": weights, "normalization": sidecar}
        else:
            result["torch"] = torch_export.write(output, p.torch_output, overwrite=p.overwrite)
    return result


def _holds(output: str, name: str) -> bool:
    """Whether the export at ``output`` is the official encoder ``name`` (complete and whole)."""
    try:
        return export.read_metadata(output).get("pretrained_name") == name
    except (OSError, ValueError):
        return False
