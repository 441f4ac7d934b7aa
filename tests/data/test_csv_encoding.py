"""CSV decoding: bytes that are not UTF-8 and header-only files are errors that say where, and
`vans-jax validate-data` fails on them."""
import json

import pytest

from vans_jax.apps import cli
from vans_jax.data.csv_format import REQUIRED_COLUMNS, VNEPFormatError, read_vnep_csv

HEADER = ",".join(REQUIRED_COLUMNS)
ROW0 = "a/0.mp4,a/1.mp4,What will happen next?,Because.,The ball bounces."
ROW1 = "b/0.mp4,b/1.mp4,What should I do next?,It is cold.,Order a café au lait."


def _write(path, text, encoding, bom=b""):
    path.write_bytes(bom + text.encode(encoding))
    return path


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_cp1252_csv_names_file_line_and_byte_offset(tmp_path, bom):
    text = "\n".join([HEADER, ROW0, ROW1]) + "\n"
    p = _write(tmp_path / "cp1252.csv", text, "cp1252", bom)
    offset = p.read_bytes().index(b"\xe9")                      # the é of "café", one byte in cp1252
    with pytest.raises(VNEPFormatError) as ei:
        read_vnep_csv(p)
    msg = str(ei.value)
    assert str(p) in msg and "not UTF-8" in msg
    assert f"line 3, byte offset {offset} " in msg             # header = line 1, ROW0 = line 2
    assert "caf\\xe9" in msg and "iconv" in msg                 # the line as it is, and the fix
    # the same text in UTF-8 reads, the é intact (was: decoded with errors="replace" -> "caf\ufffd")
    rows = read_vnep_csv(_write(tmp_path / "utf8.csv", text, "utf-8", bom))
    assert rows[1].caption == "Order a café au lait." and rows.report.bom == bool(bom)


def test_bad_byte_inside_a_multiline_field_counts_physical_lines(tmp_path):
    text = HEADER + "\n" + 'a/0.mp4,a/1.mp4,"What will\nhappen next?",Because.,"One\nTwo\nna\u00efve"\n'
    p = _write(tmp_path / "latin1.csv", text, "latin-1")
    with pytest.raises(VNEPFormatError, match=r"line 5, byte offset %d " % p.read_bytes().index(b"\xef")):
        read_vnep_csv(p)


def test_header_only_csv_is_an_error(tmp_path):
    p = _write(tmp_path / "h.csv", HEADER + "\n\n", "utf-8")
    with pytest.raises(VNEPFormatError, match="header only, no data rows") as ei:
        read_vnep_csv(p)
    assert str(p) in str(ei.value)
    # one data row is enough
    assert len(read_vnep_csv(_write(tmp_path / "one.csv", HEADER + "\n" + ROW0 + "\n", "utf-8"))) == 1


@pytest.mark.parametrize("content, expected", [
    ("\n".join([HEADER, ROW0, ROW1]).encode("cp1252"), "not UTF-8 at line 3"),
    ((HEADER + "\n").encode(), "header only"),
])
def test_validate_data_fails_on_undecodable_and_header_only_csv(tmp_path, capsys, content, expected):
    p = tmp_path / "data.csv"
    p.write_bytes(content)
    report = tmp_path / "report.json"
    rc = cli.main(["validate-data", "--csv", str(p), "--video_root", str(tmp_path), "--output", str(report)])
    out = capsys.readouterr().out
    assert rc == 1 and expected in out and "OK" not in out.splitlines()[-2:]
    data = json.loads(report.read_text())
    assert data["ok"] is False and expected in data["fatal"]
