"""HTTP layer: random requests never get a 500, always get JSON errors, never stop the server.

Hypothesis builds requests from the pieces that make the routes overlap (sessions/, bulk,
:content), keys valid and not, odd numbers, percent-escapes and random bodies and headers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import SCALE
from httputil import Server, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)

SEGMENTS = st.one_of(
    st.sampled_from(["sessions", "bulk", "a", "b.txt", "..", ".", "", "x:content", ":content",
                     "%2E%2E", "%00", "%ff", "%3A", "caf%C3%A9", "-", "...", "k" * 300]),
    st.text(alphabet="abcXYZ019_.-:%/ ", min_size=1, max_size=12),
)
NUMBERS = st.one_of(st.integers(-(2**70), 2**70).map(str),
                    st.sampled_from(["", "x", "1.5", "1e3", "-0", "0x10", " 1"]))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], dict[str, str], bytes]:
    method = draw(st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "PATCH"]))
    segments = draw(st.lists(SEGMENTS, max_size=4))
    suffix = draw(st.sampled_from(["", ":content", "/"]))
    path = "/v1/artifacts" + "".join("/" + s for s in segments) + suffix
    params = draw(st.dictionaries(
        st.sampled_from(["start_index", "limit", "prefix", "offset"]), NUMBERS, max_size=3))
    headers = draw(st.dictionaries(
        st.sampled_from(["Upload-Offset", "Range", "Content-Type", "If-Range"]),
        st.one_of(NUMBERS, st.sampled_from(["bytes=0-1", "bytes=-5", "bytes=9-", "bytes=1-0",
                                            "application/json", "text/plain"])),
        max_size=3))
    body = draw(st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.sampled_from([b'{"key": "k", "mime_type": "a/b", "size": 3}',
                         b'{"artifacts": [{"key": "k"}]}', b"[]", b"null", b'{"key": 1}']),
    ))
    return method, path, params, headers, body


# pytest-trio runs each example in its own trio.run, so each example serves its own store
# (the fixture-per-test server would belong to another loop). One store per test keeps
# examples cheap; the artifacts they create or delete do not change what must hold.
@settings(max_examples=80 * SCALE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(requests(), min_size=1, max_size=12))
async def test_random_requests_get_json_answers_below_500(
        tmp_path: Path,
        batch: list[tuple[str, str, dict[str, str], dict[str, str], bytes]]) -> None:
    async with running_server(tmp_path / "data") as server:
        await _seed(server)
        for method, path, params, headers, body in batch:
            try:
                r = await server.client.request(method, path, params=params,
                                                headers=headers, content=body)
            except (httpx.InvalidURL, httpx.LocalProtocolError):
                continue  # httpx itself refuses to send it
            assert r.status_code < 500
            if r.status_code >= 400 and method != "HEAD":
                assert isinstance(r.json()["detail"], str)


async def _seed(server: Server) -> None:
    if (await server.client.get("/v1/artifacts/k")).status_code != 200:
        await server.put("k", b"abc")
        await server.put("sessions/s", b"s")
        await server.put("bulk", b"b")
