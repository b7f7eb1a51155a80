"""The README is a front door and the docs hold together: every relative link (and anchor) in README.md,
docs/*.md and examples/README.md resolves, the README stays short, its two set-up commands are the ones CI runs,
and no sentence points at a machine or a moment the reader cannot see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250
# The README's two commands, exactly as a newcomer copies them; .ci/run and .ci/notebooks.sh install the same.
FIGURES_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && "
                   "pip install 'torch==2.13.0' -e '.[notebooks]' && sspo figures")
TESTS_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && "
                 "pip install 'torch==2.13.0' -e '.[test,trl,tensorboard,math,wandb]' && pytest")
UNSEEN = ("this machine", "the project's cpu machines")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)


def _links(text: str) -> list[str]:
    """Every Markdown link target outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks); repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _broken(page: Path) -> list[str]:
    """The relative links of one page whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked (no network)
            continue
        name, _, anchor = target.partition("#")
        path = (page.parent / name).resolve() if name else page
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    return broken


def test_the_helpers_find_what_they_should():
    # The checks below pass vacuously if these do not work: known links, a fence, a heading with code in it.
    text = "[a](x.md) ![b](y.png) [c](#z) [d](https://e.org)\n```\n[not](a-link.md)\n```\n"
    assert _links(text) == ["x.md", "y.png", "#z", "https://e.org"]
    assert _slug("`sspo theory`: what each objective's gate does") == "sspo-theory-what-each-objectives-gate-does"
    assert _slug("Outputs (`RUN/`)") == "outputs-run"
    assert _slug("One step (`rl_step`)") == "one-step-rl_step"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) [self](#top)\n# Top\n")
    assert [b.split(" ")[0] for b in _broken(page)] == ["missing.md", "there.md#nope"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert _broken(page) == []


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(README.read_text())}
    assert linked
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked) == []


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}"


def test_the_readme_commands_are_the_ones_ci_runs():
    lines = README.read_text().splitlines()
    assert FIGURES_COMMAND in lines and TESTS_COMMAND in lines
    # Both commands sit in the README's first code block, before anything else a reader has to scroll past.
    first_block = README.read_text().split("```")[1]
    assert FIGURES_COMMAND in first_block and TESTS_COMMAND in first_block
    # CI installs the same pin and extras: the test command in .ci/run, the figures install in .ci/notebooks.sh.
    install = re.compile(r"pip\"? install (?:-q )?(?:--no-compile )?('torch==[^']+' -e '[^']+')")
    ci = install.findall((ROOT / ".ci" / "run").read_text())
    notebooks = install.findall((ROOT / ".ci" / "notebooks.sh").read_text())
    assert install.search(TESTS_COMMAND).group(1) in ci
    assert install.search(FIGURES_COMMAND).group(1) in notebooks
    assert re.search(r"^pytest\b", (ROOT / ".ci" / "run").read_text(), flags=re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sentence_points_at_an_unseen_machine(page):
    text = " ".join(page.read_text().lower().split())  # a phrase broken over two lines is still found
    assert [phrase for phrase in UNSEEN if phrase in text] == []
