"""Comments and docs cite only files inside the repository and speak of the code, not of people."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

CHECKED = ["pcbench", "data_prep", "benchmarks", "tests", "conf", "scripts", ".ci", "README.md", "pyproject.toml"]
SUFFIXES = {".py", ".md", ".yaml", ".toml", ".sh", ".txt", ""}
# Documents are cited by their upper-case names (README.md, DESIGN.md, ...); lower-case *.md are outputs.
MD_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_-]*\.md)\b")
PEOPLE = re.compile(r"\b(project lead|the lead|helper session|reviewer)\b", re.IGNORECASE)


def _files() -> list[Path]:
    out = []
    for name in CHECKED:
        p = REPO / name
        paths = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        out += [q for q in paths if q.suffix in SUFFIXES and "__pycache__" not in q.parts and q != Path(__file__)]
    return out


@pytest.mark.parametrize("name", CHECKED)
def test_cited_markdown_files_exist_in_the_repo(name: str) -> None:
    missing = []
    for f in _files():
        if not f.relative_to(REPO).parts[0] == name.split("/")[0]:
            continue
        for m in MD_REF.finditer(f.read_text(errors="replace")):
            ref = m.group(1)
            if name == "tests" and ref.lstrip("./").startswith("shared/"):
                continue  # the tests are the one place that may point at the sample folder beside the repo
            # A path must resolve to a file inside the repository (../shared exists beside some checkouts only);
            # a bare name may be any file of that name in it.
            found = [p for p in ((REPO / ref).resolve(), (f.parent / ref).resolve()) if p.is_relative_to(REPO)
                     and p.exists()]
            if not (found or ("/" not in ref and any(REPO.rglob(ref)))):
                missing.append(f"{f.relative_to(REPO)}: {ref}")
    assert not missing, f"files cited but not in the repository: {missing}"


def test_no_comment_speaks_of_people() -> None:
    hits = [f"{f.relative_to(REPO)}:{i}: {line.strip()}" for f in _files()
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if PEOPLE.search(line)]
    assert not hits, hits
