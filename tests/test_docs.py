"""The README and docs/*.md: every relative link and image resolves (to a file, and to a heading
where it names one), the README stays a manual of about 300 lines and keeps the test command CI
runs."""

import re

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def _links(page) -> list[str]:
    return [m.group(1) for m in LINK.finditer(page.read_text())]


def test_the_pages_exist_and_link_to_something():
    assert len(PAGES) >= 5
    assert sum(len(_links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: {broken}"


def test_the_slug_is_githubs():
    assert _slug("Choosing the sampler") == "choosing-the-sampler"
    assert _slug("At 600 steps and batch 16, the patch-4 net") == "at-600-steps-and-batch-16-the-patch-4-net"
    assert _slug("The `vdm` command") == "the-vdm-command"


def test_the_readme_is_a_manual_with_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "    make test" in readme
    for section in ("## Quick start", "## What you get", "## The pipeline", "## Using the model", "## Experiments"):
        assert section in readme
    assert "## Results" in readme and "## Layout" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_tells_the_story_of_earlier_defaults(page):
    """The pages state what holds, each figure with its command, not which default came when."""
    text = page.read_text().lower()
    for phrase in ("default of the time", "default now", "previous default", "the default then", "used to"):
        assert phrase not in text, f"{page.name}: {phrase!r}"
