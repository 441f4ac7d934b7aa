import csv

import pytest

from vans_jax.data.csv_format import (
    REQUIRED_COLUMNS,
    VNEPFormatError,
    VNEPRow,
    clean_text,
    infer_kind,
    read_vnep_csv,
    write_vnep_csv,
)

HEADER = ["name", "recipe_type", "input_id", "target_id", "input_video_path", "output_video_path",
          "ENG_Instruction", "ENG_Think", "ENG_GT_Caption", "CHN_Instruction"]


def _write(path, header, rows, bom=True):
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)


def _row(name, q="What should I do next?", think="Because.", cap="Stir the soup.", inp=None, out=None):
    return [name, "cooking", "1", "2", inp if inp is not None else f"{name}/1.mp4",
            out if out is not None else f"{name}/2.mp4", q, think, cap, "下一步"]


def test_bom_trailing_separator_and_whitespace(tmp_path):
    p = tmp_path / "a.csv"
    _write(p, HEADER, [
        _row("v0", q="  What will happen next?  ", cap="The ball bounces.\n\n---"),
        _row("v1", think="  think  \n\n---\n", cap="  Add the onions.\n---  \n\n---  "),
        _row("v2", cap="Multi\nline caption, with comma \"quoted\""),
    ])
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    rows = read_vnep_csv(p)
    assert rows.report.bom and rows.report.kept == 3 and rows.report.num_skipped == 0
    r0, r1, r2 = rows
    assert r0.question == "What will happen next?"
    assert r0.caption == "The ball bounces."
    assert r1.caption == "Add the onions." and r1.think == "think"
    assert r2.caption == 'Multi\nline caption, with comma "quoted"'
    # BOM must not leak into the first column name
    assert r0.extra["name"] == "v0" and "\ufeffname" not in r0.extra
    assert r0.extra["CHN_Instruction"] == "下一步" and r0.extra["recipe_type"] == "cooking"
    assert (r0.index, r1.index, r2.index) == (0, 1, 2)
    assert r0.kind == "predictive" and r1.kind == "procedural"
    assert r0.input_video_path == "v0/1.mp4" and r0.output_video_path == "v0/2.mp4"


def test_malformed_rows_skipped_and_counted(tmp_path):
    p = tmp_path / "b.csv"
    with open(p, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow(_row("ok0"))
        w.writerow(_row("short")[:5])  # missing fields
        w.writerow(_row("long") + ["x", "y"])  # extra fields
        w.writerow(_row("noq", q="   "))
        w.writerow(_row("nocap", cap="\n\n---"))  # only a separator -> empty
        w.writerow(_row("noin", inp=" "))
        w.writerow(_row("noout", out=""))
        w.writerow([])  # blank line: ignored, not a row
        w.writerow(_row("nothink", think=""))
        w.writerow(_row("ok1"))
    rows = read_vnep_csv(p)
    rep = rows.report
    assert [r.extra["name"] for r in rows] == ["ok0", "nothink", "ok1"]
    assert [r.index for r in rows] == [0, 7, 8]  # indices count every data row
    assert rep.total_rows == 9 and rep.kept == 3 and rep.num_skipped == 6
    assert dict(rep.skipped) == {
        "missing_fields": 1, "extra_fields": 1, "empty_question": 1, "empty_caption": 1,
        "empty_input_video_path": 1, "empty_output_video_path": 1,
    }
    assert rep.warnings["empty_think"] == 1
    assert (1, "missing_fields") in rep.examples
    s = rep.summary()
    assert "6 skipped" in s and "empty_caption: 1" in s


def test_missing_required_column_is_clear_error(tmp_path):
    p = tmp_path / "c.csv"
    hdr = [h for h in HEADER if h != "ENG_GT_Caption"]
    _write(p, hdr, [["x"] * len(hdr)])
    with pytest.raises(VNEPFormatError) as ei:
        read_vnep_csv(p)
    msg = str(ei.value)
    assert "ENG_GT_Caption" in msg and str(p) in msg
    # think can be made optional
    p2 = tmp_path / "d.csv"
    hdr2 = [h for h in HEADER if h != "ENG_Think"]
    _write(p2, hdr2, [["v", "c", "1", "2", "a.mp4", "b.mp4", "What will happen next?", "Cap.", "x"]])
    with pytest.raises(VNEPFormatError, match="ENG_Think"):
        read_vnep_csv(p2)
    rows = read_vnep_csv(p2, require_think=False)
    assert len(rows) == 1 and rows[0].think == "" and rows[0].caption == "Cap."
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(VNEPFormatError, match="empty"):
        read_vnep_csv(empty)
    with pytest.raises(FileNotFoundError):
        read_vnep_csv(tmp_path / "nope.csv")


def test_write_read_roundtrip(tmp_path):
    rows = [
        VNEPRow(0, "a/0.mp4", "a/1.mp4", "What will happen next?", "t, with comma", "Cap \"q\"\nline2",
                "predictive", {"name": "a", "scene": '{"x": 1}'}),
        VNEPRow(1, "b/0.mp4", "b/1.mp4", "What should I do next?", "t2", "Cap2", "procedural", {"other": "z"}),
    ]
    p = write_vnep_csv(rows, tmp_path / "w.csv", bom=True)
    with open(p, encoding="utf-8-sig") as f:
        header = next(csv.reader(f))
    assert header[0] == "name" and header[1:6] == list(REQUIRED_COLUMNS) and header[6] == "kind"
    back = read_vnep_csv(p)
    assert len(back) == 2
    for a, b in zip(rows, back):
        assert (a.index, a.input_video_path, a.output_video_path, a.question, a.think, a.caption, a.kind) == (
            b.index, b.input_video_path, b.output_video_path, b.question, b.think, b.caption, b.kind)
    assert back[0].extra["scene"] == '{"x": 1}' and back[1].extra["other"] == "z"


def test_infer_kind():
    assert infer_kind("What should I do next?") == "procedural"
    assert infer_kind("What is the next step after cutting the onion?") == "procedural"
    assert infer_kind("What will happen next?") == "predictive"
    assert infer_kind("Predict the next event.") == "predictive"
    assert infer_kind("Describe the video.") == "unknown"
    # an explicit column wins over the heuristic
    assert infer_kind("What will happen next?", {"kind": "Procedural "}) == "procedural"
    assert infer_kind("What will happen next?", {"question_type": "nonsense"}) == "predictive"
    assert clean_text("  a\n\n---\n\n---  ") == "a"
    assert clean_text("a --- b") == "a --- b"
