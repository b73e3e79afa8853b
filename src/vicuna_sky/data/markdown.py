"""ChatGPT-export HTML to markdown, with the page's UI residue removed.

ShareGPT pages hold answers as rendered HTML: code blocks wrapped in a header with the language
name and a "Copy code" button, regenerate counters ("2 / 2"), "Copy12 chars / 3 words" widgets.
FastChat strips these with regexes after conversion; here the UI elements are removed from the
parsed page before conversion, so a code block keeps its language as a fenced block and its text
verbatim (blank lines included), and prose is not backslash-escaped: the model should learn to
write `snake_case`, not `snake\\_case`. Plain text (human turns) is not run through an HTML
parser at all, which would fold its line breaks.
"""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, NavigableString, Tag
from markdownify import ATX, MarkdownConverter

# Markup has closing tags (or <br>/<hr>); "if a<b and c > d" in a pasted snippet does not.
HTML_TAG = re.compile(r"</[a-zA-Z][a-zA-Z0-9]*\s*>|<(?:br|hr)\s*/?>", re.IGNORECASE)
LANGUAGE_CLASS = re.compile(r"^language-([\w+#.-]+)$")
REGENERATE_COUNTER = re.compile(r"^\s*\d+\s*/\s*\d+\s*")
COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
COPY_CODE = re.compile(r"\s*Copy code\s*")
THREE_NEWLINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)
UI_TAGS = ("button", "svg", "script", "style", "img")


def looks_like_html(text: str) -> bool:
    return HTML_TAG.search(text) is not None


def _code_language(pre: Tag, code: Tag | None) -> str:
    if code is not None:
        for cls in code.get("class") or []:
            match = LANGUAGE_CLASS.match(cls)
            if match:
                return match.group(1)
    # Older exports: the header <span>python</span> next to the "Copy code" button.
    header = pre.find("span")
    if header is not None and code is not None and header not in code.parents:
        name = header.get_text(strip=True)
        if re.fullmatch(r"[\w+#.-]{1,20}", name or ""):
            return name
    return ""


def _flatten_code_blocks(soup: BeautifulSoup) -> None:
    """Each <pre> becomes just its code text, with the language kept aside for the fence."""
    for pre in soup.find_all("pre"):
        code = pre.find("code")
        language = _code_language(pre, code)
        text = (code if code is not None else pre).get_text()
        pre.clear()
        pre.append(NavigableString(COPY_CODE.sub("\n", text) if code is None else text))
        pre["data-language"] = language


class _Converter(MarkdownConverter):
    def __init__(self) -> None:
        super().__init__(
            heading_style=ATX,
            bullets="-",
            escape_asterisks=False,
            escape_underscores=False,
            code_language_callback=lambda el: el.get("data-language", ""),
        )


_converter = _Converter()


def remove_residue(text: str) -> str:
    """Drop ChatGPT UI text and normalise whitespace outside code fences."""
    text = REGENERATE_COUNTER.sub("", text, count=1)
    text = COPY_CHARS.sub("", text)
    # Split on fence markers and touch only the pieces outside fences: code keeps its blank
    # lines and trailing spaces exactly.
    parts = FENCE.split(text)
    out = []
    inside = False
    for piece in parts:
        if piece in ("```", "~~~"):
            inside = not inside
            out.append(piece)
        elif inside:
            out.append(piece)
        else:
            piece = TRAILING_SPACE.sub("\n", piece)
            out.append(THREE_NEWLINES.sub("\n\n", piece))
    return "".join(out).strip()


def html_to_markdown(value: str) -> str:
    """One turn's value as clean markdown: HTML converted, residue removed."""
    if not looks_like_html(value):
        return remove_residue(value)
    soup = BeautifulSoup(value, "lxml")
    for tag in soup.find_all(UI_TAGS):
        tag.decompose()
    _flatten_code_blocks(soup)
    return remove_residue(_converter.convert_soup(soup))
