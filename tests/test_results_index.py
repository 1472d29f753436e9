"""experiments/results/INDEX.md backs every figure of the README, and lists every result file.

The index has one section per claim, headed ``### R<n> · <title>`` with the fields ``- files:`` (paths under
experiments/results/, globs allowed), ``- command:``, ``- commit:``, ``- device:`` and ``- figures:`` (the
README figures the row backs, each in backticks, verbatim). The README's results section cites rows as
``[R<n>]``.

Checked both ways, without JAX:
- every file under experiments/results/ outside archive/ (INDEX.md aside) is matched by some row's files, and
  every path or glob a row names matches at least one file;
- every figure in the README's results sections (every ``## `` section but the few in NOT_RESULTS; a figure is
  a number with a unit such as ms, s, TF/s, x, %, GB, GiB, MiB, K tokens/s, or a decimal with two or more
  places, such as a loss) sits in a paragraph or table that cites rows, and is listed among those rows'
  figures; every cited row exists and every row is cited.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
INDEX = RESULTS / "INDEX.md"
README = ROOT / "README.md"
# README sections that state no measured result (install and run times, the API, the layout); every other
# section, and any section added later, is checked for figures
NOT_RESULTS = ("Two commands", "Quickstart", "The algorithm (what the tests check)", "Library tour",
               "Notebooks",
               "Layout", "Tests", "Citation")
FIELDS = ("files", "command", "commit", "device", "figures")

_NUM = r"\d+(?:[.,]\d+)*"
_SEP = r"\s?(?:-|/|→|–)\s?"
_UNIT = (r"(?:[KM] tokens/s|tokens/s|tok/s|TFLOP/s|TF/s|TB/s|GB/s|ms|µs|us|min|s|x|×|%|TB|GB|GiB|MB|MiB|KiB"
         r"|bytes)")
# a number (or a range / list of numbers like 1.05-1.21 or 100/15/0) with a unit, or a decimal of >= 2 places
FIGURE = re.compile(
    rf"(?<![\w.])(?:>= )?{_NUM}(?:{_SEP}{_NUM})*\s?{_UNIT}(?![\w])"
    rf"|(?<![\w.])\d+\.\d{{2,}}(?:{_SEP}\d+\.\d{{2,}})*(?![\w.])"
)
REF = re.compile(r"\[(R\d+)\]")
LINK_DEFINITION = re.compile(r"^\[(R\d+)\]: (\S+)$", flags=re.MULTILINE)


def readme_figures(text: str) -> list[str]:
    """The figures of one stretch of README text, whitespace collapsed."""
    return [" ".join(m.group(0).split()) for m in FIGURE.finditer(text.replace("**", ""))]


def parse_index(text: str) -> dict[str, dict[str, str]]:
    """Row id -> {field: its text, from ``- field:`` to the next field} for every ``### R<n>`` section."""
    rows: dict[str, dict[str, str]] = {}
    for section in re.split(r"^(?=### R\d+\b)", text, flags=re.MULTILINE)[1:]:
        rid = re.match(r"### (R\d+)\b", section).group(1)
        assert rid not in rows, f"INDEX.md: {rid} appears twice"
        starts = {m.group(1): m
                  for m in re.finditer(rf"^- ({'|'.join(FIELDS)}):", section, flags=re.MULTILINE)}
        missing = [name for name in FIELDS if name not in starts]
        assert not missing, f"INDEX.md {rid}: no '- {missing[0]}:' line"
        ends = sorted(m.start() for m in starts.values()) + [len(section)]
        rows[rid] = {name: section[m.end(): min(e for e in ends if e > m.start())].strip()
                     for name, m in starts.items()}
    return rows


def backticked(field: str) -> list[str]:
    return re.findall(r"`([^`]+)`", field)


def results_sections(text: str) -> dict[str, str]:
    """Title -> body of every ``## `` section of the README outside NOT_RESULTS (the title block above the
    first section is the project's summary and is not checked)."""
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    titled = {s.split("\n", 1)[0].strip(): s.split("\n", 1)[1] if "\n" in s else "" for s in sections}
    return {title: body for title, body in titled.items() if title not in NOT_RESULTS}


def readme_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(block text, rows cited) for each paragraph or table of the README's results sections; a table with no
    citation of its own takes those of the paragraph just above it (its caption)."""
    blocks = []
    for body in results_sections(text).values():
        blocks += _blocks(body)
    return blocks


def _blocks(body: str) -> list[tuple[str, list[str]]]:
    blocks, caption_refs = [], []
    for block in re.split(r"\n\s*\n", body):
        if not block.strip() or re.fullmatch(r"(\[R\d+\]: \S+\s*)+", block.strip()):
            continue
        refs = REF.findall(block)
        if block.lstrip().startswith("|"):
            refs = refs or caption_refs
        else:
            caption_refs = refs
        blocks.append((block, refs))
    return blocks


@pytest.fixture(scope="module")
def rows():
    return parse_index(INDEX.read_text())


def test_the_index_has_rows_with_every_field_filled(rows):
    assert rows, "INDEX.md has no '### R<n>' rows"
    for rid, fields in rows.items():
        for name in FIELDS:
            assert fields[name], f"INDEX.md {rid}: '- {name}:' is empty"
        no_file = fields["files"].lower().startswith("no file")
        assert no_file or re.search(r"\b[0-9a-f]{7,40}\b", fields["commit"]), f"{rid}: commit names no hash"
        assert backticked(fields["figures"]), f"{rid}: lists no figures"


def test_every_result_file_is_indexed_and_every_indexed_path_exists(rows):
    listed: set[pathlib.Path] = set()
    for rid, fields in rows.items():
        if fields["files"].lower().startswith("no file"):
            continue
        for pattern in backticked(fields["files"]):
            matched = [p for p in RESULTS.glob(pattern) if p.is_file()]
            assert matched, f"INDEX.md {rid}: `{pattern}` matches no file under experiments/results/"
            assert not any("archive" in p.relative_to(RESULTS).parts
                           for p in matched), f"{rid}: cites archive/"
            listed.update(matched)
    on_disk = {p for p in RESULTS.rglob("*") if p.is_file() and p != INDEX
               and p.relative_to(RESULTS).parts[0] != "archive"}
    missing = sorted(str(p.relative_to(RESULTS)) for p in on_disk - listed)
    assert not missing, f"files under experiments/results/ that no INDEX.md row lists: {missing}"


def test_every_readme_figure_has_an_index_row(rows):
    cited: set[str] = set()
    for block, refs in readme_blocks(README.read_text()):
        figures = readme_figures(block)
        unknown = [r for r in refs if r not in rows]
        assert not unknown, f"README cites {unknown}, which INDEX.md does not have"
        cited.update(refs)
        if not figures:
            continue
        assert refs, f"README figures {figures} cite no INDEX.md row, in:\n{block}"
        backed = {" ".join(f.split()) for r in refs for f in backticked(rows[r]["figures"])}
        unbacked = [f for f in figures if f not in backed]
        assert not unbacked, (f"README figures {unbacked} are in none of the rows {refs} it cites, "
                              f"in:\n{block}")
    uncited = sorted(set(rows) - cited, key=lambda r: int(r[1:]))
    assert not uncited, f"INDEX.md rows the README never cites: {uncited}"


def test_the_readme_has_a_results_section_and_the_exempt_sections_exist():
    text = README.read_text()
    titles = re.findall(r"^## (.*)$", text, flags=re.MULTILINE)
    absent = set(NOT_RESULTS) - set(titles)
    assert not absent, f"NOT_RESULTS names sections the README lacks: {sorted(absent)}"
    assert any(readme_figures(body)
               for body in results_sections(text).values()), "no figures found in the README"


def test_every_readme_citation_has_a_link_to_its_row():
    text = README.read_text()
    cited = set(REF.findall(LINK_DEFINITION.sub("", text)))
    defined = dict(LINK_DEFINITION.findall(text))
    missing = sorted(cited - set(defined))
    assert cited <= set(defined), f"README citations without a link definition: {missing}"
    for rid, target in defined.items():
        assert target == f"experiments/results/INDEX.md#{rid.lower()}", f"[{rid}] links to {target}"
        assert f'<a id="{rid.lower()}"></a>' in INDEX.read_text(), f"INDEX.md has no anchor for {rid}"


@pytest.mark.parametrize("text, figures", [
    ("3.92 ms (569 TF/s); Triton 6.24 ms (357)", ["3.92 ms", "569 TF/s", "6.24 ms"]),
    ("val k8 0.418 < k16 0.429, 1.138/1.136/1.273 (b fails)", ["0.418", "0.429", "1.138/1.136/1.273"]),
    ("scores 100/15/0% at 2K/8K/32K, reaches 4x, 436K tokens/s, 8.2 GiB, >= 95% at 16x",
     ["100/15/0%", "4x", "436K tokens/s", "8.2 GiB", ">= 95%", "16x"]),
    ("1.2M tokens/s at 2.9 TB/s, 12 µs, 3 min", ["1.2M tokens/s", "2.9 TB/s", "12 µs", "3 min"]),
    ("B=1, N=32, W=128, top_k 4/8/16, 13.1M tokens, T = 2048, keep ratio 0.2, jax 0.11.2, 1200 steps", []),
])
def test_the_figure_pattern(text, figures):
    assert readme_figures(text) == figures
