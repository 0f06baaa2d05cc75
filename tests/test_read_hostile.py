"""Raw files that fight back: bytes that are not UTF-8, keys given twice, folders as inputs.

Each bad record must cost only itself (a ``malformed_record`` with its raw text, bytes escaped), at the row number
the fast path would have given it, while the good rows are read as from a clean file.
"""

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import expand_inputs
from schemas.errors import InputError
from transforms.read import (
    MALFORMED_RECORD,
    ROW_NUMBER,
    Malformed,
    _read_csv,
    _read_csv_records,
    malformed_rows,
    peek_schema,
    read_file,
)


def _read(path: Path, string_columns: tuple[str, ...] = ()) -> tuple[pa.Table, list[Malformed]]:
    bad: list[Malformed] = []
    table = pa.Table.from_batches(list(read_file(str(path), malformed=bad, string_columns=string_columns)))
    table.validate(full=True)                            # what goes downstream is valid UTF-8
    return table, bad


def _bad(row: int, text: str) -> Malformed:
    return Malformed(row, text, MALFORMED_RECORD)


# --- JSON Lines --------------------------------------------------------------------------------------------

JSONL = (b'{"id": "a", "response": "fine"}\n'
         b'\n'                                                       # blank: not a record, not counted
         b'{"id": "b", "response": "caf\xe9 \xff"}\n'                # Latin-1 bytes inside a valid record
         b'{"id": "c", "response": "na\xc3\xafve"}\n')               # real UTF-8 stays as it is


@pytest.mark.parametrize("name, data", [("s.jsonl", JSONL), ("s.jsonl.gz", gzip.compress(JSONL, mtime=0))],
                         ids=["plain", "gzip"])   # fixed ids: every xdist worker must collect the same tests
def test_invalid_utf8_in_a_json_value_quarantines_that_line_only(tmp_path: Path, name: str, data: bytes):
    fast = pajson.read_json(pa.BufferReader(JSONL))      # pyarrow's reader alone accepts the file ...
    with pytest.raises(pa.ArrowInvalid, match="Invalid UTF8"):
        fast.validate(full=True)                        # ... and passes the bytes on
    (tmp_path / name).write_bytes(data)
    table, bad = _read(tmp_path / name)
    assert table.select(["id", "response", ROW_NUMBER]).to_pylist() == [
        {"id": "a", "response": "fine", ROW_NUMBER: 0}, {"id": "c", "response": "naïve", ROW_NUMBER: 2}]
    assert bad == [_bad(1, '{"id": "b", "response": "caf\\xe9 \\xff"}')]
    q = malformed_rows(bad, str(tmp_path / name), "signals")
    q.validate(full=True)
    assert q.column("record").to_pylist() == [bad[0].text]


def test_invalid_utf8_in_a_json_key_at_any_depth_is_malformed(tmp_path: Path):
    (tmp_path / "s.jsonl").write_bytes(b'{"id": "a", "n": {"k": 1}}\n{"id": "b", "k\xff": 1}\n'
                                       b'{"id": "c", "n": {"k\xfe": 1}}\n{"id": "d", "n": {"k": 2}}\n')
    table, bad = _read(tmp_path / "s.jsonl")
    assert table.column("id").to_pylist() == ["a", "d"] and table.column(ROW_NUMBER).to_pylist() == [0, 3]
    assert bad == [_bad(1, '{"id": "b", "k\\xff": 1}'), _bad(2, '{"id": "c", "n": {"k\\xfe": 1}}')]
    assert peek_schema(str(tmp_path / "s.jsonl")).names == ["id", "n"]


def test_a_key_given_twice_is_malformed_not_last_wins(tmp_path: Path):
    lines = ['{"id": "a", "v": 1}', '{"id": "b", "v": 1, "v": 2}', '{"id": "c", "n": {"x": 1, "x": 2}}',
             '{"id": "d", "l": [{"y": 1}, {"y": 1, "y": 2}]}', '{"id": "e", "v": 3, "\\u0076": 4}',
             '{"id": "f", "v": 5}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    table, bad = _read(tmp_path / "s.jsonl")
    assert table.select(["id", "v", ROW_NUMBER]).to_pylist() == [
        {"id": "a", "v": 1, ROW_NUMBER: 0}, {"id": "f", "v": 5, ROW_NUMBER: 5}]
    assert bad == [_bad(i, lines[i]) for i in (1, 2, 3, 4)]


def test_an_escaped_lone_surrogate_is_malformed_a_pair_is_text(tmp_path: Path):
    (tmp_path / "s.jsonl").write_text('{"r": "ok"}\n{"r": "\\ud800"}\n{"r": "\\ud83d\\ude00"}\n')
    table, bad = _read(tmp_path / "s.jsonl")
    assert table.column("r").to_pylist() == ["ok", "😀"] and table.column(ROW_NUMBER).to_pylist() == [0, 2]
    assert bad == [_bad(1, '{"r": "\\ud800"}')]


def test_a_byte_order_mark_is_not_a_malformed_first_line(tmp_path: Path):
    (tmp_path / "s.jsonl").write_bytes(b'\xef\xbb\xbf{"r": "first"}\n{"r": "\xff"}\n')
    table, bad = _read(tmp_path / "s.jsonl")
    assert table.column("r").to_pylist() == ["first"]
    assert bad == [_bad(1, '{"r": "\\xff"}')]


# --- CSV / TSV ---------------------------------------------------------------------------------------------

def test_one_non_utf8_byte_in_a_csv_quarantines_that_row_only(tmp_path: Path):
    (tmp_path / "imps.csv").write_bytes(b"impression_id,user_id,position,response\n"
                                        b"007,NULL,1,ok\n"
                                        b"008,bob,2,caf\xe9\n"
                                        b"009,carol,3,na\xc3\xafve\n")
    table, bad = _read(tmp_path / "imps.csv", ("impression_id", "user_id", "response"))
    assert table.select(["impression_id", "user_id", "position", "response", ROW_NUMBER]).to_pylist() == [
        {"impression_id": "007", "user_id": "NULL", "position": 1, "response": "ok", ROW_NUMBER: 0},
        {"impression_id": "009", "user_id": "carol", "position": 3, "response": "naïve", ROW_NUMBER: 2}]
    assert table.schema.field("position").type == pa.int64()        # inferred as from a clean file
    assert bad == [_bad(1, "008,bob,2,caf\\xe9")]


def test_a_bad_byte_in_a_column_pyarrow_would_infer_as_binary(tmp_path: Path):
    (tmp_path / "s.csv").write_bytes(b"n,note\n1,a\n2,b\xff\n3,c\n")
    assert pacsv.read_csv(tmp_path / "s.csv").schema.field("note").type == pa.binary()   # what we must not pass on
    table, bad = _read(tmp_path / "s.csv")
    assert table.schema.field("note").type == pa.string() and table.column("note").to_pylist() == ["a", "c"]
    assert bad == [_bad(1, "2,b\\xff")]
    assert peek_schema(str(tmp_path / "s.csv")).field("note").type == pa.string()


def test_quoted_multiline_values_with_a_bad_byte_and_a_short_row_keep_exact_row_numbers(tmp_path: Path):
    (tmp_path / "s.csv").write_bytes(b'id,n,text\r\n'
                                     b'001,1,"two\r\nlines, a comma"\r\n'      # row 0
                                     b'002,2\r\n'                              # row 1: a field short
                                     b'\r\n'                                   # empty: no row
                                     b'003,3,"quoted ""x"" \xfe\nthen more"\n'  # row 2: a bad byte, two lines
                                     b'004,4,plain\n'                          # row 3
                                     b'005,5,"last\nvalue"')                   # row 4: no final line end
    table, bad = _read(tmp_path / "s.csv", ("id", "text"))
    assert table.select(["id", "n", "text", ROW_NUMBER]).to_pylist() == [
        {"id": "001", "n": 1, "text": "two\r\nlines, a comma", ROW_NUMBER: 0},
        {"id": "004", "n": 4, "text": "plain", ROW_NUMBER: 3},
        {"id": "005", "n": 5, "text": "last\nvalue", ROW_NUMBER: 4}]
    assert bad == [_bad(1, "002,2"), _bad(2, '003,3,"quoted ""x"" \\xfe\nthen more"')]


def test_a_short_row_before_good_ones_does_not_shift_their_numbers(tmp_path: Path):
    (tmp_path / "s.csv").write_text("id,n\na,1\nb\nc,3\nd,4,4\ne,5\n")
    table, bad = _read(tmp_path / "s.csv")
    assert table.column("id").to_pylist() == ["a", "c", "e"] and table.column(ROW_NUMBER).to_pylist() == [0, 2, 4]
    assert bad == [_bad(1, "b"), _bad(3, "d,4,4")]


def test_tsv_by_extension_and_gzip(tmp_path: Path):
    (tmp_path / "s.tsv.gz").write_bytes(gzip.compress(b'id\ttext\n007\t"a\tb"\n008\tx\xff\n009\tz\n'))
    table, bad = _read(tmp_path / "s.tsv.gz", ("id",))
    assert table.select(["id", "text", ROW_NUMBER]).to_pylist() == [
        {"id": "007", "text": "a\tb", ROW_NUMBER: 0}, {"id": "009", "text": "z", ROW_NUMBER: 2}]
    assert bad == [_bad(1, "008\tx\\xff")]


def test_a_header_that_is_not_utf8_fails_the_file_naming_it(tmp_path: Path):
    (tmp_path / "s.csv").write_bytes(b"id,caf\xe9\n1,2\n")
    with pytest.raises(InputError, match="s.csv: cannot read csv: the header is not UTF-8"):
        _read(tmp_path / "s.csv")


_CELL = st.text(st.sampled_from(list('ab1 ,"\n\r\té')), max_size=6)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.lists(st.lists(_CELL, min_size=1, max_size=4), max_size=6), quote_all=st.booleans(),
       crlf=st.booleans())
def test_the_record_by_record_path_reads_a_file_as_pyarrow_does(tmp_path_factory, rows, quote_all, crlf):
    """The slow path splits records itself: on any file it must agree with pyarrow's own parser."""
    end = "\r\n" if crlf else "\n"

    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if quote_all or any(c in v for c in ',"\r\n') else v

    path = tmp_path_factory.mktemp("csv") / "s.csv"
    path.write_text("a,b,c" + end + "".join(",".join(cell(v) for v in row) + end for row in rows), newline="")
    convert = pacsv.ConvertOptions(column_types={"b": pa.string()})
    rejected: list[str] = []
    fast = pacsv.read_csv(path, convert_options=convert, parse_options=pacsv.ParseOptions(
        newlines_in_values=True, invalid_row_handler=lambda row: rejected.append(row.text) or "skip"))
    slow, bad = _read_csv_records(str(path), ",", convert)
    assert slow.drop_columns([ROW_NUMBER]).equals(fast)
    assert sorted(m.text.rstrip("\r\n") for m in bad) == sorted(t.rstrip("\r\n") for t in rejected)
    records = [r for r in rows if quote_all or r != [""]]      # an unquoted empty row is an empty line: no row
    assert slow.column(ROW_NUMBER).to_pylist() == [i for i, row in enumerate(records) if len(row) == 3]
    if not bad:
        assert _read_csv(str(path), ["b"])[0].equals(fast)     # a clean file never leaves the fast path


# --- folders as inputs -------------------------------------------------------------------------------------

def test_a_folder_is_read_as_a_dataset(tmp_path: Path):
    root = tmp_path / "impressions"
    for day in ("2026-11-02", "2026-11-01"):
        (root / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), root / f"date={day}" / "part-0.parquet")
    (root / "late.jsonl.gz").write_bytes(gzip.compress(b'{"x": 2}\n'))
    (root / "extra.tsv").write_text("x\n3\n")
    (root / "_SUCCESS").write_text("")
    (root / ".part-0.parquet.crc").write_text("crc")
    (root / "date=2026-11-01" / ".part-1.parquet.crc").write_text("crc")
    (root / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(pa.table({"x": [9]}), root / "_temporary" / "0" / "part-9.parquet")
    (root / ".hidden").mkdir()
    pq.write_table(pa.table({"x": [9]}), root / ".hidden" / "part-9.parquet")
    (root / "README.md").write_text("not data")
    want = [str(root / p) for p in ("date=2026-11-01/part-0.parquet", "date=2026-11-02/part-0.parquet",
                                    "extra.tsv", "late.jsonl.gz")]
    assert expand_inputs([str(root)], what="impressions") == want
    assert expand_inputs([str(root) + "/"], what="impressions") == want
    assert expand_inputs([f"{root}/date=*"], what="impressions") == want[:2]            # a glob of folders
    assert expand_inputs([f"{root}/date={{date}}"], what="impressions", day=dt.date(2026, 11, 2),
                         late_window=1) == want[:2]
    assert expand_inputs([f"{root}/*.tsv"], what="impressions") == want[2:3]           # globs of files as before


def test_a_folder_without_data_files_is_no_input(tmp_path: Path):
    (tmp_path / "out" / "_temporary").mkdir(parents=True)
    (tmp_path / "out" / "_SUCCESS").write_text("")
    (tmp_path / "out" / "_temporary" / "part-0.parquet").write_text("")
    with pytest.raises(InputError, match="no signals input file found"):
        expand_inputs([str(tmp_path / "out")], what="signals")


def test_a_json_file_comes_in_batches_of_batch_rows_not_in_the_parsers_blocks(tmp_path: Path):
    path = tmp_path / "signals.jsonl"
    n = 40_000                                          # ~2 MB: several of pyarrow's 1 MB parse blocks
    path.write_text("".join(f'{{"event_id": "e{i:06d}", "impression_id": "i{i:06d}", "value": {i}}}\n'
                            for i in range(n)))
    assert pajson.read_json(path).column("event_id").num_chunks > 1
    batches = list(read_file(str(path), batch_rows=16_384))
    assert [b.num_rows for b in batches] == [16_384, 16_384, n - 2 * 16_384]
    assert pa.Table.from_batches(batches).column(ROW_NUMBER).to_pylist() == list(range(n))
