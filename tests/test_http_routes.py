"""HTTP layer: every route of DESIGN §4 against a real server on loopback, good and bad input.

Every response is checked by the fixture never to be a 500, and the server must still answer
after each test (tests/httputil.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from httputil import Server, raw_request, running_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        yield srv

# A key using every allowed character, in components as odd as the rules allow.
EVERY_CHAR_KEY = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ/abcdefghijklmnopqrstuvwxyz/0123456789"
                  "/_.-/.../-x-/a.b_c-d/..hidden/trailing.")
LONGEST_KEY = "/".join(["k" * 255] * 3 + ["m" * 200, "z" * 55])  # 1024 bytes

BAD_KEYS = [
    ("", "empty"),
    ("/a", "start or end"),
    ("a/", "start or end"),
    ("a//b", "empty component"),
    ("a/./b", "'.'"),
    ("a/../b", "'..'"),
    ("..", "'..'"),
    ("a b", "' '"),
    ("a:b", "':'"),
    ("caf\u00e9", "allowed characters"),
    ("x" * 1025, "1024"),
    ("a/" + "y" * 256, "255"),
    ("a\\b", "allowed characters"),
]


def detail(r) -> str:
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), r.text
    return body["detail"]


# --- POST /v1/artifacts --------------------------------------------------------------------


async def test_create_session_gives_absolute_uri_that_works(server: Server) -> None:
    r = await server.client.post("/v1/artifacts", json={
        "key": "data/a.jsonl", "mime_type": "application/jsonl", "size": 3})
    assert r.status_code == 200
    s = r.json()
    assert s["offset"] == 0 and s["size"] == 3 and len(s["id"]) >= 16
    assert s["uri"] == f"{server.url}/v1/artifacts/sessions/{s['id']}"
    info = (await server.client.get(s["uri"])).json()
    assert info == s


@pytest.mark.parametrize(("key", "why"), BAD_KEYS)
async def test_create_session_refuses_bad_keys(server: Server, key: str, why: str) -> None:
    r = await server.client.post("/v1/artifacts", json={
        "key": key, "mime_type": "text/plain", "size": 1})
    assert r.status_code == 400
    assert why in detail(r)


@pytest.mark.parametrize("body", [
    {"key": "k", "mime_type": "text", "size": 1},
    {"key": "k", "mime_type": "", "size": 1},
    {"key": "k", "mime_type": "text/plain stuff", "size": 1},
    {"key": "k", "mime_type": "text/plain", "size": -1},
    {"key": "k", "mime_type": "text/plain", "size": 2**64},
    {"key": "k", "mime_type": "text/plain", "size": 10**400},
    {"key": "k", "mime_type": "text/plain", "size": "lots"},
    {"key": "k", "mime_type": "text/plain", "size": 1.5},
    {"key": "k", "mime_type": "text/plain", "size": "1"},
    {"key": "k", "mime_type": "text/plain", "size": True},
    {"key": "k", "mime_type": 5, "size": 1},
    {"key": "k", "mime_type": "text/plain", "size": None},
    {"key": 5, "mime_type": "text/plain", "size": 1},
    {"key": ["k"], "mime_type": "text/plain", "size": 1},
    {"mime_type": "text/plain", "size": 1},
    {"key": "k", "size": 1},
    {"key": "k", "mime_type": "text/plain"},
    {},
    [],
    "k",
    None,
])
async def test_create_session_refuses_bad_bodies(server: Server, body: object) -> None:
    r = await server.client.post("/v1/artifacts", json=body)
    assert r.status_code == 400, r.text
    assert detail(r)
    assert (await server.client.get("/v1/artifacts")).json()["data"] == []


@pytest.mark.parametrize(("content", "content_type"), [
    (b'{"key": "k", "mime_type": "text/plain", "size": 1}', "text/plain"),
    (b'{"key": "k", "mime_type": "text/plain", "size": 1}', "application/x-www-form-urlencoded"),
    (b'{"key": "k", "mime_type": "text/plain", "size": 1}', "multipart/form-data; boundary=x"),
    (b'{"key": "k", "mime_type": "text/plain", "size": 1}', None),
    (b"key=k&mime_type=text/plain&size=1", "application/x-www-form-urlencoded"),
    (b'{"key": "k", "mime_type": ', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"", "application/json"),
])
async def test_create_session_wants_a_json_body(
        server: Server, content: bytes, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await server.client.post("/v1/artifacts", content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert "body" in detail(r) or "JSON" in detail(r)


async def test_oversized_json_body_is_refused(server: Server) -> None:
    big = b'{"key": "' + b"k" * (17 << 20) + b'", "mime_type": "text/plain", "size": 1}'
    r = await server.client.post("/v1/artifacts", content=big,
                                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "larger than" in detail(r)

    async def chunked():  # no Content-Length: the cap is found while reading
        for _ in range(17):
            yield b" " * (1 << 20)

    r = await server.client.post("/v1/artifacts", content=chunked(),
                                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "larger than" in detail(r)
    assert (await server.client.get("/v1/artifacts")).json()["data"] == []


async def test_oversized_upload_body_gets_its_400_not_a_reset(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "o", "mime_type": "a/b", "size": 10})).json()
    r = await c.post(s["uri"], content=b"x" * (20 << 20))
    assert r.status_code == 400 and "exceeds" in detail(r)

    async def chunked():
        for _ in range(20):
            yield b"y" * (1 << 20)

    r = await c.post(s["uri"], content=chunked())
    assert r.status_code == 400 and "exceeds" in detail(r)
    # Every other refusal of a big body is read too, not met with a reset.
    big = b"x" * (20 << 20)
    r = await c.post(s["uri"], content=big, headers={"Upload-Offset": "abc"})
    assert r.status_code == 400 and "offset" in detail(r).lower()
    r = await c.post(s["uri"], content=big, headers={"Upload-Offset": "3"})
    assert r.status_code == 409
    assert (await c.post("/v1/artifacts/sessions/nope", content=big)).status_code == 404
    assert (await c.post("/nowhere", content=big)).status_code == 404
    assert (await c.put("/v1/artifacts/x", content=big)).status_code == 405
    assert (await c.get(s["uri"])).json()["offset"] == 0


async def test_create_session_over_a_file_or_directory_is_409(server: Server) -> None:
    await server.put("a/b", b"x")
    for key, word in (("a", "directory"), ("a/b/c", "file")):
        r = await server.client.post("/v1/artifacts", json={
            "key": key, "mime_type": "text/plain", "size": 1})
        assert r.status_code == 409
        assert word in detail(r)


# --- POST /v1/artifacts/sessions/{id} --------------------------------------------------------


async def test_upload_in_chunks_returns_null_then_the_artifact(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "t.txt", "mime_type": "text/plain",
                                             "size": 11})).json()
    r = await c.post(s["uri"], content=b"hello ", headers={"Upload-Offset": "0"})
    assert r.status_code == 200 and r.json() is None
    assert r.headers["Upload-Offset"] == "6"
    assert (await c.get(s["uri"])).json()["offset"] == 6
    assert (await c.get("/v1/artifacts/t.txt")).status_code == 404  # invisible until commit
    r = await c.post(s["uri"], content=b"world", params={"offset": 6})
    assert r.status_code == 200
    art = r.json()
    assert art["key"] == "t.txt" and art["size"] == 11 and art["mime_type"] == "text/plain"
    assert art["uri"] == f"{server.url}/v1/artifacts/t.txt:content"
    assert (await c.get(art["uri"])).content == b"hello world"
    # The session is gone once committed.
    assert (await c.post(s["uri"], content=b"x")).status_code == 404
    assert (await c.get(s["uri"])).status_code == 404


async def test_repeated_chunk_is_409_with_the_true_offset(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "r", "mime_type": "a/b", "size": 8})).json()
    assert (await c.post(s["uri"], content=b"abcd", headers={"Upload-Offset": "0"})
            ).status_code == 200
    r = await c.post(s["uri"], content=b"abcd", headers={"Upload-Offset": "0"})
    assert r.status_code == 409
    assert r.json()["offset"] == 4 and r.headers["Upload-Offset"] == "4"
    assert "offset" in detail(r)
    r = await c.post(s["uri"], content=b"efgh", params={"offset": 0})
    assert r.status_code == 409
    assert (await c.get(s["uri"])).json()["offset"] == 4
    art = (await c.post(s["uri"], content=b"efgh", headers={"Upload-Offset": "4"})).json()
    assert (await c.get(art["uri"])).content == b"abcdefgh"


@pytest.mark.parametrize(("headers", "params"), [
    ({"Upload-Offset": "abc"}, {}),
    ({"Upload-Offset": "-1"}, {}),
    ({"Upload-Offset": "1.5"}, {}),
    ({}, {"offset": "x"}),
    ({}, {"offset": "-5"}),
])
async def test_upload_refuses_bad_offsets(server: Server, headers: dict, params: dict) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "o", "mime_type": "a/b", "size": 4})).json()
    r = await c.post(s["uri"], content=b"ab", headers=headers, params=params)
    assert r.status_code == 400, r.text
    assert "offset" in detail(r).lower()
    assert (await c.get(s["uri"])).json()["offset"] == 0


async def test_delete_under_sessions_is_the_artifact_never_a_live_session(server: Server
                                                                        ) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "s", "mime_type": "a/b", "size": 2})).json()
    r = await c.delete(f"/v1/artifacts/sessions/{s['id']}")
    assert r.status_code == 409 and "live upload session" in detail(r)
    assert (await c.get(s["uri"])).json()["offset"] == 0  # still there
    await server.put("sessions/abc", b"x")
    assert (await c.delete("/v1/artifacts/sessions/abc")).status_code == 204
    assert (await c.get("/v1/artifacts/sessions/abc")).status_code == 404
    assert (await c.delete("/v1/artifacts/sessions/abc")).status_code == 404


async def test_header_and_query_offsets_that_disagree_are_a_mismatch(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "o", "mime_type": "a/b", "size": 4})).json()
    r = await c.post(s["uri"], content=b"ab", headers={"Upload-Offset": "0"},
                     params={"offset": "1"})
    assert r.status_code == 409 and "disagree" in detail(r)
    assert r.json()["offset"] == 0 and r.headers["Upload-Offset"] == "0"
    assert (await c.get(s["uri"])).json()["offset"] == 0
    r = await c.post("/v1/artifacts/sessions/nope", content=b"ab",
                     headers={"Upload-Offset": "0"}, params={"offset": "1"})
    assert r.status_code == 404


async def test_a_whole_number_size_may_be_written_as_a_float(server: Server) -> None:
    """JSON does not tell 1 from 1.0, and neither does JSON Schema's integer."""
    c = server.client
    r = await c.post("/v1/artifacts", json={"key": "f", "mime_type": "a/b", "size": 1.0})
    assert r.status_code == 200 and r.json()["size"] == 1


async def test_huge_offset_is_a_mismatch(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "o", "mime_type": "a/b", "size": 4})).json()
    r = await c.post(s["uri"], content=b"ab", headers={"Upload-Offset": str(10**30)})
    assert r.status_code == 409 and r.json()["offset"] == 0


async def test_oversized_body_is_refused_whole(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "o", "mime_type": "a/b", "size": 4})).json()
    await c.post(s["uri"], content=b"ab")
    r = await c.post(s["uri"], content=b"cdef")
    assert r.status_code == 400 and "exceeds" in detail(r)
    assert (await c.get(s["uri"])).json()["offset"] == 2

    async def chunked():  # no Content-Length: the store finds out while streaming
        yield b"c"
        yield b"def"

    r = await c.post(s["uri"], content=chunked())
    assert r.status_code == 400 and "exceeds" in detail(r)
    assert (await c.get(s["uri"])).json()["offset"] == 2
    art = (await c.post(s["uri"], content=b"cd")).json()
    assert (await c.get(art["uri"])).content == b"abcd"


async def test_upload_body_is_raw_bytes_whatever_its_content_type(server: Server) -> None:
    c = server.client
    payloads = [
        (b'{"not": "parsed"}', "application/json"),
        (b"a=1&b=2", "application/x-www-form-urlencoded"),
        (b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
        (b"\x00\xff\x00", None),
    ]
    for i, (data, ctype) in enumerate(payloads):
        s = (await c.post("/v1/artifacts", json={
            "key": f"raw/{i}", "mime_type": "application/octet-stream",
            "size": len(data)})).json()
        r = await c.post(s["uri"], content=data,
                         headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 200, r.text
        assert (await c.get(r.json()["uri"])).content == data


async def test_empty_artifact_commits_on_first_upload(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "e", "mime_type": "a/b", "size": 0})).json()
    r = await c.post(s["uri"], content=b"")
    assert r.status_code == 200 and r.json()["size"] == 0
    assert (await c.get(r.json()["uri"])).content == b""


async def test_upload_to_unknown_session_is_404(server: Server) -> None:
    for sid in ("nope", "a" * 300, "%00", "..."):
        r = await server.client.post(f"/v1/artifacts/sessions/{sid}", content=b"x")
        assert r.status_code == 404, (sid, r.text)
    r = await server.client.post("/v1/artifacts/sessions/a/b", content=b"x")
    assert r.status_code == 405


# --- GET /v1/artifacts/sessions/{x}: a session, else the artifact sessions/x ---------------


async def test_sessions_path_is_the_session_else_the_artifact(server: Server) -> None:
    c = server.client
    art = await server.put("sessions/abc", b"data")
    await server.put("sessions/deep/er", b"deeper")
    s = (await c.post("/v1/artifacts", json={"key": "k", "mime_type": "a/b", "size": 2})).json()
    assert (await c.get(f"/v1/artifacts/sessions/{s['id']}")).json() == s
    r = await c.get("/v1/artifacts/sessions/abc")
    assert r.status_code == 200 and r.json() == art
    assert (await c.get(art["uri"])).content == b"data"
    assert (await c.get("/v1/artifacts/sessions/deep/er")).json()["size"] == 6
    r = await c.get("/v1/artifacts/sessions/nothing")
    assert r.status_code == 404 and "sessions/nothing" in detail(r)
    listed = [a["key"] for a in (await c.get("/v1/artifacts")).json()["data"]]
    assert listed == ["sessions/abc", "sessions/deep/er"]
    assert (await c.delete("/v1/artifacts/sessions/abc")).status_code == 204
    assert (await c.get("/v1/artifacts/sessions/abc")).status_code == 404
    # The session is untouched by all that.
    assert (await c.get(s["uri"])).json()["offset"] == 0


# --- GET /v1/artifacts ---------------------------------------------------------------------


async def test_list_pages_in_key_order_with_prefix(server: Server) -> None:
    c = server.client
    keys = [f"p/{i:02d}" for i in range(7)] + ["q/x", "a", "p0"]
    for k in keys:
        await server.put(k, k.encode())
    page = (await c.get("/v1/artifacts")).json()
    assert [a["key"] for a in page["data"]] == sorted(keys)
    assert page["has_more"] is False
    got: list[str] = []
    start = 0
    while True:
        r = await c.get("/v1/artifacts", params={"start_index": start, "limit": 3,
                                                 "prefix": "p/"})
        page = r.json()
        got += [a["key"] for a in page["data"]]
        start += len(page["data"])
        # url is absolute and gives this same page again
        assert (await c.get(page["url"])).json()["data"] == page["data"]
        if not page["has_more"]:
            break
    assert got == [f"p/{i:02d}" for i in range(7)]
    a = (await c.get("/v1/artifacts", params={"prefix": "q"})).json()["data"][0]
    assert set(a) >= {"key", "mime_type", "uri", "size", "created_at"}
    assert (await c.get(a["uri"])).content == b"q/x"


@pytest.mark.parametrize("params", [
    {"start_index": -1}, {"limit": -1}, {"start_index": "x"}, {"limit": "1e3"},
    {"start_index": 10**30}, {"start_index": 2**63}, {"limit": ""},
    {"prefix": "a b"}, {"prefix": "a:b"}, {"prefix": "x" * 2000},
])
async def test_list_refuses_bad_params(server: Server, params: dict) -> None:
    r = await server.client.get("/v1/artifacts", params=params)
    assert r.status_code == 400, r.text
    assert detail(r)


async def test_list_with_huge_but_valid_numbers(server: Server) -> None:
    await server.put("x", b"1")
    r = await server.client.get("/v1/artifacts", params={"start_index": 2**63 - 1})
    assert r.status_code == 200 and r.json()["data"] == [] and not r.json()["has_more"]
    r = await server.client.get("/v1/artifacts", params={"limit": 10**30})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = await server.client.get("/v1/artifacts", params={"limit": 0})
    assert r.status_code == 200 and r.json()["data"] == [] and r.json()["has_more"]


# --- GET / DELETE /v1/artifacts/{key} ------------------------------------------------------


async def test_every_allowed_character_round_trips(server: Server) -> None:
    c = server.client
    for key in (EVERY_CHAR_KEY, LONGEST_KEY, "bulk", "sessions", "-", "_", "...", "a.b.c"):
        art = await server.put(key, key.encode(), "text/plain")
        assert art["key"] == key
        assert (await c.get(f"/v1/artifacts/{key}")).json() == art
        r = await c.get(f"/v1/artifacts/{key}:content")
        assert r.content == key.encode()
    keys = [a["key"] for a in (await c.get("/v1/artifacts")).json()["data"]]
    assert EVERY_CHAR_KEY in keys and LONGEST_KEY in keys
    for key in (EVERY_CHAR_KEY, LONGEST_KEY):
        assert (await c.delete(f"/v1/artifacts/{key}")).status_code == 204
        assert (await c.get(f"/v1/artifacts/{key}")).status_code == 404


async def test_get_artifact_errors(server: Server) -> None:
    c = server.client
    await server.put("dir/file", b"x")
    assert (await c.get("/v1/artifacts/nope")).status_code == 404
    r = await c.get("/v1/artifacts/dir")
    assert r.status_code == 404 and "directory" in detail(r)
    for raw in ("a%20b", "a%3Ab", "a//b", "a/%2E%2E/b", "a/%2E/b", "a%00b", "caf%C3%A9", ""):
        r = await c.get(f"/v1/artifacts/{raw}")
        assert r.status_code == 400, (raw, r.text)
        assert (await c.delete(f"/v1/artifacts/{raw}")).status_code == 400
    assert (await c.get("/v1/artifacts/" + "x" * 1025)).status_code == 400


async def test_delete(server: Server) -> None:
    c = server.client
    await server.put("d/one", b"1")
    r = await c.delete("/v1/artifacts/d/one")
    assert r.status_code == 204 and r.content == b""
    assert (await c.get("/v1/artifacts/d/one")).status_code == 404
    assert (await c.get("/v1/artifacts/d/one:content")).status_code == 404
    assert (await c.delete("/v1/artifacts/d/one")).status_code == 404
    assert (await c.delete("/v1/artifacts/d")).status_code == 404  # a directory, not an artifact


# --- POST /v1/artifacts/bulk vs the artifact 'bulk' ----------------------------------------


async def test_bulk_delete_and_the_artifact_named_bulk(server: Server) -> None:
    c = server.client
    for k in ("bulk", "b1", "b2", "b3"):
        await server.put(k, k.encode())
    assert (await c.get("/v1/artifacts/bulk")).json()["key"] == "bulk"
    assert (await c.get("/v1/artifacts/bulk:content")).content == b"bulk"
    r = await c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": "b1"}, {"key": "b2"}]})
    assert r.status_code == 204
    keys = [a["key"] for a in (await c.get("/v1/artifacts")).json()["data"]]
    assert keys == ["b3", "bulk"]
    # all or nothing: one absent or invalid key and nothing goes
    r = await c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": "b3"}, {"key": "no"}]})
    assert r.status_code == 404 and "no" in detail(r)
    r = await c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": "b3"}, {"key": "a b"}]})
    assert r.status_code == 400
    assert (await c.get("/v1/artifacts/b3")).status_code == 200
    assert (await c.post("/v1/artifacts/bulk", json={"artifacts": []})).status_code == 204
    assert (await c.delete("/v1/artifacts/bulk")).status_code == 204
    assert (await c.get("/v1/artifacts/bulk")).status_code == 404
    assert [a["key"] for a in (await c.get("/v1/artifacts")).json()["data"]] == ["b3"]


@pytest.mark.parametrize("body", [
    {}, [], {"artifacts": "b3"}, {"artifacts": [{"nokey": 1}]}, {"artifacts": [{"key": 5}]},
    {"artifacts": None}, "x",
])
async def test_bulk_delete_refuses_bad_bodies(server: Server, body: object) -> None:
    await server.put("b3", b"x")
    r = await server.client.post("/v1/artifacts/bulk", json=body)
    assert r.status_code == 400, r.text
    r = await server.client.post("/v1/artifacts/bulk", content=b"artifacts=b3",
                                 headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    assert (await server.client.get("/v1/artifacts/b3")).status_code == 200


# --- unknown routes, methods, OpenAPI, broken HTTP ---------------------------------------------


async def test_unknown_routes_and_methods_are_json(server: Server) -> None:
    c = server.client
    r = await c.get("/nope")
    assert r.status_code == 404 and "no route" in detail(r)
    r = await c.get("/v2/artifacts")
    assert r.status_code == 404
    for method, path in (("PUT", "/v1/artifacts/x"), ("PATCH", "/v1/artifacts"),
                         ("POST", "/v1/artifacts/x"), ("DELETE", "/v1/artifacts"),
                         ("PUT", "/v1/artifacts/sessions/x")):
        r = await c.request(method, path)
        assert r.status_code == 405, (method, path)
        assert "not allowed" in detail(r)
        assert r.headers["content-type"] == "application/json"
    # Allow names every method the path takes, across the routes that share it.
    for path, allowed in (("/v1/artifacts", "GET, POST"), ("/v1/artifacts/a/b", "DELETE, GET"),
                          ("/v1/artifacts/bulk", "DELETE, GET, POST"),
                          ("/v1/artifacts/sessions/x", "DELETE, GET, POST"),
                          ("/v1/artifacts/a:content", "GET, HEAD")):
        r = await c.request("PATCH", path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers)


async def test_openapi_document_lists_the_routes(server: Server) -> None:
    doc = (await server.client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert set(paths["/v1/artifacts"]) == {"get", "post"}
    assert set(paths["/v1/artifacts/bulk"]) == {"get", "post", "delete"}
    assert set(paths["/v1/artifacts/sessions/{upload_id}"]) == {"get", "post", "delete"}
    assert set(paths["/v1/artifacts/{key}"]) == {"get", "delete"}
    assert "get" in paths["/v1/artifacts/{key}:content"]
    # Validation errors are 400 here: the document must not promise FastAPI's 422.
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())
    assert "400" in paths["/v1/artifacts"]["post"]["responses"]


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/artifacts HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/artifacts/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS hello
])
async def test_broken_http_does_not_hurt_the_server(server: Server, garbage: bytes) -> None:
    answer = await raw_request(server.port, garbage)
    assert not answer.startswith(b"HTTP/1.1 500")
    assert (await server.client.get("/v1/artifacts")).status_code == 200
