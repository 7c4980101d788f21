"""Checked downloads of the known dataset files.

``download`` streams a URL to a temporary file beside the target, verifies its SHA-256 and
renames it into place. ``REMOTE_FILES`` lists the files of each dataset with the SHA-256 of the
copies published by the dataset authors, and ``fetch`` tries their mirrors in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REMOTE_FILES", "RemoteFile", "download", "fetch", "sha256_file"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str, dest_path: str | os.PathLike[str], *, sha256: str, timeout: float = 60
) -> Path:
    """Download ``url`` to ``dest_path`` and check its SHA-256; return the destination path.

    A file already at ``dest_path`` with the right hash is kept as is (no network access). The
    data is streamed to a temporary file in the destination folder, hashed, and moved into place
    with an atomic rename only if the hash matches, so ``dest_path`` never holds a partial file.
    On a mismatch the temporary file is deleted and a ValueError names the file and both hashes.
    Network failures raise OSError naming the URL.
    """
    expected = sha256.lower()
    if not _HEX64.fullmatch(expected):
        raise ValueError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    dest = Path(dest_path)
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "difflab"})
        logger.info("downloading %s -> %s", url, dest)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as r:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        actual = h.hexdigest()
        if actual != expected:
            raise ValueError(
                f"SHA-256 mismatch for {dest.name} downloaded from {url}: "
                f"expected {expected}, got {actual}"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        tmp.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise OSError(f"could not download {url} to {dest}: {reason}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file: its name, its SHA-256 and the URLs (mirrors) tried in order."""

    filename: str
    sha256: str
    urls: tuple[str, ...]


_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",  # the original site; often refuses scripted access
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

# In the format of `sha256sum`, so a copy can be checked with `sha256sum -c`.
_SHA256SUMS = {
    "mnist": """
440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609  train-images-idx3-ubyte.gz
3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c  train-labels-idx1-ubyte.gz
8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6  t10k-images-idx3-ubyte.gz
f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6  t10k-labels-idx1-ubyte.gz
""",
    "fashion-mnist": """
3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84  train-images-idx3-ubyte.gz
a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845  train-labels-idx1-ubyte.gz
346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073  t10k-images-idx3-ubyte.gz
67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5  t10k-labels-idx1-ubyte.gz
""",
    "cifar10": """
6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce  cifar-10-python.tar.gz
""",
}

REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    dataset: tuple(
        RemoteFile(name, digest, tuple(mirror + name for mirror in _MIRRORS[dataset]))
        for digest, name in (line.split() for line in table.strip().splitlines())
    )
    for dataset, table in _SHA256SUMS.items()
}


def fetch(dataset: str, filename: str, dest_dir: str | os.PathLike[str]) -> Path:
    """Download ``filename`` of ``dataset`` (a key of ``REMOTE_FILES``) into ``dest_dir``,
    trying each mirror in turn; one OSError lists every mirror's failure if all fail."""
    remote = next((r for r in REMOTE_FILES.get(dataset, ()) if r.filename == filename), None)
    if remote is None:
        raise ValueError(f"no known source for {filename!r} of dataset {dataset!r}")
    errors = []
    for url in remote.urls:
        try:
            return download(url, Path(dest_dir) / filename, sha256=remote.sha256)
        except (OSError, ValueError) as err:
            errors.append(str(err))
    raise OSError(f"could not download {filename}: {'; '.join(errors)}")
