"""Distil an expert's end-to-end refinement into a minimal deletion-only program.

An expert (an LLM or trafilatura) rewrites a document freely; RefineX (arXiv 2507.03253)
keeps only the part of that rewrite a deletion can express, so that a small model can learn
to emit it as a program (``refinex.program``). ``distill(raw, refined)`` computes that
program; ``distill_report`` adds the accounting.

How the alignment works (all of it linear or near-linear on real documents):

1. Non-blank lines (``raw.split("\\n")``) are compared on their whitespace-normalised
   text, so lines that differ only in whitespace are kept whole. Lines found once on
   each side anchor the alignment (patience diff, recursively inside the gaps); repeated
   lines ("Share", "Advertisement") are left to the next step, which sees their context.
2. Every gap left is aligned at token level (words and single punctuation characters;
   whitespace only separates; a blank line is one token), by a longest common
   subsequence (bit-parallel, exact; anchored on unique tokens and then greedy only for
   huge gaps), which finds
   partial-line deletions and copes with lines the expert merged, split or edited. Words
   are aligned first: a raw line whose aligned words are under 30% of its word characters
   (a line the expert deleted, lending its "the" or "." to the alignment) is left out and
   the gap aligned again, punctuation included, without it. Of equally long alignments,
   the one keeping each raw line's matches on one refined line wins.
3. Raw tokens with no counterpart are deleted. When the expert *replaced* raw text, the
   replacement is not representable: the raw side is kept (and counted in
   ``replaced_chars``) when it resembles the replacement (character similarity >= 0.6) or
   has at most twice as many tokens plus one; otherwise it is treated as deleted. This is
   judged per raw line, against the part of the replacement on refined lines aligned with
   that raw line, so a line's tail the expert dropped stays a deletion even when the next
   line was rewritten. A raw line with no aligned token is removed whole (blank lines
   included), unless all of it is a close rewrite (a fixed typo, words the expert glued).
   A removed line whose text reappears unaligned elsewhere in the expert's output (the
   expert moved it) is kept.
4. A deleted token run inside a kept line goes together with the whitespace on one side,
   chosen to reproduce the expert's whitespace when it is known, so words stay separated
   and no word is ever cut or glued to another: the output's words are raw words.
5. Every ``remove_str`` text is unambiguous in its raw line: found once, or (a doubled
   word, a run of dashes) found only at positions whose deletion gives the same line.
   When the natural text is neither, it is shifted along a repetition or minimally
   extended over adjacent whitespace and punctuation; failing both, that deletion is
   given up rather than deleting a word the expert kept. (Searches are bounded per
   document: a megabyte-long line keeps only its longest deletions.)
6. When the result is not exactly the expert's text, an exact solver tries to embed every
   refined line, in order, into its own raw line by deleting whole units (words,
   punctuation characters, single whitespace characters); it wins when it reproduces the
   refined text without any whitespace-only deletion. So whenever ``refined`` is obtained
   from ``raw`` by deleting whole lines and whole-unit runs within lines, the program
   reproduces it exactly. It cannot when the expert joined lines (a line break survives
   unless its whole line is removed), emptied a line it kept, cut or glued words, or only
   changed whitespace inside lines (never worth a ``remove_str``: when only whitespace
   differs the program is ``keep_all()``).
7. Blank (whitespace-only) lines are layout, not content: the program never spends an
   operation on them. A blank line shares the fate of the nearest non-blank line above it
   (below it, for the blank lines that open the document), so a deleted block takes the
   blank lines that follow it along, deleted blocks separated only by blank lines become
   one ``remove_lines`` range, and blank lines between kept paragraphs stay. Texts are
   compared the same way: the program is ``exact`` when it yields the expert's non-blank
   lines, whatever the expert did with blank lines. (Distilling every dropped blank line
   made three quarters of the operations on the dev pages blank-line deletions, and made
   models trained on them lose count of alternating blank lines.)
"""
from __future__ import annotations

from refinex.distill.distillation import Distillation, distill, distill_report
from refinex.distill.plan import settle_blank_lines

__all__ = ["Distillation", "distill", "distill_report", "settle_blank_lines"]
