"""artifactfs:// through fsspec and pandas, end to end, against a real HTTP server on loopback
(and, for the directory rule, a real mount). fsspec's own suite is tests/test_fsspec_abstract.py.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq
import pytest
from httputil import server_in_thread
from mountutil import Mount, mount_fixture

from artifactfs import fsspec_fs
from artifactfs.fsspec_fs import ArtifactFileSystem

pytestmark = pytest.mark.timeout(120)

TOKEN = "fsspec-test-token"
KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module, with a token: every test proves the token passes through."""
    with server_in_thread(tmp_path_factory.mktemp("fsspec") / "data", token=TOKEN) as u:
        yield u


@pytest.fixture
def fs(url: str) -> ArtifactFileSystem:
    return ArtifactFileSystem(base_url=url, token=TOKEN, skip_instance_cache=True)


@pytest.fixture
def root(fs: ArtifactFileSystem, request: pytest.FixtureRequest) -> Iterator[str]:
    """A directory of this test's own; emptied afterwards."""
    name = f"t/{request.node.name.replace('[', '-').replace(']', '')}"
    yield name
    if fs.exists(name):
        fs.rm(name, recursive=True)


class Recorder:
    """Every request an httpx client sends: method, path and the headers a test looks at."""

    def __init__(self, fs: ArtifactFileSystem) -> None:
        self.requests: list[httpx.Request] = []
        fs.http.event_hooks["request"].append(self.requests.append)

    def of(self, method: str, suffix: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(suffix)]


# --- registration --------------------------------------------------------------------------


def test_the_entry_point_names_the_class() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="fsspec.specs") if e.name == "artifactfs"]
    assert ep.value == "artifactfs.fsspec_fs:ArtifactFileSystem"
    assert fsspec.get_filesystem_class("artifactfs") is ArtifactFileSystem


def test_fsspec_open_finds_it_in_a_fresh_interpreter(url: str, fs: ArtifactFileSystem,
                                                     root: str) -> None:
    """A process that never imports artifactfs opens artifactfs:// URLs: fsspec finds the
    class through the installed package's entry point; base_url and token from the
    environment."""
    fs.pipe(f"{root}/hello.txt", b"hello from the store")
    code = ("import sys, fsspec\n"
            f"with fsspec.open('artifactfs://{root}/hello.txt') as f:\n"
            "    sys.stdout.buffer.write(f.read())\n"
            f"with fsspec.open('artifactfs://{root}/out.txt', 'w') as f:\n"
            "    f.write('written by fsspec.open')\n")
    env = {**os.environ, "ARTIFACTFS_URL": url, "ARTIFACTFS_TOKEN": TOKEN}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"hello from the store"
    assert fs.cat(f"{root}/out.txt") == b"written by fsspec.open"
    assert fs.info(f"{root}/out.txt")["mime_type"] == "text/plain"


# --- pandas --------------------------------------------------------------------------------


def frame() -> pd.DataFrame:
    rng = random.Random(7)
    return pd.DataFrame({
        "id": range(2000),
        "score": [rng.random() for _ in range(2000)],
        "label": [rng.choice(["cat", "dog", "eel"]) for _ in range(2000)],
    })


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_pandas_writes_and_reads_through_artifactfs_urls(url: str, fs: ArtifactFileSystem,
                                                         root: str, kind: str) -> None:
    df = frame()
    target = f"artifactfs://{root}/data.{kind}"
    options = {"base_url": url, "token": TOKEN}
    if kind == "parquet":
        df.to_parquet(target, storage_options=options, index=False)
        back = pd.read_parquet(target, storage_options=options)
        mime = "application/vnd.apache.parquet"
    else:
        df.to_csv(target, storage_options=options, index=False)
        back = pd.read_csv(target, storage_options=options)
        mime = "text/csv"
    pd.testing.assert_frame_equal(back, df)
    info = fs.info(f"{root}/data.{kind}")
    assert info["mime_type"] == mime
    assert info["sha256"] == hashlib.sha256(fs.cat(f"{root}/data.{kind}")).hexdigest()


def test_a_partitioned_dataset_through_pyarrow(url: str, fs: ArtifactFileSystem,
                                                root: str) -> None:
    """Directory partitioning (``label/x/...``) works; hive's ``label=x`` cannot be a key
    (``=`` is not a key character), which pandas' ``partition_cols`` always writes."""
    part = pa_ds.partitioning(pa.schema([("label", pa.string())]))
    df = frame()
    pq.write_to_dataset(pa.Table.from_pandas(df), f"{root}/ds", filesystem=fs,
                        partitioning=part)
    assert fs.ls(f"{root}/ds", detail=False) == [f"{root}/ds/{v}" for v in ["cat", "dog", "eel"]]
    back = pd.read_parquet(f"artifactfs://{root}/ds", partitioning=part,
                           storage_options={"base_url": url, "token": TOKEN})
    back = back.sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(back[["id", "score"]], df[["id", "score"]])
    assert back["label"].astype(str).tolist() == df["label"].tolist()
    with pytest.raises(OSError, match="contains '='"):
        df.to_parquet(f"artifactfs://{root}/hive", partition_cols=["label"],
                      storage_options={"base_url": url, "token": TOKEN})


def test_pandas_without_the_token_is_refused(url: str, root: str) -> None:
    with pytest.raises(PermissionError, match="bearer token"):
        pd.read_csv(f"artifactfs://{root}/none.csv",
                    storage_options={"base_url": url, "skip_instance_cache": True})


def test_pyarrow_reads_parquet_columns_with_ranged_reads(url: str, fs: ArtifactFileSystem,
                                                         root: str) -> None:
    """pyarrow reads a parquet file's footer and the columns it wants, not the whole file."""
    rng = random.Random(1)
    df = pd.DataFrame({"keep": range(50_000),
                       "big": [rng.randbytes(64).hex() for _ in range(50_000)]})
    with fs.open(f"{root}/wide.parquet", "wb") as f:
        df.to_parquet(f, index=False, compression=None)
    size = fs.size(f"{root}/wide.parquet")
    rec = Recorder(fs)
    with fs.open(f"{root}/wide.parquet", "rb", block_size=64 * KiB, cache_type="none") as f:
        back = pd.read_parquet(f, columns=["keep"])
    assert back["keep"].tolist() == list(range(50_000))
    gets = rec.of("GET", ":content")
    assert gets and all("range" in r.headers for r in gets)
    fetched = sum(_range_length(r.headers["range"], size) for r in gets)
    assert fetched < size / 4, (fetched, size)


def _range_length(header: str, size: int) -> int:
    first, _, last = header.removeprefix("bytes=").partition("-")
    return (int(last) if last else size - 1) - int(first) + 1


# --- reading -------------------------------------------------------------------------------


def test_ranged_reads_of_the_version_opened(fs: ArtifactFileSystem, root: str) -> None:
    data = random.Random(2).randbytes(300 * KiB + 11)
    fs.pipe(f"{root}/blob.bin", data)
    rec = Recorder(fs)
    with fs.open(f"{root}/blob.bin", "rb", block_size=32 * KiB) as f:
        assert f.size == len(data)
        for pos, n in [(0, 10), (100 * KiB, 5000), (len(data) - 7, 100), (len(data) + 5, 10),
                       (50, 0)]:
            f.seek(pos)
            assert f.read(n) == data[pos:pos + n]
    sha = hashlib.sha256(data).hexdigest()
    gets = rec.of("GET", ":content")
    assert gets and all(r.headers.get("if-range") == f'"{sha}"' for r in gets)
    assert all(_range_length(r.headers["range"], len(data)) <= 64 * KiB for r in gets)

    assert fs.cat_file(f"{root}/blob.bin", 10, 20) == data[10:20]
    assert fs.cat_file(f"{root}/blob.bin", -5) == data[-5:]
    assert fs.cat_file(f"{root}/blob.bin", 5, -5) == data[5:-5]
    assert fs.cat_file(f"{root}/blob.bin", len(data) + 1) == b""
    assert fs.cat_file(f"{root}/blob.bin", 20, 10) == b""
    assert fs.read_block(f"{root}/blob.bin", 1000, 2000) == data[1000:3000]


def test_a_file_replaced_while_read_fails_rather_than_mixing_versions(
        fs: ArtifactFileSystem, root: str) -> None:
    old, new = b"a" * (200 * KiB), b"b" * (200 * KiB)
    fs.pipe(f"{root}/f", old)
    with fs.open(f"{root}/f", "rb", block_size=16 * KiB, cache_type="none") as f:
        assert f.read(10) == b"a" * 10
        fs.pipe(f"{root}/f", new)
        f.seek(100 * KiB)
        with pytest.raises(OSError, match="replaced while it was being read") as exc:
            f.read(10)
        assert exc.value.errno == errno.ESTALE
    assert fs.cat(f"{root}/f") == new


def test_get_checks_the_sha256_and_makes_directories(fs: ArtifactFileSystem, root: str,
                                                     tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MiB + 5)
    fs.pipe(f"{root}/d/e/model.bin", data)
    fs.pipe(f"{root}/d/notes.txt", b"notes")
    fs.get(f"{root}/d", str(tmp_path / "out"), recursive=True)
    assert (tmp_path / "out/e/model.bin").read_bytes() == data
    assert (tmp_path / "out/notes.txt").read_bytes() == b"notes"
    with pytest.raises(FileNotFoundError):
        fs.get_file(f"{root}/absent", str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()


# --- writing -------------------------------------------------------------------------------


def test_open_for_writing_uploads_in_offset_chunks_at_close(
        fs: ArtifactFileSystem, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes spool (memory, then a temporary file) until close, which uploads them in
    chunks with Upload-Offset; nothing is visible before the last byte."""
    monkeypatch.setattr(fsspec_fs, "PUT_CHUNK", 64 * KiB)
    monkeypatch.setattr(fsspec_fs, "SPOOL_IN_MEMORY", 100 * KiB)  # spills to disk
    data = random.Random(4).randbytes(300 * KiB + 3)
    rec = Recorder(fs)
    with fs.open(f"{root}/ckpt.bin", "wb", block_size=50 * KiB) as f:
        for i in range(0, len(data), 7000):
            f.write(data[i:i + 7000])
        assert f.spool is not None and f.spool._rolled  # type: ignore[attr-defined]
        assert not fs.exists(f"{root}/ckpt.bin")
    assert fs.cat(f"{root}/ckpt.bin") == data
    chunks = rec.of("POST", "")[1:]
    assert [int(r.headers["upload-offset"]) for r in chunks] == list(
        range(0, len(data), 64 * KiB))
    info = fs.info(f"{root}/ckpt.bin")
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["mime_type"] == "application/octet-stream"


def test_put_uploads_from_disk_and_keeps_mime_types(fs: ArtifactFileSystem, root: str,
                                                    tmp_path: Path) -> None:
    (tmp_path / "src/sub").mkdir(parents=True)
    (tmp_path / "src/a.json").write_bytes(b'{"a": 1}')
    (tmp_path / "src/sub/b.csv").write_bytes(b"x,y\n1,2\n")
    fs.put(str(tmp_path / "src"), f"{root}/dst", recursive=True)
    assert fs.find(f"{root}/dst") == [f"{root}/dst/a.json", f"{root}/dst/sub/b.csv"]
    assert fs.info(f"{root}/dst/a.json")["mime_type"] == "application/json"
    fs.cp(f"{root}/dst/sub/b.csv", f"{root}/copy")
    assert fs.info(f"{root}/copy")["mime_type"] == "text/csv"  # the source's, kept
    assert fs.cat(f"{root}/copy") == b"x,y\n1,2\n"
    fs.pipe(f"{root}/typed", b"{}", mime_type="application/x-custom")
    assert fs.info(f"{root}/typed")["mime_type"] == "application/x-custom"


def test_a_transaction_commits_at_its_end(fs: ArtifactFileSystem, root: str) -> None:
    with fs.transaction:
        with fs.open(f"{root}/a", "wb") as f:
            f.write(b"first")
        assert not fs.exists(f"{root}/a")
    assert fs.cat(f"{root}/a") == b"first"
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open(f"{root}/b", "wb") as f:
            f.write(b"dropped")
        raise RuntimeError("abandon")
    assert not fs.exists(f"{root}/b")


class FlakyTransport(httpx.BaseTransport):
    """The real server, with some requests to the upload session lost (counted from 1 over
    the session's POSTs and GETs): in ``unsent`` the request never leaves, in ``unanswered``
    the server gets it and its answer is lost (the case that must not send bytes twice)."""

    def __init__(self, unsent: set[int], unanswered: set[int]) -> None:
        self.real = httpx.HTTPTransport()
        self.unsent, self.unanswered = unsent, unanswered
        self.seen = 0
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "/sessions/" in request.url.path:
            self.seen += 1
            self.posts += request.method == "POST"
            if self.seen in self.unsent:
                raise httpx.ConnectError("connection refused", request=request)
            if self.seen in self.unanswered:
                self.real.handle_request(request).read()
                raise httpx.RemoteProtocolError("connection lost", request=request)
        return self.real.handle_request(request)


@pytest.mark.parametrize(("unsent", "unanswered", "posts"), [
    ({2}, set(), 5),         # chunk 2 never arrives: sent again
    (set(), {2}, 4),         # chunk 2 arrives, its answer is lost: not sent again
    (set(), {4}, 4),         # the last chunk's answer is lost: the commit is found
    ({3, 4}, {2}, 4),        # and the session's offset cannot be asked at first either
])
def test_an_upload_survives_lost_connections(url: str, root: str, unsent: set[int],
                                             unanswered: set[int], posts: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """After a lost request the session's offset says what arrived; the rest is sent from
    there, never a byte twice."""
    monkeypatch.setattr(fsspec_fs, "PUT_CHUNK", 64 * KiB)
    monkeypatch.setattr(fsspec_fs, "RETRY_WAIT", 0.01)
    fs = ArtifactFileSystem(base_url=url, token=TOKEN, skip_instance_cache=True)
    flaky = FlakyTransport(unsent, unanswered)
    fs.http = httpx.Client(base_url=url, headers=fs.http.headers, transport=flaky)
    data = random.Random(len(unsent)).randbytes(4 * 64 * KiB)  # four chunks
    artifact = fs.upload(f"{root}/f", io.BytesIO(data), len(data))
    assert artifact["sha256"] == hashlib.sha256(data).hexdigest()
    assert fs.cat(f"{root}/f") == data
    assert flaky.posts == posts


def test_an_upload_gives_up_when_the_daemon_stays_away(url: str, root: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsspec_fs, "RETRY_WAIT", 0.001)
    fs = ArtifactFileSystem(base_url=url, token=TOKEN, skip_instance_cache=True)
    fs.http = httpx.Client(base_url=url, headers=fs.http.headers,
                           transport=FlakyTransport(set(range(1, 100)), set()))
    with pytest.raises(ConnectionError, match="cannot reach the artifactfs daemon"):
        fs.pipe(f"{root}/f", b"never")
    assert not fs.exists(f"{root}/f")


# --- listing and directories ---------------------------------------------------------------


def test_listing_derives_directories_from_keys(fs: ArtifactFileSystem, root: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsspec_fs, "PAGE", 3)  # several pages per listing
    for key in ["a/b/c.txt", "a/b/d.txt", "a/e.txt", "a.txt", "f/g/h/i.bin", "z"]:
        fs.pipe(f"{root}/{key}", key.encode())
    assert fs.ls(root, detail=False) == [f"{root}/{n}" for n in ["a", "a.txt", "f", "z"]]
    listed = {e["name"]: e for e in fs.ls(f"{root}/a")}
    assert listed[f"{root}/a/b"] == {"name": f"{root}/a/b", "size": 0, "type": "directory"}
    e = listed[f"{root}/a/e.txt"]
    assert (e["type"], e["size"], e["mime_type"]) == ("file", 7, "text/plain")
    assert e["sha256"] == hashlib.sha256(b"a/e.txt").hexdigest()
    assert isinstance(e["created_at"], int)
    assert fs.ls(f"{root}/a.txt", detail=False) == [f"{root}/a.txt"]
    assert fs.info(f"{root}/f/g")["type"] == "directory"
    assert fs.info("")["type"] == "directory"
    assert fs.find(root, maxdepth=2) == [f"{root}/a.txt", f"{root}/a/e.txt", f"{root}/z"]
    assert fs.find(f"{root}/f", withdirs=True) == [
        f"{root}/f", f"{root}/f/g", f"{root}/f/g/h", f"{root}/f/g/h/i.bin"]
    assert fs.glob(f"{root}/**/*.txt") == [
        f"{root}/a.txt", f"{root}/a/b/c.txt", f"{root}/a/b/d.txt", f"{root}/a/e.txt"]
    assert fs.glob(f"artifactfs://{root}/a/*") == [f"{root}/a/b", f"{root}/a/e.txt"]
    assert fs.du(root) == sum(len(k) for k in
                              ["a/b/c.txt", "a/b/d.txt", "a/e.txt", "a.txt", "f/g/h/i.bin", "z"])
    for missing in [f"{root}/nope", f"{root}/a/b/c.txt/x", f"{root}/a/b/c"]:
        with pytest.raises(FileNotFoundError):
            fs.info(missing)
        with pytest.raises(FileNotFoundError):
            fs.ls(missing)


def test_checksum_follows_the_content(fs: ArtifactFileSystem, root: str) -> None:
    fs.pipe(f"{root}/x", b"one")
    fs.pipe(f"{root}/y", b"one")
    first = fs.checksum(f"{root}/x")
    assert first == int(hashlib.sha256(b"one").hexdigest(), 16) == fs.checksum(f"{root}/y")
    assert fs.ukey(f"{root}/x") == hashlib.sha256(b"one").hexdigest()
    fs.pipe(f"{root}/x", b"two")
    assert fs.checksum(f"{root}/x") != first
    assert fs.modified(f"{root}/x") == fs.created(f"{root}/x")
    assert fs.created(f"{root}/x").tzinfo is not None


def test_rm_and_directories(fs: ArtifactFileSystem, root: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsspec_fs, "BULK_DELETE_BATCH", 2)
    for key in ["d/1", "d/2", "d/s/3", "d/s/t/4", "keep"]:
        fs.pipe(f"{root}/{key}", b"x")
    fs.mkdir(f"{root}/empty")  # nothing to make: it does not appear
    assert not fs.exists(f"{root}/empty")
    fs.makedirs(f"{root}/d", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{root}/d")
    with pytest.raises(FileExistsError):
        fs.mkdir(f"{root}/keep")
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{root}/d")
    with pytest.raises(OSError, match="not empty") as exc:
        fs.rmdir(f"{root}/d")
    assert exc.value.errno == errno.ENOTEMPTY
    fs.rm(f"{root}/d/s", recursive=True, maxdepth=1)  # only the top level of s
    assert fs.find(f"{root}/d") == [f"{root}/d/1", f"{root}/d/2", f"{root}/d/s/t/4"]
    fs.rm(f"{root}/d", recursive=True)
    assert fs.find(root) == [f"{root}/keep"]
    assert not fs.exists(f"{root}/d")
    fs.rm(f"{root}/keep")
    with pytest.raises(FileNotFoundError):
        fs.rm(f"{root}/keep")


def test_errors_say_what_was_wrong(url: str, fs: ArtifactFileSystem, root: str) -> None:
    fs.pipe(f"{root}/file", b"x")
    with pytest.raises(FileExistsError, match="is a file"):
        fs.pipe(f"{root}/file/under", b"y")
    with pytest.raises(FileExistsError, match="directory"):
        fs.pipe(root, b"y")
    with pytest.raises(OSError, match="allowed characters") as exc:
        fs.pipe(f"{root}/a b", b"y")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(IsADirectoryError):
        fs.open(root, "rb")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{root}/absent", "rb")
    with pytest.raises(NotImplementedError, match="append"):
        fs.open(f"{root}/file", "ab")
    with pytest.raises(FileExistsError):
        fs.open(f"{root}/file", "xb")
    assert fs.cat(f"{root}/file") == b"x"
    with pytest.raises(PermissionError, match="bearer token"):
        ArtifactFileSystem(base_url=url, token="wrong", skip_instance_cache=True).ls("")
    with pytest.raises(ConnectionError, match="cannot reach the artifactfs daemon"):
        ArtifactFileSystem(base_url="http://127.0.0.1:1", skip_instance_cache=True).ls("")


def test_options_default_from_the_environment(url: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setenv("ARTIFACTFS_URL", url)
    monkeypatch.setenv("ARTIFACTFS_TOKEN", TOKEN)
    fs = fsspec.filesystem("artifactfs", skip_instance_cache=True)
    assert fs.base_url == url
    fs.ls("")  # the token from the environment is accepted
    monkeypatch.delenv("ARTIFACTFS_URL")
    assert ArtifactFileSystem(skip_instance_cache=True).base_url == "http://127.0.0.1:8321"


def test_a_pickled_file_system_and_file_work_elsewhere(fs: ArtifactFileSystem, root: str
                                                       ) -> None:
    """dask and multiprocessing ship the file system (and open files) to workers by pickle."""
    fs.pipe(f"{root}/p.txt", b"pickled")
    again = pickle.loads(pickle.dumps(fs))
    assert again.cat(f"{root}/p.txt") == b"pickled"
    with fs.open(f"{root}/p.txt", "rb") as f:
        g = pickle.loads(pickle.dumps(f))
    with g:
        assert g.read() == b"pickled"


# --- the mount's empty directories ---------------------------------------------------------


mount = mount_fixture()


@pytest.mark.mount
def test_empty_directories_made_in_the_mount_do_not_show(mount: Mount) -> None:
    """The HTTP API lists artifacts only, so a directory with no artifact under it (made by
    mkdir in the mount, or left when its last file was deleted) is not in fsspec's view."""
    fs = ArtifactFileSystem(base_url=mount.url, skip_instance_cache=True)
    (mount.path / "proj/empty").mkdir(parents=True)
    (mount.path / "proj/data").mkdir()
    (mount.path / "proj/data/x.csv").write_bytes(b"a\n1\n")
    assert fs.ls("proj", detail=False) == ["proj/data"]
    assert not fs.exists("proj/empty")
    fs.pipe("proj/new/y.txt", b"from fsspec")
    assert (mount.path / "proj/new/y.txt").read_bytes() == b"from fsspec"
    fs.rm("proj/new", recursive=True)
    assert (mount.path / "proj/new").is_dir()  # the mount keeps the emptied directory
    assert not fs.exists("proj/new")
    assert fs.find("", withdirs=True) == ["proj", "proj/data", "proj/data/x.csv"]


# --- the documentation's examples ----------------------------------------------------------

FSSPEC_DOC = Path(__file__).resolve().parent.parent / "docs" / "FSSPEC.md"


def test_the_documented_examples_run(tmp_path: Path) -> None:
    """docs/FSSPEC.md's Python blocks run as written against a token-free server (the first
    names the default address, which is replaced by this server's)."""
    blocks = re.findall(r"```python\n(.*?)```", FSSPEC_DOC.read_text(), re.S)
    assert len(blocks) == 2, "docs/FSSPEC.md lost an example"
    (tmp_path / "results").mkdir()
    (tmp_path / "results/summary.json").write_text('{"acc": 0.9}')
    with server_in_thread(tmp_path / "data") as url:
        env = {**os.environ, "ARTIFACTFS_URL": url}
        env.pop("ARTIFACTFS_TOKEN", None)
        outputs = []
        for code in blocks:
            assert "http://127.0.0.1:8321" in code or "ARTIFACTFS_URL" in code
            r = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8321", url)],
                               cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=60, check=False)
            assert r.returncode == 0, r.stderr
            outputs.append(r.stdout)
        fs = ArtifactFileSystem(base_url=url, skip_instance_cache=True)
        assert fs.cat("runs/run7/results/summary.json") == b'{"acc": 0.9}'
    assert "0.3" in outputs[0] and outputs[0].count("loss") == 2
    assert "runs/run7/results" in outputs[1] and "'mime_type': 'text/csv'" in outputs[1]
    assert "step,loss" in outputs[1]
