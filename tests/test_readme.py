"""The README and the pages under docs/ say only what runs: their Python blocks execute, their ropekit command
lines parse, the result tables they quote are the committed files, their links lead to files in the repository,
and the README's set-up and test commands are the ones CI runs."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = {"README.md": README} | {
    f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
}  # docs/support.md and docs/training.md are generated, the others written by hand
README_MAX_LINES = 200  # the front door: what it is, install, the patch, the demo, choosing, the commands, links


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def _page_blocks(language: str) -> list[tuple[str, int]]:
    """(page, index) of every block in that language, README.md first."""
    return [(page, i) for page, text in PAGES.items() for i in range(len(_blocks(language, text)))]


def _command_lines(block: str) -> list[str]:
    """Shell lines of a block, continuation backslashes joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index"), _page_blocks("python"), ids=lambda v: str(v))
def test_python_blocks_run(page, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs a block writes land here
    exec(compile(_blocks("python", PAGES[page])[index], f"{page} python block {index}", "exec"), {})


def _ropekit_commands(text: str) -> list[list[str]]:
    found = []
    for block in _blocks("bash", text):
        for line in _command_lines(block):
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "ropekit":
                    found.append(words[1:])
                elif "ropekit.cli" in words:  # torchrun ... -m ropekit.cli train ...
                    found.append(words[words.index("ropekit.cli") + 1 :])
    return found


def _all_ropekit_commands() -> list[tuple[str, list[str]]]:
    return [(page, argv) for page, text in PAGES.items() for argv in _ropekit_commands(text)]


@pytest.mark.parametrize(
    ("page", "argv"),
    _all_ropekit_commands(),
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60],
)
def test_ropekit_command_lines_parse(page, argv):
    from ropekit.cli import build_parser

    args = build_parser().parse_args(argv)  # argparse exits (status 2) on an unknown option or value
    if getattr(args, "preset", None) and args.command == "train":
        from ropekit.train import PRESETS, apply_overrides

        apply_overrides(PRESETS[args.preset](), args.set or [])  # typed overrides are valid too


def test_readme_has_ropekit_commands_to_check():
    assert len(_all_ropekit_commands()) >= 10
    assert _ropekit_commands(README), "the README shows no ropekit command line in a bash block"


def test_the_readme_test_command_is_what_ci_runs():
    setup, test = _blocks("bash")[:2]  # Quickstart: the main job, then the tests
    assert setup.strip().endswith("ropekit demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.strip() in ci, "the README's test command must be the line .ci/run runs"


def test_the_readme_is_a_front_door():
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move long material to a page under docs/"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_readme_command_list_names_every_command_the_parser_has():
    from ropekit.cli import build_parser

    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    (listing,) = _blocks("", section)
    listed = [line.split()[:3] for line in listing.splitlines() if line.startswith("ropekit ")]
    commands = _subcommands(build_parser())
    assert {words[1] for words in listed} == set(commands), "the README's command list and the CLI differ"
    tasks = {task for words in listed if words[1] == "eval" for task in words[2].split("|")}
    assert tasks == set(_subcommands(commands["eval"])), "the README's `ropekit eval` tasks and the CLI differ"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", list(PAGES))
def test_relative_links_lead_to_files_in_the_repository(page):
    checked = 0
    for target in _LINK.findall(PAGES[page]):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # https:, mailto:, an anchor
            continue
        path = ((ROOT / page).parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page} links {target}, outside the repository"
        assert path.exists(), f"{page} links {target}, which does not exist"
        checked += 1
    assert "../shared/" not in PAGES[page], f"{page} points outside the repository"
    if page == "README.md":
        assert checked >= 5  # the README links the docs pages


def test_result_tables_the_pages_quote_are_the_committed_ones():
    # a table a run wrote (figures/pe_ablation_<preset>_table.md, figures/<sweep>_table.md) that a page says it
    # quotes ("`<file>` (below, verbatim)") appears in it verbatim
    tables = sorted((ROOT / "figures").glob("*_table.md"))
    quoted = [(page, t) for page, text in PAGES.items() for t in tables if f"{t.name}` (below, verbatim)" in text]
    assert any(t.name.startswith("pe_ablation_") for _, t in quoted), "no page quotes a committed ablation table"
    assert any(t.name.startswith("sweep_") for _, t in quoted), "no page quotes a committed sweep table"
    for page, table in quoted:
        assert table.read_text().strip() in PAGES[page], f"{page}'s copy of {table.name} differs from the file"


def _excerpts(text: str) -> list[tuple[str, str]]:
    """(file, excerpt) for each "`figures/<file>` (excerpt below, verbatim)": the text after it up to the end of
    its first markdown table."""
    found = []
    for match in re.finditer(r"`figures/([\w.-]+_table\.md)` \(excerpt below, verbatim\)[^\n]*\n", text):
        taken, in_table = [], False
        for line in text[match.end() :].split("\n"):
            if line.startswith("|"):
                in_table = True
            elif in_table:
                break
            taken.append(line)
        found.append((match.group(1), "\n".join(taken).strip()))
    return found


def test_result_table_excerpts_are_cut_from_the_committed_files():
    excerpts = [(page, name, text) for page, page_text in PAGES.items() for name, text in _excerpts(page_text)]
    assert any(page == "README.md" and name.startswith("pe_ablation_") for page, name, _ in excerpts), (
        "the README shows no excerpt of a committed ablation table"
    )
    for page, name, excerpt in excerpts:
        assert "\n|---" in excerpt, f"{page}: the excerpt of {name} holds no table"
        assert excerpt in (ROOT / "figures" / name).read_text(), f"{page}'s excerpt of {name} differs from the file"


def test_the_advice_the_docs_show_is_what_advise_prints():
    # docs/choosing.md's block is `ropekit advise --head-dim 64 --base 100000 --trained-length 8192
    # --target-length 32768`, recomputed here from the closed forms
    from ropekit.studies.advise import advise, format_table

    assert format_table(advise(64, 100000.0, 8192, 32768)) in PAGES["docs/choosing.md"]


def test_the_tested_versions_the_readme_states_are_the_ones_ci_installs():
    # "the whole suite runs on ... **transformers A and lm-eval B**" are constraints.txt's pins; "again on
    # **transformers C** (the oldest pyproject.toml admits)" is what .ci/run's 4.x leg installs and the
    # lower bound in pyproject.toml.
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    pinned = re.search(r"\*\*transformers ([\d.]+) and lm-eval ([\d.]+)\*\*", README)
    assert pinned, "the README no longer states the pinned versions"
    assert pinned.groups() == (pins["transformers"], pins["lm-eval"])
    oldest = re.search(r"again on \*\*transformers ([\d.]+)\*\* \(the oldest", README)
    assert oldest, "the README no longer states the oldest tested transformers"
    assert f'"transformers=={oldest.group(1)}"' in (ROOT / ".ci" / "run").read_text()
    assert f'"transformers>={oldest.group(1)},' in (ROOT / "pyproject.toml").read_text()
    image = re.search(r"\*\*transformers ([\d.]+) and Triton ([\d.]+)\*\* \(the lent", README)
    assert image, "the README no longer states the GPU image's versions CI tests"
    assert f'"transformers=={image.group(1)}" "triton=={image.group(2)}"' in (ROOT / ".ci" / "run").read_text()


def test_the_pins_lie_within_the_declared_ranges():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    declared = [*project["dependencies"], *(r for group in project["optional-dependencies"].values() for r in group)]
    checked = 0
    for line in declared:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {line!r}"
            checked += 1
    assert checked >= 15  # every dependency but torch and triton (left to the torch build) is pinned
