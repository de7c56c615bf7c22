"""One README builder for every experiment: the seed questions answered, then sections.

An experiment's README is::

    # NAME (seed labs ...)
    <headline>
    ## The questions, answered
    **1. <label>.** > <question>
    <answer from the measured numbers>
    ...
    ## <section title>
    <section body>
    ...

Experiments build their answers and sections as short strings from their records and
summary (:func:`render` only lays them out), so every number shown is one results.json
holds. Quoted question lines are blockquotes (``> ``): they quote the seed, not a
measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

from flashmath.lab.seeds import Question, questions

__all__ = ["Section", "render"]

#: A titled piece of a README: (title, body); a body may be a list of paragraphs/lines.
Section = tuple[str, str | Sequence[str]]


def _body(body: str | Sequence[str]) -> str:
    return body if isinstance(body, str) else "\n".join(body)


def render(name: str, seeds: Sequence[str], headline: str,
           answers: Sequence[str | Sequence[str]], sections: Sequence[Section] = ()) -> str:
    """The Markdown README of experiment ``name``.

    answers: one answer per question of ``seeds.questions(name)``, in that order (ValueError
    when the counts differ: every question is answered, none twice). sections: further
    (title, body) pieces after the answers: method, tables, figures.
    """
    qs: tuple[Question, ...] = questions(name)
    if len(answers) != len(qs):
        raise ValueError(f"{name}: {len(qs)} questions but {len(answers)} answers")
    where = (f"seed lab{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}; see docs/seeds.md"
             if seeds else "beyond the seed labs")
    lines = [f"# {name} ({where})", "", headline.rstrip(".") + ".", "",
             "## The questions, answered", ""]
    for i, (q, answer) in enumerate(zip(qs, answers, strict=True), start=1):
        lines += [f"**{i}. {q.label}.**", "", f"> {q.text}", "", _body(answer).strip(), ""]
    for title, body in sections:
        lines += [f"## {title}", "", _body(body).strip(), ""]
    return "\n".join(lines).rstrip() + "\n"
