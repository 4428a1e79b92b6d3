"""The one Markdown / HTML renderer both reports use."""

import base64
from pathlib import Path

from leukodetect.reporting.render import (
    CSS,
    Section,
    Thumbnail,
    md_cell,
    render_html,
    render_markdown,
)

SECTIONS = [
    Section("Facts", tables=[(None, ("fact", "value"), [("command", "a | b"), ("n", 3)])]),
    Section("Results", paragraphs=["Two <lines>\nof text."], tables=[("Table 2", ("arch", "F1"), [("resnet18", "0.910")])]),
    Section("Figures", figures=[("ROC | curve", Path("figures/roc.png"))]),
]


def test_md_cell_escapes_pipes_and_joins_lines():
    assert md_cell("a | b\nc") == "a \\| b c"
    assert md_cell(3) == "3"


def test_markdown():
    assert render_markdown("Run <1>", SECTIONS) == "\n".join([
        "# Run <1>", "",
        "## Facts", "", "| fact | value |", "|---|---|", "| command | a \\| b |", "| n | 3 |", "",
        "## Results", "", "Two <lines>\nof text.", "", "**Table 2**", "", "| arch | F1 |", "|---|---|", "| resnet18 | 0.910 |", "",
        "## Figures", "", "![ROC \\| curve](figures/roc.png)", "", "*ROC | curve*", "",
    ])


def test_html_escapes_text_and_embeds_figures(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "roc.png").write_bytes(b"\x89PNG fake")
    page = render_html("Run <1>", SECTIONS, tmp_path, css="body {}")
    data = base64.b64encode(b"\x89PNG fake").decode("ascii")
    assert page.startswith('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Run &lt;1&gt;</title>\n'
                           "<style>body {}</style>\n")
    assert "<h2>Facts</h2>\n<table>\n<tr><th>fact</th><th>value</th></tr>\n<tr><td>command</td><td>a | b</td></tr>\n" in page
    assert "<h2>Results</h2>\n<p>Two &lt;lines&gt;\nof text.</p>\n<h3>Table 2</h3>\n<table>\n" in page
    assert (f'<figure><img alt="ROC | curve" src="data:image/png;base64,{data}"><figcaption>ROC | curve</figcaption></figure>'
            in page)
    assert page.endswith("</body>\n</html>\n")
    assert "src=\"http" not in page and CSS not in page


def test_a_thumbnail_cell_is_embedded_in_html_and_linked_in_markdown(tmp_path):
    (tmp_path / "thumbs").mkdir()
    (tmp_path / "thumbs" / "a.png").write_bytes(b"\x89PNG tiny")
    sections = [Section("Cells", tables=[(None, ("cell", "file"), [(Thumbnail(Path("thumbs/a.png"), "a <cell>"), "a.png")])])]
    data = base64.b64encode(b"\x89PNG tiny").decode("ascii")
    assert f'<tr><td><img alt="a &lt;cell&gt;" src="data:image/png;base64,{data}"></td><td>a.png</td></tr>' in render_html(
        "T", sections, tmp_path)
    assert "| ![a <cell>](thumbs/a.png) | a.png |" in render_markdown("T", sections)
