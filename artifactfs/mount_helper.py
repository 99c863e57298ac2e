"""``mount.fuse.artifactfs``: the helper mount(8) runs for ``-t fuse.artifactfs`` and fstab lines.

    mount.fuse.artifactfs DATA_DIR MOUNTPOINT [-sfnv] [-o OPTIONS] [-t fuse.artifactfs]

mount(8) looks for it in /sbin only and runs it with a minimal PATH; scripts/setup links it
there to this environment's console script. It turns mount options into ``artifactfs mount``
options and runs that (its background form: it returns once the mount is ready and leaves the
daemon running, whose log goes to DATA_DIR/mount.log, or to the journal under systemd).

Options (comma-separated, as in fstab's fourth field):
    http=HOST:PORT          also serve the HTTP API there
    token=T, token_file=F   the bearer token HTTP requires (token_file: read from file F)
    sync                    fsync every commit before it returns
    allow_other             let other users see the mount
    no_passthrough          the daemon serves every read (artifactfs mount --no-passthrough)
    no_passthrough_writes   the daemon receives every write
Options mount(8) and systemd handle themselves (rw, defaults, noauto, nofail, _netdev, user,
x-systemd.*, ...) are ignored; any other option is refused, and nothing is mounted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "mount.fuse.artifactfs"

# Options with no meaning to the daemon: mount(8), systemd's fstab generator or the kernel's
# defaults for a FUSE mount act on them (or they only say what the defaults already are).
GENERIC_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
    "owner", "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async",
    "atime", "noatime", "relatime", "nodiratime", "diratime", "lazytime", "nolazytime",
    "loud", "silent",
})
GENERIC_PREFIXES = ("x-", "comment=")
FLAGS = {
    "sync": "--sync",
    "allow_other": "--allow-other",
    "no_passthrough": "--no-passthrough",
    "no_passthrough_writes": "--no-passthrough-writes",
}
KNOWN = "http=HOST:PORT, token=T, token_file=FILE, " + ", ".join(FLAGS)


class UsageError(Exception):
    """Bad arguments or options: said to the user, and nothing is mounted."""


@dataclass
class Request:
    """What mount(8) asked for, as ``artifactfs mount`` arguments."""

    argv: list[str]
    token: str | None = None
    fake: bool = False  # mount -f: check everything, mount nothing
    warnings: list[str] = field(default_factory=list)


def split_options(text: str) -> list[str]:
    r"""Comma-separated options; ``\,`` is a comma inside a value (as libmount escapes it)."""
    out, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i + 1]
            i += 2
            continue
        if text[i] == ",":
            out.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    out.append(cur)
    return [o for o in out if o]


def parse(argv: list[str]) -> Request:
    """mount(8)'s helper arguments: two positionals, then -s -f -n -v, -o OPTS, -t TYPE."""
    positional: list[str] = []
    options: list[str] = []
    sloppy = fake = verbose = False
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "-t", "-N"):
            value = next(args, None)
            if value is None:
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                options += split_options(value)
            elif arg == "-N":
                raise UsageError("mounting in another namespace (-N) is not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            options += split_options(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "s":
                    sloppy = True
                elif flag == "f":
                    fake = True
                elif flag == "v":
                    verbose = True
                elif flag != "n":  # -n: do not write /etc/mtab; the kernel's table is it
                    raise UsageError(f"unknown flag -{flag}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("wants DATA_DIR MOUNTPOINT [-o OPTIONS]"
                         f" (got {len(positional)} paths)")
    data_dir, mountpoint = positional
    request = Request(argv=[*(["-v"] if verbose else []), "mount", mountpoint,
                            "--data", data_dir], fake=fake)
    for option in options:
        name, eq, value = option.partition("=")
        if name == "http" and eq and value:
            request.argv += ["--http", value]
        elif name == "token" and eq:
            request.token = value
        elif name == "token_file" and eq and value:
            try:
                request.token = Path(value).read_text().strip()
            except OSError as exc:
                raise UsageError(f"token_file: cannot read {value}: {exc.strerror}") from None
        elif option in FLAGS:
            request.argv.append(FLAGS[option])
        elif option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
            continue
        elif option == "ro":
            raise UsageError("option 'ro': an artifactfs mount is read-write only")
        elif sloppy:
            request.warnings.append(f"ignoring unknown option {option!r} (-s)")
        else:
            raise UsageError(f"unknown option {option!r}; artifactfs knows {KNOWN}")
    return request


def main(argv: list[str] | None = None) -> int:
    try:
        request = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1  # mount(8)'s "incorrect invocation"
    for warning in request.warnings:
        print(f"{PROG}: {warning}", file=sys.stderr)
    if request.fake:
        return 0
    if request.token is not None:
        # The daemon reads it from its environment: not on a command line, where ps shows it.
        os.environ["ARTIFACTFS_TOKEN"] = request.token
    from .cli import main as artifactfs_main

    return artifactfs_main(request.argv)


if __name__ == "__main__":
    sys.exit(main())
