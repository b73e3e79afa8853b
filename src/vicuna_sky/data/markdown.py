"""ChatGPT-export HTML to markdown, with the page's UI residue removed.

ShareGPT pages hold answers as rendered HTML: code blocks wrapped in a header with the language
name and a "Copy code" button, one <span> per highlighted token, regenerate counters ("2 / 2"),
"Copy12 chars / 3 words" widgets. FastChat removes these with regexes after a generic
conversion (markdownify), and collapses every triple newline, code included. Here code blocks are
lifted out first (fenced, with their language, text verbatim), the rest is converted by a small
converter over lxml's tree, prose is not backslash-escaped (the model should learn to write
`snake_case`, not `snake\\_case`), and plain text (human turns) skips the HTML parser, which
would fold its line breaks.
"""

from __future__ import annotations

import html
import re

from lxml import etree
from lxml import html as lxml_html

# Markup has closing tags (or <br>/<hr>); "if a<b and c > d" in a pasted snippet does not.
HTML_TAG = re.compile(r"</[a-zA-Z][a-zA-Z0-9]*\s*>|<(?:br|hr)\s*/?>", re.IGNORECASE)
REGENERATE_COUNTER = re.compile(r"^\s*\d+\s*/\s*\d+\s*")
COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
COPY_CODE = re.compile(r"\s*Copy code\s*")
THREE_NEWLINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def looks_like_html(text: str) -> bool:
    return HTML_TAG.search(text) is not None


PRE_BLOCK = re.compile(r"<pre\b[^>]*>(.*?)</pre\s*>", re.DOTALL | re.IGNORECASE)
CODE_ELEMENT = re.compile(r"<code\b([^>]*)>(.*?)</code\s*>", re.DOTALL | re.IGNORECASE)
CLASS_LANGUAGE = re.compile(r"""class=["'][^"']*\blanguage-([\w+#.-]+)""")
HEADER_LANGUAGE = re.compile(r"<span[^>]*>\s*([\w+#.-]{1,20})\s*</span>")
ANY_TAG = re.compile(r"<[^>]*>")
UI_ELEMENTS = re.compile(
    r"<(button|svg|script|style)\b[^>]*>.*?</\1\s*>|<img\b[^>]*>", re.DOTALL | re.IGNORECASE
)
PLACEHOLDER = "VSKYCODEBLOCK{}X"
PLACEHOLDER_RE = re.compile(r"VSKYCODEBLOCK(\d+)X")


def _take_code_blocks(value: str) -> tuple[str, list[str]]:
    """Replace each <pre> by a placeholder paragraph; return the fenced blocks to put back.

    Code is the bulk of a ChatGPT page's markup (one <span> per highlighted token), so it is
    taken out with regexes before the HTML parser sees it: the code text is the <code>
    element's text with tags removed and entities decoded, the language comes from its
    `language-X` class or, in older exports, from the header's <span>."""
    blocks: list[str] = []

    def take(match: re.Match) -> str:
        inner = match.group(1)
        code = CODE_ELEMENT.search(inner)
        if code:
            lang = CLASS_LANGUAGE.search(code.group(1))
            header = HEADER_LANGUAGE.search(inner[: code.start()])
            language = lang.group(1) if lang else (header.group(1) if header else "")
            text = code.group(2)
        else:
            language, text = "", COPY_CODE.sub("\n", inner)
        text = html.unescape(ANY_TAG.sub("", text)).strip("\n")
        blocks.append(f"```{language}\n{text}\n```")
        return f"<p>{PLACEHOLDER.format(len(blocks) - 1)}</p>"

    return PRE_BLOCK.sub(take, UI_ELEMENTS.sub("", value)), blocks


INLINE_SPACE = re.compile(r"[ \t\r\n\f]+")
DROPPED = {"button", "svg", "script", "style", "img", "head", "title", "meta", "link"}
HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
EMPHASIS = {"strong": "**", "b": "**", "em": "*", "i": "*", "del": "~~", "s": "~~"}
BLOCKS = {
    "p",
    "div",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "body",
    "html",
    "figure",
    "details",
    "summary",
    "dl",
    "dt",
    "dd",
    "center",
}


def _inline_code(text: str) -> str:
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if fence != "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _block(text: str) -> str:
    text = text.strip()
    return f"\n\n{text}\n\n" if text else ""


class _Markdown:
    """Markdown for the HTML that chat pages are made of: paragraphs, headings, emphasis,
    inline code, links, lists (nested), tables, quotes, rules. Unknown tags keep their text.
    Written against lxml's tree directly: a chat dump has hundreds of thousands of answers,
    and a generic converter on a Python-built tree is several times slower."""

    def convert(self, root: lxml_html.HtmlElement) -> str:
        return self.children(root)

    def children(self, el: lxml_html.HtmlElement) -> str:
        parts = [self.text(el.text)]
        for child in el:
            parts.append(self.element(child))
            parts.append(self.text(child.tail))
        return "".join(parts)

    @staticmethod
    def text(text: str | None) -> str:
        return INLINE_SPACE.sub(" ", text) if text else ""

    def element(self, el: lxml_html.HtmlElement) -> str:
        tag = el.tag if isinstance(el.tag, str) else ""
        if not tag or tag in DROPPED:
            return ""
        if tag in BLOCKS:
            return _block(self.children(el))
        if tag in HEADINGS:
            return _block("#" * HEADINGS[tag] + " " + self.children(el).strip())
        if tag in EMPHASIS:
            inner = self.children(el)
            mark = EMPHASIS[tag]
            core = inner.strip()
            if not core:
                return inner
            lead = inner[: len(inner) - len(inner.lstrip())]
            trail = inner[len(inner.rstrip()) :]
            return f"{lead}{mark}{core}{mark}{trail}"
        if tag == "code":
            return _inline_code(el.text_content())
        if tag == "a":
            label, href = self.children(el).strip(), el.get("href") or ""
            return f"[{label}]({href})" if href and href != label and label else label
        if tag == "br":
            return "\n"
        if tag == "hr":
            return "\n\n---\n\n"
        if tag in ("ul", "ol"):
            return _block(self.list(el))
        if tag == "table":
            return _block(self.table(el))
        if tag == "blockquote":
            inner = self.children(el).strip()
            return _block("\n".join(f"> {line}".rstrip() for line in inner.splitlines()))
        if tag == "pre":
            return _block(f"```\n{el.text_content().strip(chr(10))}\n```")
        return self.children(el)

    def list(self, el: lxml_html.HtmlElement) -> str:
        ordered = el.tag == "ol"
        number = int(el.get("start", "1")) if (el.get("start") or "1").isdigit() else 1
        items = []
        for li in el:
            if getattr(li, "tag", None) != "li":
                continue
            prefix = f"{number}. " if ordered else "* "
            number += 1
            body = THREE_NEWLINES.sub("\n\n", self.children(li).strip())
            if li.find("p") is None:  # a tight list stays tight around nested lists
                body = re.sub(r"\n\n+", "\n", body)
            indent = " " * len(prefix)
            lines = body.splitlines() or [""]
            rest = [f"{indent}{line}" if line.strip() else "" for line in lines[1:]]
            items.append("\n".join([prefix + lines[0], *rest]))
        return "\n".join(items)

    def table(self, el: lxml_html.HtmlElement) -> str:
        rows = []
        for tr in el.iter("tr"):
            cells = [
                self.children(cell).strip().replace("\n", " ").replace("|", "\\|")
                for cell in tr
                if getattr(cell, "tag", None) in ("td", "th")
            ]
            rows.append("| " + " | ".join(cells) + " |")
            if len(rows) == 1:
                rows.append("| " + " | ".join("---" for _ in cells) + " |")
        return "\n".join(rows)


_converter = _Markdown()


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
    value, blocks = _take_code_blocks(value)
    try:
        root = lxml_html.fragment_fromstring(value, create_parent="div")
    except etree.ParserError:  # nothing but whitespace/comments left
        return remove_residue("")
    text = _converter.convert(root)
    text = PLACEHOLDER_RE.sub(lambda m: blocks[int(m.group(1))], text)
    return remove_residue(text)
