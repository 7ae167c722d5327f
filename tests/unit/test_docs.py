"""python -m pytest tests/unit/test_docs.py  (README.md and docs/ stand alone and stay in sync)

- no tracked text file refers to files that live outside the repository;
- every relative link in README.md and docs/*.md points to a file (and heading) that exists;
- docs/design.md lists every module under train/.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Spelled in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ["seeds" + "/", "DESIGN" + ".md", "../" + "shared"]


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but caches
        skip = {".git", "runs", "data", "__pycache__", ".pytest_cache", "logs_slurm"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)]
    return [REPO / name for name in names if (REPO / name).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_to_files_outside_the_repository():
    hits = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE_REFERENCES:
                if needle in line:
                    hits.append(f"{path.relative_to(REPO)}:{number}: {needle}: {line.strip()[:120]}")
    assert not hits, ("these files cite files that are not in the repository; say what they carried "
                      "in words, or put the fact in docs/:\n" + "\n".join(hits))


def without_code(text: str) -> str:
    """The Markdown text with fenced code blocks and inline code removed (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(without_code(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto:


def test_the_docs_pages_exist_and_each_starts_with_a_title_and_a_summary():
    assert len(DOC_FILES) > 1, "docs/*.md missing"
    for path in DOC_FILES[1:]:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip(), \
            f"{path.relative_to(REPO)}: a '# Title' line, a blank line, then a one-line summary"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors_of(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(REPO)}")
    assert not broken, f"{path.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    readme = set(relative_links(REPO / "README.md"))
    missing = [p.name for p in DOC_FILES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link docs pages: {missing}"


def test_design_lists_every_module_of_train():
    design = (REPO / "docs" / "design.md").read_text()
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "train").rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in design]
    stale = [m for m in re.findall(r"`(train/[\w/]+\.py)`", design) if not (REPO / m).exists()]
    assert not missing and not stale, (f"docs/design.md, 'Modules of train/': add one line for each of "
                                       f"{missing}; remove {stale}")
