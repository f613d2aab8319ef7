"""README.md stays true: its config reference is the schema's, its commands and examples exist."""

import re

from conftest import REPO

from dtrain.config import reference_markdown


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_config_reference_matches_schema():
    text = _readme()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    block = text[text.index(start) + len(start) : text.index(end)]
    assert block == reference_markdown(), (
        "README config reference is stale: regenerate the block between the config-reference markers "
        "with dtrain.config.reference_markdown()"
    )


def test_exactly_two_setup_commands_and_ci_uses_the_test_one():
    blocks = re.findall(r"```bash\n(.*?)```", _readme(), flags=re.S)
    setup = [b.strip() for b in blocks if "python3 -m venv .venv" in b]
    assert len(setup) == 2, setup
    main_cmd, test_cmd = setup
    assert main_cmd.endswith("dtrain train examples/tiny_alpaca.yaml")
    assert test_cmd in (REPO / ".ci" / "run").read_text()


def test_every_example_config_named_in_readme_exists():
    for name in re.findall(r"`(examples/[\w/.-]+\.yaml)`", _readme()):
        assert (REPO / name).is_file(), name


def test_every_link_within_the_readme_names_one_of_its_headings():
    text = _readme()
    # GitHub's anchors: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens.
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)}
    links = set(re.findall(r"\]\(#([\w-]+)\)", text))
    assert links and links <= anchors, sorted(links - anchors)
