"""The docs cannot drift from the code: every relative link of README.md and docs/ resolves
(file and heading), every project file they name exists, and every command-line option they
name is an option of some project script."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The benchmark notes are history (options of earlier code included): only their links are checked.
LINKED_PAGES = [*PAGES, ROOT / "bench" / "results" / "NOTES.md"]
# Options of other tools that the docs show in commands (torchrun, pip, pytest).
EXTERNAL_OPTIONS = {
    "--standalone",
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--master_addr",
    "--master_port",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--no-deps",
    "--upgrade",
    "--headless",
    "--index-url",
}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"```.*?\n(.*?)```", re.S)
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def code_options() -> set[str]:
    """Every option a project script accepts: argparse strings in the code, and the variables
    at the top of the train scripts (`--name`, also spelled `--name-with-dashes`)."""
    options = {"--demo", "--preset"}  # the train scripts' two flags (options.parse_overrides)
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.sh")]:
        options |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", path.read_text()))
    import train_f30k

    for name, value in vars(train_f30k).items():
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)):
            options |= {f"--{name}", f"--{name.replace('_', '-')}"}
    return options


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[p.name for p in LINKED_PAGES])
def test_relative_links_resolve(page):
    assert page.is_file()
    for target in _LINK.findall(_FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_named_files_and_options_exist(page):
    text = page.read_text()
    known = code_options() | EXTERNAL_OPTIONS
    snippets = _CODE.findall(text) + _FENCE.findall(text)
    for snippet in snippets:
        for token in re.findall(r"[\w./-]+", snippet):
            if token.startswith("bench/out/"):  # what a benchmark writes, not a project file
                continue
            if re.fullmatch(r"(?:(?:bench|tests|docs|\.ci)/)?[\w-]+\.(?:py|md)", token) or re.fullmatch(
                r"(?:bench|tests|docs)/[\w./-]+", token
            ):
                assert (ROOT / token).exists() or (ROOT / "bench" / token).exists(), f"{page.name}: no file {token}"
        for option in _OPTION.findall(snippet):
            assert option in known, f"{page.name}: {option} is no option of any project script"


def test_readme_is_a_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 12_500, f"README.md is {size} bytes; move details to docs/"
    for page in ("method.md", "training.md", "data.md", "distributed.md", "benchmarks.md"):
        assert f"docs/{page}" in (ROOT / "README.md").read_text(), f"README.md does not link docs/{page}"
