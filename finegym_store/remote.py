"""Remote stores: ``finegym_store.open("s3://...")`` / ``"https://..."``.

A remote store is read through a local cache file of the object's full size
(sparse: only what was fetched takes disk space) that the C++ reader maps like
any store, so gathers run the same memory-mapped code as for a local file.

* Opening fetches every byte that is not feature data (header, section
  table, ids, labels, metadata, offsets, block checksums) in a few parallel
  range requests and checks each of those sections against its checksum;
  feature bytes are fetched on demand, in blocks of ``_core.BLOCK_SIZE``
  (1 MiB) of a ``features/COL`` section, by parallel range requests.
* Version-2 stores carry the XXH64 of every block (``features/COL/blocks``):
  a block is checked when it arrives, before it is written to the cache, and
  a cached block the first time a process serves it; a mismatch refetches it
  once, then raises FormatError. Version-1 stores have no block checksums:
  their feature blocks are used as received (``Store.verify()`` fetches
  everything and checks whole sections).
* The cache folder (``cache_dir``, default ``$XDG_CACHE_HOME/finegym-store/remote``
  or ``~/.cache/finegym-store/remote``) is keyed by the URL and by the object's
  ETag, size and modification time, so a changed object starts a fresh
  cache (and opening it deletes the URL's older caches that no process holds
  open: a shared flock on ``inuse``). Each cache holds ``data`` (the sparse file), ``present`` (one byte
  per feature block, set only after the block's bytes are written) and
  ``lock``. Processes (DataLoader workers, DDP ranks on one node) share a
  cache: the files are created under an exclusive ``flock``, and a process
  fetching a run of blocks holds an ``fcntl`` lock on the run's bytes of
  ``present`` so others wait for it instead of fetching the same bytes.
  Nothing is fsynced: after an operating-system crash a block may be marked
  present without its bytes, and the first-use check of version-2 blocks
  finds and refetches it.
* Requests use obstore (the Rust ``object_store`` client): per-request and
  connect timeouts, bounded retries with exponential backoff, and an overall
  retry timeout. Any failure raises OSError naming the URL
  (FileNotFoundError for a missing object, PermissionError for a denied one).
* Writes (:func:`upload`: ``to_parquet``, ``to_ipc``, ``convert`` and the
  command line's export to ``s3://``) go to a local temporary file first,
  then up in one put, which S3 makes atomic.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from . import _core
from .errors import FormatError

__all__ = ["is_url", "default_cache_dir", "RemoteFile", "open_remote", "upload", "exists"]

SCHEMES = ("s3", "s3a", "http", "https", "file")
_S = _core.SECTIONS
_B = int(_core.BLOCK_SIZE)
#: Largest single range request: a run of missing blocks longer than this is
#: split so that its parts download in parallel.
_MAX_REQUEST = 8 * _B
#: Options of finegym-store itself in ``storage_options`` (the rest go to obstore's store).
_OWN_OPTIONS = ("timeout", "connect_timeout", "max_retries", "retry_timeout")
_DEFAULTS = {"timeout": 60.0, "connect_timeout": 5.0, "max_retries": 3, "retry_timeout": 30.0}


def is_url(path: Any) -> bool:
    """True for a string with one of the schemes a remote store is opened from."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in SCHEMES


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "finegym-store", "remote")


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError('remote stores need obstore: pip install "finegym-store[remote]"') from None
    return obstore


def _seconds(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"storage_options[{name!r}] must be a number of seconds, got {value!r}") from None
    if not v > 0:
        raise ValueError(f"storage_options[{name!r}] must be > 0 seconds, got {v}")
    return v


class RemoteFile:
    """One remote object: the client, its URL and what HEAD said about it.
    Every request either returns or raises OSError naming the URL."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self._obstore = _obstore()
        self._store, self._path = _client(url, storage_options)
        self.requests = 0  # range requests made by this object (for tests and the bench)
        self.bytes_fetched = 0
        self.size, self.etag, self.modified = self._head()

    def _error(self, e: BaseException, what: str) -> OSError:
        return _as_oserror(self.url, e, what)

    def _head(self) -> tuple[int, str, str]:
        try:
            meta = self._obstore.head(self._store, self._path)
        except Exception as e:
            raise self._error(e, "HEAD") from None
        return int(meta["size"]), str(meta.get("e_tag") or ""), str(meta.get("last_modified") or "")

    def identity(self) -> str:
        """What names this version of the object (a change of any part starts a fresh cache)."""
        return f"{self.size}|{self.etag}|{self.modified}"

    def get_ranges(self, starts: Sequence[int], ends: Sequence[int]) -> list[memoryview]:
        """The bytes of [starts[k], ends[k]) each, fetched in parallel."""
        if not starts:
            return []
        try:
            out = self._obstore.get_ranges(self._store, self._path, starts=list(starts), ends=list(ends), coalesce=0)
        except Exception as e:
            raise self._error(e, f"GET of {len(starts)} byte ranges") from None
        views = [memoryview(b) for b in out]
        for s, e, v in zip(starts, ends, views):
            if v.nbytes != e - s:
                raise OSError(f"{self.url}: range [{s}, {e}) returned {v.nbytes} bytes, expected {e - s}")
        self.requests += len(starts)
        self.bytes_fetched += sum(e - s for s, e in zip(starts, ends))
        return views


def _client(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """(obstore store, path in it) for `url`; ValueError for a bad URL or option."""
    from obstore.store import HTTPStore, S3Store

    opts = dict(storage_options or {})
    own = {k: opts.pop(k, _DEFAULTS[k]) for k in _OWN_OPTIONS}
    timeout = _seconds(own["timeout"], "timeout")
    connect = _seconds(own["connect_timeout"], "connect_timeout")
    retry_timeout = _seconds(own["retry_timeout"], "retry_timeout")
    max_retries = own["max_retries"]
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"storage_options['max_retries'] must be an integer >= 0, got {max_retries!r}")
    client = {"timeout": timedelta(seconds=timeout), "connect_timeout": timedelta(seconds=connect)}
    retry = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=retry_timeout),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5),
                         "base": 2.0}}
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    try:
        if scheme in ("s3", "s3a"):
            bucket, key = parsed.netloc, parsed.path.lstrip("/")
            if not bucket or not key or key.endswith("/"):
                raise ValueError(f"{url}: expected s3://BUCKET/KEY naming an object")
            endpoint = opts.get("endpoint") or opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
                or os.environ.get("AWS_ENDPOINT_URL") or ""
            if "endpoint_url" in opts:
                opts["endpoint"] = opts.pop("endpoint_url")
            if str(endpoint).startswith("http://"):
                client["allow_http"] = True
            store = S3Store(bucket, client_options=client, retry_config=retry, **opts)
            path = key
        elif scheme in ("http", "https"):
            head, _, name = parsed.path.rpartition("/")
            if not parsed.netloc or not name:
                raise ValueError(f"{url}: expected {scheme}://HOST/PATH naming a file")
            if scheme == "http":
                client["allow_http"] = True
            store = HTTPStore.from_url(f"{scheme}://{parsed.netloc}{head}", client_options=client,
                                             retry_config=retry, **opts)
            path = name
        else:
            raise ValueError(f"{url}: unsupported scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    except (ValueError, TypeError):
        raise
    except Exception as e:  # obstore's configuration errors (unknown option, ...)
        raise ValueError(f"{url}: bad storage_options: {e}") from None
    return store, path


def _as_oserror(url: str, e: BaseException, what: str) -> OSError:
    msg = f"{url}: {what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    name = type(e).__name__
    if isinstance(e, FileNotFoundError) or name == "NotFoundError":
        return FileNotFoundError(msg)
    if isinstance(e, PermissionError) or name in ("PermissionDeniedError", "UnauthenticatedError"):
        return PermissionError(msg)
    text = str(e)
    if "403" in text.split("Debug source")[0] or "401" in text.split("Debug source")[0]:
        return PermissionError(msg)
    if "404" in text.split("Debug source")[0]:
        return FileNotFoundError(msg)
    return OSError(msg)


# ---- writing: local temporary file, then one atomic upload ---------------------------
def _writable(url: str) -> None:
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("s3", "s3a"):
        raise ValueError(f"{url}: cannot write to a {scheme}:// URL; remote writes go to s3:// "
                         "(HTTP(S) stores are read-only)")


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the object at `url` exists (a HEAD request); OSError naming the URL if it cannot tell."""
    obstore = _obstore()
    store, path = _client(url, storage_options)
    try:
        obstore.head(store, path)
    except Exception as e:
        err = _as_oserror(url, e, "HEAD")
        if isinstance(err, FileNotFoundError):
            return False
        raise err from None
    return True


@contextlib.contextmanager
def upload(url: str, storage_options: Mapping[str, Any] | None = None, overwrite: bool = False) -> Iterator[str]:
    """A local temporary path to write a file to; when the block ends without
    an exception the file is uploaded to `url` in one put (multipart for large
    files), which S3 makes atomic: the object appears whole or not at all.
    Without `overwrite` an existing object is refused (FileExistsError) both
    before the work and at the upload (a conditional put: one that appeared
    meanwhile is not replaced). The temporary file is removed in any case."""
    _writable(url)
    obstore = _obstore()
    store, path = _client(url, storage_options)
    if not overwrite and exists(url, storage_options):
        raise FileExistsError(f"{url} exists; pass overwrite=True (--overwrite) to replace it")
    folder = tempfile.mkdtemp(prefix="finegym-upload-")
    local = os.path.join(folder, os.path.basename(path) or "upload")
    try:
        yield local
        try:
            obstore.put(store, path, Path(local), mode="overwrite" if overwrite else "create")
        except Exception as e:
            if type(e).__name__ in ("AlreadyExistsError", "PreconditionError"):
                raise FileExistsError(f"{url} exists (created while this was written); pass overwrite=True "
                                      "(--overwrite) to replace it") from None
            raise _as_oserror(url, e, "upload") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the section table, parsed just enough to plan the fetches -------------------
_ENTRY = struct.Struct("<64sQQQBB6x4Q")


def _parse_table(url: str, header: bytes, size: int, fetch: Any) -> tuple[int, list[dict[str, Any]]]:
    """(version, sections) from the header bytes; `fetch(start, end)` reads the table.
    Checks the header checksum (the C++ reader checks everything else at open)."""
    where = f"{url} is not a valid finegym-store file"
    if len(header) < _core.HEADER_SIZE or header[:8] != b"FGSTORE\0":
        raise FormatError(f"{where}: bad magic (the first 8 bytes are not \"FGSTORE\\0\")")
    version, hsize, fsize, _n, table_offset, nsec, esize, _flags, checksum = struct.unpack_from("<IIQQQIIQQ", header, 8)
    if not _core.MIN_FORMAT_VERSION <= version <= _core.FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version} is not supported; this build reads versions "
                          f"{_core.MIN_FORMAT_VERSION} to {_core.FORMAT_VERSION}")
    if fsize != size:
        raise FormatError(f"{where}: the header records a file of {fsize} bytes but the object has {size}")
    if hsize != _core.HEADER_SIZE or esize != _core.SECTION_ENTRY_SIZE or \
            not hsize <= table_offset <= size or table_offset + nsec * esize > size:
        raise FormatError(f"{where}: header fields out of range (header size {hsize}, entry size {esize}, "
                          f"table at {table_offset}, {nsec} sections, file of {size} bytes)")
    table = bytes(fetch(table_offset, table_offset + nsec * esize))
    if _core.hash64(header[:56] + table) != checksum:
        raise FormatError(f"{where}: header checksum mismatch (damaged header or section table)")
    sections = []
    for k in range(nsec):
        raw, offset, length, sum_, _dt, _nd, *_shape = _ENTRY.unpack_from(table, k * esize)
        name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if offset + length > table_offset or offset < hsize:
            raise FormatError(f"{where}: section '{name}' [{offset}, {offset + length}) lies outside the data area")
        sections.append({"name": name, "offset": offset, "length": length, "checksum": sum_})
    return version, sections


def _is_feature(name: str) -> bool:
    prefix = _S["feature_prefix"]
    return name.startswith(prefix) and "/" not in name[len(prefix):]


def _runs(lo_hi: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge touching [lo, hi) ranges (sorted)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(lo_hi):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


_LIVE: weakref.WeakSet[RemoteCache] = weakref.WeakSet()


def _after_fork() -> None:
    # A lock held by another thread at fork() stays held in the child: new ones.
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()
    for c in list(_LIVE):
        c._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class RemoteCache:
    """The local cache of one remote object (see the module docstring)."""

    def __init__(self, remote: RemoteFile, storage_options: Mapping[str, Any] | None, cache_root: str,
                 folder: str) -> None:
        url = self.url = remote.url
        self.remote = remote
        self.storage_options = dict(storage_options or {})
        self.cache_root = cache_root
        size = self.remote.size
        if size < _core.HEADER_SIZE:
            raise FormatError(f"{url} is not a valid finegym-store file: the object has {size} bytes, "
                              f"less than the {_core.HEADER_SIZE}-byte header")
        self.dir = folder
        self.data_path = os.path.join(self.dir, "data")
        fds: list[int] = []
        try:
            self._inuse_fd = _hold_in_use(folder)
            fds.append(self._inuse_fd)
            self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(self._lock_fd)
            self._create_file("data", size)
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
            fds.append(self._data_fd)
            try:  # header and table from the cache when they are there (checked by the header checksum)
                header = os.pread(self._data_fd, _core.HEADER_SIZE, 0)
                self.version, self.sections = _parse_table(url, header, size, self._read_cached)
            except FormatError:
                header = bytes(self._fetch_one(0, _core.HEADER_SIZE))
                self.version, self.sections = _parse_table(url, header, size, self._fetch_one)
            self._plan()
            self._create_file("present", max(1, self.nblocks))
            self._present_fd = os.open(os.path.join(self.dir, "present"), os.O_RDWR | os.O_CLOEXEC)
            fds.append(self._present_fd)
        except BaseException:
            RemoteCache._close_fds(*fds)
            raise
        # Shared with every process using this cache: 1 = the block's bytes are written.
        self.present = np.memmap(os.path.join(self.dir, "present"), dtype=np.uint8, mode="r+",
                                 shape=(max(1, self.nblocks),))
        # This process's view: 1 = checked (version 2) or fetched here; served without further checks.
        self.ok = np.zeros(max(1, self.nblocks), dtype=bool)
        self._mutex = threading.Lock()
        self._ready: set[str] = set()  # columns whose every block is ok here
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: concurrent.futures.Future[None] | None = None
        _LIVE.add(self)
        self._fetch_metadata()
        self._finalizer = weakref.finalize(self, RemoteCache._close_fds, self._lock_fd, self._data_fd,
                                           self._present_fd, self._inuse_fd)
        _remove_unused_versions(folder)

    @staticmethod
    def _close_fds(*fds: int) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _reset_after_fork(self) -> None:
        self._mutex = threading.Lock()
        self._executor = None
        self._ahead = None

    # -- layout -------------------------------------------------------------------
    def _plan(self) -> None:
        """Feature sections cut into blocks (global block ids); the rest is metadata."""
        self.columns: dict[str, tuple[int, int, int]] = {}  # column -> (first block id, section offset, length)
        self.block_start: list[int] = []  # absolute byte range of each block
        self.block_end: list[int] = []
        self.block_sum: list[int | None] = []
        features = []
        for s in self.sections:
            if _is_feature(s["name"]):
                col = s["name"][len(_S["feature_prefix"]):]
                self.columns[col] = (len(self.block_start), s["offset"], s["length"])
                for k in range(0, s["length"], _B):
                    self.block_start.append(s["offset"] + k)
                    self.block_end.append(s["offset"] + min(k + _B, s["length"]))
                    self.block_sum.append(None)
                features.append((s["offset"], s["offset"] + s["length"]))
        self.nblocks = len(self.block_start)
        self.block_start_arr = np.asarray(self.block_start, dtype=np.int64)
        # Metadata: everything outside the feature sections (sections, padding, table, header).
        meta: list[tuple[int, int]] = []
        pos = 0
        for lo, hi in sorted(features):
            if lo > pos:
                meta.append((pos, lo))
            pos = max(pos, hi)
        if pos < self.remote.size:
            meta.append((pos, self.remote.size))
        self.meta_ranges = meta
        self.meta_sections = [s for s in self.sections if not _is_feature(s["name"])]

    def _create_file(self, name: str, size: int) -> None:
        """The cache file `name` of `size` zero bytes, made once (atomically,
        under the folder's lock) by whichever process comes first."""
        path = os.path.join(self.dir, name)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if os.path.exists(path) and os.path.getsize(path) == size:
                return
            tmp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)  # sparse: zero bytes that take no space
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- fetching -------------------------------------------------------------------
    def _read_cached(self, start: int, end: int) -> bytes:
        return os.pread(self._data_fd, end - start, start)

    def _fetch_one(self, start: int, end: int) -> memoryview:
        return self.remote.get_ranges([start], [end])[0]

    def _fetch_metadata(self) -> None:
        """Every non-feature byte, checked against its section's checksum;
        read from the cache when it is there and intact."""
        bad = self._check_meta_sections()
        if not bad:
            self._load_block_sums()
            return
        for attempt in range(2):
            starts = [lo for lo, _ in self.meta_ranges]
            ends = [hi for _, hi in self.meta_ranges]
            for lo, data in zip(starts, self.remote.get_ranges(starts, ends)):
                os.pwrite(self._data_fd, data, lo)
            bad = self._check_meta_sections()
            if not bad:
                break
        if bad:
            raise FormatError(f"{self.url} is damaged: section(s) {', '.join(bad)} do not match their checksums "
                              "(fetched twice)")
        self._load_block_sums()

    def _check_meta_sections(self) -> list[str]:
        bad = []
        for s in self.meta_sections:
            raw = os.pread(self._data_fd, s["length"], s["offset"])
            if len(raw) != s["length"] or _core.hash64(raw) != s["checksum"]:
                bad.append(s["name"])
        return bad

    def _load_block_sums(self) -> None:
        if self.version < 2:
            return
        suffix = _S["blocks_suffix"]
        by_name = {s["name"]: s for s in self.sections}
        for col, (first, _offset, length) in self.columns.items():
            s = by_name.get(_S["feature_prefix"] + col + suffix)
            n = -(-length // _B)
            if s is None or s["length"] != 8 * n:
                raise FormatError(f"{self.url} is not a valid finegym-store file: column '{col}' has no block "
                                  f"checksums of {n} blocks")
            sums = np.frombuffer(os.pread(self._data_fd, s["length"], s["offset"]), dtype="<u8")
            self.block_sum[first : first + n] = [int(v) for v in sums]

    def _lock_run(self, lo: int, hi: int, wait: bool) -> bool:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.lockf(self._present_fd, flags, hi - lo, lo)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def _unlock_run(self, lo: int, hi: int) -> None:
        fcntl.lockf(self._present_fd, fcntl.LOCK_UN, hi - lo, lo)

    def _check_cached(self, blocks: np.ndarray) -> np.ndarray:
        """Of blocks marked present, those whose cached bytes fail their
        checksum (version 2); the others become ok in this process."""
        bad = []
        for b in blocks.tolist():
            want = self.block_sum[b]
            if want is not None:
                raw = os.pread(self._data_fd, self.block_end[b] - self.block_start[b], self.block_start[b])
                if _core.hash64(raw) != want:
                    self.present[b] = 0
                    bad.append(b)
                    continue
            self.ok[b] = True
        return np.asarray(bad, dtype=np.int64)

    def _download(self, blocks: list[int]) -> None:
        """Fetch, check and write the given blocks (absent ones), in parallel requests."""
        if not blocks:
            return
        runs: list[tuple[int, int]] = []  # [first block, last block + 1), contiguous bytes, <= _MAX_REQUEST
        for b in blocks:
            if runs and runs[-1][1] == b and self.block_start[b] == self.block_end[b - 1] and \
                    self.block_end[b] - self.block_start[runs[-1][0]] <= _MAX_REQUEST:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        for attempt in range(2):
            starts = [self.block_start[lo] for lo, _ in runs]
            ends = [self.block_end[hi - 1] for _, hi in runs]
            retry: list[tuple[int, int]] = []
            for (lo, hi), start, data in zip(runs, starts, self.remote.get_ranges(starts, ends)):
                for b in range(lo, hi):
                    piece = data[self.block_start[b] - start : self.block_end[b] - start]
                    want = self.block_sum[b]
                    if want is not None and _core.hash64(piece) != want:
                        retry.append((b, b + 1))
                        continue
                    os.pwrite(self._data_fd, piece, self.block_start[b])
                    self.present[b] = 1  # after the bytes: another process never sees a marked, unwritten block
                    self.ok[b] = True
            if not retry:
                return
            runs = retry
        changed = ""
        try:
            if RemoteFile(self.url, self.storage_options).identity() != self.remote.identity():
                changed = "; the object was replaced since it was opened (open it again)"
        except OSError:
            pass
        first = runs[0][0]
        raise FormatError(f"{self.url}: feature block at byte {self.block_start[first]} does not match its checksum "
                          f"(fetched twice){changed}")

    def ensure_blocks(self, blocks: np.ndarray) -> None:
        """Make every block in `blocks` (global ids, unique) present and checked."""
        if blocks.size == 0:
            return
        need = blocks[~self.ok[blocks]]
        if need.size == 0:
            return
        with self._mutex:
            need = need[~self.ok[need]]
            if need.size == 0:
                return
            cached = need[self.present[need] != 0]
            bad = self._check_cached(cached) if cached.size else np.zeros(0, np.int64)
            missing = np.union1d(need[self.present[need] == 0], bad)
            if missing.size == 0:
                return
            # Contiguous runs of missing blocks; take the runs no other process is fetching.
            cut = np.flatnonzero(np.diff(missing) != 1) + 1
            groups = np.split(missing, cut)
            mine, theirs = [], []
            for g in groups:
                lo, hi = int(g[0]), int(g[-1]) + 1
                (mine if self._lock_run(lo, hi, wait=False) else theirs).append((lo, hi))
            try:
                self._download([b for lo, hi in mine for b in range(lo, hi)])
            finally:
                for lo, hi in mine:
                    self._unlock_run(lo, hi)
            for lo, hi in theirs:  # another process is fetching these: wait for it, then take what it left
                self._lock_run(lo, hi, wait=True)
                try:
                    rng = np.arange(lo, hi)
                    cached = rng[(self.present[rng] != 0) & ~self.ok[rng]]
                    bad = self._check_cached(cached) if cached.size else np.zeros(0, np.int64)
                    left = np.union1d(rng[self.present[rng] == 0], bad)
                    self._download([int(b) for b in left])
                finally:
                    self._unlock_run(lo, hi)

    def rows_blocks(self, column: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Global ids of the blocks holding bytes [starts, ends) of `column`'s section."""
        first_id, _offset, _length = self.columns[column]
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if starts.size == 0:
            return np.zeros(0, np.int64)
        lo = starts // _B
        hi = (ends - 1) // _B
        span = hi - lo
        if span.max() <= 1:
            ids = np.union1d(lo, hi)
        else:
            counts = span + 1
            ids = np.unique(np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum())))
        return ids + first_id

    def column_ready(self, column: str) -> bool:
        """True once every block of `column` is checked in this process: reads
        of it then need nothing more (the fast path of a warm cache)."""
        if column in self._ready:
            return True
        first_id, _offset, length = self.columns[column]
        if self.ok[first_id : first_id + -(-length // _B)].all():
            self._ready.add(column)
            return True
        return False

    def column_blocks(self, column: str) -> np.ndarray:
        first_id, _offset, length = self.columns[column]
        return np.arange(first_id, first_id + -(-length // _B), dtype=np.int64)

    def ensure_all(self) -> None:
        self.ensure_blocks(np.arange(self.nblocks, dtype=np.int64))

    def prefetch(self, column: str, blocks: np.ndarray) -> None:
        """Fetch `blocks` on a background thread (errors surface at the next
        synchronous fetch of the same blocks); one prefetch at a time."""
        if blocks.size == 0 or self.ok[blocks].all():
            return
        if self._ahead is not None and not self._ahead.done():
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="finegym-remote")

        def run() -> None:
            try:
                self.ensure_blocks(blocks)
            except Exception:  # noqa: BLE001 - surfaces again on the synchronous path
                pass

        self._ahead = self._executor.submit(run)

    def wait_prefetch(self) -> None:
        if self._ahead is not None:
            self._ahead.result()


class RowMap:
    """Byte ranges of instances in one column's section, for RemoteCache.rows_blocks."""

    def __init__(self, cache: RemoteCache, column: str, row_bytes: int, segments: int | None,
                 offsets: np.ndarray | None) -> None:
        self.cache = cache
        self.column = column
        self.row_bytes = row_bytes
        self.segments = segments
        self.offsets = offsets

    def blocks(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if self.offsets is None:
            inst = int(self.segments or 0) * self.row_bytes
            starts = idx * inst
            ends = starts + inst
        else:
            starts = self.offsets[idx] * self.row_bytes
            ends = self.offsets[idx + 1] * self.row_bytes
        return self.cache.rows_blocks(self.column, starts, ends)


def _hold_in_use(folder: str) -> int:
    """Create `folder` if needed and hold a shared flock on its ``inuse``
    file for as long as the returned descriptor is open: a cleaner never
    removes a cache some process has open. Retries if the folder was removed
    (by a cleaner) between creating and locking it."""
    for _ in range(16):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "inuse")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(f"{folder}: the cache folder keeps disappearing while it is opened")


def _remove_unused_versions(folder: str) -> None:
    """Delete the caches of other versions of the same URL that no process
    has open (their objects were replaced: they would never be read again)."""
    parent, mine = os.path.split(folder)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        other = os.path.join(parent, name)
        if name == mine or "." in name or not os.path.isdir(other):
            continue
        try:
            fd = os.open(os.path.join(other, "inuse"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # being created (no inuse file yet) or already gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # open somewhere
        try:
            doomed = f"{other}.{os.getpid()}.removing"
            os.rename(other, doomed)  # atomically out of reach of a new opener, which recreates the folder
            shutil.rmtree(doomed, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


#: This process's open caches by folder: stores opened twice share one
#: RemoteCache (one set of descriptors, so fcntl locks are not dropped by
#: closing a second descriptor of the same file).
_OPEN: weakref.WeakValueDictionary[str, RemoteCache] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


def open_remote(url: str, storage_options: Mapping[str, Any] | None = None,
                cache_dir: str | os.PathLike[str] | None = None) -> RemoteCache:
    """The cache of `url`'s current version (a HEAD request decides which)."""
    remote = RemoteFile(url, storage_options)
    root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    url_key = hashlib.sha256(url.encode()).hexdigest()[:32]
    version_key = hashlib.sha256(remote.identity().encode()).hexdigest()[:16]
    folder = os.path.join(root, url_key, version_key)
    with _OPEN_LOCK:
        cache = _OPEN.get(folder)
        if cache is None:
            cache = RemoteCache(remote, storage_options, root, folder)
            _OPEN[folder] = cache
    return cache


