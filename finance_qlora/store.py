"""The durable store: one place, a local folder or any fsspec URL, for everything that must
outlive a run (step outputs, adapters, reports, the champion registry, Prefect's results).

    <store>/<kind>/<key>/...            a step's output folder, named by the step's cache key
    <store>/<kind>/<key>/MANIFEST.json  sha256 of every file; written last, never rewritten

A folder without its manifest is unfinished (a killed upload) and is never read. Steps write
into a local staging folder and publish it here; readers get a verified local copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finance_qlora.errors import ConfigError
from finance_qlora.untouched import remove_untouched

MANIFEST = "MANIFEST.json"
STALE_STAGING_S = 7 * 24 * 3600
# Object stores fsspec reaches with a package of its own (s3fs, gcsfs, adlfs); memory: tests.
REMOTE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> dict[str, str]:
    """Relative file name -> sha256, for every file under `folder` (the manifest aside)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def manifest_digest(files: dict[str, str]) -> str:
    """A folder's fingerprint: the sha256 of its sorted (name, sha256) list."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def local_cache() -> Path:
    return Path(os.environ.get("FINANCE_QLORA_CACHE", Path.home() / ".cache" / "finance-qlora"))


@dataclass
class Store:
    """A root on a file system; `url` is what users and records see."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import fsspec

        self.url = normalize_url(self.url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        except ImportError as exc:
            raise ConfigError(
                f"output_dir: {self.url} needs a package that is not installed ({exc.name}); "
                "pip install s3fs, gcsfs or adlfs for s3://, gs:// or az://"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"output_dir: {self.url} is not a usable URL ({exc})") from None
        self.root = self.root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    # Paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def _fs_path(self, uri: str) -> str:
        """The file system path of a URI under this store."""
        base = self.url.rstrip("/")
        if uri != base and not uri.startswith(base + "/"):
            raise ValueError(f"{uri} is not under the store {self.url}")
        return self.root + uri[len(base) :]

    # Small objects ---------------------------------------------------------------------------
    def read_text(self, *parts: str) -> str | None:
        try:
            return self.fs.cat_file(self.path(*parts)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, text: str, *parts: str) -> None:
        """One object, all or nothing: readers see the old text or the new, never half."""
        target = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, text.encode())  # one PUT: atomic on object stores

    def listdir(self, *parts: str) -> list[str]:
        self.fs.invalidate_cache(self.path(*parts))  # others write here: list it as it is now
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def check_writable(self) -> None:
        """Write and delete a probe object: the store is reachable, and ours to write."""
        probe = self.path(f".write-check-{uuid.uuid4().hex}")
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # every backend words this differently
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConfigError(
                f"output_dir: cannot write to {self.url} ({reason}); check the URL, that the "
                "bucket or folder exists and the credentials (see README: the durable store)"
            ) from None

    # Step folders ----------------------------------------------------------------------------
    def staging(self, kind: str, key: str) -> Path:
        """Where a step writes before publishing: inside a local store (so publishing is a
        rename, and a retry on another machine sharing the volume finds checkpoints), else in
        the local cache."""
        base = Path(self.root) / ".staging" if self.is_local else local_cache() / "staging"
        folder = base / kind / key
        # a published step's folder is cleared; a crashed try's stays for its retry until a
        # week untouched (retries come within minutes; a live step writes far more often)
        others = (p for p in base.glob("*/*") if p != folder and p.is_dir())
        remove_untouched(others, STALE_STAGING_S)
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # live again: a retry that only reads its checkpoints keeps them
        return folder

    def _manifest(self, uri: str) -> dict[str, Any] | None:
        try:
            document = json.loads(self.fs.cat_file(f"{self._fs_path(uri)}/{MANIFEST}"))
            return document if isinstance(document.get("files"), dict) else None
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def manifest(self, uri: str) -> dict[str, str] | None:
        """File name -> sha256 of a complete folder; None for a missing or unfinished one."""
        document = self._manifest(uri)
        return document["files"] if document else None

    def intact(self, uri: str, fingerprint: str) -> bool:
        """The folder is complete and still holds what its record says: on a local store every
        file's sha256 is checked; on an object store every file's size (a read, which downloads,
        checks the sha256 too)."""
        document = self._manifest(uri)
        if document is None or manifest_digest(document["files"]) != fingerprint:
            return False
        path = self._fs_path(uri)
        if self.is_local:
            return os.path.isdir(path) and folder_manifest(Path(path)) == document["files"]
        self.fs.invalidate_cache(path)
        try:
            listing = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return False
        sizes = {name[len(path) + 1 :]: info["size"] for name, info in listing.items()}
        expected = document.get("sizes", {})
        return all(sizes.get(name) == expected.get(name) for name in document["files"])

    def publish(self, local: Path, kind: str, key: str) -> tuple[str, str]:
        """Put a finished local folder at <kind>/<key>, manifest last; returns (uri, digest).

        The folder is immutable: when a complete, intact one is already there (an earlier run,
        or a concurrent one), it is kept and its digest returned."""
        uri = self.uri(kind, key)
        existing = self.manifest(uri)
        if existing is not None and self.intact(uri, manifest_digest(existing)):
            shutil.rmtree(local, ignore_errors=True)
            return uri, manifest_digest(existing)
        if existing is not None:  # damaged since: replace it, manifest first out
            self.remove(uri)
        files = folder_manifest(local)
        sizes = {name: (local / name).stat().st_size for name in files}
        text = json.dumps({"files": files, "sizes": sizes}, indent=1, sort_keys=True)
        target = self.path(kind, key)
        if self.is_local:
            (local / MANIFEST).write_text(text)
            if os.path.exists(target):  # unfinished leftovers of a killed publish
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(local, target)
        else:
            for name in files:
                self.fs.put_file(str(local / name), f"{target}/{name}")
            self.fs.pipe_file(f"{target}/{MANIFEST}", text.encode())
            _keep_as_cached(local, manifest_digest(files))
        return uri, manifest_digest(files)

    def materialize(self, uri: str, fingerprint: str) -> Path:
        """A local folder with the verified contents of `uri`; raises StaleOutput when the
        store no longer holds what the record says."""
        files = self.manifest(uri)
        if files is None or manifest_digest(files) != fingerprint:
            raise StaleOutput(f"{uri} is missing or changed on the store")
        if self.is_local:
            folder = Path(self._fs_path(uri))
            if folder_manifest(folder) != files:
                raise StaleOutput(f"{uri}: files changed on the store")
            return folder
        cached = local_cache() / "objects" / fingerprint
        if cached.is_dir():
            return cached
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(cached.parent)))
        try:
            for name in files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{self._fs_path(uri)}/{name}", str(tmp / name))
            if folder_manifest(tmp) != files:
                raise StaleOutput(f"{uri}: files changed on the store")
            os.replace(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cached

    def remove(self, uri: str) -> None:
        """Remove a folder (manifest first, so nothing half-removed looks complete)."""
        path = self._fs_path(uri)
        try:
            self.fs.rm_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def gets_store_credentials(url: str, store_url: str) -> bool:
    """Whether a data URL is read with the store's options (credentials, endpoint): only a
    URL on the store's own kind of object store (s3:// data for an s3:// store), never a
    local file or another provider, which must not receive this store's secrets."""
    scheme = urlsplit(url).scheme.lower()
    store_scheme = urlsplit(normalize_url(store_url)).scheme.lower()
    return scheme in REMOTE_SCHEMES and scheme == store_scheme


class StaleOutput(RuntimeError):
    """A record points at files that are gone or changed: recompute the step."""


def normalize_url(url: str) -> str:
    """An absolute local path, or a URL with a supported scheme; one line on anything else."""
    text = str(url).strip()
    if not text:
        raise ConfigError("output_dir: empty; give a folder or a URL such as s3://bucket/runs")
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        local = text[len("file://") :] if scheme == "file" else text
        return str(Path(local).expanduser().resolve())
    if scheme not in REMOTE_SCHEMES:
        raise ConfigError(
            f"output_dir: unsupported URL scheme {scheme!r} in {text}; use a folder or "
            f"{', '.join(sorted(s + '://' for s in REMOTE_SCHEMES - {'memory'}))}"
        )
    if not urlsplit(text).netloc:
        raise ConfigError(f"output_dir: {text} names no bucket; use {scheme}://<bucket>/<path>")
    return text.rstrip("/")


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keep_as_cached(local: Path, digest: str) -> None:
    """A folder just uploaded is also the verified local copy: no download to read it back."""
    cached = local_cache() / "objects" / digest
    if cached.is_dir():
        shutil.rmtree(local, ignore_errors=True)
        return
    _mkdir(cached.parent)
    try:
        os.replace(local, cached)
    except OSError:  # another file system: copy
        shutil.copytree(local, cached, dirs_exist_ok=True)
        shutil.rmtree(local, ignore_errors=True)
