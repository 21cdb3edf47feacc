"""The official pretrained encoders by name: download, convert, load.

`CHECKPOINTS` (`models.registry`, with what each encoder is) holds exactly the weights the official
repository lists, served as `.pth` files of the `nn.Sequential` query encoder from the project
page's `checkpoints/` folder. `load_pretrained(name)` downloads one into the cache (progress bar; an
interrupted transfer resumes with an HTTP Range request; the size is checked against the server's),
checks the file (its keys and shapes must be the official `nn.Sequential` layout of the named
architecture before it is labelled official; its SHA-256 is recorded beside it on first use and
compared at every later load), converts it once into an encoder export (`models.convert`) and loads
it. Any other encoder export, e.g. `<workdir>/encoder` of a pretraining run, loads the same way from
its path.

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

from caco_jax.models import convert, export
from caco_jax.models.registry import CHECKPOINTS, OFFICIAL_BASE_URL, Checkpoint, get
from caco_jax.runtime import errors, progress, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

CACHE_ENV = "CACO_JAX_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


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


def download(checkpoint: Checkpoint, *, cache: str = "", base_url: str = OFFICIAL_BASE_URL) -> str:
    """The path of ``checkpoint``'s file in the cache, downloaded first if it is not there.

    The transfer goes to ``<file>.part`` and is renamed once complete, so a file under its final
    name is whole; a rerun after an interruption asks only for the missing bytes.
    """
    folder = os.path.join(cache_dir(cache), "checkpoints")
    path = os.path.join(folder, checkpoint.file)
    if os.path.isfile(path):
        check_recorded_sha256(path)
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
    check_recorded_sha256(path)
    return path


def check_recorded_sha256(path: str) -> str:
    """The SHA-256 of a cached checkpoint file, recorded beside it (``<file>.sha256``) the first
    time it is used and compared with that record every later time: a file that changed since
    (replaced, truncated, another file under the official name) is a DownloadError."""
    digest = _sha256(path)
    record = path + ".sha256"
    if not os.path.exists(record):
        with open(record, "w") as f:
            f.write(digest + "\n")
        return digest
    with open(record) as f:
        recorded = f.read().strip()
    if recorded != digest:
        raise DownloadError(
            f"{path}: SHA-256 {digest} differs from {recorded}, recorded when it was first "
            f"downloaded ({record}); delete both files to download it again"
        )
    return digest


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
    downloaded = os.path.join(cache_dir(cache), "checkpoints", checkpoint.file)
    if not os.path.isdir(target) or os.path.isfile(downloaded):  # checked at every load
        source = download(checkpoint, cache=cache, base_url=base_url)
        if not os.path.isdir(target):
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
    """Converts the downloaded ``source`` of ``checkpoint`` into an export at ``output``, once
    its keys and shapes are those of the official file: the `nn.Sequential` query encoder of a
    ResNet-``checkpoint.depth`` (a torchvision or Lightning file under the official name is
    refused, whatever its weights)."""
    layout = convert.key_layout(convert.load_state_dict(source))
    if layout != "sequential":
        raise DownloadError(
            f"{source} is not the official {checkpoint.name} file: its keys are in the "
            f"{layout} layout, the official files hold the nn.Sequential query encoder "
            "(0.weight, 1.running_mean, 4.0.conv1.weight, ...); delete it to download the "
            "official one"
        )
    convert.write_export(
        source,
        output,
        depth=checkpoint.depth,
        overwrite=overwrite,
        metadata={
            **checkpoint.metadata(base_url),
            "sha256": _sha256(source),
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
