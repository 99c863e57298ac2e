"""Store layer, property-based: random operation sequences against a plain in-memory model.

The model is a dict from path to ``Dir`` or ``File`` plus a list of upload sessions, with the
rules of DESIGN §1-3 written out as plainly as possible. After every step the store's artifacts
(list_artifacts and their bytes), its tree (readdir from the root) and its sessions must equal
the model's, and a refused operation must raise the error the model predicts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import SCALE
from hypothesis import given, settings
from hypothesis import strategies as st
from storeutil import all_artifacts, check_invariants, read, sha

from artifactfs import (
    ArtifactError,
    Conflict,
    InvalidArgument,
    InvalidKey,
    NotEmpty,
    NotFound,
    open_store,
)
from artifactfs.store import ArtifactStore
from artifactfs.store.schema import ROOT_ID

DIR = "dir"


@dataclass
class File:
    content: bytes
    mime: str


@dataclass
class Session:
    id: str
    key: str
    size: int
    data: bytearray = field(default_factory=bytearray)
    mime: str = "text/plain"


@dataclass
class Model:
    nodes: dict[str, Any] = field(default_factory=dict)  # key -> DIR | File
    sessions: list[Session] = field(default_factory=list)

    def parent(self, key: str) -> str:
        return key.rpartition("/")[0]

    def kind(self, key: str) -> str | None:
        if key == "":
            return DIR
        n = self.nodes.get(key)
        return None if n is None else DIR if n == DIR else "file"

    def children(self, key: str) -> list[str]:
        prefix = key + "/" if key else ""
        return [k for k in self.nodes if k.startswith(prefix) and "/" not in k[len(prefix):]]

    def can_hold_file(self, key: str) -> type[ArtifactError] | None:
        if self.kind(key) == DIR:
            return Conflict
        p = self.parent(key)
        while p:
            if self.kind(p) == "file":
                return Conflict
            p = self.parent(p)
        return None

    def commit(self, key: str, content: bytes, mime: str) -> None:
        p = self.parent(key)
        while p and p not in self.nodes:
            self.nodes[p] = DIR
            p = self.parent(p)
        self.nodes[key] = File(content, mime)


NAMES = ["a", "b", "c"]
BAD_KEYS = ("", "a//b", "a/../b", "/a", "a/", "a b", "x" * 256)
fresh_keys = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
contents = st.binary(max_size=40)
mimes = st.sampled_from(["text/plain", "application/json"])


def op_strategy(m: Model) -> st.SearchStrategy[tuple[Any, ...]]:
    """Operations biased towards the paths that exist, so that rules meet real clashes."""
    existing = sorted(m.nodes)
    files = sorted(k for k, v in m.nodes.items() if isinstance(v, File))
    near = [fresh_keys]
    if existing:
        near += [st.sampled_from(existing)] * 2
        # A new name inside an existing path: where clashes with files happen.
        near.append(st.tuples(st.sampled_from(existing), st.sampled_from(NAMES))
                    .map("/".join))
    valid = st.one_of(*near)
    file_keys = st.sampled_from(files) if files else fresh_keys
    key = st.one_of(*[valid] * 7, st.sampled_from(BAD_KEYS))
    put = st.tuples(st.just("put"), key, contents, st.integers(1, 3), mimes)
    return st.one_of(
        put, put,
        st.tuples(st.just("put"), file_keys, contents, st.integers(1, 3), mimes),
        st.tuples(st.just("session"), key, st.integers(-1, 30)),
        st.tuples(st.just("upload"), st.integers(0, 5), st.integers(0, 20),
                  st.sampled_from(["right", "right", "none", "wrong"])),
        st.tuples(st.just("upload"), st.integers(0, 5), st.integers(0, 20), st.just("right")),
        st.tuples(st.just("delete"), st.one_of(file_keys, key)),
        st.tuples(st.just("bulk"), st.lists(st.one_of(file_keys, file_keys, key), max_size=3)),
        st.tuples(st.just("mkdir"), valid),
        st.tuples(st.just("rmdir"), valid),
        st.tuples(st.just("unlink"), st.one_of(file_keys, valid)),
        st.tuples(st.just("rename"), valid, valid, st.booleans()),
        st.tuples(st.just("rename"), st.one_of(file_keys, valid), valid, st.just(False)),
        st.tuples(st.just("mount_write"), st.one_of(file_keys, valid), contents),
    )


class Skip(Exception):
    """The operation cannot be expressed (the mount never sees an id for a missing parent)."""


class Runner:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.m = Model()
        self.upload_target: Session | None = None

    def id_of(self, key: str) -> int:
        if self.m.kind(key) is None:
            raise Skip
        e = self.store.meta.entry_by_key(key)
        assert e is not None, f"model has {key!r}, the store does not"
        return e.id

    async def run(self, op: tuple[Any, ...]) -> None:
        if op[0] == "upload" and self.m.sessions:
            # Picked before predict(), which may retire the session from the model.
            self.upload_target = self.m.sessions[op[1] % len(self.m.sessions)]
        try:
            expected = self.predict(op)
        except Skip:
            return
        try:
            await self.perform(op)
        except ArtifactError as exc:
            assert type(exc) is expected, f"{op}: raised {exc!r}, model expected {expected}"
            return
        assert expected is None, f"{op}: succeeded, model expected {expected.__name__}"

    # The model's answer: the error class it expects, applying the change when there is none.
    def predict(self, op: tuple[Any, ...]) -> type[ArtifactError] | None:
        m = self.m
        name = op[0]
        if name in ("put", "session"):
            key = op[1]
            if key in BAD_KEYS:
                return InvalidKey
            if name == "session" and op[2] < 0:
                return InvalidArgument
            err = m.can_hold_file(key)
            if err or name == "session":
                return err
            return self._commit(key, op[2], op[4])
        if name == "upload":
            if not m.sessions:
                raise Skip
            s = m.sessions[op[1] % len(m.sessions)]
            data = bytes(range(op[2]))
            if op[3] == "wrong":
                return Conflict
            if len(s.data) + len(data) > s.size:
                return InvalidArgument
            s.data += data
            if len(s.data) < s.size:
                return None
            m.sessions.remove(s)
            return m.can_hold_file(s.key) or self._commit(s.key, bytes(s.data), s.mime)
        if name == "delete":
            key = op[1]
            if key in BAD_KEYS:
                return InvalidKey
            if m.kind(key) != "file":
                return NotFound
            del m.nodes[key]
            return None
        if name == "bulk":
            keys = op[1]
            if any(k in BAD_KEYS for k in keys):
                return InvalidKey
            if any(m.kind(k) != "file" for k in keys):
                return NotFound
            for k in set(keys):
                del m.nodes[k]
            return None
        key = op[1]
        pkey = m.parent(key)
        self.id_of(pkey)  # Skip when the parent is missing
        if name == "mkdir":
            if m.kind(pkey) != DIR:
                return Conflict
            if m.kind(key) is not None:
                return Conflict
            m.nodes[key] = DIR
            return None
        if name == "rmdir":
            if m.kind(key) is None or m.kind(pkey) != DIR:
                return NotFound
            if m.kind(key) != DIR:
                return Conflict
            if m.children(key):
                return NotEmpty
            del m.nodes[key]
            return None
        if name == "unlink":
            if m.kind(key) is None or m.kind(pkey) != DIR:
                return NotFound
            if m.kind(key) == DIR:
                return Conflict
            del m.nodes[key]
            return None
        if name == "mount_write":
            if m.kind(pkey) != DIR:
                return Conflict
            if m.kind(key) == DIR:
                return Conflict
            old = m.nodes.get(key)
            m.nodes[key] = File(op[2], old.mime if old else "application/octet-stream")
            return None
        assert name == "rename"
        src, dst, noreplace = op[1], op[2], op[3]
        dkey = m.parent(dst)
        self.id_of(dkey)
        if m.kind(src) is None or m.kind(pkey) != DIR:
            return NotFound
        if m.kind(dkey) != DIR:
            return Conflict
        if src == dst:
            return None
        if m.kind(dst) is not None and noreplace:
            return Conflict
        if m.kind(src) == DIR:
            if dst.startswith(src + "/"):
                return InvalidArgument
            if m.kind(dst) == "file":
                return Conflict
            if m.kind(dst) == DIR and m.children(dst):
                return NotEmpty
        elif m.kind(dst) == DIR:
            return Conflict
        moved = {k: v for k, v in m.nodes.items() if k == src or k.startswith(src + "/")}
        for k in moved:
            del m.nodes[k]
        m.nodes.pop(dst, None)
        for k, v in moved.items():
            m.nodes[dst + k[len(src):]] = v
        return None

    def _commit(self, key: str, content: bytes, mime: str) -> None:
        self.m.commit(key, content, mime)
        return None

    async def perform(self, op: tuple[Any, ...]) -> None:
        store, name = self.store, op[0]
        if name == "put":
            _, key, content, chunks, mime = op
            s = await store.create_upload_session(key, mime, len(content))
            step = max(1, -(-len(content) // chunks))
            pieces = [content[i:i + step] for i in range(0, len(content), step)] or [b""]
            for piece in pieces:
                await store.upload_content_to_session(s.id, piece)
        elif name == "session":
            s = await store.create_upload_session(op[1], "text/plain", op[2])
            self.m.sessions.append(Session(s.id, op[1], op[2]))
        elif name == "upload":
            # predict() already picked the session and moved its model forward.
            s = self.upload_target
            assert s is not None
            row = store.meta.session(s.id)
            offset = {"right": row.offset if row else 0, "none": None,
                      "wrong": (row.offset if row else 0) + 1}[op[3]]
            await store.upload_content_to_session(s.id, bytes(range(op[2])), offset)
        elif name == "delete":
            await store.delete_artifact(op[1])
        elif name == "bulk":
            await store.bulk_delete_artifacts(op[1])
        elif name in ("mkdir", "rmdir", "unlink", "mount_write"):
            key = op[1]
            parent_id = self.store.meta.entry_by_key(key.rpartition("/")[0])
            assert parent_id is not None
            base = key.rpartition("/")[2]
            if name == "mkdir":
                store.mkdir(parent_id.id, base, 0o755, 0, 0)
            elif name == "rmdir":
                store.rmdir(parent_id.id, base)
            elif name == "unlink":
                store.unlink(parent_id.id, base)
            else:
                existing = store.meta.child(parent_id.id, base)
                if existing is None:
                    _, ws = store.create_file(parent_id.id, base, 0o644, 0, 0)
                else:
                    ws = await store.open_write(existing.id, truncate=True)
                os.pwrite(ws.fd, op[2], 0)
                ws.wrote()
                await store.release_write(ws)
        else:
            src, dst = op[1], op[2]
            sp = store.meta.entry_by_key(src.rpartition("/")[0])
            dp = store.meta.entry_by_key(dst.rpartition("/")[0])
            assert sp is not None and dp is not None
            store.rename(sp.id, src.rpartition("/")[2], dp.id, dst.rpartition("/")[2],
                         1 if op[3] else 0)

    async def compare(self) -> None:
        store, m = self.store, self.m
        files = {k: v for k, v in m.nodes.items() if isinstance(v, File)}
        listed = await all_artifacts(store, page=7)
        assert [a["key"] for a in listed] == sorted(files, key=str.encode)
        for a in listed:
            f = files[a["key"]]
            assert (a["size"], a["sha256"], a["mime_type"]) == (
                len(f.content), sha(f.content), f.mime), a["key"]
            assert read(store, a["key"]) == f.content
        tree: dict[str, str] = {}
        stack = [(ROOT_ID, "")]
        while stack:
            node, key = stack.pop()
            for e in store.readdir(node, 0, 10_000):
                assert e.key == (f"{key}/{e.name}" if key else e.name)
                tree[e.key] = e.kind
                if e.is_dir:
                    stack.append((e.id, e.key))
        assert tree == {k: DIR if v == DIR else "file" for k, v in m.nodes.items()}
        for s in m.sessions:
            info = await store.get_upload_session_info(s.id)
            assert (info.offset, info.size) == (len(s.data), s.size)
        assert {r.id for r in store.meta.all_sessions()} == {s.id for s in m.sessions}


@settings(max_examples=100 * SCALE)
@given(data=st.data())
async def test_store_matches_the_model(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            runner = Runner(await stack.enter_async_context(open_store(tmp)))
            for _ in range(data.draw(st.integers(0, 50), label="steps")):
                # A restart now and then (each costs a few fsyncs): 1 step in 40.
                restart = data.draw(st.integers(0, 39), label="restart") == 0
                op = ("restart",) if restart else data.draw(op_strategy(runner.m))
                if restart:
                    # Close and reopen: the tree, the artifacts and the sessions all stay.
                    await stack.aclose()
                    runner.store = await stack.enter_async_context(open_store(tmp))
                else:
                    await runner.run(op)
                await runner.compare()
            check_invariants(runner.store)
            runner.store.flush()
            check_invariants(runner.store)
        async with open_store(tmp) as store:  # and the same after a restart
            runner.store = store
            await runner.compare()


@pytest.mark.parametrize("seed", range(3))
async def test_model_runner_smoke(seed: int) -> None:
    """A fixed sequence touching every rule, so a broken runner fails loudly, not vacuously."""
    steps: list[tuple[Any, ...]] = [
        ("put", "a/b", b"x", 1, "text/plain"), ("put", "a/b/c", b"y", 1, "text/plain"),
        ("mkdir", "a/b"), ("mkdir", "c"), ("rename", "a", "c", False), ("rename", "a", "b", False),
        ("rmdir", "c"), ("rmdir", "b"), ("unlink", "b"), ("unlink", "b/b"),
        ("session", "c/a", 3), ("upload", 0, 2, "right"), ("upload", 0, 2, "right"),
        ("upload", 0, 1, "wrong"), ("upload", 0, 1, "none"), ("mount_write", "c/b", b"mw"),
        ("bulk", ["c/a", "nope"]), ("bulk", ["c/a", "c/b"]), ("rename", "c", "c/a", True),
    ][: 10 + 4 * seed]
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(tmp) as store:
            runner = Runner(store)
            for op in steps:
                await runner.run(op)
                await runner.compare()
