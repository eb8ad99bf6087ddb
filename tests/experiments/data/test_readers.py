import numpy as np
import pytest

from experiments.data.readers import (RawSplit, infer_label_values, label_ids, read_conll, read_delimited, read_jsonl,
                                     read_unlabeled)


def test_tsv_with_header_single_sentence(write):
    path = write("sst.tsv", "sentence\tlabel\na fine film \t1\n\nawful , just awful\t0\n")
    raw = read_delimited(path, text="sentence", label="label")
    assert raw.texts == ["a fine film", "awful , just awful"]
    assert raw.labels == ["1", "0"] and raw.lines == [2, 4] and raw.texts_b is None


def test_tsv_pairs_with_bom_and_unbalanced_quotes(write):
    # MRPC layout: BOM before the header, quotes that a CSV reader would treat as field delimiters.
    text = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            '1\t11\t12\tHe said "yes, fine.\tHe agreed "in full".\n'
            '0\t13\t14\t"Quoted\tnot quoted\n')
    raw = read_delimited(write("mrpc.tsv", text), text="#1 String", text_b="#2 String", label="Quality")
    assert raw.texts == ['He said "yes, fine.', '"Quoted']
    assert raw.texts_b == ['He agreed "in full".', "not quoted"]
    assert raw.labels == ["1", "0"]


def test_tsv_without_header_by_index_and_carriage_return_inside_text(write):
    path = write("ag.tsv", "Stocks rise\rtoday\tBusiness\r\nTeam wins\tSports\n")
    raw = read_delimited(path, text=0, label=1, header=False)
    assert raw.texts == ["Stocks rise\rtoday", "Team wins"] and raw.labels == ["Business", "Sports"]


def test_csv_honours_quotes(write):
    raw = read_delimited(write("x.csv", 'text,label\n"a, b",pos\nc,neg\n'), text="text", label="label",
                         delimiter=",", quoting=True)
    assert raw.texts == ["a, b", "c"] and raw.lines == [2, 3]


def test_delimited_errors_name_the_problem(write, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.tsv")):
        read_delimited(str(tmp_path / "nope.tsv"), text="sentence", label="label")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]; the header has \['sentence', 'y'\]"):
        read_delimited(write("a.tsv", "sentence\ty\nx\t1\n"), text="sentence", label="label")
    with pytest.raises(ValueError, match=r"b.tsv:3: expected 2 fields"):
        read_delimited(write("b.tsv", "sentence\tlabel\nx\t1\ny\t0\textra\n"), text="sentence", label="label")
    with pytest.raises(ValueError, match="no examples"):
        read_delimited(write("c.tsv", "sentence\tlabel\n"), text="sentence", label="label")
    with pytest.raises(ValueError, match="out of range"):
        read_delimited(write("d.tsv", "x\t1\n"), text=0, label=2, header=False)


def test_jsonl_sequence_and_token_records(write):
    raw = read_jsonl(write("s.jsonl", '{"t": "hi", "u": "yo", "label": 1}\n\n{"t": "x", "u": "y", "label": 0}\n'),
                     text="t", text_b="u", label="label")
    assert raw.texts == ["hi", "x"] and raw.texts_b == ["yo", "y"] and raw.labels == ["1", "0"]
    assert raw.lines == [1, 3]
    raw = read_jsonl(write("t.jsonl", '{"w": ["Ann", "ran"], "tags": ["B-PER", "O"]}\n'), tokens="w", label="tags")
    assert raw.tokens == [["Ann", "ran"]] and raw.labels == [["B-PER", "O"]]


def test_jsonl_errors_name_the_line(write):
    with pytest.raises(ValueError, match=r"e.jsonl:2: missing key\(s\) \['label'\]"):
        read_jsonl(write("e.jsonl", '{"t": "a", "label": 1}\n{"t": "b"}\n'), text="t", label="label")
    with pytest.raises(ValueError, match=r"f.jsonl:1: invalid JSON"):
        read_jsonl(write("f.jsonl", '{"t": \n'), text="t", label="label")
    with pytest.raises(ValueError, match=r"g.jsonl:1: 'w' and 'tags' must be lists of equal length"):
        read_jsonl(write("g.jsonl", '{"w": ["a"], "tags": []}\n'), tokens="w", label="tags")


def test_conll_with_prefix_blank_lines_and_no_trailing_blank(write):
    text = "en:Ann\tB-PER\nen:Lee\tI-PER\nen:ran\tO\n\n\nen:en:x\tO\n"
    raw = read_conll(write("w.txt", text), prefix="en:")
    assert raw.tokens == [["Ann", "Lee", "ran"], ["en:x"]]  # the prefix is stripped once
    assert raw.labels == [["B-PER", "I-PER", "O"], ["O"]]
    assert raw.lines == [[1, 2, 3], [6]]


def test_conll_strips_stray_bom_including_bom_only_separator_lines(write):
    # As in WNUT-17 dev: a BOM glued to a token, and a line holding only a BOM between sentences.
    text = "Dubbz\ufeff\tB-person\nrocks\tO\n\ufeff\nok\tO\n"
    raw = read_conll(write("wnut.conll", text))
    assert raw.tokens == [["Dubbz", "rocks"], ["ok"]]
    assert raw.labels == [["B-person", "O"], ["O"]]


def test_conll_space_separated_tag_last_and_docstart(write):
    raw = read_conll(write("c.conll", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"))
    assert raw.tokens == [["EU", "rejects"]] and raw.labels == [["B-ORG", "O"]]


def test_conll_errors(write):
    with pytest.raises(ValueError, match=r"bad.conll:2: expected 'token<TAB>tag'"):
        read_conll(write("bad.conll", "a\tO\nlonely\n"))
    with pytest.raises(ValueError, match="no examples"):
        read_conll(write("empty.conll", "\n\n\ufeff\n"))


def test_label_ids_maps_and_names_the_line_of_an_unknown_label(write):
    raw = read_delimited(write("l.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tmeh\n"), text="sentence", label="label")
    with pytest.raises(ValueError, match=r"l.tsv:4: label 'meh' is not in the label set \['neg', 'pos'\]"):
        label_ids(raw, ["neg", "pos"])
    np.testing.assert_array_equal(label_ids(raw.select([1, 0]), ["neg", "pos"]), [0, 1])
    tags = read_conll(write("t.conll", "a\tO\nb\tB-LOC\n\nc\tB-XYZ\n"))
    with pytest.raises(ValueError, match=r"t.conll:4: label 'B-XYZ'"):
        label_ids(tags, ["O", "B-LOC"])


def test_infer_label_values_orders_bio_by_type():
    raw = RawSplit("x", [["I-PER", "O", "B-LOC", "B-PER"]], [[1, 2, 3, 4]], tokens=[["a", "b", "c", "d"]])
    assert infer_label_values(raw) == ["O", "B-LOC", "B-PER", "I-PER"]


def test_unlabeled_transfer_text_per_kind(write):
    path = write("u.txt", "\ufeffParis is big, isn't it?\n\n  \nNew York\n")
    raw = read_unlabeled(path, kind="token")
    assert raw.tokens == [["Paris", "is", "big", ",", "isn't", "it", "?"], ["New", "York"]]
    assert raw.lines == [1, 4] and raw.labels == ["", ""] and raw.texts is None
    raw = read_unlabeled(path, kind="sequence")
    assert raw.texts == ["Paris is big, isn't it?", "New York"] and raw.texts_b is None
    pairs = read_unlabeled(write("p.txt", "a cat\ta dog\n\nred\tblue \n"), kind="sequence", is_pair=True)
    assert pairs.texts == ["a cat", "red"] and pairs.texts_b == ["a dog", "blue"] and pairs.lines == [1, 3]


def test_unlabeled_transfer_errors_name_the_line(write, tmp_path):
    with pytest.raises(ValueError, match=r"u.txt:2: expected one text without tabs, found 2"):
        read_unlabeled(write("u.txt", "fine\ntext\tpositive\n"), kind="sequence")
    with pytest.raises(ValueError, match=r"p.txt:1: expected two tab-separated texts \(a pair task\), found 1"):
        read_unlabeled(write("p.txt", "only one text\n"), kind="sequence", is_pair=True)
    with pytest.raises(ValueError, match="no examples"):
        read_unlabeled(write("e.txt", "\n\n"), kind="token")
    with pytest.raises(FileNotFoundError, match="missing data file"):
        read_unlabeled(str(tmp_path / "absent.txt"), kind="token")


def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path):
    tsv = tmp_path / "x.tsv"
    tsv.write_bytes(b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n")  # Latin-1 e-acute; 15 + 5 + 3 bytes before it
    want = rf"{tsv}:3: not UTF-8: byte 0xe9 at byte 4 of the line \(offset 23 in the file\)"
    with pytest.raises(ValueError, match=want):
        read_delimited(str(tsv), text="sentence", label="label")
    with pytest.raises(ValueError, match=want):
        read_delimited(str(tsv), text="sentence", label="label", delimiter="\t", quoting=True)
    # Far past the decoder's first read buffer: line and offset count from the start of the file.
    far = tmp_path / "far.txt"
    far.write_bytes(b"line\n" * 2999 + b"bad \xff\n")
    with pytest.raises(ValueError, match=rf"{far}:3000: not UTF-8: byte 0xff at byte 5 of the line "
                                         r"\(offset 14999 in the file\)"):
        read_unlabeled(str(far), kind="sequence")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"t": "a", "label": 1}\n{"t": "\x80", "label": 0}\n')  # 23 + 7 bytes before it
    with pytest.raises(ValueError, match=rf"{jsonl}:2: not UTF-8: byte 0x80 at byte 8 of the line \(offset 30"):
        read_jsonl(str(jsonl), text="t", label="label")
    conll = tmp_path / "x.conll"
    conll.write_bytes(b"\xefa\tO\n")  # a truncated 3-byte sequence
    with pytest.raises(ValueError, match=rf"{conll}:1: not UTF-8: byte 0xef at byte 1 of the line \(offset 0"):
        read_conll(str(conll))


def test_a_csv_parse_error_names_file_and_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("text,label\nfine,pos\n" + "x" * 200_000 + ",neg\n")  # past csv's field size limit
    with pytest.raises(ValueError, match=rf"{path}:3: field larger than field limit"):
        read_delimited(str(path), text="text", label="label", delimiter=",", quoting=True)
