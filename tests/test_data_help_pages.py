"""Help-page parsing (.xhp and .html) and the natural-language filters."""

import collections

import pytest

from sparsemem.data import help_pages, paragraph_filters, splits


def xhp_page(body: str, lang: str = "en-US") -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<helpdocument version="1.0">
<meta><topic id="textswritermain0202xml"><title id="tit" xml-lang="{lang}">Page</title>
<filename>/text/swriter/main0202.xhp</filename></topic></meta>
<body>{body}</body></helpdocument>"""


XHP_BODY_EN = """
<section id="howtoget"><paragraph role="paragraph" id="par_nav">Choose Tools - Options</paragraph></section>
<paragraph role="heading" id="hd_1" level="1">Writing <emph>documents</emph></paragraph>
<paragraph role="paragraph" id="par_1">Press <switchinline select="sys"><caseinline select="MAC">Command</caseinline>
<defaultinline>Ctrl</defaultinline></switchinline>+F to open the <link href="x.xhp">Find</link> toolbar.</paragraph>
<bascode><paragraph role="bascode" id="par_code1">Sub Main
  MsgBox "Hello world program"
End Sub</paragraph></bascode>
<paragraph role="code" id="par_code2">Dim counter As Integer counter here</paragraph>
<embed href="text/shared/00/00000004.xhp#related"/>
<table><tablerow><tablecell><paragraph role="tablehead" id="par_th">Command name</paragraph></tablecell>
<tablecell><paragraph role="tablecontent" id="par_td">Inserts a table at the cursor.</paragraph></tablecell></tablerow></table>
<paragraph role="paragraph" id="par_num">=SUM(A1:B12)/3</paragraph>
<paragraph role="paragraph" id="par_2">The page style applies to all pages.</paragraph>
<paragraph role="paragraph" id="par_2">A second paragraph reusing the id.</paragraph>
<paragraph role="note" id="par_note">Notes are prose too.</paragraph>
"""

XHP_BODY_DE = """
<paragraph role="heading" id="hd_1" level="1">Dokumente <emph>schreiben</emph></paragraph>
<paragraph role="paragraph" id="par_1">Drücken Sie <switchinline select="sys"><caseinline select="MAC">Befehl</caseinline>
<defaultinline>Strg</defaultinline></switchinline>+F, um die Symbolleiste Suchen zu öffnen.</paragraph>
<paragraph role="paragraph" id="par_2">The page style applies to all pages.</paragraph>
<paragraph role="note" id="par_note">Notizen sind auch Prosa.</paragraph>
"""


def test_xhp_markup_is_flattened_and_variants_resolved():
    paragraphs = {p.paragraph_id: p for p in help_pages.parse_xhp(xhp_page(XHP_BODY_EN))}
    assert paragraphs["hd_1"].text == "Writing documents"
    assert paragraphs["hd_1"].role == "heading"
    assert paragraphs["par_1"].text == "Press Ctrl+F to open the Find toolbar."
    assert "par_nav" not in paragraphs  # navigation box
    assert "par_code1" not in paragraphs  # inside <bascode>
    assert paragraphs["par_code2"].role == "code"


def test_filters_drop_code_tables_heads_numbers_duplicates_and_count_them():
    dropped = collections.Counter()
    kept = paragraph_filters.natural_paragraphs(help_pages.parse_xhp(xhp_page(XHP_BODY_EN)), reference=None,
                                                dropped=dropped)
    assert [p.paragraph_id for p in kept] == ["hd_1", "par_1", "par_td", "par_2", "par_note"]
    assert [p.text for p in kept if p.paragraph_id == "par_2"] == ["The page style applies to all pages."]
    assert dropped == {"role code": 1, "role tablehead": 1, "too few letters": 1, "duplicate id": 1}


def test_untranslated_paragraphs_are_dropped_in_other_languages():
    english = paragraph_filters.natural_paragraphs(help_pages.parse_xhp(xhp_page(XHP_BODY_EN)), reference=None,
                                                   dropped=collections.Counter())
    reference = {p.paragraph_id: p.text for p in english}
    dropped = collections.Counter()
    kept = paragraph_filters.natural_paragraphs(help_pages.parse_xhp(xhp_page(XHP_BODY_DE, "de")),
                                                reference=reference, dropped=dropped)
    assert [p.paragraph_id for p in kept] == ["hd_1", "par_1", "par_note"]
    assert kept[1].text == "Drücken Sie Strg+F, um die Symbolleiste Suchen zu öffnen."
    assert dropped == {"untranslated": 1}


HTML_PAGE = """<!DOCTYPE html><html lang="de"><head><title>T</title><script>var x = "<p id='s'>no</p>";</script></head>
<body><header><a><p dir="auto">Hilfe für LibreOffice 7.4</p></a></header>
<div id="DisplayArea">
<h1 id="par_idN1" dir="auto">Erweitert</h1>
<p id="par_idN2" class="paragraph" dir="auto">Legt <span class="emph">Java</span> fest.<br>Zweite Zeile.</p>
<div class="howtoget"><p id="par_nav" class="paragraph">Wählen Sie Extras – Optionen.</p></div>
<div class="embedded"><p id="par_embedded" dir="auto">Aus einer anderen Seite eingebettet.</p></div>
<p id="par_idN3" class="paragraph" dir="auto">Drücken Sie <span class="switchinline"><span hidden="true" id="MACx_1" class="MAC">Befehl</span><span hidden="true" id="defaultx_1">Strg</span></span>+F.</p>
<span class="switch"><span hidden="true" id="WINx_2" class="WIN"><p id="par_win" class="paragraph">Nur unter Windows.</p></span></span>
<div class="bascode"><pre><code><p id="par_code" class="code">Sub Main</p></code></pre></div>
<table><tr><td><p id="par_td" class="tablecontentintable" dir="auto">Tabellenzelle mit Text.</p></td></tr></table>
<div class="note"><div class="noteicon"><img src="x.svg" alt="note"></div><div class="notetext"><p id="par_note" dir="auto">Ein Hinweis.</p></div></div>
</div></body></html>"""


def test_html_keeps_own_paragraphs_only():
    paragraphs = {p.paragraph_id: p for p in help_pages.parse_html(HTML_PAGE)}
    assert list(paragraphs) == ["par_idN1", "par_idN2", "par_idN3", "par_td", "par_note"]
    assert paragraphs["par_idN2"].text == "Legt Java fest. Zweite Zeile."
    assert paragraphs["par_idN3"].text == "Drücken Sie Strg+F."
    assert paragraphs["par_td"].role == "tablecontent"
    assert paragraphs["par_note"].role == "paragraph"
    assert paragraphs["par_idN1"].role == "heading"


def test_page_files_ids_are_relative_paths_without_extension(tmp_path):
    for name in ["text/swriter/main0202.xhp", "text/shared/01/about.html", "media/ignored.html", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert list(help_pages.page_files(tmp_path)) == ["text/shared/01/about", "text/swriter/main0202"]
    with pytest.raises(ValueError, match="not a help page"):
        help_pages.parse_page(tmp_path / "notes.txt")


def test_split_is_a_stable_function_of_the_page():
    pages = [f"text/page{i}" for i in range(2000)]
    assigned = [splits.split_of(page) for page in pages]
    assert assigned == [splits.split_of(page) for page in pages]
    counts = collections.Counter(assigned)
    assert 1700 < counts["train"] < 1900 and counts["validation"] > 50 and counts["test"] > 50
    # Pinned: changing the hash would silently reshuffle pages between splits of cached corpora.
    assert [splits.split_of(f"text/swriter/page{i}") for i in (7, 8, 52)] == ["train", "test", "validation"]
    with pytest.raises(ValueError, match="summing to 1"):
        splits.split_of("x", (0.5, 0.5, 0.5))


@pytest.mark.parametrize("text, prose", [
    ("Ok", False), ("Add", True), ("120", False), ("=SUM(A1:B12)/3", False), ("03/2013", False),
    ("数据", True), ("列", False), ("返回 3.14159265358979，即数学常量 PI 的值，保留 14 位小数位数。", True),
    ("Вставить", True), ("挿入します", True),
])
def test_letter_test_treats_scripts_alike(text, prose):
    assert paragraph_filters.has_enough_letters(text) is prose
