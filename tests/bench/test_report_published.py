"""Published figures carry their provenance inside the repository (a fresh clone has no ``../shared``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pcbench.bench.published import PUBLISHED

REPO = Path(__file__).resolve().parents[2]
#: "owner/name path/FILE.ext @ <commit>": a repository file read at a named commit.
REPO_FILE_AT_COMMIT = re.compile(r"\b[\w.-]+/[\w.-]+ [\w./-]+\.(?:md|py|yaml) @ [0-9a-f]{7,40}\b")
#: "Authors et al. YEAR, Title (venue), <table>": a paper figure.
PAPER = re.compile(r"\bet al\. (?:19|20)\d\d, .+\(\w+\), .*\btable\b", re.IGNORECASE)


@pytest.mark.parametrize("fig", PUBLISHED, ids=lambda p: f"{p.model}-{p.dataset}-{p.metric}-{p.protocol}")
def test_each_published_figure_names_where_it_was_read(fig) -> None:
    if fig.checked == "source":
        assert REPO_FILE_AT_COMMIT.search(fig.source), f"{fig.source!r}: name the repository file and its commit"
    else:
        assert PAPER.search(fig.source), f"{fig.source!r}: name the paper (authors, year, venue) and its table"


def test_report_modules_point_at_nothing_outside_the_repository() -> None:
    # A user's clone has no ../shared beside it: the library and its docstrings must not cite it.
    hits = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "pcbench" / "bench").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.\./shared|shared/data", line)]
    assert not hits, hits
