"""Reader / writer for the VANS-Data (VNEP) CSV layout.

Layout (VANS-Data-100K as released): one row per sample; the columns we use
are

=====================  =====================================================
``input_video_path``   input clip, relative to a video root (``<vid>/<k>.mp4``)
``output_video_path``  the next-event clip (same convention)
``ENG_Instruction``    the question                       -> ``VNEPRow.question``
``ENG_Think``          the reasoning                      -> ``VNEPRow.think``
``ENG_GT_Caption``     the answer caption                 -> ``VNEPRow.caption``
=====================  =====================================================

Every other column (``name``, ``recipe_type``, ``input_id``, ``target_id``,
``input_sentence``, ``target_sentence``, dense captions, ``CHN_*``, and the
synthetic world's ``kind`` / ``event`` / ``scene``) is kept verbatim in
``VNEPRow.extra``.

Reading rules
-------------
* The file is UTF-8 and may start with a UTF-8 BOM (``utf-8-sig``); fields may
  span lines (standard CSV quoting).  Bytes that are not UTF-8 (e.g. a cp1252
  export: "café" as ``caf\xe9``) raise :class:`VNEPFormatError` naming the file,
  the line and the byte offset; nothing is silently replaced.
* A file without a header, or with a header and no data rows, raises
  :class:`VNEPFormatError`.
* All text fields are whitespace-trimmed.  A trailing separator block such as
  ``"\\n\\n---"`` (one or more lines of 3+ dashes, as left over in some released
  captions) is stripped from ``caption`` and ``think``.
* A header lacking a required column raises :class:`VNEPFormatError` naming
  the column(s) and the file.  ``ENG_Think`` is required in the header unless
  ``require_think=False``; an *empty* think in a row is allowed (counted as a
  warning, ``empty_think``).
* A malformed row is skipped and counted, never raised: reasons are
  ``missing_fields`` (row shorter than the header), ``extra_fields`` (longer:
  usually broken quoting), ``empty_input_video_path``,
  ``empty_output_video_path``, ``empty_question``, ``empty_caption``.
* ``VNEPRow.index`` is the 0-based position of the row among the data rows
  of the file (skipped rows keep their number, so indices are stable).

Question kind
-------------
``kind`` is ``"procedural"`` ("what should I do next?") or ``"predictive"``
("what will happen next?"), else ``"unknown"``.  A ``kind`` (or
``question_type``) column wins when it holds one of those words; otherwise a
keyword heuristic on the question decides: *should / do next / next step /
need to / supposed to* -> procedural, *will / going to / happen / predict* ->
predictive (procedural cues are checked first).  The released VANS-Data has
no kind column; its ``recipe_type`` column is a task category, not the kind.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import sys
from collections import Counter
from typing import Iterable, Sequence

__all__ = [
    "COL_INPUT",
    "COL_OUTPUT",
    "COL_QUESTION",
    "COL_THINK",
    "COL_CAPTION",
    "REQUIRED_COLUMNS",
    "KINDS",
    "VNEPRow",
    "VNEPRowList",
    "CSVReport",
    "VNEPFormatError",
    "read_vnep_csv",
    "write_vnep_csv",
    "clean_text",
    "infer_kind",
]

COL_INPUT = "input_video_path"
COL_OUTPUT = "output_video_path"
COL_QUESTION = "ENG_Instruction"
COL_THINK = "ENG_Think"
COL_CAPTION = "ENG_GT_Caption"
REQUIRED_COLUMNS = (COL_INPUT, COL_OUTPUT, COL_QUESTION, COL_THINK, COL_CAPTION)
_MAPPED = set(REQUIRED_COLUMNS)
KINDS = ("procedural", "predictive")
_KIND_COLUMNS = ("kind", "question_type")
_BOM = b"\xef\xbb\xbf"

_SEP_LINE = re.compile(r"\s*-{3,}\s*")
_PROC_RE = re.compile(r"\b(should|do next|next step|need to|supposed to|what do i do|how do i)\b", re.I)
_PRED_RE = re.compile(r"\b(will|going to|happen|happens|predict)\b", re.I)


class VNEPFormatError(ValueError):
    """The CSV is unusable as a whole: not UTF-8, empty, header only, or a
    required column missing."""


@dataclasses.dataclass
class VNEPRow:
    index: int
    input_video_path: str
    output_video_path: str
    question: str
    think: str
    caption: str
    kind: str = "unknown"
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CSVReport:
    path: str
    total_rows: int = 0
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    warnings: Counter = dataclasses.field(default_factory=Counter)
    # (row index, reason) of the first ``max_examples`` skipped rows
    examples: list = dataclasses.field(default_factory=list)
    kinds: Counter = dataclasses.field(default_factory=Counter)
    bom: bool = False

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"{self.path}: {self.total_rows} rows, {self.kept} kept, {self.num_skipped} skipped"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n}")
        for reason, n in sorted(self.warnings.items()):
            lines.append(f"  warning {reason}: {n}")
        if self.kinds:
            lines.append("  kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "total_rows": self.total_rows,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "warnings": dict(self.warnings),
            "kinds": dict(self.kinds),
            "examples": [list(e) for e in self.examples],
            "bom": self.bom,
        }


class VNEPRowList(list):
    """A ``list[VNEPRow]`` that also carries the :class:`CSVReport` (``.report``)."""

    report: CSVReport

    def __init__(self, rows: Iterable[VNEPRow] = (), report: CSVReport | None = None):
        super().__init__(rows)
        self.report = report if report is not None else CSVReport(path="<memory>")


def clean_text(s: str | None) -> str:
    """Trim whitespace and drop a trailing ``---`` separator block."""
    if s is None:
        return ""
    lines = s.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    while lines and (not lines[-1].strip() or _SEP_LINE.fullmatch(lines[-1])):
        lines.pop()
    return "\n".join(lines).strip()


def infer_kind(question: str, extra: dict | None = None) -> str:
    """``procedural`` / ``predictive`` / ``unknown`` (see module docstring)."""
    for col in _KIND_COLUMNS:
        v = (extra or {}).get(col)
        if isinstance(v, str) and v.strip().lower() in KINDS:
            return v.strip().lower()
    q = question or ""
    if _PROC_RE.search(q):
        return "procedural"
    if _PRED_RE.search(q):
        return "predictive"
    return "unknown"


def _raise_field_limit():
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def read_vnep_csv(
    path,
    *,
    require_think: bool = True,
    max_examples: int = 20,
) -> VNEPRowList:
    """Read a VANS-Data CSV.  Returns a :class:`VNEPRowList` (a list of
    :class:`VNEPRow`) whose ``.report`` counts kept / skipped rows by reason.

    Raises ``FileNotFoundError`` for a missing file and :class:`VNEPFormatError`
    for an empty or header-only file, bytes that are not UTF-8 (naming the line
    and byte offset) or a header missing required columns.
    """
    path = os.fspath(path)
    _raise_field_limit()
    with open(path, "rb") as fb:
        raw = fb.read()
    bom = raw.startswith(_BOM)
    text = _decode_utf8(raw, path)
    report = CSVReport(path=path, bom=bom)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise VNEPFormatError(f"{path}: empty CSV (no header)") from None
    header = [h.strip() for h in header]
    required = REQUIRED_COLUMNS if require_think else tuple(c for c in REQUIRED_COLUMNS if c != COL_THINK)
    missing = [c for c in required if c not in header]
    if missing:
        raise VNEPFormatError(
            f"{path}: missing required column(s) {', '.join(repr(m) for m in missing)}; header has {header}"
        )
    pos = {name: i for i, name in enumerate(header)}  # last one wins on duplicates
    ncol = len(header)
    rows = VNEPRowList(report=report)

    def skip(i, reason):
        report.skipped[reason] += 1
        if len(report.examples) < max_examples:
            report.examples.append((i, reason))

    i = -1
    for rec in reader:
        if not rec or all(not f.strip() for f in rec):  # blank line: not a row
            continue
        i += 1
        report.total_rows += 1
        if len(rec) < ncol:
            skip(i, "missing_fields")
            continue
        if len(rec) > ncol:
            skip(i, "extra_fields")
            continue
        get = lambda c: rec[pos[c]] if c in pos else ""  # noqa: E731
        inp, out = get(COL_INPUT).strip(), get(COL_OUTPUT).strip()
        question, think, caption = clean_text(get(COL_QUESTION)), clean_text(get(COL_THINK)), clean_text(get(COL_CAPTION))
        if not inp:
            skip(i, "empty_input_video_path")
            continue
        if not out:
            skip(i, "empty_output_video_path")
            continue
        if not question:
            skip(i, "empty_question")
            continue
        if not caption:
            skip(i, "empty_caption")
            continue
        if not think:
            report.warnings["empty_think"] += 1
        extra = {name: rec[j] for name, j in pos.items() if name not in _MAPPED}
        kind = infer_kind(question, extra)
        report.kinds[kind] += 1
        rows.append(VNEPRow(i, inp, out, question, think, caption, kind, extra))
        report.kept += 1
    if report.total_rows == 0:
        raise VNEPFormatError(f"{path}: header only, no data rows (header has {header})")
    return rows


def _decode_utf8(raw: bytes, path: str) -> str:
    """The file's text (a leading BOM dropped); bytes that are not UTF-8 raise
    :class:`VNEPFormatError` naming the file, the line and the byte offset."""
    start = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line_no = raw.count(b"\n", 0, offset) + 1
        line_start = raw.rfind(b"\n", 0, offset) + 1
        line_end = raw.find(b"\n", offset)
        line = raw[line_start:len(raw) if line_end < 0 else line_end].rstrip(b"\r")
        shown = line.decode("utf-8", errors="backslashreplace")
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise VNEPFormatError(
            f"{path}: not UTF-8 at line {line_no}, byte offset {offset} (byte {offset - line_start + 1} of the line): "
            f"bytes {raw[offset:start + e.end]!r} ({e.reason}) in the line '{shown}'. Re-save the file as UTF-8 "
            f"(e.g. from cp1252 / Latin-1: iconv -f cp1252 -t utf-8 IN.csv > OUT.csv)"
        ) from None


def write_vnep_csv(rows: Sequence[VNEPRow], path, *, bom: bool = False, kind_column: bool = True) -> str:
    """Write rows in the VANS-Data layout.

    Columns: ``name`` (if any row has it) then the five mapped columns, then
    ``kind`` (when ``kind_column``), then every other ``extra`` key in
    first-seen order.  ``bom=True`` writes a UTF-8 BOM like the released files.
    """
    path = os.fspath(path)
    extras: list[str] = []
    for r in rows:
        for k in r.extra:
            if k not in extras and k not in _MAPPED and k != "kind":
                extras.append(k)
    header = []
    if "name" in extras:
        header.append("name")
        extras.remove("name")
    header += list(REQUIRED_COLUMNS)
    if kind_column:
        header.append("kind")
    header += extras
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            vals = {
                COL_INPUT: r.input_video_path,
                COL_OUTPUT: r.output_video_path,
                COL_QUESTION: r.question,
                COL_THINK: r.think,
                COL_CAPTION: r.caption,
                "kind": r.kind,
            }
            w.writerow([vals[c] if c in vals else str(r.extra.get(c, "")) for c in header])
    return path
