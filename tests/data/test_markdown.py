"""HTML as ShareGPT pages hold ChatGPT's answers, and the markdown it must become."""

from vicuna_sky.data.markdown import html_to_markdown

PROSE = '<div class="markdown prose w-full break-words dark:prose-invert light">{}</div>'

# The 2023 export: a header with the language and a Copy button inside <pre>.
CODE_2023 = (
    '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative '
    'text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">python</span>'
    '<button class="flex ml-auto gap-2"><svg stroke="currentColor" fill="none"><path d="M16 4h2">'
    '</path></svg>Copy code</button></div><div class="p-4 overflow-y-auto"><code class="'
    '!whitespace-pre hljs language-python"><span class="hljs-keyword">def</span> '
    '<span class="hljs-title function_">area</span>(<span class="hljs-params">r_m</span>):\n'
    '    <span class="hljs-keyword">return</span> <span class="hljs-number">3.14159</span> * '
    'r_m ** <span class="hljs-number">2</span>\n\n\nprint(area(<span class="hljs-number">2'
    "</span>))\n</code></div></div></pre>"
)
# The early export: no language span, the language only in the code's class.
CODE_EARLY = (
    '<pre><div class="bg-black"><div class="flex items-center relative text-gray-200 bg-gray-800 '
    'px-4 py-2 text-xs font-sans"><button class="flex ml-auto gap-2"><svg></svg>Copy code'
    '</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre-wrap hljs '
    'language-bash">pip install -U my_pkg\n</code></div></div></pre>'
)


def test_code_blocks_keep_language_and_text():
    html = PROSE.format(
        f"<p>Use <code>area(r_m)</code>:</p>{CODE_2023}<p>Or install:</p>{CODE_EARLY}"
    )
    assert html_to_markdown(html) == (
        "Use `area(r_m)`:\n\n"
        "```python\ndef area(r_m):\n    return 3.14159 * r_m ** 2\n\n\nprint(area(2))\n```\n\n"
        "Or install:\n\n```bash\npip install -U my_pkg\n```"
    )


def test_lists_tables_headings_and_emphasis():
    html = PROSE.format(
        "<h2>Plan</h2><ol><li><strong>Read</strong> the docs</li><li>Write <em>tests</em></li>"
        '</ol><ul><li>snake_case stays<ul><li>nested <a href="https://x.org">link</a></li></ul></li>'
        "<li>2 * 3 = 6</li></ul><blockquote><p>quoted</p></blockquote><hr>"
        "<table><thead><tr><th>Cloud</th><th>Spot $/h</th></tr></thead><tbody>"
        "<tr><td>aws</td><td>9.8</td></tr><tr><td>gcp</td><td>8.1</td></tr></tbody></table>"
    )
    assert html_to_markdown(html) == (
        "## Plan\n\n1. **Read** the docs\n2. Write *tests*\n\n* snake_case stays\n  * nested [link](https://x.org)\n"
        "* 2 * 3 = 6\n\n> quoted\n\n---\n\n"
        "| Cloud | Spot $/h |\n| --- | --- |\n| aws | 9.8 |\n| gcp | 8.1 |"
    )


def test_ui_residue_is_removed():
    assert html_to_markdown("2 / 2" + PROSE.format("<p>Sure, here it is.</p>")) == (
        "Sure, here it is."
    )
    assert html_to_markdown(PROSE.format("<p>Short answer.</p><p>Copy12 chars / 2 words</p>")) == (
        "Short answer."
    )


def test_plain_text_keeps_its_lines():
    text = "1 / 1Fix this:\nif a<b and c > d:\n    print('x')\n\n\n\nThanks   "
    assert html_to_markdown(text) == "Fix this:\nif a<b and c > d:\n    print('x')\n\nThanks"


def test_plain_text_fences_are_untouched():
    text = "Look:\n```\nx = 1   \n\n\n\ny = 2\n```\n\n\n\nok"
    assert html_to_markdown(text) == "Look:\n```\nx = 1   \n\n\n\ny = 2\n```\n\nok"
