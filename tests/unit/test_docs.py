"""The documentation stays true: the generated configuration page is current, links resolve, the README stays short,
and nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from clusterucb.infra import configdoc

REPO = configdoc.REPO
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Written by another change (GPU paths); linked from here before it lands.


def test_the_configuration_page_is_current():
    assert configdoc.PAGE.read_text() == configdoc.render(), "docs/configuration.md is stale: run `python -m clusterucb.infra.configdoc`"


def test_a_stale_page_is_reported(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(configdoc.render().replace("| `lora.r` |", "| `lora.rank` |"))
    monkeypatch.setattr(configdoc, "PAGE", stale)
    assert configdoc.main(["--check"]) == 1
    assert "lora.rank" in capsys.readouterr().err
    stale.write_text(configdoc.render())
    assert configdoc.main(["--check"]) == 0


def test_every_schema_key_has_a_row_with_its_reruns():
    page = configdoc.PAGE.read_text()
    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    keys = [key for key, _ in configdoc.leaves(schema, schema)]
    assert len(keys) > 50
    for key in keys:
        assert f"| `{key}` |" in page, key
    row = next(line for line in page.splitlines() if line.startswith("| `gradients.max_batch_size` |"))
    assert row.rstrip(" |").endswith("nothing")  # a throughput knob
    row = next(line for line in page.splitlines() if line.startswith("| `cluster.k` |"))
    assert "`kmeans`" in row and "`grads_pool_shard`" not in row


def test_config_marks_and_schema_defaults_are_read(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lora:\n  r: 128  # paper\n  alpha: 512\ncluster:\n  init: k-means++  # official: random\n")
    assert configdoc.marked_values(config) == {"lora.r": "`128`", "cluster.init": "random (official code)"}
    assert configdoc.paper_text("Validation examples (paper: GSM8K 50, MMLU 5).") == "paper: GSM8K 50, MMLU 5"


def test_a_description_cut_by_a_yaml_comma_is_refused():
    schema = yaml.safe_load("properties:\n  n: {type: integer, description: Pool shards, one job each.}\n")
    with pytest.raises(ValueError, match="not a JSON Schema keyword"):
        configdoc.check_keywords(schema)


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; details belong in docs/"


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_github_anchors():
    assert github_anchor("Selection quality on SmolLM2-135M-Instruct") == "selection-quality-on-smollm2-135m-instruct"
    assert github_anchor("Where we depart from the official code, and why") == "where-we-depart-from-the-official-code-and-why"
    assert github_anchor("`model_builtin` (the built-in tiny model)") == "model_builtin-the-built-in-tiny-model"


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` to a missing file, or to a heading its target does not have."""
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.name}")
    return broken


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-section) [gone](missing.md) [bad](other.md#nowhere) [web](https://example.org) `[code](x.md)`\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no heading with that anchor in other.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", [*PAGES, REPO / "config.schema.yaml"], ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_points_outside_the_repository(page):
    text = page.read_text()
    for outside in ("spec §", "method spec", "shared/reference"):
        assert outside not in text, f"{page.relative_to(REPO)} cites {outside!r}, which a clone does not have"
