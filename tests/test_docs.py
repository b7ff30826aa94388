"""Every documentation reference resolves: `docs/NAME.md#anchor` cited in code, recipes,
manifests, examples and docs, and the local links of the README and the docs pages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED_IN = ["deeppose_cli/**/*.py", "stages/*.toml", "datasets/**/*.toml", "examples/*",
            "tests/*.py", "docs/*.md", "README.md", "Makefile", "setup.cfg"]
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6} (.+)$", line)):
            found.add(slug(m.group(1)))
    return found


def problems_of(target: Path, anchor: str | None, where: str) -> list[str]:
    if not target.is_file():
        return [f"{where}: {target.relative_to(ROOT)} does not exist"]
    if anchor and anchor not in anchors(target):
        return [f"{where}: no heading #{anchor} in {target.relative_to(ROOT)}"]
    return []


def test_the_slug_is_githubs():
    assert slug("Full AlexNet on one GPU") == "full-alexnet-on-one-gpu"
    assert slug("Refinement stages (2 and later)") == "refinement-stages-2-and-later"
    assert slug("The stage recipes' choices") == "the-stage-recipes-choices"


def test_every_cited_docs_page_and_anchor_exists():
    problems = []
    for pattern in CITED_IN:
        for path in ROOT.glob(pattern):
            if not path.is_file() or path.name == "test_docs.py":
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for page, anchor in CITATION.findall(line):
                    problems += problems_of(ROOT / "docs" / page, anchor or None,
                                            f"{path.relative_to(ROOT)}:{number}")
    assert problems == []


def test_every_local_link_of_the_readme_and_docs_resolves():
    problems = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for link in LINK.findall(line):
                if re.match(r"^[a-z]+:", link):
                    continue  # http(s), mailto
                path, _, anchor = link.partition("#")
                target = (page.parent / path) if path else page
                problems += problems_of(target.resolve(), anchor or None,
                                        f"{page.relative_to(ROOT)}:{number}")
    assert problems == []
