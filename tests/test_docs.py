"""The documents' cross-references resolve inside the repository.

Code, tests, scripts and documents cite the design as "DESIGN §N", other documents by name
(``docs/SEMANTICS.md``, ``RELIABILITY.md §3``) and by Markdown link. Each of these must name
something that exists here: a section of docs/DESIGN.md (or of the document named), a file, a
heading. No text names a path of one particular machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# What is the project's own text: the package, its tests and scripts, the documents.
SCANNED_DIRS = ("artifactfs", "docs", "scripts", "tests")
SCANNED_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ""}

# "DESIGN §1", "DESIGN.md §2, §3", "DESIGN §1-3", "DESIGN §1, §3 and §5"; the same for any
# other document named with .md ("RELIABILITY.md §1"). Line breaks count as spaces.
SECTION_REF = re.compile(
    r"\b(?:docs/)?(?:DESIGN(?:\.md)?|(?P<doc>[A-Za-z_]+)\.md),? §"
    r"(?P<nums>\d+(?:(?:\s*[,–-]\s*|\s+and\s+)§?\d+)*)")
# A part of a document named after it: 'SEMANTICS.md, Overwriting', 'PERFORMANCE.md, "Method"'.
NAMED_PART = re.compile(r"\b([A-Z][A-Z_]*\.md)\)?, (?:\"([^\"\n]+)\"|([A-Z][A-Za-z' -]*[A-Za-z]))")
BOLD_LEAD = re.compile(r"^\*\*([^*]+)\*\*", re.M)
# A document named by file name: docs/X.md, X.md.
MD_NAME = re.compile(r"(?<![\w./-])((?:docs/)?[A-Za-z0-9_-]+\.md)\b")
# [text](target) and ![alt](target), target without spaces.
MD_LINK = re.compile(r"!?\[[^\]]{0,300}\]\(([^)\s]+)\)")
NUMBERED_HEADING = re.compile(r"^#{2,6} (\d+)\.\s", re.M)
HEADING = re.compile(r"^#{1,6} (.+?)\s*#*\s*$", re.M)
# History belongs in git: no work rounds, issue numbers or review notes as the reason for text.
NARRATION = re.compile(r"\b(?:issue|session) #?\d+\b|\bfound by review\b|\bbefore this change\b",
                       re.I)
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home)/[\w.-]+")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def text_files() -> list[Path]:
    files = [REPO / "README.md"]
    for d in SCANNED_DIRS:
        for p in sorted((REPO / d).rglob("*")):
            if (p.is_file() and p.suffix in SCANNED_SUFFIXES and "__pycache__" not in p.parts
                    and p.name != "test_docs.py"):
                files.append(p)
    return files


def read(p: Path) -> str:
    try:
        return p.read_text()
    except UnicodeDecodeError:
        return ""


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def numbered_sections(doc: Path) -> set[int]:
    return {int(n) for n in NUMBERED_HEADING.findall(read(doc))}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", read(doc))):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def part_names(doc: Path) -> list[str]:
    """What a part of ``doc`` may be cited by: its headings and its bold paragraph leads."""
    text = FENCE.sub("", read(doc))
    return [re.sub(r"[`*]", "", h).strip().lower()
            for h in HEADING.findall(text) + BOLD_LEAD.findall(text)]


def expand(nums: str) -> list[int]:
    """'1-3' -> 1, 2, 3; '2, §3' -> 2, 3."""
    out: list[int] = []
    for part in re.findall(r"\d+\s*[–-]\s*§?\d+|\d+", nums):
        ends = [int(x) for x in re.findall(r"\d+", part)]
        out.extend(range(ends[0], ends[-1] + 1) if len(ends) == 2 else ends)
    return out


def resolve_md(name: str, where: Path) -> Path | None:
    """Where a document named in ``where`` is: docs/X.md, beside the citing file, or at the root."""
    for candidate in (REPO / name, where.parent / name, DOCS / name):
        if candidate.is_file():
            return candidate
    return None


FILES = text_files()


def matches(pattern: re.Pattern[str]) -> Iterator[tuple[Path, str, re.Match[str]]]:
    """Every match of ``pattern`` in the scanned files: the file, where (path:line), the match."""
    for p in FILES:
        text = read(p)
        for m in pattern.finditer(text):
            yield p, f"{p.relative_to(REPO)}:{line_of(text, m.start())}", m


def test_the_scan_sees_the_documents() -> None:
    names = {p.relative_to(REPO).as_posix() for p in FILES}
    assert {"README.md", "docs/DESIGN.md", "docs/SEMANTICS.md", "artifactfs/errors.py"} <= names
    assert len(numbered_sections(DOCS / "DESIGN.md")) >= 8


def test_every_section_reference_names_a_section() -> None:
    bad = []
    for p, where, m in matches(SECTION_REF):
        doc = resolve_md(f"{m['doc'] or 'DESIGN'}.md", p)
        if doc is None:
            bad.append(f"{where}: {m[0]!r} names no document of the repository")
            continue
        missing = [n for n in expand(m["nums"]) if n not in numbered_sections(doc)]
        if missing:
            bad.append(f"{where}: {m[0]!r}: {doc.name} has no section {missing}")
    design = DOCS / "DESIGN.md"
    text = read(design)
    for m in re.finditer(r"\bsection (\d+)\b", text):
        if int(m[1]) not in numbered_sections(design):
            bad.append(f"docs/DESIGN.md:{line_of(text, m.start())}: no section {m[1]}")
    assert not bad, "\n".join(bad)


def test_every_document_named_exists() -> None:
    bad = [f"{where}: no file {m[1]}" for p, where, m in matches(MD_NAME)
           if resolve_md(m[1], p) is None]
    assert not bad, "\n".join(bad)


def test_every_named_part_of_a_document_exists() -> None:
    bad = []
    for p, where, m in matches(NAMED_PART):
        doc = resolve_md(m[1], p)
        name = (m[2] or m[3]).strip().lower()
        if doc is not None and not any(h.startswith(name) for h in part_names(doc)):
            bad.append(f"{where}: {m[1]} has no part named {name!r}")
    assert not bad, "\n".join(bad)


def test_every_markdown_link_resolves() -> None:
    bad = []
    for p in FILES:
        if p.suffix != ".md":
            continue
        text = read(p)
        prose = FENCE.sub(lambda f: "\n" * f[0].count("\n"), text)
        for m in MD_LINK.finditer(prose):
            target = m[1]
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (p.parent / path).resolve() if path else p
            where = f"{p.relative_to(REPO)}:{line_of(prose, m.start())}"
            if not dest.exists():
                bad.append(f"{where}: {target} does not exist")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                bad.append(f"{where}: {target}: no heading with the anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_no_text_names_a_path_of_one_machine() -> None:
    bad = [f"{where}: {m[0]}" for _, where, m in matches(MACHINE_PATH)]
    assert not bad, "\n".join(bad)


def test_no_text_narrates_its_history() -> None:
    bad = [f"{where}: {m[0]}" for _, where, m in matches(NARRATION)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("heading", "anchor"), [
    ("2. `cp` and the copy at close", "2-cp-and-the-copy-at-close"),
    ("Results: quick run (`--quick`)", "results-quick-run---quick"),
    ("The store: `scripts/bench_store.py`", "the-store-scriptsbench_storepy"),
])
def test_anchors_are_spelled_as_github_spells_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_reference_is_caught() -> None:
    """The patterns match what they are meant to catch (a check that cannot fail is none)."""
    assert expand("1-3") == [1, 2, 3] and expand("2, §3 and §5") == [2, 3, 5]
    m = SECTION_REF.search("as DESIGN §2,\n§3 says")
    assert m is not None and expand(m["nums"]) == [2, 3]
    assert 99 not in numbered_sections(DOCS / "DESIGN.md")
    names = [m[1] for m in MD_NAME.finditer("see docs/NOPE.md and X.md.")]
    assert names == ["docs/NOPE.md", "X.md"]
    assert resolve_md("NOPE.md", REPO / "README.md") is None
    assert MD_LINK.findall("[a](b.md#c) ![i](bench/x.png)") == ["b.md#c", "bench/x.png"]
    # Built from parts, so that this file holds no such phrase itself.
    issue, session = "issue" + " 5", "session" + " 4"
    assert NARRATION.findall(f"the bench of {issue}, {session}, and a session of 3") == [
        issue, session]
    m = NAMED_PART.search('(docs/PERFORMANCE.md, "Store") and (SEMANTICS.md, Overwriting)')
    assert m is not None and m[2] == "Store"
    assert "store" not in part_names(DOCS / "PERFORMANCE.md")
    assert any(h.startswith("overwriting") for h in part_names(DOCS / "SEMANTICS.md"))


def _report():  # scripts/benchlib is not a package of the project: import it from its place
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from benchlib import report
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return report


@pytest.mark.parametrize("profile", ["full", "quick"])
def test_the_results_in_performance_md_are_what_the_bench_writes(tmp_path: Path,
                                                                 profile: str) -> None:
    """The generated block is the generator's output for the run's JSON, so the next run of
    scripts/bench writes the same shape, and nothing outside its block moves."""
    import json

    report = _report()
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(read(DOCS / "PERFORMANCE.md"))
    result = json.loads(read(DOCS / "bench" / f"{profile}.json"))
    report.update_performance_md(doc, profile, report.markdown(result))
    assert doc.read_text() == read(DOCS / "PERFORMANCE.md")


def test_a_missing_results_block_goes_ahead_of_the_rest(tmp_path: Path) -> None:
    report = _report()
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nIntro.\n\n## Known weak spots\n\nText.\n")
    report.update_performance_md(doc, "quick", "QUICK")
    report.update_performance_md(doc, "full", "FULL")
    text = doc.read_text()
    order = [text.index(s) for s in ("Intro.", "## Results: full run", "FULL",
                                     "## Results: quick run", "QUICK", "## Known weak spots")]
    assert order == sorted(order), text
    report.update_performance_md(doc, "full", "FULL2")
    assert "FULL2" in doc.read_text() and "FULL\n" not in doc.read_text()
