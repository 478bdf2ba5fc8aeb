"""Remote stores (docs/remote.md): s3:// against a moto server and
http:// against a plain Range server, both started here on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from conftest import example_store, require, run_markdown_blocks

require("obstore", "obstore", 'pip install "finegym-store[remote]"')

from remote_servers import RangeServer, s3_options, s3_put, start_moto  # noqa: E402

#: Short timeouts: a failure must come back within seconds.
FAST = {"timeout": 5, "connect_timeout": 2, "max_retries": 1, "retry_timeout": 4}
N = 240


def _make(folder: Path, name: str = "s.fgs", seed: int = 0) -> fgs.Store:
    from finegym_store import synth

    rng = np.random.default_rng(seed)
    ids = synth.make_ids(N, seed=seed)
    fix = {k: rng.standard_normal((12, 512)).astype(np.float32) for k in ids}  # ~5.6 MiB: 6 blocks
    rag = {k: rng.standard_normal((int(rng.integers(1, 30)), 128)).astype(np.float32) for k in ids}
    synth.write_split(folder / "split.txt", ids, synth.long_tailed_labels(N, 10, seed=seed))
    return fgs.convert({"fix": fix, "rag": rag}, folder / name, split=folder / "split.txt",
                       progress=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    local = _make(root)
    server = RangeServer(root).start()
    yield server, local, root
    server.stop()


@pytest.fixture(scope="module")
def moto(served):
    require("moto", "moto", "pip install 'moto[server]'")
    server, endpoint = start_moto()
    s3_put(endpoint, "bkt", "data/s.fgs", served[2] / "s.fgs")
    yield endpoint
    server.stop()


def _open_http(served, cache: Path, name: str = "s.fgs", **options) -> fgs.Store:
    server = served[0]
    return fgs.open(f"{server.url}/{name}", cache_dir=cache, storage_options={**FAST, **options})


def _feature_ranges(local: fgs.Store) -> list[tuple[int, int]]:
    return [(s["offset"], s["offset"] + s["length"]) for s in local.sections()
            if s["name"].startswith("features/") and "/" not in s["name"][len("features/"):]]


def _served_ranges(server: RangeServer) -> list[tuple[int, int]]:
    out = []
    for method, _path, rng in server.requests:
        if method == "GET" and rng:
            a, b = rng.split("=")[1].split("-")
            out.append((int(a), int(b) + 1))
    return out


def test_gathers_equal_the_local_store_over_http(served, tmp_path):
    _server, local, _ = served
    store = _open_http(served, tmp_path / "c")
    assert store.path.startswith("http://") and store.format_version == fgs.FORMAT_VERSION and len(store) == N
    assert store.ids.to_list() == local.ids.to_list()
    np.testing.assert_array_equal(store.labels, local.labels)
    rng = np.random.default_rng(1)
    for column in ("fix", "rag"):
        for mode in ("train", "test"):
            idx = rng.integers(-N, N, 40)
            np.testing.assert_array_equal(store.gather(column, idx, num_segments=5, mode=mode, seed=3),
                                          local.gather(column, idx, num_segments=5, mode=mode, seed=3))
        # The statistics come with the metadata, at open; normalising gathers agree.
        remote_stats, local_stats = store.stats(column), local.stats(column)
        assert remote_stats.count == local_stats.count
        np.testing.assert_array_equal(remote_stats.mean, local_stats.mean)
        np.testing.assert_array_equal(remote_stats.std, local_stats.std)
        np.testing.assert_array_equal(store.gather(column, idx, num_segments=2, mode="test", normalize=True),
                                      local.gather(column, idx, num_segments=2, mode="test", normalize=True))
    assert store.verify() == []
    assert store.column("fix").values.tobytes() == local.column("fix").values.tobytes()


def test_gathers_equal_the_local_store_over_s3(served, moto, tmp_path):
    _server, local, _ = served
    store = fgs.open("s3://bkt/data/s.fgs", storage_options={**s3_options(moto), **FAST}, cache_dir=tmp_path)
    idx = np.arange(0, N, 7)
    for column in ("fix", "rag"):
        np.testing.assert_array_equal(store.gather(column, idx, num_segments=3, mode="test"), local.gather(column, idx, num_segments=3, mode="test"))
    batches = [b.features for b in store.loader("rag", 16, num_segments=4, mode="train", seed=5)]
    want = [b.features for b in local.loader("rag", 16, num_segments=4, mode="train", seed=5)]
    assert len(batches) == len(want)
    for a, b in zip(batches, want):
        np.testing.assert_array_equal(a, b)


def test_s3_credentials_and_endpoint_come_from_the_environment(served, moto, tmp_path, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    store = fgs.open("s3://bkt/data/s.fgs", storage_options=FAST, cache_dir=tmp_path)
    np.testing.assert_array_equal(store.gather("fix", [1, 2], num_segments=2, mode="test"), served[1].gather("fix", [1, 2], num_segments=2, mode="test"))


def test_open_fetches_no_feature_bytes(served, tmp_path):
    server, local, _ = served
    server.reset_counts()
    store = _open_http(served, tmp_path)
    got = _served_ranges(server)
    assert got and len(server.requests) <= 10  # HEAD, header, table and the metadata ranges
    for a, b in got:
        for lo, hi in _feature_ranges(local):
            assert b <= lo or a >= hi, (a, b, lo, hi)
    feature_bytes = sum(hi - lo for lo, hi in _feature_ranges(local))
    assert server.bytes_served <= local.file_size - feature_bytes + 64 + 128 * len(local.sections())
    # Metadata is there without a request: ids, meta, classes-free stores, offsets.
    server.reset_counts()
    assert store.meta.video.to_list() == local.meta.video.to_list()
    assert store.column("rag").lengths().tolist() == local.column("rag").lengths().tolist()
    assert server.requests == []


def test_rows_are_fetched_once_and_a_second_epoch_makes_no_request(served, tmp_path):
    server, local, _ = served
    store = _open_http(served, tmp_path)
    loader = store.loader("fix", 32, num_segments=4, mode="train", prefetch=2)
    first = [b.features.copy() for b in loader]
    server.reset_counts()
    second = [b.features.copy() for b in loader]
    assert server.requests == []
    ref = local.loader("fix", 32, num_segments=4, mode="train", prefetch=2)
    for got, want in zip(first + second, [b.features for b in ref] + [b.features for b in ref]):
        np.testing.assert_array_equal(got, want)
    # A new process-level open of the same cache fetches nothing either (only HEAD).
    again = _open_http(served, tmp_path)
    server.reset_counts()
    again.gather("fix", np.arange(N), num_segments=4, mode="test")
    assert server.requests == []


def test_a_gather_fetches_only_the_blocks_it_needs(served, tmp_path):
    server, local, _ = served
    store = _open_http(served, tmp_path)
    server.reset_counts()
    store.gather("fix", [0], num_segments=12, mode="test")  # instance 0: 24 KiB, inside the first block
    lo, _hi = _feature_ranges(local)[0]
    assert _served_ranges(server) == [(lo, lo + fgs._core.BLOCK_SIZE)]


def test_no_public_read_sees_unfetched_bytes(served, tmp_path):
    # The cache file is sparse: unfetched bytes read as zeros. Every public
    # way to read features fetches first.
    _server, local, _ = served
    fresh = lambda: _open_http(served, tmp_path / str(time.monotonic_ns()))  # noqa: E731
    np.testing.assert_array_equal(fresh().features("fix", N - 1), local.features("fix", N - 1))
    np.testing.assert_array_equal(fresh().features("rag", -1), local.features("rag", -1))
    np.testing.assert_array_equal(fresh().column("fix")[N - 3 :], local.column("fix")[N - 3 :])
    np.testing.assert_array_equal(fresh().column("fix")[[5, N - 2]], local.column("fix")[[5, N - 2]])
    np.testing.assert_array_equal(fresh().column("fix")[-1], local.column("fix")[-1])
    for a, b in zip(fresh().column("rag")[N - 4 :], local.column("rag")[N - 4 :]):
        np.testing.assert_array_equal(a, b)
    assert fresh().column("rag").values.tobytes() == local.column("rag").values.tobytes()
    assert fresh().column("fix").nbytes == local.column("fix").values.nbytes
    with pytest.raises(IndexError):
        fresh().features("fix", N)
    pa = pytest.importorskip("pyarrow")
    assert fresh().to_arrow().equals(local.to_arrow())
    assert isinstance(pa, object)


def test_two_processes_share_one_cache(served, tmp_path):
    server, local, _ = served
    url = f"{server.url}/s.fgs"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        halves = pool.starmap(_child_gather, [(url, str(tmp_path), 0), (url, str(tmp_path), 1)])
    for part, got in enumerate(halves):
        idx = np.arange(part, N, 2)
        np.testing.assert_array_equal(got, local.gather("fix", idx, num_segments=4, mode="test"))
    # Everything the children fetched is in the shared cache: no feature request here.
    store = _open_http(served, tmp_path)
    server.reset_counts()
    np.testing.assert_array_equal(store.gather("fix", np.arange(N), num_segments=4, mode="test"), local.gather("fix", np.arange(N), num_segments=4, mode="test"))
    assert server.requests == []
    # A pickled store (what a spawn DataLoader worker gets) reopens the same cache.
    clone = pickle.loads(pickle.dumps(store))
    assert clone.cache_path == store.cache_path and clone.path == store.path


def _child_gather(url: str, cache: str, part: int) -> np.ndarray:
    store = fgs.open(url, cache_dir=cache, storage_options=FAST)
    return store.gather("fix", np.arange(part, N, 2), num_segments=4, mode="test")


def test_a_damaged_cache_block_is_refetched(served, tmp_path):
    server, local, _ = served
    store = _open_http(served, tmp_path)
    want = local.gather("fix", np.arange(N), num_segments=12, mode="test")
    np.testing.assert_array_equal(store.gather("fix", np.arange(N), num_segments=12, mode="test"), want)
    lo, _ = _feature_ranges(local)[0]
    block = fgs._core.BLOCK_SIZE
    with open(store.cache_path, "r+b") as f:  # damage the second block of the cache
        f.seek(lo + block + 100)
        f.write(b"\xff" * 64)
    del store
    server.reset_counts()
    again = _open_http(served, tmp_path)
    np.testing.assert_array_equal(again.gather("fix", np.arange(N), num_segments=12, mode="test"), want)
    assert _served_ranges(server) == [(lo + block, lo + 2 * block)]  # header, table, metadata: from the cache


def test_a_changed_object_gets_a_fresh_cache(served, tmp_path):
    _server, _local, root = served
    other = _make(tmp_path, "v.fgs", seed=7)
    shutil.copyfile(root / "s.fgs", root / "changing.fgs")
    old = _open_http(served, tmp_path / "c", "changing.fgs")
    old_values = old.gather("fix", np.arange(10), num_segments=3, mode="test")
    time.sleep(0.01)
    shutil.copyfile(tmp_path / "v.fgs", root / "changing.fgs")  # new ETag and content
    new = _open_http(served, tmp_path / "c", "changing.fgs")
    assert new.cache_path != old.cache_path
    np.testing.assert_array_equal(new.gather("fix", np.arange(10), num_segments=3, mode="test"), other.gather("fix", np.arange(10), num_segments=3, mode="test"))
    assert not np.array_equal(old_values, new.gather("fix", np.arange(10), num_segments=3, mode="test"))
    # The old version's cache stays while a store has it open, and goes once none has.
    assert os.path.exists(old.cache_path)
    old_cache = old.cache_path
    del old
    shutil.copyfile(root / "s.fgs", root / "changing.fgs")  # a third version
    third = _open_http(served, tmp_path / "c", "changing.fgs")
    assert not os.path.exists(old_cache) and os.path.exists(new.cache_path) and os.path.exists(third.cache_path)
    assert sorted(os.listdir(Path(third.cache_path).parent.parent)) == sorted(
        Path(p).parent.name for p in (new.cache_path, third.cache_path))


def test_damaged_remote_feature_bytes_raise_format_error(served, tmp_path):
    _server, local, root = served
    data = bytearray((root / "s.fgs").read_bytes())
    lo, _ = _feature_ranges(local)[0]
    data[lo + 10] ^= 0xFF
    (root / "damaged.fgs").write_bytes(bytes(data))
    store = _open_http(served, tmp_path, "damaged.fgs")  # metadata intact: opens
    np.testing.assert_array_equal(store.gather("fix", [N - 1], num_segments=3, mode="test"), local.gather("fix", [N - 1], num_segments=3, mode="test"))
    with pytest.raises(fgs.FormatError, match=r"damaged\.fgs: feature block at byte \d+ does not match its checksum"):
        store.gather("fix", [0], num_segments=3, mode="test")
    with pytest.raises(fgs.FormatError, match=r"damaged\.fgs: feature block"):
        store.features("fix", 0)


def test_a_version_1_store_opens_remotely(served, tmp_path):
    _server, _local, root = served
    golden = Path(__file__).resolve().parent / "data" / "golden_v1.fgs"
    shutil.copyfile(golden, root / "golden_v1.fgs")
    store = _open_http(served, tmp_path, "golden_v1.fgs")
    local = fgs.open(golden)
    assert store.format_version == 1
    for column in local.columns:
        np.testing.assert_array_equal(store.gather(column, np.arange(len(local)), num_segments=2, mode="test"),
                                      local.gather(column, np.arange(len(local)), num_segments=2, mode="test"))
    assert store.verify() == [] and store.attrs == local.attrs


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable-http", "unreachable-s3", "missing-http", "missing-s3", "denied-http"])
def test_failures_raise_oserror_naming_the_url(served, moto, tmp_path, case):
    server = served[0]
    port = _closed_port()
    url, options, expected = {
        "unreachable-http": (f"http://127.0.0.1:{port}/s.fgs", {}, OSError),
        "unreachable-s3": ("s3://bkt/data/s.fgs", s3_options(f"http://127.0.0.1:{port}"), OSError),
        "missing-http": (f"{server.url}/nope.fgs", {}, FileNotFoundError),
        "missing-s3": ("s3://bkt/data/nope.fgs", s3_options(moto), FileNotFoundError),
        "denied-http": (f"{server.url}/denied.fgs", {}, PermissionError),
    }[case]
    with pytest.raises(expected, match=rf"^{url.replace('.', '[.]')}: HEAD failed"):
        fgs.open(url, storage_options={**options, **FAST}, cache_dir=tmp_path)


def test_a_server_failing_after_open_raises_oserror_after_retries(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _make(root)
    server = RangeServer(root).start()
    try:
        store = fgs.open(f"{server.url}/s.fgs", cache_dir=tmp_path / "c", storage_options=FAST)
        server.failing = True  # 503 to everything: retried, then an error
        server.reset_counts()
        with pytest.raises(OSError, match=rf"^{server.url.replace('.', '[.]')}/s[.]fgs: GET of \d+ byte ranges "
                                          r"failed: .*503"):
            store.gather("fix", [0], num_segments=3, mode="test")
        assert len(server.requests) == 1 + FAST["max_retries"]
        server.failing = False  # nothing was cached from the failure: the next gather fetches
        np.testing.assert_array_equal(store.gather("fix", [0], num_segments=3, mode="test"), fgs.open(root / "s.fgs").gather("fix", [0], num_segments=3, mode="test"))
    finally:
        server.stop()


def test_open_arguments_are_checked(served, tmp_path):
    with pytest.raises(ValueError, match="storage_options and cache_dir are for remote stores"):
        fgs.open(served[2] / "s.fgs", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"storage_options\['timeout'\] must be > 0"):
        fgs.open(f"{served[0].url}/s.fgs", storage_options={"timeout": 0}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"expected s3://BUCKET/KEY"):
        fgs.open("s3://bucket-only/", cache_dir=tmp_path)
    local = fgs.open("file://" + str(served[2] / "s.fgs"))
    assert local.cache_path is None and len(local) == N


def test_default_cache_folder_follows_xdg(served, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = fgs.open(f"{served[0].url}/s.fgs", storage_options=FAST)
    assert store.cache_path.startswith(str(tmp_path / "xdg" / "finegym-store" / "remote") + os.sep)


def test_dataloader_workers_over_a_remote_store(served, tmp_path):
    torch = require("torch", "torch", "pip install torch")
    from finegym_store.torch import StoreDataset, collate

    _server, local, _ = served
    store = _open_http(served, tmp_path)
    ds = StoreDataset(store, "fix", num_segments=4, mode="test")
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate,
                                     multiprocessing_context="spawn")
    got = torch.cat([b.features for b in dl]).numpy()
    np.testing.assert_array_equal(got, local.gather("fix", np.arange(N), num_segments=4, mode="test"))


# -- writing to object storage ---------------------------------------------------------


def _s3_bytes(endpoint: str, key: str) -> bytes:
    import obstore
    from obstore.store import S3Store

    store = S3Store("bkt", client_options={"allow_http": True}, **s3_options(endpoint))
    return bytes(obstore.get(store, key).bytes())


@pytest.fixture
def local_scratch(tmp_path, monkeypatch):
    """Upload staging and the default cache folder under tmp_path."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "tmp"


def test_to_parquet_and_convert_write_to_s3(served, moto, tmp_path, local_scratch):
    pq = require("pyarrow.parquet", "pyarrow", 'pip install "finegym-store[arrow]"')
    _server, local, _root = served
    opts = {**s3_options(moto), **FAST}
    url = "s3://bkt/out/s.parquet"
    assert local.to_parquet(url, storage_options=opts) == url
    (tmp_path / "got.parquet").write_bytes(_s3_bytes(moto, "out/s.parquet"))
    assert pq.read_table(tmp_path / "got.parquet").equals(pq.read_table(local.to_parquet(tmp_path / "want.parquet")))
    with pytest.raises(FileExistsError, match=r"s3://bkt/out/s\.parquet exists; pass overwrite=True"):
        local.to_parquet(url, storage_options=opts)
    local.to_parquet(url, ["id", "label"], storage_options=opts, overwrite=True)  # replaced
    (tmp_path / "small.parquet").write_bytes(_s3_bytes(moto, "out/s.parquet"))
    assert pq.read_table(tmp_path / "small.parquet").column_names == ["id", "label"]

    table = {k: local.features("fix", i).copy() for i, k in enumerate(local.ids)}
    store = fgs.convert({"fix": table}, "s3://bkt/out/c.fgs", progress=False, storage_options=opts)
    assert store.path == "s3://bkt/out/c.fgs" and store.format_version == fgs.FORMAT_VERSION
    order = store.index_of(local.ids.to_list())  # without a split, a conversion sorts by id
    np.testing.assert_array_equal(store.gather("fix", order, num_segments=12, mode="test"), local.gather("fix", np.arange(N), num_segments=12, mode="test"))
    assert store.verify() == []
    with pytest.raises(FileExistsError, match=r"s3://bkt/out/c\.fgs exists"):
        fgs.convert({"fix": table}, "s3://bkt/out/c.fgs", progress=False, storage_options=opts)
    assert list(local_scratch.iterdir()) == []  # staging files removed, after success and failure


def test_cli_export_to_s3_uses_the_aws_environment(served, moto, tmp_path, monkeypatch, local_scratch):
    require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')
    from finegym_store.cli import main

    for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    src = str(served[2] / "s.fgs")
    assert main(["export", src, "s3://bkt/cli/e.parquet", "-q"]) == 0
    assert _s3_bytes(moto, "cli/e.parquet")[:4] == b"PAR1"
    assert main(["export", src, "s3://bkt/cli/e.parquet", "-q"]) == 2  # exists, no --overwrite
    assert main(["export", "s3://bkt/data/s.fgs", "s3://bkt/cli/e.parquet", "-q", "--overwrite"]) == 0


def test_http_urls_are_read_only(served, tmp_path, local_scratch):
    with pytest.raises(ValueError, match=r"cannot write to a http:// URL"):
        served[1].to_parquet(f"{served[0].url}/x.parquet")


def test_select_from_a_remote_store(served, tmp_path):
    _server, local, _ = served
    store = _open_http(served, tmp_path / "c")
    rows = [5, 1, N - 1]
    got = store.select(rows, tmp_path / "sel.fgs")
    want = local.select(rows, tmp_path / "want.fgs")
    for column in ("fix", "rag"):
        assert got.column(column).values.tobytes() == want.column(column).values.tobytes()


def test_unpickling_never_raises_and_tries_again(served, tmp_path):
    server, local, root = served
    shutil.copyfile(root / "s.fgs", root / "moving.fgs")
    blob = pickle.dumps(_open_http(served, tmp_path, "moving.fgs"))
    (root / "moving.fgs").rename(root / "moved.fgs")
    try:
        other = pickle.loads(blob)  # the object is gone: a Store that raises at first use
        with pytest.raises(FileNotFoundError, match="could not reopen the store .*moving"):
            len(other)
        again = pickle.loads(pickle.dumps(other))
        with pytest.raises(FileNotFoundError):
            len(again)
    finally:
        (root / "moved.fgs").rename(root / "moving.fgs")
    back = pickle.loads(pickle.dumps(again))
    assert type(back) is fgs.Store and len(back) == N and back.path == f"{server.url}/moving.fgs"
    assert local is not None


def test_a_server_that_never_answers_times_out(tmp_path):
    # The kernel accepts the connection (listen backlog); nothing ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/s.fgs"
        options = {"timeout": 1, "connect_timeout": 1, "max_retries": 1, "retry_timeout": 2}
        with pytest.raises(OSError, match=rf"^{url.replace('.', '[.]')}: HEAD failed"):
            fgs.open(url, storage_options=options, cache_dir=tmp_path)


def test_cli_info_and_verify_open_urls(served, local_scratch, capsys):
    from finegym_store.cli import main

    url = f"{served[0].url}/s.fgs"
    assert main(["info", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert url in out and f'"format_version": {fgs.FORMAT_VERSION}' in out
    assert main(["verify", url]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["stats", url]) == 0
    assert "fix" in capsys.readouterr().out
    assert main(["stats", url, "--in-place"]) == 2
    assert "remote store: it cannot be replaced in place" in capsys.readouterr().err
    # A copy with a remote store's statistics records the URLs, not paths made of them.
    out = local_scratch / "copy.fgs"
    assert main(["stats", url, "--from", url, "--output", str(out)]) == 0
    copy = fgs.open(out)
    assert copy.attrs["selected_from"]["path"] == url and copy.attrs["stats_from"]["path"] == url
    np.testing.assert_array_equal(copy.stats("fix").mean, fgs.open(url, cache_dir=local_scratch).stats("fix").mean)


def test_docs_example(served, moto, tmp_path, monkeypatch):
    # docs/remote.md's example as written: S3 through the AWS_* environment
    # (a moto server), and the https URL pointed at the local Range server.
    server, root = served[0], served[2]
    local = example_store(root / "docs", name="gym99_train.fgs")
    shutil.copy(local.path, root / "gym99_val.fgs")
    s3_put(moto, "bucket", "gym99_train.fgs", Path(local.path))
    for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "XDG_CACHE_HOME": str(tmp_path / "xdg")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    page = Path(__file__).resolve().parents[1] / "docs" / "remote.md"
    scope = run_markdown_blocks(page, "fgs.open(", {"__name__": "docs_example"},
                                {'"https://example.org/gym99_val.fgs"': repr(f"{server.url}/gym99_val.fgs")})
    store, val = scope["store"], scope["val"]
    np.testing.assert_array_equal(store.gather("i3d", [0, 5], num_segments=3, mode="test"),
                                  local.gather("i3d", [0, 5], num_segments=3, mode="test"))
    np.testing.assert_array_equal(val.features("i3d", 7), local.features("i3d", 7))
    assert (tmp_path / "fgs-cache").is_dir()


def test_cli_info_on_a_url_is_not_checked_as_a_local_path(served, local_scratch, capsys):
    # The command line's up-front path checks leave URLs to the remote layer.
    from finegym_store.cli import main

    assert main(["info", f"{served[0].url}/s.fgs"]) == 0
    assert "240" in capsys.readouterr().out
