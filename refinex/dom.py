"""Where each line of a page's text sits in its HTML: per-line structure features (pure).

``refinex.text.html_to_text`` renders a page as one line per block. A refine model that
sees only those lines cannot tell a navigation link from a heading of the article; the
page's markup can: the enclosing ``nav`` or ``footer``, class names such as ``sidebar`` or
``comment``, the share of a line's characters inside links. This module recovers, for every
line of the rendered text, the element its characters came from and describes it with
:data:`DOM_FEATURES` numbers.

How lines are matched to elements: the page is parsed as ``html_to_text`` parses it and its
visible text nodes are walked in document order, each character remembering its node. The
rendered text holds the same characters in the same order, save what the renderer adds
(list bullets, ordinals, quotes) and drops (control and invisible characters, whitespace).
Both character streams are compared without whitespace: equal characters pair up, an added
character is skipped, and after a mismatch the match resumes at the next place where the
following characters agree. Each line takes the element that most of its characters came
from; a line none of whose characters were found (or a document without HTML) gets zeros,
with the ``has_dom`` column 0, so a model trained with these features also runs on
text-only corpora.

The columns (all roughly in [0, 1]): whether the line was found, the share of its characters
found and inside links, its block element (one-hot), its ancestors (flags), keywords of the
ancestors' class/id/role names (flags), hashed class/id tokens (:data:`HASHED_TOKENS`
buckets), nesting depth, position in the page, block size, and how many siblings share its
tag (lists, menus).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["DOM_FEATURES", "DOM_FEATURE_NAMES", "HASHED_TOKENS", "PageStructure", "dom_line_features", "has_dom",
           "page_structure"]

# Block elements that own a line (nearest one wins), grouped.
_BLOCK_GROUPS: tuple[tuple[str, frozenset[str]], ...] = (
    ("p", frozenset({"p"})),
    ("h1", frozenset({"h1"})),
    ("h2", frozenset({"h2"})),
    ("h3", frozenset({"h3"})),
    ("h4_6", frozenset({"h4", "h5", "h6"})),
    ("li", frozenset({"li", "dt", "dd"})),
    ("cell", frozenset({"td", "th", "tr", "caption"})),
    ("div", frozenset({"div", "section", "article", "main", "body", "center"})),
    ("pre", frozenset({"pre", "code", "xmp", "listing", "plaintext"})),
    ("quote", frozenset({"blockquote", "q"})),
    ("figure", frozenset({"figure", "figcaption"})),
    ("chrome", frozenset({"nav", "header", "footer", "aside", "menu", "form", "fieldset", "legend", "address",
                          "details", "summary", "dialog"})),
)
_BLOCK_OF = {tag: index for index, (_, tags) in enumerate(_BLOCK_GROUPS) for tag in tags}
_BLOCK_TAGS = frozenset(_BLOCK_OF)
# Ancestors worth a flag: is the line anywhere inside one of these?
_ANCESTOR_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("in_nav", frozenset({"nav", "menu"})),
    ("in_header", frozenset({"header"})),
    ("in_footer", frozenset({"footer"})),
    ("in_aside", frozenset({"aside"})),
    ("in_article", frozenset({"article"})),
    ("in_main", frozenset({"main"})),
    ("in_form", frozenset({"form", "fieldset", "label", "button", "input", "textarea"})),
    ("in_list", frozenset({"ul", "ol", "dl"})),
    ("in_table", frozenset({"table"})),
    ("in_heading", frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})),
    ("in_emphasis", frozenset({"strong", "b", "em", "i", "mark"})),
    ("in_small", frozenset({"small", "sub", "sup"})),
    ("in_time", frozenset({"time", "address", "cite"})),
    ("in_quote", frozenset({"blockquote", "q"})),
    ("in_figure", frozenset({"figure", "figcaption", "picture"})),
    ("in_code", frozenset({"pre", "code"})),
)
# Substrings of class, id and role names: boilerplate vocabularies and content vocabularies.
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kw_nav", ("nav", "menu", "toolbar", "topbar", "skip")),
    ("kw_header", ("header", "masthead", "banner", "brand", "logo")),
    ("kw_footer", ("footer", "copyright", "legal", "bottom")),
    ("kw_sidebar", ("sidebar", "side-bar", "aside", "rail", "complementary")),
    ("kw_comment", ("comment", "respond", "reply", "discuss", "disqus")),
    ("kw_share", ("share", "social", "sharing", "follow", "facebook", "twitter")),
    ("kw_related", ("related", "recommend", "more-", "popular", "trending", "also", "teaser", "outbrain", "taboola")),
    ("kw_breadcrumb", ("breadcrumb", "crumb")),
    ("kw_widget", ("widget", "module", "block", "box", "panel", "card")),
    ("kw_ad", ("advert", "sponsor", "promo", "banner-ad", "adsense", "dfp", "gpt-ad")),
    ("kw_cookie", ("cookie", "consent", "gdpr", "privacy", "notice")),
    ("kw_subscribe", ("newsletter", "subscribe", "signup", "sign-up", "register", "login", "signin", "account")),
    ("kw_search", ("search", "filter", "sort")),
    ("kw_pager", ("pagination", "pager", "paging", "next", "prev")),
    ("kw_meta", ("meta", "byline", "author", "date", "time", "posted", "published", "dateline")),
    ("kw_tags", ("tag", "categor", "topic", "label", "keyword")),
    ("kw_content", ("content", "article", "post", "entry", "story", "body", "main", "text", "prose", "blog")),
    ("kw_title", ("title", "headline", "heading", "subtitle")),
    ("kw_caption", ("caption", "credit", "figure", "image", "photo", "media", "gallery")),
    ("kw_hidden", ("hidden", "modal", "popup", "overlay", "tooltip", "dropdown", "sr-only", "visually")),
    ("kw_product", ("price", "product", "cart", "buy", "shop", "offer", "review", "rating")),
    ("kw_list", ("list", "item", "grid", "result", "feed", "archive", "listing")),
)
_ROLE_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("role_chrome", frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "menu",
                               "menubar", "toolbar", "dialog", "alert"})),
    ("role_main", frozenset({"main", "article"})),
)
HASHED_TOKENS = 32
_DENSE = ("has_dom", "found_share", "link_share", "depth", "position", "block_chars", "same_tag_siblings",
          "text_siblings")
DOM_FEATURE_NAMES: tuple[str, ...] = (
    *_DENSE,
    *(f"block_{name}" for name, _ in _BLOCK_GROUPS),
    *(name for name, _ in _ANCESTOR_FLAGS),
    *(name for name, _ in _KEYWORDS),
    *(name for name, _ in _ROLE_FLAGS),
    *(f"token_{i}" for i in range(HASHED_TOKENS)),
)
DOM_FEATURES = len(DOM_FEATURE_NAMES)
_N_DENSE = len(_DENSE)
_BLOCK_AT = _N_DENSE
_ANCESTOR_AT = _BLOCK_AT + len(_BLOCK_GROUPS)
_KEYWORD_AT = _ANCESTOR_AT + len(_ANCESTOR_FLAGS)
_ROLE_AT = _KEYWORD_AT + len(_KEYWORDS)
_TOKEN_AT = _ROLE_AT + len(_ROLE_FLAGS)

_HIDDEN_TAGS = frozenset((
    "head", "title", "meta", "link", "base", "script", "style", "noscript", "template", "svg", "select",
    "datalist", "option", "optgroup", "iframe", "object", "embed", "audio", "video", "canvas", "map", "param",
    "source", "track", "dialog", "rt", "rp",
))
_HIDDEN_STYLE = re.compile(r"(?:display\s*:\s*none|visibility\s*:\s*(?:hidden|collapse))", re.IGNORECASE)
_NAME_SPLIT = re.compile(r"[^a-z0-9-]+")
_WS = re.compile(r"\s+")
_RESYNC = 12  # characters that must agree where a lost match resumes
_RESYNC_WINDOW = 4000  # how far ahead (in page characters) a lost match looks
_ADDED = frozenset("-\"0123456789.")  # characters the renderer adds (bullets, ordinals, quotes)
_PATH_TAGS = 4  # tags of a line's tag path
_NAME_WORDS = 16  # class/id/role words a line keeps, nearest ancestors first


class _Context:
    """What one element says about the text inside it (computed once per element)."""

    __slots__ = ("block", "flags", "keywords", "roles", "tokens", "depth", "order", "block_element", "in_link",
                 "names", "path")

    def __init__(self) -> None:
        self.block = -1
        self.flags = 0
        self.keywords = 0
        self.roles = 0
        self.tokens: frozenset[int] = frozenset()
        self.depth = 0
        self.order = 0
        self.block_element: Any = None
        self.in_link = False
        self.names: tuple[str, ...] = ()  # class/id/role words of the nearest ancestors, nearest first
        self.path: tuple[str, ...] = ()  # the nearest ancestors' tags, outermost first


def _names(element: Any) -> str:
    get = element.get
    return f"{get('class') or ''} {get('id') or ''} {get('role') or ''}".lower()


def _context(element: Any, parent: Optional[_Context], order: int) -> _Context:
    ctx = _Context()
    tag = element.tag.lower() if isinstance(element.tag, str) else ""
    if parent is not None:
        ctx.block, ctx.flags, ctx.keywords, ctx.roles = parent.block, parent.flags, parent.keywords, parent.roles
        ctx.depth, ctx.block_element, ctx.in_link = parent.depth + 1, parent.block_element, parent.in_link
        ctx.tokens = parent.tokens
        ctx.names, ctx.path = parent.names, parent.path
    ctx.order = order
    if tag:
        ctx.path = (ctx.path + (tag,))[-_PATH_TAGS:]
    if tag in _BLOCK_TAGS:
        ctx.block, ctx.block_element = _BLOCK_OF[tag], element
    for bit, (_, tags) in enumerate(_ANCESTOR_FLAGS):
        if tag in tags:
            ctx.flags |= 1 << bit
    if tag == "a":
        ctx.in_link = True
    names = _names(element)
    if names.strip():
        for bit, (_, words) in enumerate(_KEYWORDS):
            if any(word in names for word in words):
                ctx.keywords |= 1 << bit
        role = (element.get("role") or "").strip().lower()
        for bit, (_, roles) in enumerate(_ROLE_FLAGS):
            if role in roles:
                ctx.roles |= 1 << bit
        words = []
        for tok in _NAME_SPLIT.split(names):
            if len(tok) > 1:
                words.append(tok)
                parts = [part for part in tok.split("-") if len(part) > 1]
                words.extend(parts if len(parts) > 1 else ())
        tokens = {zlib.crc32(tok.encode()) % HASHED_TOKENS for tok in words}
        if tokens:
            ctx.tokens = ctx.tokens | frozenset(tokens)
        if words:
            ctx.names = (tuple(dict.fromkeys(words)) + ctx.names)[:_NAME_WORDS]
    return ctx


def _hidden(element: Any) -> bool:
    tag = element.tag.lower() if isinstance(element.tag, str) else ""
    if tag in _HIDDEN_TAGS or element.get("hidden") is not None:
        return True
    style = element.get("style")
    return bool(style and _HIDDEN_STYLE.search(style))


def _page_chars(tree: Any) -> tuple[str, list[int], list[_Context]]:
    """The page's visible characters without whitespace, each one's context index, and the
    contexts (iterative walk: pages nest deeper than Python's recursion limit)."""
    chars: list[str] = []
    owner: list[int] = []
    contexts: list[_Context] = []

    def add(text: Optional[str], index: int) -> None:
        if text:
            piece = _WS.sub("", text)
            if piece:
                chars.append(piece)
                owner.extend([index] * len(piece))

    body = tree.find(".//body")
    root = body if body is not None else tree
    stack: list[tuple[Any, int, bool]] = [(root, -1, False)]  # (element, parent context, closing)
    order = 0
    while stack:
        element, parent_index, closing = stack.pop()
        if closing:  # the element's tail belongs to its parent
            add(element.tail, parent_index)
            continue
        if not isinstance(element.tag, str):  # comments, processing instructions
            if element is not root:
                add(element.tail, parent_index)
            continue
        if element is not root:
            stack.append((element, parent_index, True))
        if _hidden(element):
            continue
        ctx = _context(element, contexts[parent_index] if parent_index >= 0 else None, order)
        order += 1
        contexts.append(ctx)
        index = len(contexts) - 1
        add(element.text, index)
        for child in reversed(element):
            stack.append((child, index, False))
    return "".join(chars), owner, contexts


def _clean(text: str) -> str:
    return _WS.sub("", text)


def _align(page: str, lines: Sequence[str]) -> list[list[int]]:
    """Per line, the positions in ``page`` its non-whitespace characters matched."""
    out: list[list[int]] = []
    j = 0
    n = len(page)
    for line in lines:
        text = _clean(line)
        matched: list[int] = []
        i = 0
        while i < len(text):
            if j < n and text[i] == page[j]:
                matched.append(j)
                i += 1
                j += 1
                continue
            if text[i] in _ADDED and (i + 1 >= len(text) or j >= n or text[i + 1] == page[j]):
                i += 1
                continue
            probe = text[i : i + _RESYNC]
            found = page.find(probe, j, min(n, j + _RESYNC_WINDOW)) if len(probe) >= min(_RESYNC, len(text) - i) else -1
            if found >= 0 and len(probe) >= 3:
                j = found
                continue
            i += 1  # a character the page does not have here (or too short to resync on)
        out.append(matched)
    return out


def _siblings(element: Any) -> tuple[int, int]:
    """How many siblings of ``element`` share its tag, and how many siblings it has."""
    parent = element.getparent()
    if parent is None:
        return 0, 0
    same = total = 0
    for sibling in parent:
        if isinstance(sibling.tag, str):
            total += 1
            same += sibling.tag == element.tag
    return max(0, same - 1), max(0, total - 1)


def _parse(html: str) -> Any:
    from refinex.text import _NOSCRIPT, _XML_DECLARATION, _parse as parse_page

    html = _NOSCRIPT.sub(" ", html)
    tree, _complete = parse_page(_XML_DECLARATION.sub("", html, count=1))
    return tree


def has_dom(html: Optional[str]) -> bool:
    """Whether ``html`` is a page these features can be read from."""
    return bool(html and html.strip())


@dataclass(frozen=True)
class PageStructure:
    """What the page's markup says about each line of its text: the :data:`DOM_FEATURES`
    numbers (``features``) and, for models that read words, the words themselves
    (``tokens``: per line, ``tag:<tag>`` for its nearest ancestors, ``path:<a>/<b>/<c>``
    for its tag path and ``name:<word>`` for the class/id/role words around it; empty for a
    line not found in the page)."""

    features: np.ndarray
    tokens: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, rows: slice) -> "PageStructure":
        if not isinstance(rows, slice):
            raise TypeError("a PageStructure is sliced by lines")
        return PageStructure(self.features[rows], self.tokens[rows])

    @classmethod
    def empty(cls, n_lines: int) -> "PageStructure":
        return cls(np.zeros((n_lines, DOM_FEATURES), dtype=np.float32), ((),) * n_lines)


def dom_line_features(html: Optional[str], lines: Sequence[str]) -> np.ndarray:
    """``(len(lines), DOM_FEATURES)`` float32: the structure features of every line of the
    page's text (``refinex.text.html_to_text(html).split("\\n")``); all zeros without HTML."""
    return page_structure(html, lines).features


def _line_tokens(ctx: _Context) -> tuple[str, ...]:
    return (*(f"tag:{t}" for t in ctx.path), "path:" + "/".join(ctx.path), *(f"name:{w}" for w in ctx.names))


def page_structure(html: Optional[str], lines: Sequence[str]) -> PageStructure:
    """The :class:`PageStructure` of every line of the page's text; empty without HTML."""
    empty = PageStructure.empty(len(lines))
    if not has_dom(html) or not lines:
        return empty
    try:
        tree = _parse(str(html))
    except Exception:  # noqa: BLE001 - features are optional: an unreadable page has none
        return empty
    if tree is None:
        return empty
    page, owner, contexts = _page_chars(tree)
    if not page:
        return empty
    rows = empty.features
    tokens: list[tuple[str, ...]] = [()] * len(lines)
    total_order = max(1, len(contexts) - 1)
    sizes: dict[int, int] = {}
    for index in owner:
        block = contexts[index].block_element
        key = id(block)
        sizes[key] = sizes.get(key, 0) + 1
    sibling_cache: dict[int, tuple[int, int]] = {}
    for row, positions in enumerate(_align(page, lines)):
        text_chars = len(_clean(lines[row]))
        if not positions or not text_chars:
            continue
        counts: dict[int, int] = {}
        links = 0
        for position in positions:
            index = owner[position]
            counts[index] = counts.get(index, 0) + 1
            links += contexts[index].in_link
        best = max(counts, key=lambda k: (counts[k], -k))
        ctx = contexts[best]
        tokens[row] = _line_tokens(ctx)
        out = rows[row]
        out[0] = 1.0
        out[1] = len(positions) / text_chars
        out[2] = links / len(positions)
        out[3] = min(1.0, ctx.depth / 40.0)
        out[4] = ctx.order / total_order
        block = ctx.block_element
        out[5] = min(1.0, np.log1p(sizes.get(id(block), 0)) / 10.0)
        if block is not None:
            key = id(block)
            if key not in sibling_cache:
                sibling_cache[key] = _siblings(block)
            same, total = sibling_cache[key]
            out[6] = min(1.0, np.log1p(same) / 5.0)
            out[7] = min(1.0, np.log1p(total) / 5.0)
        if ctx.block >= 0:
            out[_BLOCK_AT + ctx.block] = 1.0
        for bit in range(len(_ANCESTOR_FLAGS)):
            if ctx.flags >> bit & 1:
                out[_ANCESTOR_AT + bit] = 1.0
        for bit in range(len(_KEYWORDS)):
            if ctx.keywords >> bit & 1:
                out[_KEYWORD_AT + bit] = 1.0
        for bit in range(len(_ROLE_FLAGS)):
            if ctx.roles >> bit & 1:
                out[_ROLE_AT + bit] = 1.0
        for token in ctx.tokens:
            out[_TOKEN_AT + token] = 1.0
    return PageStructure(rows, tuple(tokens))
