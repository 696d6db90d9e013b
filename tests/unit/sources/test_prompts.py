"""Concept and geometric prompt tables: grouping, formats, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sam3ray.core.errors import PromptTableError
from sam3ray.core.ids import input_id
from sam3ray.core.types import Exemplar
from sam3ray.sources.prompts import check_exemplars_in_image, load_concepts, load_geometric
from sam3ray.storage.location import Location

CAR = "3f1c2a8e-0000-4000-8000-000000000001"
DOG = "3f1c2a8e-0000-4000-8000-000000000002"
TREE = "3f1c2a8e-0000-4000-8000-000000000003"

CONCEPTS_CSV = f"""class_id,name,text,min_score
{CAR.upper()},car,car,0.5
{CAR},,automobile,
{{{CAR}}},,car,0.5

{DOG},,dog,
{TREE},tree,,
"""


def write(tmp_path: Path, name: str, text: str) -> Location:
    path = tmp_path / name
    path.write_text(text)
    return Location(str(path))


def local(path: Path) -> Location:
    return Location(str(path))


def test_concepts_csv_grouped_by_class(tmp_path):
    cs = load_concepts(write(tmp_path, "concepts.csv", CONCEPTS_CSV))
    assert [c.class_id for c in cs] == [CAR, DOG, TREE]
    car, dog, tree = cs.concepts
    assert car.name == "car" and car.texts == ("car", "automobile") and car.min_score == 0.5
    assert dog.name == "dog" and dog.texts == ("dog",) and dog.min_score is None
    assert tree.texts == () and tree.name == "tree"  # exemplar-only class
    assert cs.by_id[DOG] is dog and len(cs) == 3


def rows() -> list[dict]:
    return [
        {"class_id": CAR, "name": "car", "text": "car", "min_score": 0.5},
        {"class_id": CAR, "name": None, "text": "automobile", "min_score": None},
        {"class_id": DOG, "name": None, "text": "dog", "min_score": None},
    ]


def test_parquet_and_yaml_give_the_same_set(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows()), tmp_path / "c.parquet")
    write(tmp_path, "c.yaml", yaml.safe_dump(rows()))
    a = load_concepts(local(tmp_path / "c.parquet"))
    b = load_concepts(local(tmp_path / "c.yaml"))
    assert a == b and [c.texts for c in a] == [("car", "automobile"), ("dog",)]


REFUSALS = [
    # (rows after the header, line number, text that must appear)
    (["abc,x,x,"], 2, "class_id 'abc' is not a UUID"),
    ([f"{CAR},car,car,", ",y,y,"], 3, "class_id is missing"),
    ([f"{CAR},car,car,", f"{DOG},,,"], 3, "text: empty prompt"),
    ([f"{CAR},car,car,", f"{CAR},auto,automobile,"], 3, "name 'auto' contradicts name 'car'"),
    ([f"{CAR},car,car,", f"{DOG},Car,dog,"], 3, f"name 'Car' of class_id {DOG} is already used"),
    ([f"{CAR},,car,", f"{DOG},car,dog,"], 3, "already used by class_id"),
    ([f"{CAR},car,car,0.5", f"{CAR},,auto,0.6"], 3, "min_score 0.6 contradicts 0.5"),
    ([f"{CAR},car,car,1.5"], 2, "min_score 1.5 is not within 0..1"),
    ([f"{CAR},car,car,high"], 2, "min_score 'high' is not a number"),
    ([f"{CAR},car,car,nan"], 2, "min_score 'nan' is not a finite number"),
    ([f"{CAR},car,car,", "", f"{DOG},dog,dog,0.3,extra"], 4, "5 cells but 4 columns"),
]


@pytest.mark.parametrize("body,line,text", REFUSALS)
def test_concept_refusals_name_file_row_and_field(tmp_path, body, line, text):
    path = write(tmp_path, "concepts.csv", "class_id,name,text,min_score\n" + "\n".join(body))
    with pytest.raises(PromptTableError) as err:
        load_concepts(path)
    assert str(err.value).startswith(f"{path} row {line}: "), str(err.value)
    assert text in str(err.value)


def test_table_level_refusals(tmp_path):
    path = write(tmp_path, "concepts.csv", f"class_id,text,colour\n{CAR},car,red\n")
    with pytest.raises(PromptTableError, match=r"concepts\.csv: unknown column 'colour'"):
        load_concepts(path)
    with pytest.raises(PromptTableError, match="has no rows"):
        load_concepts(write(tmp_path, "empty.csv", "class_id,text\n"))
    with pytest.raises(PromptTableError, match="unsupported table type '.xlsx'"):
        load_concepts(write(tmp_path, "c.xlsx", ""))
    with pytest.raises(PromptTableError, match="c.yaml row 2: expected a mapping"):
        load_concepts(write(tmp_path, "c.yaml", f"- {{class_id: {CAR}, text: car}}\n- oops\n"))
    with pytest.raises(PromptTableError, match="cannot read"):
        load_concepts(local(tmp_path / "missing.csv"))
    with pytest.raises(PromptTableError, match="c2.csv: missing column 'class_id'"):
        load_concepts(write(tmp_path, "c2.csv", "name,text\ncar,car\n"))
    with pytest.raises(PromptTableError, match="duplicate column names"):
        load_concepts(write(tmp_path, "c3.csv", f"class_id,Text,text\n{CAR},a,b\n"))
    (tmp_path / "latin1.csv").write_bytes(b"class_id,text\n" + CAR.encode() + b",caf\xe9\n")
    with pytest.raises(PromptTableError, match="latin1.csv: cannot parse"):
        load_concepts(local(tmp_path / "latin1.csv"))
    with pytest.raises(PromptTableError, match="fake.parquet: cannot parse"):
        load_concepts(write(tmp_path, "fake.parquet", "class_id,text\n"))


def test_parquet_and_yaml_rows_count_from_one(tmp_path):
    bad = rows() + [{"class_id": "not-a-uuid", "name": None, "text": "x", "min_score": None}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "c.parquet")
    with pytest.raises(PromptTableError, match=r"c\.parquet row 4: class_id 'not-a-uuid'"):
        load_concepts(local(tmp_path / "c.parquet"))
    with pytest.raises(PromptTableError, match=r"c\.yaml row 4: class_id"):
        load_concepts(write(tmp_path, "c.yaml", yaml.safe_dump(bad)))


def test_concepts_from_s3(moto_s3):
    bucket = moto_s3.new_bucket("prompts")
    uri = moto_s3.put(bucket, "t/concepts.csv", CONCEPTS_CSV)
    cs = load_concepts(Location(uri, moto_s3.storage_options))
    assert [c.name for c in cs] == ["car", "dog", "tree"]


GEO_HEADER = "image_uri,image_id,class_id,kind,x0,y0,x1,y1,x,y,positive,frame_index\n"


@pytest.fixture
def concepts(tmp_path):
    return load_concepts(write(tmp_path, "concepts.csv", CONCEPTS_CSV))


def test_geometric_grouping_and_lookup(tmp_path, concepts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img_b = "s3://bucket/b.jpg"
    body = (
        f"imgs/a.jpg,,{CAR},box,1,2,30,40,,,,\n"
        f"imgs/a.jpg,,{DOG},point,,,,,5,6,no,\n"
        f",{input_id(img_b)},{CAR},,10,10,20,20,,,0,3\n"
        f"imgs/a.jpg,,{CAR},POINT,,,,,7,8,Yes,\n"
        f"{img_b},{input_id(img_b)},{TREE},box,0,0,1,1,,,true,\n"
    )
    geo = load_geometric(write(tmp_path, "geo.csv", GEO_HEADER + body), concepts)
    assert len(geo) == 5
    a = str(tmp_path / "imgs" / "a.jpg")  # relative paths become absolute, as in list_inputs
    ex = geo.for_image(a, input_id(a))
    assert list(ex) == [CAR, DOG]
    assert ex[CAR] == [Exemplar("box", (1.0, 2.0, 30.0, 40.0)), Exemplar("point", (7.0, 8.0))]
    assert ex[DOG] == [Exemplar("point", (5.0, 6.0), positive=False)]
    b = geo.for_image(img_b, input_id(img_b))
    assert b[CAR] == [Exemplar("box", (10.0, 10.0, 20.0, 20.0), False, 3)]
    assert b[TREE][0].kind == "box"
    assert geo.for_image("s3://bucket/other.jpg", "0" * 16) == {}
    assert set(geo.image_keys()) == {a, img_b, input_id(img_b)}


GEO_REFUSALS = [
    (f"a.jpg,,{TREE.replace('3', '4')},box,1,1,2,2,,,,", "is not in the concept table"),
    (f"a.jpg,,{CAR},box,5,1,2,2,,,,", "x1 is smaller than x0"),
    (f"a.jpg,,{CAR},box,1,5,2,2,,,,", "y1 is smaller than y0"),
    (f"a.jpg,,{CAR},box,2,1,2,4,,,,", "x1 is equal to x0"),
    (f"a.jpg,,{CAR},box,1,nan,2,2,,,,", "y0 'nan' is not a finite number"),
    (f"a.jpg,,{CAR},box,1,,2,2,,,,", "y0 is missing for a box"),
    (f"a.jpg,,{CAR},point,,,,,-1,2,,", "x -1.0 is negative"),
    (f"a.jpg,,{CAR},circle,,,,,1,2,,", "kind 'circle' is not box or point"),
    (f"a.jpg,,{CAR},,,,,,,,,", "kind is missing"),
    (f"a.jpg,,{CAR},point,1,1,2,2,1,2,,", "x0 is given for a point"),
    (f"a.jpg,,{CAR},point,,,,,1,2,maybe,", "positive 'maybe' is not a boolean"),
    (f"a.jpg,,{CAR},point,,,,,1,2,,1.5", "frame_index '1.5' is not an integer"),
    (f",,{CAR},point,,,,,1,2,,", "image_uri: neither image_uri nor image_id"),
    (f"s3://b/a.jpg,0123456789abcdef,{CAR},point,,,,,1,2,,", "image_id '0123456789abcdef' is not"),
    ("a.jpg,,xyz,point,,,,,1,2,,", "class_id 'xyz' is not a UUID"),
]


@pytest.mark.parametrize("line,text", GEO_REFUSALS)
def test_geometric_refusals_name_file_row_and_field(tmp_path, concepts, line, text):
    ok = f"a.jpg,,{CAR},box,1,1,2,2,,,,\n"
    path = write(tmp_path, "geo.csv", GEO_HEADER + ok + line + "\n")
    with pytest.raises(PromptTableError) as err:
        load_geometric(path, concepts)
    assert str(err.value).startswith(f"{path} row 3: "), str(err.value)
    assert text in str(err.value)


def test_geometric_unknown_column_and_parquet(tmp_path, concepts):
    with pytest.raises(PromptTableError, match="unknown column 'width'"):
        load_geometric(write(tmp_path, "g.csv", "image_uri,class_id,kind,width\n"), concepts)
    table = [
        {"image_id": "abc", "class_id": CAR, "kind": "point", "x": 3.0, "y": 4.0,
         "positive": True, "frame_index": 2},
        {"image_id": "abc", "class_id": DOG, "kind": "point", "x": 3.0, "y": None,
         "positive": False, "frame_index": None},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "g.parquet")
    with pytest.raises(PromptTableError, match=r"g\.parquet row 2: y is missing"):
        load_geometric(local(tmp_path / "g.parquet"), concepts)
    pq.write_table(pa.Table.from_pylist(table[:1]), tmp_path / "g1.parquet")
    geo = load_geometric(local(tmp_path / "g1.parquet"), concepts)
    assert geo.for_image("/x.jpg", "abc") == {CAR: [Exemplar("point", (3.0, 4.0), True, 2)]}


def test_check_exemplars_in_image():
    ok = {CAR: [Exemplar("box", (0, 0, 100, 50)), Exemplar("point", (99.5, 49))]}
    assert check_exemplars_in_image(ok, 100, 50) is None
    reason = check_exemplars_in_image({DOG: [Exemplar("box", (10, 10, 120, 20))]}, 100, 50)
    assert reason and DOG in reason and "(10, 10, 120, 20)" in reason and "100x50" in reason
    reason = check_exemplars_in_image({CAR: [Exemplar("point", (5, 51))]}, 100, 50)
    assert reason and "point (5, 51)" in reason
    assert check_exemplars_in_image({}, 1, 1) is None
