"""Storage for run outputs through pyarrow filesystems: local paths, file://, s3://, gs://.

Everything a run publishes (summaries, final models, prepared data) is written to a temporary
name first and then moved into place, so a reader never sees half a file. On a local filesystem
the move is an atomic rename. Object stores have no atomic rename, so there a published directory
is a small pointer plus versions: ``<dest>/_v/<id>/`` holds each complete upload and
``<dest>/_ce_ray_current.json`` (one PUT, visible all at once) names the current one, so readers
(:func:`current`, :func:`download_dir`) always find a complete copy, the old one until the switch.
A JSON file is written as one PUT.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

__all__ = [
    "POINTER",
    "current",
    "delete_dir",
    "download_dir",
    "exists",
    "filesystem_and_path",
    "is_local",
    "join",
    "publish_dir",
    "read_json",
    "resolve_uri",
    "stat_fingerprint",
    "write_bytes",
    "write_json",
]


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def resolve_uri(uri: str) -> str:
    """Absolute form of a location: local paths become absolute paths, URIs stay as they are.

    A URI's query (``s3://bucket/p?endpoint_override=host:9000``) is kept after the path.
    """
    if uri.startswith("file://"):
        return uri[len("file://") :] or "/"
    if "://" in uri:
        path, sep, query = uri.partition("?")
        return path.rstrip("/") + sep + query
    return str(Path(uri).expanduser().resolve())


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path inside it for a local path or URI."""
    if is_local(uri):
        return pafs.LocalFileSystem(), resolve_uri(uri)
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI (before a URI's ``?query``)."""
    base, sep, query = resolve_uri(uri).partition("?")
    return "/".join([base, *[p.strip("/") for p in parts]]) + sep + query


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def stat_fingerprint(uri: str) -> dict[str, Any]:
    """What identifies a file's content, to key caches and run identities; empty when it does not exist.

    A local file: its size and sha256, so a copy or a re-sync of the same bytes (a new machine, a re-mounted
    volume: a new mtime) keeps its prepared data and lets its run resume. An object store's file (or a
    directory): size and modification time, as hashing it would mean downloading it."""
    fs, path = filesystem_and_path(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return {}
    if is_local(uri) and info.type == pafs.FileType.File:
        return {"size": info.size, "sha256": _file_sha256(path, info.size, info.mtime_ns)}
    return {"size": info.size, "mtime_ns": info.mtime_ns}


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a local file, once per (path, size, mtime) in a process (about 1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically: temp file then rename on local disks, one PUT on object stores."""
    fs, path = filesystem_and_path(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as out:  # one PUT: visible all at once
        out.write(data)


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes`)."""
    write_bytes(uri, json.dumps(obj, indent=2, default=str).encode())


def read_json(uri: str) -> Any:
    fs, path = filesystem_and_path(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


POINTER = "_ce_ray_current.json"
_VERSIONS = "_v"


def current(uri: str) -> str:
    """Where the current copy of a published directory is: ``uri`` itself, or (on an object store) the
    version its pointer names."""
    if is_local(uri):
        return resolve_uri(uri)
    pointer = join(uri, POINTER)
    if not exists(pointer):
        return resolve_uri(uri)  # a plain directory (not published by ce-ray, or by an older ce-ray)
    return join(uri, _VERSIONS, read_json(pointer)["version"])


def publish_dir(local_dir: str, uri: str) -> str:
    """Copy a local directory to ``uri`` so that readers never see a partial copy.

    Local: copied next to the destination under a temporary name, then swapped in by rename.
    Remote: uploaded whole as a new version under ``<uri>/_v/<id>/``, then the pointer
    ``<uri>/_ce_ray_current.json`` is switched to it in one PUT; the version before stays (readers
    may still be downloading it), older ones are deleted.

    Returns:
        The resolved destination.
    """
    dest = resolve_uri(uri)
    if is_local(uri):
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(dest)}-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local_dir, tmp)
        old = None
        if os.path.exists(dest):
            old = os.path.join(parent, f".old-{os.path.basename(dest)}-{uuid.uuid4().hex[:8]}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return dest
    pointer = join(dest, POINTER)
    previous = read_json(pointer)["version"] if exists(pointer) else None
    version = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    fs, path = filesystem_and_path(join(dest, _VERSIONS, version))
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    write_json(pointer, {"version": version, "previous": previous})  # the switch
    fs, versions = filesystem_and_path(join(dest, _VERSIONS))
    for info in fs.get_file_info(pafs.FileSelector(versions, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name not in (version, previous):
            fs.delete_dir(info.path)
    return dest


def _content_key(uri: str) -> str:
    """What identifies a remote directory's content: its version (published by ce-ray: immutable), else
    the listing of its files with their sizes and modification times."""
    fs, path = filesystem_and_path(uri)
    if f"/{_VERSIONS}/" in path:
        return uri
    listing = sorted(
        (info.path, info.size, info.mtime_ns)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if info.type == pafs.FileType.File
    )
    return uri + json.dumps(listing)


def delete_dir(uri: str) -> None:
    """Delete a directory (or prefix) and everything under it; nothing when it does not exist."""
    if not exists(uri):
        return
    if is_local(uri):
        shutil.rmtree(resolve_uri(uri))
        return
    fs, path = filesystem_and_path(uri)
    fs.delete_dir(path)


def download_dir(uri: str, local_dir: str | None = None) -> str:
    """A local directory with the contents of ``uri``: the path itself when it is local.

    Remote directories (their current version, see :func:`current`) are downloaded once into
    ``local_dir`` (default: a node-local cache keyed by their content, so a republished model is
    fetched again) and renamed into place when complete, so concurrent workers on one node share it.
    """
    if is_local(uri):
        return resolve_uri(uri)
    uri = current(uri)
    if local_dir is None:
        key = uuid.uuid5(uuid.NAMESPACE_URL, _content_key(uri)).hex[:16]
        local_dir = os.path.join(tempfile.gettempdir(), "ce_ray_cache", key)
    if os.path.isdir(local_dir):
        return local_dir
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    tmp = f"{local_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)  # copy_files creates the subdirectories it copies, not the target itself
    fs, path = filesystem_and_path(uri)
    pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        os.replace(tmp, local_dir)
    except OSError:  # another worker on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir
