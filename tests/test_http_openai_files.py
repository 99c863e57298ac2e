"""The OpenAI Files API (/v1/files), driven by OpenAI's own Python client against a real server
on loopback: the shapes of the reference, pagination, errors in OpenAI's shape, and the same
artifacts seen through the Artifacts API, after a restart, and in a real mount.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from httputil import server_in_thread
from mountutil import Mount, mount_fixture
from openai import OpenAI

from artifactfs.http.openai_files import file_id, key_of

pytestmark = pytest.mark.timeout(120)

mount = mount_fixture()


def client(url: str, token: str = "unused-on-loopback") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=30)


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with server_in_thread(tmp_path / "data") as u:
        yield u


def put(url: str, key: str, data: bytes, mime_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None) -> dict:
    """Commit ``data`` as ``key`` through the Artifacts API."""
    with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
        s = c.post("/v1/artifacts", json={"key": key, "mime_type": mime_type,
                                          "size": len(data)})
        assert s.status_code == 200, s.text
        r = c.post(s.json()["uri"], content=data)
        assert r.status_code == 200, r.text
        return c.get(f"/v1/artifacts/{key}").json()


def test_ids_are_keys_in_base64url() -> None:
    for key in ("a", "datasets/v1/train.jsonl", "/".join(["k" * 255] * 4), "-_./x", "ab"):
        ident = file_id(key)
        assert ident.startswith("file-") and "=" not in ident and "/" not in ident
        assert key_of(ident) == key
    assert file_id("datasets/train.jsonl") == "file-ZGF0YXNldHMvdHJhaW4uanNvbmw"
    # Not ids of any key: another prefix, bad base64, bytes that are no key, a second spelling.
    for ident in ("file-", "abc", "file-A", "file-_w", "file-YSBi", "file-YR", "file-!!"):
        assert key_of(ident) is None, ident


def test_create_retrieve_content_list_delete(url: str) -> None:
    c = client(url)
    data = b'{"prompt": "hi"}\n' * 100
    f = c.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert f.object == "file" and f.filename == "train.jsonl" and f.purpose == "fine-tune"
    assert f.bytes == len(data) and f.status == "processed" and f.expires_at is None
    assert f.id == file_id("files/fine-tune/train.jsonl")
    raw = httpx.get(f"{url}/v1/files/{f.id}").json()
    assert set(raw) == {"id", "object", "bytes", "created_at", "filename", "purpose",
                        "status", "expires_at"}
    assert c.files.retrieve(f.id) == f
    assert c.files.content(f.id).content == data
    # The same artifact through the Artifacts API, with the mount's mime type for the name.
    art = httpx.get(f"{url}/v1/artifacts/files/fine-tune/train.jsonl").json()
    assert art["size"] == len(data) and art["mime_type"] == "application/jsonl"
    assert art["sha256"] == hashlib.sha256(data).hexdigest()
    assert art["created_at"] == f.created_at
    page = c.files.list()
    assert [x.id for x in page.data] == [f.id] and page.has_more is False
    raw = httpx.get(f"{url}/v1/files").json()
    assert raw["object"] == "list" and raw["first_id"] == raw["last_id"] == f.id
    gone = c.files.delete(f.id)
    assert gone.id == f.id and gone.deleted is True and gone.object == "file"
    assert httpx.get(f"{url}/v1/artifacts/files/fine-tune/train.jsonl").status_code == 404
    assert c.files.list().data == []


def test_an_artifact_is_a_file(url: str) -> None:
    c = client(url)
    data = os.urandom(1000)
    art = put(url, "checkpoints/run1/model.safetensors", data)
    f = c.files.retrieve(file_id("checkpoints/run1/model.safetensors"))
    assert f.filename == "model.safetensors" and f.purpose == "user_data"
    assert f.bytes == 1000 and f.created_at == art["created_at"]
    assert c.files.content(f.id).content == data
    # Put under files/<purpose>/ by the Artifacts API: a file of that purpose.
    put(url, "files/batch/requests.jsonl", b"{}\n")
    assert [x.filename for x in c.files.list(purpose="batch")] == ["requests.jsonl"]
    # Deleted as a file, gone as an artifact.
    c.files.delete(f.id)
    assert httpx.get(f"{url}/v1/artifacts/checkpoints/run1/model.safetensors"
                     ).status_code == 404


def test_a_second_upload_of_a_name_replaces_it(url: str) -> None:
    c = client(url)
    first = c.files.create(file=("notes.txt", b"one"), purpose="assistants")
    second = c.files.create(file=("notes.txt", b"two, longer"), purpose="assistants")
    assert second.id == first.id and second.bytes == len(b"two, longer")
    assert c.files.content(first.id).content == b"two, longer"
    other = c.files.create(file=("notes.txt", b"three"), purpose="batch")
    assert other.id != first.id
    assert len(c.files.list().data) == 2


def test_a_large_upload_streams_through(url: str) -> None:
    """Past the 1 MiB a multipart part is held in memory: spooled, then streamed in."""
    c = client(url)
    data = os.urandom(5 * (1 << 20) + 7)
    f = c.files.create(file=("shard.bin", data), purpose="user_data")
    assert f.bytes == len(data)
    got = c.files.content(f.id).content
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    r = httpx.get(f"{url}/v1/files/{f.id}/content", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]


def test_pagination_by_cursor(url: str) -> None:
    c = client(url)
    keys = sorted([f"d/{i:02d}.bin" for i in range(9)] + ["a", "z/last",
                                                          "files/batch/b1.jsonl"])
    for key in keys:
        put(url, key, key.encode())
    ids = [file_id(k) for k in keys]
    # The client follows has_more and last_id on its own.
    assert [f.id for f in c.files.list(limit=2, order="asc")] == ids
    assert [f.id for f in c.files.list(limit=3, order="desc")] == ids[::-1]
    assert [f.id for f in c.files.list(limit=1000).data] == ids[::-1]  # desc is the default
    page = c.files.list(limit=4, order="asc")
    assert [f.id for f in page.data] == ids[:4] and page.has_more is True
    last = c.files.list(limit=4, order="asc", after=ids[-5])
    assert [f.id for f in last.data] == ids[-4:] and last.has_more is False
    # The cursor is a position: the file it names may be gone.
    c.files.delete(ids[3])
    # (.data: iterating a page would follow the cursor to the end.)
    assert [f.id for f in c.files.list(limit=2, order="asc", after=ids[3]).data] == ids[4:6]
    assert [f.id for f in c.files.list(limit=2, order="desc", after=ids[3]).data
            ] == ids[2:0:-1]
    assert [f.filename for f in c.files.list(purpose="batch")] == ["b1.jsonl"]
    assert c.files.list(purpose="vision").data == []


def test_errors_have_openai_shape(url: str) -> None:
    c = client(url)
    missing = file_id("no/such/file")
    with pytest.raises(openai.NotFoundError) as exc:
        c.files.retrieve(missing)
    assert "no/such/file" in str(exc.value)
    r = httpx.get(f"{url}/v1/files/{missing}")
    error = r.json()["error"]
    assert r.status_code == 404 and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found"
    for ident in ("file-!!", "nope", "file-A"):
        assert httpx.get(f"{url}/v1/files/{ident}").status_code == 404, ident
        assert httpx.delete(f"{url}/v1/files/{ident}").status_code == 404, ident
    with pytest.raises(openai.NotFoundError):
        c.files.content(missing)
    with pytest.raises(openai.NotFoundError):
        c.files.delete(missing)
    # A name that cannot be a key is refused, and nothing is stored.
    for name in ("with space.txt", "colon:name", "caf\u00e9.txt", "..", "x" * 256):
        with pytest.raises(openai.BadRequestError) as bad:
            c.files.create(file=(name, b"x"), purpose="user_data")
        assert "filename" in str(bad.value), name
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("a.txt", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as bad:
        c.files.create(file=("a.txt", b"x"), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 3600})
    assert "expires_after" in str(bad.value)
    r = httpx.post(f"{url}/v1/files", data={"purpose": "batch"})
    assert r.status_code == 400 and "file" in r.json()["error"]["message"]
    r = httpx.request("PUT", f"{url}/v1/files")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(f"{url}/v1/files", params={"limit": 0})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    assert c.files.list().data == []
    # A clash in the store: the artifact "files" leaves no room for the directory files/.
    put(url, "files", b"in the way")
    with pytest.raises(openai.ConflictError):
        c.files.create(file=("a.txt", b"x"), purpose="batch")
    # The Artifacts API keeps its own error shape.
    assert "detail" in httpx.get(f"{url}/v1/artifacts/no/such").json()


def test_the_bearer_token_applies(tmp_path: Path) -> None:
    with server_in_thread(tmp_path / "data", token="s3cret") as url:
        f = client(url, "s3cret").files.create(file=("a.txt", b"x"), purpose="batch")
        assert client(url, "s3cret").files.retrieve(f.id).bytes == 1
        with pytest.raises(openai.AuthenticationError) as exc:
            client(url, "wrong").files.list()
        assert "wrong bearer token" in str(exc.value)
        r = httpx.get(f"{url}/v1/files")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_ids_survive_a_restart(tmp_path: Path) -> None:
    with server_in_thread(tmp_path / "data") as url:
        f = client(url).files.create(file=("eval.jsonl", b"{}\n"), purpose="evals")
    with server_in_thread(tmp_path / "data") as url:
        again = client(url).files.retrieve(f.id)
        assert again == f
        assert client(url).files.content(f.id).content == b"{}\n"


@pytest.mark.mount
def test_files_and_the_mount_see_each_other(mount: Mount) -> None:
    c = client(mount.url)
    data = os.urandom(3000)
    f = c.files.create(file=("from-openai.bin", data), purpose="vision")
    p = mount.path / "files" / "vision" / "from-openai.bin"
    assert p.read_bytes() == data  # no waiting: the request has returned
    (mount.path / "from-mount").mkdir()
    written = mount.path / "from-mount" / "notes.txt"
    written.write_bytes(b"# written in the mount\n")
    g = c.files.retrieve(file_id("from-mount/notes.txt"))
    assert g.filename == "notes.txt" and g.bytes == written.stat().st_size
    assert c.files.content(g.id).content == b"# written in the mount\n"
    assert {f.id, g.id} <= {x.id for x in c.files.list()}
    c.files.delete(f.id)
    assert not p.exists()
    written.unlink()
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(g.id)
