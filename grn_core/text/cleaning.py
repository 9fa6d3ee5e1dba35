"""Prompt cleaning exactly as Wan's umt5 tokenizer wrapper does it (``clean='whitespace'``).

    fix mojibake/control characters (ftfy.fix_text) -> html.unescape twice -> strip
    -> collapse every run of Unicode whitespace into one space -> strip

The official code collapses with the third-party ``regex`` module, whose ``\\s`` is the Unicode White_Space property;
the standard ``re`` module's ``\\s`` also matches the separators U+001C..U+001F. We spell the White_Space class out so
the result is identical without depending on ``regex``.
"""

from __future__ import annotations

import html
import re

import ftfy

__all__ = ["clean_prompt", "UNICODE_WHITESPACE"]

# Unicode White_Space (= `regex` module's \s): TAB..CR, SPACE, NEL, NBSP, OGHAM SPACE, EN QUAD..HAIR SPACE,
# LINE/PARAGRAPH SEPARATOR, NARROW NBSP, MEDIUM MATHEMATICAL SPACE, IDEOGRAPHIC SPACE.
UNICODE_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{UNICODE_WHITESPACE}]+")


def clean_prompt(text: str) -> str:
    """Wan's ``whitespace_clean(basic_clean(text))``; may return "" for a blank prompt."""
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    text = ftfy.fix_text(text)
    # Twice: prompts scraped from HTML are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()
