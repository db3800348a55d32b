"""Verified downloads of checkpoints and assets: nothing unverified ever lands at its destination.

A source is an http(s) URL, a ``file://`` URL or a local path. Bytes are hashed while they are
written to a temporary file next to the destination, which is moved into place only once its
digest matches; on any failure the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from modiff.errors import UserError
from modiff.io import atomic_output

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # 1 MiB
RETRY_BACKOFF_S = 0.5  # sleep RETRY_BACKOFF_S * attempt between attempts (tests shrink it)

# getaddrinfo messages on glibc, macOS and Windows, for when the gaierror itself got stringified.
_RESOLUTION_FAILURES = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "getaddrinfo failed",
)


class FetchError(UserError, RuntimeError):
    """A source could not be fetched and verified."""


class ChecksumError(FetchError):
    """The fetched bytes do not have the expected digest."""


class OfflineError(FetchError):
    """The host of a URL cannot be resolved or reached: the machine is most likely offline."""


class _RetryableError(Exception):
    """A failed attempt that a later attempt may fix (e.g. a truncated transfer)."""


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file with a hashlib ``algorithm`` (e.g. ``"sha256"``), read in chunks."""
    with open(path, "rb") as src:
        digests, _ = _copy_hashing(src, None, [algorithm])
    return digests[algorithm]


def fetch(
    source: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Fetch ``source`` to ``dest`` and verify it against every digest given; return ``dest``.

    An existing ``dest`` with the right digest is returned without fetching. HTTP timeouts,
    5xx answers, dropped connections and truncated transfers are retried up to ``retries``
    attempts in total; 4xx answers and digest mismatches are not (retrying cannot fix them).
    Raises :class:`OfflineError` at once when the host name cannot be resolved.
    """
    expected = _expected_digests(md5=md5, sha256=sha256)
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    dest = Path(dest)

    if dest.is_file():
        if _digests_match(_file_digests(dest, expected), expected):
            logger.info("%s is up to date", dest)
            return dest
        logger.info("%s exists but its digest does not match; fetching it again", dest)

    kind, location = _parse_source(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s to %s", source, dest)
    with atomic_output(dest) as tmp:  # renamed onto dest only once verified
        if kind == "http":
            actual = _download(location, tmp, dest, expected, timeout, retries, progress)
        else:
            actual = _copy_local(Path(location), tmp, expected, progress, dest.name)
        _verify(source, expected, actual)
    logger.info("verified %s (%s)", dest, ", ".join(f"{a} {d}" for a, d in expected.items()))
    return dest


def verified_checkpoint(path: str | Path, preset: dict[str, Any]) -> Path:
    """The preset's fetched checkpoint at ``path``, checked against the digest params.yaml gives
    for it (``preset``: a preset layout, with its name and checkpoint section).

    Checked at every load, not only when fetched: a file is trusted only while its digest
    matches (a byte flipped since would otherwise load silently into every later stage)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; run `modiff fetch` (or the pipeline's fetch stage) first"
        )
    digests = preset["checkpoint"]
    expected = _expected_digests(md5=digests.get("md5"), sha256=digests.get("sha256"))
    actual = _file_digests(path, expected)
    if not _digests_match(actual, expected):
        raise ChecksumError(
            f"{path} has {actual}, not the {expected} params.yaml gives for preset "
            f"'{preset['name']}': it changed since it was fetched; delete it and run `modiff fetch`"
        )
    return path


def _expected_digests(**given: str | None) -> dict[str, str]:
    """Normalised expected digests by algorithm; refuses to fetch without any."""
    expected: dict[str, str] = {}
    for algorithm, digest in given.items():
        if digest is None:
            continue
        digest = digest.strip().lower()
        length = hashlib.new(algorithm).digest_size * 2
        if len(digest) != length or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{algorithm} must be {length} hex digits, got {digest!r}")
        expected[algorithm] = digest
    if not expected:
        raise ValueError("fetch needs md5 or sha256: unverified files are never accepted")
    return expected


def _parse_source(source: str) -> tuple[str, str]:
    """("http", url) for http(s) URLs, ("path", local path) for file:// URLs and plain paths."""
    if "://" not in source:
        return "path", source
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return "http", source
    if scheme == "file" and parts.netloc in ("", "localhost"):
        return "path", urllib.request.url2pathname(parts.path)
    raise FetchError(f"unsupported source {source!r}: use an http(s) URL, a file:// URL or a path")


def _copy_hashing(
    src: BinaryIO,
    out: BinaryIO | None,
    algorithms: Iterable[str],
    bar: tqdm | None = None,
) -> tuple[dict[str, str], int]:
    """Stream ``src`` into ``out`` (if any) in chunks, hashing on the way; (digests, bytes)."""
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    total = 0
    while chunk := src.read(CHUNK_SIZE):
        for hasher in hashers.values():
            hasher.update(chunk)
        if out is not None:
            out.write(chunk)
        if bar is not None:
            bar.update(len(chunk))
        total += len(chunk)
    return {algorithm: h.hexdigest() for algorithm, h in hashers.items()}, total


def _file_digests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    with open(path, "rb") as src:
        digests, _ = _copy_hashing(src, None, algorithms)
    return digests


def _digests_match(actual: dict[str, str], expected: dict[str, str]) -> bool:
    return all(actual[algorithm] == digest for algorithm, digest in expected.items())


def _verify(source: str, expected: dict[str, str], actual: dict[str, str]) -> None:
    for algorithm, digest in expected.items():
        if actual[algorithm] != digest:
            raise ChecksumError(
                f"checksum mismatch for {source}: {algorithm} expected {digest}, "
                f"got {actual[algorithm]}"
            )


def _progress_bar(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


def _copy_local(
    path: Path, tmp: Path, expected: dict[str, str], progress: bool, desc: str
) -> dict[str, str]:
    if not path.is_file():
        raise FetchError(f"local source not found: {path}")
    with (
        open(path, "rb") as src,
        open(tmp, "wb") as out,
        _progress_bar(path.stat().st_size, desc, progress) as bar,
    ):
        digests, _ = _copy_hashing(src, out, expected, bar)
    return digests


def _http_attempt(
    url: str, tmp: Path, expected: dict[str, str], timeout: float, progress: bool, desc: str
) -> dict[str, str]:
    """One GET of ``url`` into ``tmp`` (truncating it); raises on a short transfer."""
    request = urllib.request.Request(url, headers={"User-Agent": "modiff-fetch"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        with open(tmp, "wb") as out, _progress_bar(total, desc, progress) as bar:
            digests, received = _copy_hashing(response, out, expected, bar)
    # http.client returns b"" at a premature EOF instead of raising, so check the length here.
    if total is not None and received < total:
        raise _RetryableError(f"transfer truncated: received {received} of {total} bytes")
    return digests


def _download(
    url: str,
    tmp: Path,
    dest: Path,
    expected: dict[str, str],
    timeout: float,
    retries: int,
    progress: bool,
) -> dict[str, str]:
    """GET ``url`` with retries on transient failures; the digests of what was received."""
    last_error: BaseException | None = None
    reason = ""
    for attempt in range(1, retries + 1):
        try:
            return _http_attempt(url, tmp, expected, timeout, progress, dest.name)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500:  # the server's answer will not change: fail now
                raise FetchError(f"fetching {url} failed: HTTP {exc.code} {exc.reason}") from exc
            last_error, reason = exc, f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            if _is_offline(exc.reason):
                raise OfflineError(_offline_message(url, dest, expected, exc.reason)) from exc
            last_error, reason = exc, _describe(exc.reason, timeout)
        except (TimeoutError, ConnectionError, http.client.HTTPException, _RetryableError) as exc:
            last_error, reason = exc, _describe(exc, timeout)
        logger.warning("attempt %d/%d to fetch %s failed: %s", attempt, retries, url, reason)
        if attempt < retries:
            time.sleep(RETRY_BACKOFF_S * attempt)
    raise FetchError(
        f"fetching {url} failed after {retries} attempt(s); last error: {reason}"
    ) from last_error


def _describe(error: object, timeout: float) -> str:
    if isinstance(error, TimeoutError):  # socket.timeout is an alias of TimeoutError
        return f"timed out after {timeout:g} s (timeout)"
    if isinstance(error, http.client.IncompleteRead):
        return f"transfer truncated ({error!r})"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def _is_offline(reason: object) -> bool:
    """True when the host name cannot be resolved or there is no route to any network."""
    if isinstance(reason, socket.gaierror):
        return True
    if isinstance(reason, OSError) and reason.errno == errno.ENETUNREACH:
        return True
    text = str(reason).lower()
    return any(message in text for message in _RESOLUTION_FAILURES)


def _offline_message(url: str, dest: Path, expected: dict[str, str], reason: object) -> str:
    digests = ", ".join(f"{algorithm} {digest}" for algorithm, digest in expected.items())
    return (
        f"the network is unreachable: cannot reach the host of {url} ({reason}). "
        f"Download {url} by hand and place the file at {dest.resolve()} "
        f"(its digest will be verified: {digests}), "
        "or pass a local path or a file:// URL as the source."
    )
