"""Offline experts: main-content extractors and cheap heuristics (no network, no model).

Each expert returns *a* refined text for a document; like every expert output it is only a
label, distilled onto the raw text before use. They are the default members of the
consensus expert (``refinex.experts.consensus``):

* ``trafilatura_recall`` / ``trafilatura_precision`` - ``refinex.experts.html``'s
  trafilatura expert with ``favor_recall`` or ``favor_precision``;
* ``justext`` - jusText paragraph classification, with the stoplist of the page's language
  chosen per page among the configured languages;
* ``resiliparse`` - resiliparse's main-content plain-text extraction;
* ``readability`` - the readability algorithm (trafilatura's port of readability-lxml);
* ``dom_prune`` - the page text (``refinex.text.html_to_text``) after removing the DOM
  subtrees that are boilerplate by tag, ARIA role or class/id tokens;
* ``line_rules`` - line heuristics on the raw text alone: boilerplate phrases (cookies,
  sharing, copyright, log-in...), separator-only lines and runs of short menu-like lines.

HTML experts fail (status ``failed``) on a document without HTML; no expert ever raises
from ``refine_batch``.
"""
from __future__ import annotations

import logging
import re
import time
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any, Callable, Optional, Sequence

from refinex.experts.base import FAILED, Expert, ExpertInput, ExpertOutput

logger = logging.getLogger(__name__)

__all__ = [
    "DomPruneExpert",
    "JustextExpert",
    "LineRulesExpert",
    "ReadabilityExpert",
    "ResiliparseExpert",
    "trafilatura_precision",
    "trafilatura_recall",
]


def _pkg(name: str) -> str:
    try:
        return package_version(name)
    except PackageNotFoundError:
        return "unknown"


def _run_each(
    docs: Sequence[ExpertInput], refine_one: Callable[[ExpertInput], str], needs_html: bool
) -> list[ExpertOutput]:
    """Apply ``refine_one`` per document; exceptions become FAILED outputs."""
    outputs: list[ExpertOutput] = []
    for doc in docs:
        if needs_html and not doc.html:
            outputs.append(ExpertOutput(doc.doc_id, None, FAILED, "no html"))
            continue
        started = time.perf_counter()
        try:
            text = refine_one(doc)
        except Exception as exc:  # noqa: BLE001 - third-party extractors raise anything
            logger.debug("expert failed on %s: %s", doc.doc_id, exc)
            error = f"{type(exc).__name__}: {exc}"
            outputs.append(ExpertOutput(doc.doc_id, None, FAILED, error, latency_s=time.perf_counter() - started))
            continue
        outputs.append(ExpertOutput(doc.doc_id, text, latency_s=time.perf_counter() - started))
    return outputs


def trafilatura_recall(**options: Any) -> Expert:
    """``refinex.experts.html.TrafilaturaExpert`` with ``favor_recall=True``."""
    from refinex.experts.html import TrafilaturaExpert

    expert = TrafilaturaExpert(favor_recall=True, **options)
    expert.name = "trafilatura_recall"
    return expert


def trafilatura_precision(**options: Any) -> Expert:
    """``refinex.experts.html.TrafilaturaExpert`` with ``favor_precision=True``."""
    from refinex.experts.html import TrafilaturaExpert

    expert = TrafilaturaExpert(favor_precision=True, **options)
    expert.name = "trafilatura_precision"
    return expert


class JustextExpert:
    """jusText's non-boilerplate paragraphs, one per line.

    The stoplist is chosen per page: the configured language whose stopwords cover the
    largest share of the page's words.
    """

    needs_html: bool = True

    def __init__(
        self,
        languages: Sequence[str] = ("English", "German"),
        length_low: int = 70,
        length_high: int = 200,
        stopwords_low: float = 0.30,
        stopwords_high: float = 0.32,
        max_link_density: float = 0.2,
        keep_headings: bool = True,
        name: str = "justext",
    ) -> None:
        if not languages:
            raise ValueError("JustextExpert needs at least one language")
        self.languages = tuple(languages)
        self.length_low = length_low
        self.length_high = length_high
        self.stopwords_low = stopwords_low
        self.stopwords_high = stopwords_high
        self.max_link_density = max_link_density
        self.keep_headings = keep_headings
        self.name = name
        params = f"{'+'.join(self.languages)}-{length_low}-{length_high}-{stopwords_low}-{stopwords_high}-{max_link_density}-h{int(keep_headings)}"
        self.version = f"justext-{_pkg('jusText')}+{params}"
        self._stoplists: Optional[dict[str, frozenset[str]]] = None

    def _lists(self) -> dict[str, frozenset[str]]:
        if self._stoplists is None:
            import justext

            self._stoplists = {lang: frozenset(justext.get_stoplist(lang)) for lang in self.languages}
        return self._stoplists

    def _stoplist_for(self, text: str) -> frozenset[str]:
        lists = self._lists()
        words = re.findall(r"\w+", text.lower())
        if len(lists) == 1 or not words:
            return next(iter(lists.values()))
        return max(lists.values(), key=lambda stop: sum(1 for w in words if w in stop))

    def _refine(self, doc: ExpertInput) -> str:
        import justext

        stoplist = self._stoplist_for(doc.text or "")
        paragraphs = justext.justext(
            doc.html,
            stoplist,
            length_low=self.length_low,
            length_high=self.length_high,
            stopwords_low=self.stopwords_low,
            stopwords_high=self.stopwords_high,
            max_link_density=self.max_link_density,
            no_headings=not self.keep_headings,
        )
        return "\n".join(p.text for p in paragraphs if not p.is_boilerplate)

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        return _run_each(docs, self._refine, needs_html=True)

    def __repr__(self) -> str:
        return f"JustextExpert(name={self.name!r}, version={self.version!r})"


class ResiliparseExpert:
    """resiliparse's main-content plain-text extraction (``main_content=True``)."""

    needs_html: bool = True

    def __init__(self, comments: bool = False, post_meta: bool = False, name: str = "resiliparse") -> None:
        self.comments = comments
        self.post_meta = post_meta
        self.name = name
        self.version = f"resiliparse-{_pkg('Resiliparse')}+c{int(comments)}m{int(post_meta)}"

    def _refine(self, doc: ExpertInput) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(
            doc.html,
            preserve_formatting=True,
            main_content=True,
            list_bullets=True,
            alt_texts=False,
            links=False,
            form_fields=False,
            noscript=False,
            comments=self.comments,
            post_meta=self.post_meta,
        )

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        return _run_each(docs, self._refine, needs_html=True)

    def __repr__(self) -> str:
        return f"ResiliparseExpert(name={self.name!r}, version={self.version!r})"


class ReadabilityExpert:
    """The readability algorithm (trafilatura's port of readability-lxml): the best-scored
    content block of the page, rendered by ``refinex.text.html_to_text``."""

    needs_html: bool = True

    def __init__(self, min_text_length: int = 25, name: str = "readability") -> None:
        self.min_text_length = min_text_length
        self.name = name
        self.version = f"readability-trafilatura-{_pkg('trafilatura')}+{min_text_length}"

    def _refine(self, doc: ExpertInput) -> str:
        from trafilatura.readability_lxml import Document
        from trafilatura.utils import load_html

        from refinex.text import html_to_text

        tree = load_html(doc.html)
        if tree is None:
            raise ValueError("unparsable html")
        return html_to_text(Document(tree, min_text_length=self.min_text_length).summary())

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        return _run_each(docs, self._refine, needs_html=True)

    def __repr__(self) -> str:
        return f"ReadabilityExpert(name={self.name!r}, version={self.version!r})"


# Class/id tokens (split on non-letters) that mark a boilerplate subtree.
BOILERPLATE_TOKENS = frozenset(
    """
    nav navbar navigation menu menubar submenu megamenu topbar toolbar footer sidebar
    breadcrumb breadcrumbs cookie cookies consent gdpr share sharing sharebar social
    socials sociallinks comment comments commentlist respond related recommended
    recommendations widget widgets banner advert advertisement adverts ads adsense
    sponsor sponsored promo newsletter subscribe subscription popup modal overlay
    skiplink pagination pager tagcloud taglist tags login signin signup register
    sitemap masthead copyright disclaimer teaser teasers outbrain taboola rss print
    """.split()
)
BOILERPLATE_TAGS = frozenset({"nav", "aside", "footer", "form", "button", "menu"})
BOILERPLATE_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "dialog"})
PROTECTED_TAGS = frozenset({"html", "body", "main", "article"})
_TOKEN_SPLIT = re.compile(r"[^a-z]+")


class DomPruneExpert:
    """The page text after deleting boilerplate subtrees of the DOM.

    A subtree is boilerplate by tag (``nav``, ``aside``, ``footer``, ``form``...; ``header``
    only outside ``article``/``main``), ARIA role, or a class/id token in
    ``BOILERPLATE_TOKENS``. A subtree holding more than ``max_share`` of the page's text is
    never removed (a wrapper with a ``has-sidebar`` class is not boilerplate). The pruned
    page is rendered by ``refinex.text.html_to_text``, the same renderer as the raw text,
    so the output is a line-aligned deletion of it.
    """

    needs_html: bool = True

    def __init__(self, max_share: float = 0.4, name: str = "dom_prune") -> None:
        if not 0.0 < max_share <= 1.0:
            raise ValueError("max_share must be in (0, 1]")
        self.max_share = max_share
        self.name = name
        self.version = f"dom-prune-r1+{max_share}"

    def _is_boilerplate(self, element: object) -> bool:
        tag = getattr(element, "tag", None)
        if not isinstance(tag, str):
            return False
        tag = tag.lower()
        if tag in PROTECTED_TAGS:
            return False
        if tag in BOILERPLATE_TAGS:
            return True
        get = getattr(element, "get")
        if (get("role") or "").strip().lower() in BOILERPLATE_ROLES:
            return True
        if tag == "header":
            parent = element.getparent()  # type: ignore[attr-defined]
            while parent is not None:
                if isinstance(parent.tag, str) and parent.tag.lower() in ("article", "main"):
                    return False
                parent = parent.getparent()
            return True
        names = f"{get('class') or ''} {get('id') or ''}".lower()
        return any(tok in BOILERPLATE_TOKENS for tok in _TOKEN_SPLIT.split(names) if tok)

    def _refine(self, doc: ExpertInput) -> str:
        from lxml import etree
        from lxml.html import HTMLParser, document_fromstring

        from refinex.text import html_to_text

        html = re.sub(r"^\s*<\?xml[^>]*\?>", "", doc.html or "", count=1)
        tree = document_fromstring(html, parser=HTMLParser(huge_tree=True))
        body = tree.find("body")
        root = body if body is not None else tree
        total = max(1, len(" ".join(root.itertext()).split()))
        limit = self.max_share * total
        doomed = []
        stack = list(root)
        while stack:
            element = stack.pop()
            if self._is_boilerplate(element):
                words = len(" ".join(element.itertext()).split())
                if words <= limit:
                    doomed.append(element)
                    continue
            stack.extend(element)
        for element in doomed:
            parent = element.getparent()
            if parent is None:
                continue
            tail = element.tail
            if tail:
                previous = element.getprevious()
                if previous is not None:
                    previous.tail = (previous.tail or "") + tail
                else:
                    parent.text = (parent.text or "") + tail
            parent.remove(element)
        return html_to_text(etree.tostring(tree, encoding="unicode", method="html"))

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        return _run_each(docs, self._refine, needs_html=True)

    def __repr__(self) -> str:
        return f"DomPruneExpert(name={self.name!r}, version={self.version!r})"


_BOILERPLATE_LINE = re.compile(
    r"""
    cookie | consent | datenschutz | privacy\ policy | terms\ of\ (use|service) | impressum
    | all\ rights\ reserved | alle\ rechte\ vorbehalten | ©|\(c\)\ \d{4} | copyright
    | \bshare\b | teilen | tweet | whatsapp | facebook | pinterest | linkedin | instagram
    | newsletter | subscribe | abonnieren | sign\ (up|in) | log\ ?in\b | anmelden | registrieren
    | skip\ to | zum\ inhalt | read\ more | weiterlesen | mehr\ lesen | related\ (posts|articles)
    | advertisement | anzeige | sponsored | werbung | back\ to\ top | nach\ oben
    | \bmenu\b | \bmenü\b | \bsearch\b | \bsuche\b | comments?\ \(\d+\) | \d+\ comments?
    | leave\ a\ (reply|comment) | kommentar | previous\ (post|article) | next\ (post|article)
    """,
    re.IGNORECASE | re.VERBOSE,
)
_SENTENCE_END = re.compile(r"[.!?:;\"“”'»)]\s*$")
_SEPARATOR_ONLY = re.compile(r"^[\s|/\\·•»«>›‹<\-–—_*=+#~.,:;()\[\]]*$")


class LineRulesExpert:
    """Deletes raw-text lines by rules; needs no HTML.

    A line is deleted when it is separator-only; when it is short (at most
    ``phrase_max_words`` words) and matches a boilerplate phrase; or when it belongs to a run
    of at least ``menu_run`` consecutive short lines (at most ``menu_max_words`` words, no
    sentence punctuation at the end), the shape of menus and link lists. Blank lines are
    kept. Everything else is kept verbatim.
    """

    needs_html: bool = False

    def __init__(
        self,
        phrase_max_words: int = 12,
        menu_max_words: int = 4,
        menu_run: int = 4,
        name: str = "line_rules",
    ) -> None:
        self.phrase_max_words = phrase_max_words
        self.menu_max_words = menu_max_words
        self.menu_run = menu_run
        self.name = name
        self.version = f"line-rules-r1+{phrase_max_words}-{menu_max_words}-{menu_run}"

    def _menu_like(self, line: str) -> bool:
        stripped = line.strip().lstrip("-•*").strip()
        if not stripped:
            return False
        words = stripped.split()
        return len(words) <= self.menu_max_words and not _SENTENCE_END.search(stripped)

    def deleted_lines(self, text: str) -> list[bool]:
        """Per line of ``text.split("\\n")``, whether the rules delete it."""
        lines = text.split("\n")
        deleted = [False] * len(lines)
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped:
                continue
            if _SEPARATOR_ONLY.match(stripped):
                deleted[i] = True
            elif len(stripped.split()) <= self.phrase_max_words and _BOILERPLATE_LINE.search(stripped):
                deleted[i] = True
        # Runs of menu-like lines (blank lines do not break a run).
        run: list[int] = []
        for i, line in enumerate(lines + ["."]):
            if i < len(lines) and not line.strip():
                continue
            if i < len(lines) and self._menu_like(line):
                run.append(i)
                continue
            if len(run) >= self.menu_run:
                for j in run:
                    deleted[j] = True
            run = []
        return deleted

    def _refine(self, doc: ExpertInput) -> str:
        lines = doc.text.split("\n")
        deleted = self.deleted_lines(doc.text)
        return "\n".join(line for line, gone in zip(lines, deleted) if not gone)

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        return _run_each(docs, self._refine, needs_html=False)

    def __repr__(self) -> str:
        return f"LineRulesExpert(name={self.name!r}, version={self.version!r})"

