"""The README and docs keep their promises: every relative link resolves (file and anchor), each ✓
of the README's compatibility matrix points at a row that says how that combination was tested,
the API table is the API's order, the version is in one place, and the figure redraws."""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import pytest
import standin_webui as sw

import lib_seg
from lib_seg import ARG_NAMES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
WEBUIS = ("A1111 v1.10", "Forge", "reForge", "Forge Classic", "Forge Neo", "ComfyUI")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "").replace("*", "")
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    return found


def links_of(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    for target in links_of(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{path.name}: {target} has an anchor into a non-Markdown file"
            assert anchor in anchors_of(resolved), f"{path.name}: no #{anchor} in {resolved.name}"


def test_the_docs_link_to_each_other():
    assert sum(len(links_of(path)) for path in DOCS) > 40
    assert all(links_of(path) for path in DOCS if path.name in ("README.md", "compatibility.md"))


def test_slugs_follow_githubs_rule():
    assert slug("Forge family, CPU (the same run)") == "forge-family-cpu-the-same-run"
    assert slug("The algorithm (`lib_seg/`)") == "the-algorithm-lib_seg"
    assert slug("API, infotext and XYZ plot") == "api-infotext-and-xyz-plot"


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_each_tick_of_the_readme_matrix_links_to_a_row_that_says_how_it_was_tested():
    readme = (ROOT / "README.md").read_text()
    compatibility = (ROOT / "docs" / "compatibility.md").read_text()
    detail = {}
    for line in compatibility.splitlines():
        match = re.match(r'\| <a id="([^"]+)"></a>', line)
        if match:
            detail[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    matrix = table_rows(readme, "| model | " + " | ".join(WEBUIS))
    assert len(matrix) >= 13
    ticks = 0
    for model, *cells in matrix:
        assert len(cells) == len(WEBUIS), model
        for webui, cell in zip(WEBUIS, cells, strict=True):
            said = None
            if cell != "—":
                match = re.fullmatch(r"\[✓\]\(docs/compatibility\.md#([^)]+)\)", cell)
                assert match, f"{model} on {webui}: {cell!r} is neither a linked ✓ nor —"
                ticks += 1
                row = detail[match.group(1)]
                column = 1 + WEBUIS.index(webui)
                while re.match(r"(contract tests: )?(yes: )?the same\b", row[column]):
                    column -= 1  # "the same" as the webui to its left
                said = row[column]
                assert not said.startswith(("—", "one warning")), f"{model} on {webui}: the row says {said!r}"
                how = re.search(r"real webui|real ComfyUI|contract tests|test", said)
                assert how, f"{model} on {webui}: {said!r}"
    assert ticks >= 20


def test_the_readme_stays_short_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert 'git clone "$PWD" /path/to/stable-diffusion-webui/extensions/sd-webui-seg' in readme
    assert 'git clone "$PWD" /path/to/ComfyUI/custom_nodes/sd-webui-seg' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv"))
    assert command in ci


def test_the_api_table_is_the_apis_order():
    rows = table_rows((ROOT / "docs" / "api.md").read_text(), "| position | API name |")
    assert [(int(position), name.strip("`")) for position, name, *_ in rows] == list(enumerate(ARG_NAMES))


def test_the_version_is_in_one_place_and_the_start_up_log_shows_it(monkeypatch, caplog):
    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\d+\.\d+\.\d+)", changelog, flags=re.M).group(1)
    assert newest == lib_seg.__version__
    assert f"Smoothed Energy Guidance {lib_seg.__version__}" in (ROOT / "README.md").read_text()
    assert (
        "version"
        not in re.search(r"\[project\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(), re.S)
        .group(1)
        .split("dynamic")[0]
    )
    webui = sw.install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        sw.load_script(webui)
    assert f"Smoothed Energy Guidance {lib_seg.__version__}" in caplog.messages


def test_the_figure_is_redrawn_by_its_script(tmp_path):
    import importlib.util

    from PIL import Image, ImageChops, ImageStat

    spec = importlib.util.spec_from_file_location(
        "attention_maps", ROOT / "docs" / "figures" / "attention_maps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = Image.open(module.draw(tmp_path / "figure.png")).convert("RGB")
    committed = Image.open(ROOT / "docs" / "figures" / "attention-maps.png").convert("RGB")
    assert drawn.size == committed.size
    assert max(ImageStat.Stat(ImageChops.difference(drawn, committed)).mean) < 2.0
