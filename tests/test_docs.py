"""The repository stands alone: every design document the code cites is in `docs/design/`.

Comments and docstrings cite design pages as `docs/design/PAGE.md §N` (README there). These
tests fail on a citation of a document someone who clones the project cannot read (the
design notes the project started from, which lived outside it), of a page that does not
exist, or of a section number the page does not have; and on a broken link between the
design pages themselves.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "design"

SCANNED_SUFFIXES = {".py", ".md", ".js", ".html", ".css", ".yaml", ".yml", ".toml", ".sh"}
SCANNED_NAMES = {"Makefile", "Dockerfile"}
SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", "docs"}
THIS_FILE = Path(__file__).resolve()

# Names of the design notes outside the repository, cited bare or by a path that is not
# docs/design/ (e.g. `model-spec §5`, `protocol.md`, `design/media.md`).
OUTSIDE_DOC = re.compile(
    r"(?<![\w-])(?<!docs/design/)"
    r"(model-spec|vae-and-text|training-notes|architecture\.md|protocol\.md|media\.md)"
    r"(?![\w-])"
)
OUTSIDE_FOLDER = re.compile(r"shared/design")
# A citation of a design page and the sections that follow it: `docs/design/x.md §2–§3, §5`.
NUMBER = r"\d+(?:\.\d+)*"
SECTIONS = rf"(?:[ \t]*§[ \t]*{NUMBER}(?:[ \t]*[–—-][ \t]*§?[ \t]*{NUMBER})?(?:[ \t]*,)?)+"
PAGE_CITATION = re.compile(rf"docs/design/(?P<page>[\w.-]+?\.md)(?P<sections>{SECTIONS})?")
HEADING = re.compile(rf"^#{{1,6}}[ \t]+(?P<number>{NUMBER})\.?[ \t]", re.MULTILINE)
# Inside docs/design: `[text](page.md#anchor)` links and `page.md §N` mentions.
LINK = re.compile(r"\]\((?P<target>[^)\s#]*)(?:#(?P<anchor>[^)\s]*))?\)")
LOCAL_CITATION = re.compile(rf"(?<![\w/.-])(?P<page>[\w-]+\.md)(?P<sections>{SECTIONS})")


def _scanned(path: Path) -> bool:
    return path.suffix in SCANNED_SUFFIXES or path.name in SCANNED_NAMES


@cache
def source_files() -> tuple[Path, ...]:
    """Tracked and not-ignored files outside docs/ that may cite a document."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        paths = [REPO / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):  # no git (e.g. an unpacked sdist)
        paths = [p for p in REPO.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(REPO).parts)]
    return tuple(
        sorted(
            p
            for p in set(paths)
            if _scanned(p)
            and p.is_file()
            and p.resolve() != THIS_FILE
            and p.relative_to(REPO).parts[0] not in SKIPPED_DIRS
        )
    )


@cache
def sections_of(page: Path) -> frozenset[str]:
    """The section numbers of a design page: `## 5. Title` gives "5", `### 5.2 Title` "5.2"."""
    return frozenset(m["number"] for m in HEADING.finditer(page.read_text(encoding="utf-8")))


def cited_sections(text: str | None) -> list[str]:
    """Every number of a `§2–§3, §5` run, range ends included."""
    return re.findall(NUMBER, text or "")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors_of(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    return {slug(m[1]) for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*$", text, re.MULTILINE)}


def _where(path: Path, text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    source = text.splitlines()[line - 1].strip()
    return f"{path.relative_to(REPO)}:{line}: {source[:110]}"


def test_no_citation_of_a_document_outside_the_repository():
    bad = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in (OUTSIDE_DOC, OUTSIDE_FOLDER):
            bad += [_where(path, text, m.start()) for m in pattern.finditer(text)]
    assert not bad, (
        "cites a design document that is not in the repository; cite the page and section "
        "of docs/design/ that covers it instead (e.g. `docs/design/generator.md §5`):\n"
        + "\n".join(bad)
    )


def test_design_citations_name_existing_pages_and_sections():
    bad = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in PAGE_CITATION.finditer(text):
            page = DESIGN / m["page"]
            if not page.is_file():
                bad.append(f"{_where(path, text, m.start())}\n    no page docs/design/{m['page']}")
                continue
            missing = [n for n in cited_sections(m["sections"]) if n not in sections_of(page)]
            if missing:
                have = ", ".join(
                    sorted(sections_of(page), key=lambda n: [int(x) for x in n.split(".")])
                )
                bad.append(
                    f"{_where(path, text, m.start())}\n    docs/design/{m['page']} has no "
                    f"{', '.join('§' + n for n in missing)} (it has {have})"
                )
    assert not bad, "design citations that lead nowhere:\n" + "\n".join(bad)


def test_design_pages_link_to_existing_pages_sections_and_anchors():
    bad = []
    for page in sorted(DESIGN.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for m in LINK.finditer(text):
            target, anchor = m["target"], m["anchor"]
            if re.match(r"[a-z]+:", target):  # an external URL
                continue
            dest = (page.parent / target).resolve() if target else page
            if not dest.exists():
                bad.append(f"{_where(page, text, m.start())}\n    no file {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
                bad.append(f"{_where(page, text, m.start())}\n    no heading #{anchor} in {target}")
        cites = [*LOCAL_CITATION.finditer(text), *PAGE_CITATION.finditer(text)]
        for m in cites:
            dest = DESIGN / m["page"]
            missing = [
                n
                for n in cited_sections(m["sections"])
                if not dest.is_file() or n not in sections_of(dest)
            ]
            if missing:
                bad.append(
                    f"{_where(page, text, m.start())}\n    no §{', §'.join(missing)} in {m['page']}"
                )
    assert not bad, "broken references between design pages:\n" + "\n".join(bad)


def test_every_design_page_numbers_its_sections():
    """Citations need numbers: each page (but the index) has `## 1.`, `## 2.`, ... in order."""
    for page in sorted(DESIGN.glob("*.md")):
        if page.name == "README.md":
            continue
        top = [int(n) for n in sections_of(page) if "." not in n]
        assert sorted(top) == list(range(1, len(top) + 1)) and top, (
            f"{page.relative_to(REPO)}: top-level sections {sorted(top)} are not 1..N"
        )


def test_the_checks_catch_what_they_are_for():
    """The patterns find the citations the repository once had, and pass good ones."""
    outside = [
        "(model-spec §5)",
        "(vae-and-text.md §1.3, §2)",
        "as architecture.md names the verbs",
        "`design/protocol.md`",
        "from `../shared/design/model-spec.md`",
        "(training-notes §5.4)",
        "media.md's measured codec string",
    ]
    for text in outside:
        assert OUTSIDE_DOC.search(text) or OUTSIDE_FOLDER.search(text), text
    for text in ("docs/design/vae-and-text.md §5", "server/protocol.py", "model-specific"):
        assert not OUTSIDE_DOC.search(text), text
    m = PAGE_CITATION.search("see docs/design/generator.md §2–§3, §5.1 and more")
    assert m and m["page"] == "generator.md"
    assert cited_sections(m["sections"]) == ["2", "3", "5.1"]
    assert slug("8. Prompts: cut and queue") == "8-prompts-cut-and-queue"
