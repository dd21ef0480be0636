"""The README says only what runs: its Python blocks execute, its ropekit command lines parse, and its
set-up and test commands are the ones CI runs."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


def _command_lines(block: str) -> list[str]:
    """Shell lines of a block, continuation backslashes joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs a block writes land here
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})


def _ropekit_commands() -> list[list[str]]:
    found = []
    for block in _blocks("bash"):
        for line in _command_lines(block):
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "ropekit":
                    found.append(words[1:])
                elif "ropekit.cli" in words:  # torchrun ... -m ropekit.cli train ...
                    found.append(words[words.index("ropekit.cli") + 1 :])
    return found


@pytest.mark.parametrize("argv", _ropekit_commands(), ids=lambda a: " ".join(a)[:60])
def test_ropekit_command_lines_parse(argv):
    from ropekit.cli import build_parser

    args = build_parser().parse_args(argv)  # argparse exits (status 2) on an unknown option or value
    if getattr(args, "preset", None) and args.command == "train":
        from ropekit.train import PRESETS, apply_overrides

        apply_overrides(PRESETS[args.preset](), args.set or [])  # typed overrides are valid too


def test_readme_has_ropekit_commands_to_check():
    assert len(_ropekit_commands()) >= 10


def test_the_readme_test_command_is_what_ci_runs():
    setup, test = _blocks("bash")[:2]  # Quickstart: the main job, then the tests
    assert setup.strip().endswith("ropekit demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.strip() in ci, "the README's test command must be the line .ci/run runs"


def test_result_tables_the_readme_quotes_are_the_committed_ones():
    # a table a run wrote (figures/pe_ablation_<preset>_table.md, figures/<sweep>_table.md) that the README
    # says it quotes ("`<file>` (below, verbatim)") appears in it verbatim
    tables = sorted((ROOT / "figures").glob("*_table.md"))
    quoted = [t for t in tables if f"{t.name}` (below, verbatim)" in README]
    assert any(t.name.startswith("pe_ablation_") for t in quoted), "the README quotes no committed ablation table"
    assert any(t.name.startswith("sweep_") for t in quoted), "the README quotes no committed sweep table"
    for table in quoted:
        assert table.read_text().strip() in README, f"the README's copy of {table.name} differs from the file"


def test_the_advice_the_readme_shows_is_what_advise_prints():
    # the "Choosing a method" block is `ropekit advise --head-dim 64 --base 100000 --trained-length 8192
    # --target-length 32768`, recomputed here from the closed forms
    from ropekit.advise import advise, format_table

    assert format_table(advise(64, 100000.0, 8192, 32768)) in README


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
