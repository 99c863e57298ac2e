"""Layer 6, a real mount: the ordinary tools people point at a directory all work on it."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest
from mountutil import Mount, mount_fixture, run, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()
workdir = workdir_fixture()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree of files of awkward sizes (empty, one byte, page edges, > 1 MiB)."""
    files = {
        "empty": b"",
        "one": b"x",
        "page": os.urandom(4096),
        "page_plus": os.urandom(4097),
        "a/b/c/deep.bin": os.urandom(3 * (1 << 20) + 17),
        "a/b/sibling.txt": b"hello\n" * 1000,
        "a/x.jsonl": b'{"k": 1}\n' * 100,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "emptydir").mkdir()
    return files


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "-> " + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_cp_tree_in_and_out_identical(workdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    run("cp", "-r", src, workdir / "tree")
    assert digest_tree(workdir / "tree") == digest_tree(src)
    run("cp", "-r", workdir / "tree", tmp_path / "back")
    assert digest_tree(tmp_path / "back") == digest_tree(src)
    run("diff", "-r", src, workdir / "tree")
    run("cp", src / "page", workdir / "single")
    assert (workdir / "single").read_bytes() == (src / "page").read_bytes()


def test_ls_find_du(workdir: Path, tmp_path: Path) -> None:
    files = make_tree(workdir)
    ls = run("ls", "-l", workdir).stdout.decode()
    assert "emptydir" in ls and "page_plus" in ls
    line = next(x for x in ls.splitlines() if x.endswith(" page_plus"))
    assert line.startswith("-rw-") and " 4097 " in line
    found = set(run("find", ".", cwd=workdir).stdout.decode().split())
    expected = {"."} | {f"./{k}" for k in files} | {"./a", "./a/b", "./a/b/c", "./emptydir"}
    assert found == expected
    found_files = set(run("find", ".", "-type", "f", cwd=workdir).stdout.decode().split())
    assert found_files == {f"./{k}" for k in files}
    du_kib = int(run("du", "-sk", workdir).stdout.split()[0])
    total = sum(len(v) for v in files.values())
    assert total // 1024 <= du_kib <= total // 1024 + 64
    apparent = int(run("du", "-sb", workdir).stdout.split()[0])
    assert apparent >= total


def test_mv_files_and_directories(workdir: Path, mount: Mount) -> None:
    files = make_tree(workdir)
    run("mv", workdir / "one", workdir / "uno")
    assert (workdir / "uno").read_bytes() == b"x"
    assert not (workdir / "one").exists()
    run("mv", workdir / "a", workdir / "emptydir" / "moved")
    for rel, data in files.items():
        if rel.startswith("a/"):
            assert (workdir / "emptydir" / "moved" / rel[2:]).read_bytes() == data
    assert not (workdir / "a").exists()
    # The service sees the moved keys at once.
    key = f"{workdir.name}/emptydir/moved/b/c/deep.bin"
    r = mount.get(key)
    assert r.status_code == 200 and r.json()["size"] == len(files["a/b/c/deep.bin"])
    assert mount.get(f"{workdir.name}/a/b/c/deep.bin").status_code == 404


def test_rm_and_rm_r_mkdir_p_rmdir(workdir: Path) -> None:
    make_tree(workdir)
    run("rm", workdir / "page")
    assert not (workdir / "page").exists()
    run("rm", "-r", workdir / "a")
    assert not (workdir / "a").exists()
    run("mkdir", "-p", workdir / "p/q/r")
    assert (workdir / "p/q/r").is_dir()
    run("rmdir", workdir / "p/q/r")
    run("rmdir", workdir / "p/q")
    assert sorted(os.listdir(workdir / "p")) == []
    run("rm", "-rf", workdir / "p", workdir / "emptydir")
    assert sorted(os.listdir(workdir)) == ["empty", "one", "page_plus"]


def test_touch_truncate_dd_append(workdir: Path) -> None:
    f = workdir / "t.bin"
    run("touch", f)
    assert f.stat().st_size == 0
    run("touch", "-d", "2001-02-03 04:05:06 UTC", f)
    assert int(f.stat().st_mtime) == 981173106
    run("truncate", "-s", "10000", f)
    assert f.read_bytes() == b"\0" * 10000
    run("truncate", "-s", "100", f)
    assert f.stat().st_size == 100
    run("dd", "if=/dev/zero", f"of={f}", "bs=1", "count=0", "seek=5000", "status=none")
    assert f.stat().st_size == 5000  # dd truncates at the seek point
    run("dd", "if=/dev/urandom", f"of={workdir / 'blk'}", "bs=64k", "count=4", "status=none")
    data = (workdir / "blk").read_bytes()
    assert len(data) == 4 * 65536
    run("dd", f"if={workdir / 'blk'}", f"of={f}", "bs=4096", "seek=3", "count=2",
        "conv=notrunc", "status=none")
    got = f.read_bytes()
    assert len(got) == 5 * 4096 and got[3 * 4096:] == data[:8192] and got[:100] == b"\0" * 100
    g = workdir / "log.txt"
    run("sh", "-c", f"echo one > {g}; echo two >> {g}; printf three >> {g}")
    assert g.read_bytes() == b"one\ntwo\nthree"
    run("sh", "-c", f"cat {g} >> {g}.copy; cat {g} >> {g}.copy")
    assert (workdir / "log.txt.copy").read_bytes() == b"one\ntwo\nthree" * 2


def test_rsync_in_and_out(workdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    os.symlink("a/x.jsonl", src / "link")
    os.chmod(src / "one", 0o600)
    os.utime(src / "page", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    run("rsync", "-a", f"{src}/", f"{workdir / 'dst'}/")
    assert digest_tree(workdir / "dst") == digest_tree(src)
    assert (workdir / "dst/one").stat().st_mode & 0o777 == 0o600
    assert (workdir / "dst/page").stat().st_mtime_ns == 1_500_000_000_000_000_000
    # A second run finds nothing to change (sizes and mtimes were kept).
    out = run("rsync", "-ai", f"{src}/", f"{workdir / 'dst'}/").stdout.decode()
    assert not [x for x in out.splitlines() if x.startswith(">f")], out
    run("rsync", "-a", f"{workdir / 'dst'}/", f"{tmp_path / 'back'}/")
    assert digest_tree(tmp_path / "back") == digest_tree(src)


def test_tar_extract_dirs_and_symlinks(workdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    os.symlink("b/sibling.txt", src / "a" / "rel_link")
    os.symlink("/etc/hostname", src / "abs_link")
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="pkg")
    run("tar", "-xzf", archive, "-C", workdir)
    assert digest_tree(workdir / "pkg") == digest_tree(src)
    assert os.readlink(workdir / "pkg/a/rel_link") == "b/sibling.txt"
    assert (workdir / "pkg/a/rel_link").read_bytes() == (src / "a/b/sibling.txt").read_bytes()
    # And back out of the mount.
    run("tar", "-czf", tmp_path / "again.tar.gz", "-C", workdir, "pkg")
    run("mkdir", tmp_path / "out")
    run("tar", "-xzf", tmp_path / "again.tar.gz", "-C", tmp_path / "out")
    assert digest_tree(tmp_path / "out/pkg") == digest_tree(src)


def test_getfattr_setfattr(workdir: Path) -> None:
    f = workdir / "data.json"
    f.write_bytes(b"{}")
    out = run("getfattr", "-d", f).stdout.decode()
    assert 'user.mime_type="application/json"' in out
    assert f'user.sha256="{hashlib.sha256(b"{}").hexdigest()}"' in out
    assert "user.created_at=" in out
    run("setfattr", "-n", "user.mime_type", "-v", "text/plain", f)
    assert run("getfattr", "--only-values", "-n", "user.mime_type", f).stdout == b"text/plain"
    bad = run("setfattr", "-n", "user.mime_type", "-v", "not a mime", f, check=False)
    assert bad.returncode != 0 and b"Invalid argument" in bad.stderr
    ro = run("setfattr", "-n", "user.sha256", "-v", "00", f, check=False)
    assert ro.returncode != 0
    other = run("setfattr", "-n", "user.color", "-v", "red", f, check=False)
    assert other.returncode != 0
    missing = run("getfattr", "-n", "user.nothing", f, check=False)
    assert missing.returncode != 0 and b"No such attribute" in missing.stderr
    # Other namespaces are not supported at all (ls -l then stops asking for ACLs, labels).
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        other_ns = run("getfattr", "-n", name, f, check=False)
        assert b"Operation not supported" in other_ns.stderr, name


def test_large_directory_ls_find_rm_r(workdir: Path, mount: Mount) -> None:
    names = {f"f{i:05d}" for i in range(1200)}
    for n in names:
        (workdir / n).write_bytes(n.encode())
    (workdir / "sub").mkdir()
    assert set(os.listdir(workdir)) == names | {"sub"}
    lines = run("ls", "-l", workdir).stdout.decode().splitlines()
    assert len(lines) == 1202  # "total" plus one line per entry
    # Listing while entries go: every entry that stays is listed exactly once.
    it = os.scandir(workdir)
    seen = [next(it).name for _ in range(100)]
    for n in sorted(names)[-400:]:
        os.unlink(workdir / n)
    seen += [e.name for e in it]
    it.close()
    assert len(seen) == len(set(seen))
    assert set(sorted(names)[:-400]) <= set(seen)
    run("rm", "-r", workdir)
    assert not workdir.exists()
    with mount.http() as c:
        listed = c.get("/v1/artifacts", params={"prefix": workdir.name + "/"}).json()["data"]
    assert listed == []
