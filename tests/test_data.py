"""Reading sources and checking rows: formats, column mapping, row-numbered errors, drop_invalid."""

from __future__ import annotations

import decimal
import json
import logging
import random
import re
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pytest

from ce_ray.config import load_job
from ce_ray.data import DataError, check_rows, load_split, read_source, rerank_groups
from ce_ray.data.check import _SOLID, MAX_LISTED_ROWS, _in_parts, _layout


def nli_job(tmp_path, frame: pd.DataFrame, *overrides: str, name: str = "train.parquet"):
    path = tmp_path / name
    frame.to_parquet(path)
    return load_job(None, ["task=nli", f"data.train={path}", *overrides])


def test_nli_rows_from_real_data(nli_files):
    job = load_job(None, ["task=nli", f"data.train={nli_files['train']}"])
    rows = load_split(job, "train")
    assert rows.layout == "nli" and rows.num_rows == 256 and rows.dropped == 0
    assert rows.table.column_names == ["premise", "hypothesis", "label"]
    assert set(rows.table.column("label").to_pylist()) <= {0, 1, 2}


def test_formats_select_and_column_mapping(tmp_path):
    frame = pd.DataFrame({"s1": ["A man sleeps.", "A dog runs."], "s2": ["A person rests.", "A cat sits."], "gold": [0, 2]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    with open(tmp_path / "x.jsonl", "w") as f:
        for row in frame.to_dict("records"):
            f.write(json.dumps(row) + "\n")
    mapping = "{premise: s1, hypothesis: s2, label: gold}"
    for name in ("x.csv", "x.jsonl"):
        job = load_job(None, ["task=nli", f"data.train={{path: {tmp_path / name}, columns: {mapping}, select: 1}}"])
        rows = load_split(job, "train")
        assert rows.table.to_pylist() == [{"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 0}]


def test_invalid_rows_are_listed_with_row_numbers(tmp_path):
    frame = pd.DataFrame(
        {
            "premise": ["A man sleeps.", "   ", "A dog runs.", "Two kids play.", "A cat eats."],
            "hypothesis": ["A person rests.", "Someone.", "An animal moves.", "Kids play.", "A cat is hungry."],
            "label": [0, 1, 7, -1, 2],
        }
    )
    job = nli_job(tmp_path, frame)
    with pytest.raises(DataError) as info:
        load_split(job, "train")
    message = str(info.value)
    assert message.startswith("data.train: 3 invalid row(s) of 5")
    assert "row 1: premise is empty" in message
    assert "row 2: label 7 not in 0..2 (model.num_labels=3)" in message
    assert "row 3: label -1 not in 0..2" in message
    assert "set data.drop_invalid: true" in message
    assert "\n" not in message

    job = nli_job(tmp_path, frame, "data.drop_invalid=true")
    rows = load_split(job, "train")
    assert rows.num_rows == 2 and rows.dropped == 3
    assert rows.table.column("label").to_pylist() == [0, 2]


def test_label_names_map_to_ids_and_unknown_names_fail(tmp_path):
    frame = pd.DataFrame({"premise": ["A man sleeps."] * 3, "hypothesis": ["A.", "B.", "C."], "label": ["entailment", "contradiction", "maybe"]})
    job = nli_job(tmp_path, frame, "data.drop_invalid=true")
    rows = load_split(job, "train")
    assert rows.table.column("label").to_pylist() == [0, 2]
    assert "row 2: label 'maybe' is not a class id or one of ['entailment', 'neutral', 'contradiction']" in rows.problems


def test_missing_columns_name_the_key_and_the_fix(qa_files):
    job = load_job(None, ["task=rerank", f"data.train={qa_files['train']}"])
    with pytest.raises(DataError, match=r"data.train: rerank training rows need .* found \['question', 'answer'\]\. Map yours with data.train.columns"):
        load_split(job, "train")
    job = load_job(None, ["task=rerank", f"data.train={{path: {qa_files['train']}, columns: {{query: question, positive: answr}}}}"])
    with pytest.raises(DataError, match=r"data.train.columns: column\(s\) \['answr'\] not in"):
        load_split(job, "train")


def test_file_not_found_names_the_key(tmp_path):
    job = load_job(None, ["task=nli", f"data.eval={tmp_path / 'missing.parquet'}"])
    with pytest.raises(DataError, match="data.eval: file not found"):
        load_split(job, "eval")


def test_rerank_training_layouts(tmp_path):
    pairs = pd.DataFrame({"query": ["q1", "q2"], "positive": ["p1", "p2"], "negative": [["n1", "n2"], []]})
    pairs.to_parquet(tmp_path / "pairs.parquet")
    job = load_job(None, ["task=rerank", f"data.train={tmp_path / 'pairs.parquet'}"])
    rows = load_split(job, "train")
    assert rows.layout == "pairs"
    groups = rerank_groups(rows)
    assert groups.docs == [["p1", "n1", "n2"], ["p2"]] and groups.labels == [[1.0, 0.0, 0.0], [1.0]]
    assert groups.kind == "binary" and groups.has_negatives

    wide = pd.DataFrame({"query": ["q1"], "positive": ["p1"], "negative_1": ["n1"], "negative_2": ["n2"]})
    wide.to_parquet(tmp_path / "wide.parquet")
    rows = load_split(load_job(None, ["task=rerank", f"data.train={tmp_path / 'wide.parquet'}"]), "train")
    assert rows.table.column("negatives").to_pylist() == [["n1", "n2"]]

    labeled = pd.DataFrame({"query": ["q1", "q1", "q2"], "passage": ["a", "b", "c"], "label": [1, 0, 2]})
    labeled.to_parquet(tmp_path / "labeled.parquet")
    groups = rerank_groups(load_split(load_job(None, ["task=rerank", f"data.train={tmp_path / 'labeled.parquet'}"]), "train"))
    assert groups.kind == "graded" and groups.docs == [["a", "b"], ["c"]]

    scored = pd.DataFrame({"query": ["q1", "q1"], "passage": ["a", "b"], "score": [7.5, -2.0]})
    scored.to_parquet(tmp_path / "scored.parquet")
    groups = rerank_groups(load_split(load_job(None, ["task=rerank", f"data.train={tmp_path / 'scored.parquet'}"]), "train"))
    assert groups.kind == "scores" and groups.labels == [[7.5, -2.0]]


def test_rerank_eval_rows_from_real_dev_set(qa_files):
    job = load_job(None, ["task=rerank", f"data.eval={qa_files['dev']}"])
    rows = load_split(job, "eval")
    assert rows.layout == "eval" and rows.num_rows == 24
    first = rows.table.slice(0, 1).to_pylist()[0]
    assert isinstance(first["positive"], list) and len(first["negative"]) == 5


def test_rerank_eval_rows_with_bad_lists(tmp_path):
    frame = pd.DataFrame({"query": ["q1", "q2", ""], "positive": [["p"], [], ["p"]], "negative": [["n", ""], ["n"], ["n"]]})
    frame.to_parquet(tmp_path / "dev.parquet")
    job = load_job(None, ["task=rerank", f"data.eval={tmp_path / 'dev.parquet'}"])
    with pytest.raises(DataError) as info:
        load_split(job, "eval")
    message = str(info.value)
    assert "row 0: negative: item 1 is empty" in message
    assert "row 1: no positive" in message
    assert "row 2: query is empty" in message


def test_hub_code_path_with_a_local_stand_in(tmp_path):
    """`hub:` goes through datasets.load_dataset; a local dataset directory stands in for a hub repo."""
    repo = tmp_path / "all-nli-standin" / "pair-class"
    repo.mkdir(parents=True)
    frame = pd.DataFrame({"premise": ["A man sleeps.", "A dog runs."], "hypothesis": ["A person rests.", "A cat sits."], "label": [0, 2]})
    frame.to_parquet(repo / "train-00000-of-00001.parquet")
    job = load_job(None, ["task=nli", f"data.train={{hub: {repo}, split: train, select: 1}}"])
    table = read_source(job.data.train, "data.train")
    rows = check_rows(table, job, "train", "data.train")
    assert rows.table.to_pylist() == [{"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 0}]


def test_unreachable_hub_dataset_is_a_clear_error():
    job = load_job(None, ["task=nli", "data.train={hub: no-such-org/no-such-dataset}"])
    with pytest.raises(DataError, match="data.train: cannot load hub dataset hub:no-such-org/no-such-dataset:train"):
        load_split(job, "train")


def test_prepared_rows_are_memory_mapped_not_copied(nli_files, tmp_path):
    """Workers open the prepared Arrow files memory-mapped: a large training set is shared through the
    page cache, not copied into every worker's heap."""
    from datasets.table import MemoryMappedTable

    from ce_ray.data.prepare import load_prepared, prepare_split

    job = load_job(None, ["task=nli", f"data.train={nli_files['train']}", f"run.output_dir={tmp_path / 'run'}"])
    split = prepare_split(job, "train")
    dataset = load_prepared(split.uri)
    assert isinstance(dataset.data, MemoryMappedTable)
    assert dataset.cache_files and all(f["filename"].startswith(str(tmp_path / "run")) for f in dataset.cache_files)
    assert len(dataset) == split.rows == 256


# --- check_rows (vectorised) against the row-by-row reference it replaced ------------------------------


def _ref_text_problem(value):
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if not value.strip():
        return "empty"
    return None


def _ref_text_list(value):
    if value is None:
        return [], None
    if isinstance(value, str):
        return ([value], None) if value.strip() else (None, "empty text")
    if isinstance(value, (list, tuple)):
        bad = [i for i, v in enumerate(value) if _ref_text_problem(v)]
        if bad:
            return None, f"item {bad[0]} is {_ref_text_problem(value[bad[0]])}"
        return list(value), None
    return None, f"not text or a list of texts ({type(value).__name__})"


def _reference_check_rows(table, job, split, key):
    """The row-by-row check_rows that the vectorised one replaced, verbatim."""
    logger = logging.getLogger("ce_ray.data.check")
    layout = _layout(job.task, split, table.column_names, key)
    rows = table.to_pylist()
    problems: dict[int, str] = {}
    out: dict[str, list] = defaultdict(list)

    def bad(i: int, why: str) -> None:
        problems.setdefault(i, why)

    label_names = {name: i for i, name in enumerate(job.model.labels or [])}
    neg_cols = sorted(
        (c for c in table.column_names if re.fullmatch(r"negative_\d+", c)), key=lambda c: int(c.split("_")[1])
    )
    for i, row in enumerate(rows):
        if layout == "nli":
            why = next((f"{c} is {p}" for c in ("premise", "hypothesis") if (p := _ref_text_problem(row[c]))), None)
            label = row["label"]
            if isinstance(label, str) and label in label_names:
                label = label_names[label]
            if why is None and (isinstance(label, bool) or not isinstance(label, int) and not (isinstance(label, float) and label.is_integer())):
                why = f"label {label!r} is not a class id" + (f" or one of {list(label_names)}" if label_names else "")
            elif why is None and not 0 <= int(label) < job.num_labels:
                why = f"label {label} not in 0..{job.num_labels - 1} (model.num_labels={job.num_labels})"
            if why:
                bad(i, why)
                continue
            out["premise"].append(row["premise"])
            out["hypothesis"].append(row["hypothesis"])
            out["label"].append(int(label))
        elif layout == "pairs":
            why = next((f"{c} is {p}" for c in ("query", "positive") if (p := _ref_text_problem(row[c]))), None)
            negatives: list[str] = []
            if why is None and "negative" in row:
                negatives, why = _ref_text_list(row["negative"])
                why = why and f"negative: {why}"
            for c in neg_cols:
                if why is None:
                    p = _ref_text_problem(row[c])
                    why = p and f"{c} is {p}"
                    negatives = (negatives or []) + [row[c]]
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["positive"].append(row["positive"])
            out["negatives"].append(negatives)
        elif layout in ("labeled", "scored"):
            column = "score" if layout == "scored" else "label"
            why = next((f"{c} is {p}" for c in ("query", "passage") if (p := _ref_text_problem(row[c]))), None)
            value = row[column]
            if why is None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
                why = f"{column} {value!r} is not a number"
            elif why is None and layout == "labeled" and value < 0:
                why = f"label {value} is negative (relevance labels are 0 for irrelevant, > 0 for relevant)"
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["passage"].append(row["passage"])
            out["label"].append(float(value))
        else:  # rerank eval
            why = _ref_text_problem(row["query"])
            why = why and f"query is {why}"
            positives, negatives = [], []
            if why is None:
                positives, p = _ref_text_list(row["positive"])
                why = p and f"positive: {p}"
            if why is None and not positives:
                why = "no positive (a query needs at least one relevant text)"
            if why is None:
                negatives, p = _ref_text_list(row.get("negative"))
                why = p and f"negative: {p}"
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["positive"].append(positives)
            out["negative"].append(negatives)

    listed = [f"row {i}: {why}" for i, why in sorted(problems.items())]
    if problems and not job.data.drop_invalid:
        more = f" (and {len(listed) - MAX_LISTED_ROWS} more)" if len(listed) > MAX_LISTED_ROWS else ""
        raise DataError(
            f"{key}: {len(problems)} invalid row(s) of {len(rows)} in {getattr(job.data, split).describe()}: "
            + "; ".join(listed[:MAX_LISTED_ROWS])
            + more
            + ". Fix them, or set data.drop_invalid: true to drop them."
        )
    if problems:
        logger.warning("%s: dropped %d invalid row(s) of %d: %s", key, len(problems), len(rows), "; ".join(listed[:MAX_LISTED_ROWS]))
    if not out:
        raise DataError(f"{key}: no valid rows in {getattr(job.data, split).describe()}")
    schema = {
        "nli": pa.schema([("premise", pa.string()), ("hypothesis", pa.string()), ("label", pa.int64())]),
        "pairs": pa.schema([("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string()))]),
        "labeled": pa.schema([("query", pa.string()), ("passage", pa.string()), ("label", pa.float64())]),
        "eval": pa.schema([("query", pa.string()), ("positive", pa.list_(pa.string())), ("negative", pa.list_(pa.string()))]),
    }
    schema["scored"] = schema["labeled"]
    return pa.table(dict(out), schema=schema[layout]), layout, len(problems), listed


GOOD_TEXT = ["A man sleeps.", "  padded  ", "Ünïcödé straße.", "日本語の文。", "🙂", "\u200b", "\ufeff", "\ue000", "x", "\u0301"]
BAD_TEXT = ["", " ", "\t\n", "\u00a0", "\u2003", "\u3000", "\x1c\x1f", "\x85", " \u2028\u2029 "]
ROWS = 240


def _texts(rng, n, bad=0.12, none=0.04):
    return [None if (r := rng.random()) < none else rng.choice(BAD_TEXT) if r < none + bad else rng.choice(GOOD_TEXT) for _ in range(n)]


def _text_column(kind, rng, n):
    """A column meant to hold texts, as one Arrow type (odd types included)."""
    values = _texts(rng, n)
    if kind in ("string", "large_string", "string_view"):
        return pa.array(values, getattr(pa, kind)())
    if kind == "dictionary":
        return pa.array(values).dictionary_encode()
    if kind == "int":
        return pa.array([rng.choice([None, 0, 7, -3]) for _ in range(n)], pa.int64())
    if kind == "float":
        return pa.array([rng.choice([None, 1.5, float("nan")]) for _ in range(n)], pa.float64())
    if kind == "bool":
        return pa.array([rng.choice([None, True, False]) for _ in range(n)])
    if kind == "null":
        return pa.nulls(n)
    if kind == "binary":
        return pa.array([None if v is None else v.encode() for v in values], pa.binary())
    if kind == "list":
        return pa.array([[v] for v in values], pa.list_(pa.string()))
    if kind == "union":  # text or int per row: valid rows of an odd type
        ints = pa.array([rng.choice([1, 2]) for _ in range(n)], pa.int64())
        return pa.UnionArray.from_sparse(pa.array([int(rng.random() < 0.2) for _ in range(n)], pa.int8()), [pa.array(values), ints])
    raise AssertionError(kind)


TEXT_KINDS = ["string", "large_string", "string_view", "dictionary", "int", "float", "bool", "null", "binary", "list", "union"]


def _list_column(kind, rng, n):
    """A column of texts or lists of texts (negative, positive)."""
    def items():
        if rng.random() < 0.1:
            return None
        return _texts(rng, rng.choice([0, 0, 1, 2, 3]), bad=0.05, none=0.03)

    if kind == "string":
        return pa.array(_texts(rng, n, none=0.2), pa.string())
    if kind == "dictionary":
        return pa.array(_texts(rng, n, none=0.2)).dictionary_encode()
    if kind == "list":
        return pa.array([items() for _ in range(n)], pa.list_(pa.string()))
    if kind == "large_list":
        return pa.array([items() for _ in range(n)], pa.large_list(pa.large_string()))
    if kind == "list_of_views":
        return pa.array([items() for _ in range(n)], pa.list_(pa.string_view()))
    if kind == "fixed_size_list":
        return pa.array([None if rng.random() < 0.1 else _texts(rng, 2, bad=0.05, none=0.03) for _ in range(n)], pa.list_(pa.string(), 2))
    if kind == "list_dictionary":
        return pa.array([items() for _ in range(n)], pa.list_(pa.dictionary(pa.int32(), pa.string())))
    if kind == "list_null":
        return pa.array([rng.choice([[], [], None, [None]]) for _ in range(n)], pa.list_(pa.null()))
    if kind == "list_int":
        return pa.array([rng.choice([[], [], None, [3]]) for _ in range(n)], pa.list_(pa.int64()))
    if kind == "int":
        return pa.array([rng.choice([None, None, 4]) for _ in range(n)], pa.int64())
    if kind == "null":
        return pa.nulls(n)
    if kind == "map":
        return pa.array([rng.choice([[], [], None, [("k", 1)]]) for _ in range(n)], pa.map_(pa.string(), pa.int64()))
    if kind == "struct":
        return pa.array([rng.choice([None, None, {"a": "x"}]) for _ in range(n)], pa.struct([("a", pa.string())]))
    raise AssertionError(kind)


LIST_KINDS = ["string", "dictionary", "list", "large_list", "list_of_views", "fixed_size_list", "list_dictionary",
              "list_null", "list_int", "int", "null", "map", "struct"]


def _label_column(kind, rng, n):
    """An nli label column."""
    names = ["entailment", "neutral", "contradiction", "maybe", "", "1", None]
    if kind in ("int", "int8"):
        return pa.array([rng.choice([0, 1, 2, 2, 1, 0, 3, -1, 7, None]) for _ in range(n)], pa.int64() if kind == "int" else pa.int8())
    if kind == "uint64":
        return pa.array([rng.choice([0, 1, 2, 2**64 - 1, 3, None]) for _ in range(n)], pa.uint64())
    if kind in ("float64", "float32", "float16"):
        pool = [0.0, 1.0, 2.0, 2.0, -0.0, 0.5, float("nan"), float("inf"), float("-inf"), 3.0, 1e20, -1.0, None]
        return pa.array([rng.choice(pool) for _ in range(n)], pa.float64()).cast(getattr(pa, kind)())
    if kind in ("names", "large_names", "dict_names"):
        values = pa.array([rng.choice(names[:3] * 3 + names) for _ in range(n)], pa.large_string() if kind == "large_names" else pa.string())
        return values.dictionary_encode() if kind == "dict_names" else values
    if kind == "bool":
        return pa.array([rng.choice([True, False, None]) for _ in range(n)])
    if kind == "null":
        return pa.nulls(n)
    if kind == "decimal":
        return pa.array([rng.choice([decimal.Decimal("1"), decimal.Decimal("2.5"), None]) for _ in range(n)], pa.decimal128(5, 2))
    if kind == "union":
        types = pa.array([int(rng.random() < 0.5) for _ in range(n)], pa.int8())
        return pa.UnionArray.from_sparse(types, [pa.array([rng.choice(names) for _ in range(n)]), pa.array([rng.choice([0, 2, 9]) for _ in range(n)])])
    raise AssertionError(kind)


LABEL_KINDS = ["int", "int8", "uint64", "float64", "float32", "float16", "names", "large_names", "dict_names", "bool", "null", "decimal", "union"]


def _number_column(kind, rng, n):
    """A relevance label or teacher score column."""
    if kind in ("int", "uint64"):
        pool = [0, 1, 2, 3, -2, None, 2**53 + 1, 2**62 + 1] if kind == "int" else [0, 1, 5, 2**64 - 1, None]
        return pa.array([rng.choice(pool) for _ in range(n)], pa.int64() if kind == "int" else pa.uint64())
    if kind in ("float64", "float32", "float16"):
        pool = [0.0, 1.0, 0.25, 7.5, -2.0, -0.0, float("nan"), float("inf"), float("-inf"), None, 0.1]
        return pa.array([rng.choice(pool) for _ in range(n)], pa.float64()).cast(getattr(pa, kind)())
    if kind == "bool":
        return pa.array([rng.choice([True, False, None]) for _ in range(n)])
    if kind == "string":
        return pa.array([rng.choice(["1", "0.5", None]) for _ in range(n)])
    if kind == "decimal":
        return pa.array([rng.choice([decimal.Decimal("1"), None]) for _ in range(n)], pa.decimal128(5, 2))
    if kind == "null":
        return pa.nulls(n)
    if kind == "union":
        types = pa.array([int(rng.random() < 0.5) for _ in range(n)], pa.int8())
        return pa.UnionArray.from_sparse(types, [pa.array([rng.choice(["x", None]) for _ in range(n)]), pa.array([rng.choice([0.5, -1.0, None]) for _ in range(n)])])
    raise AssertionError(kind)


NUMBER_KINDS = ["int", "uint64", "float64", "float32", "float16", "bool", "string", "decimal", "null", "union"]


def _tables():
    """(name, layout, table): a few hundred generated rows per table, every kind of bad value, every column type."""
    rng = random.Random(1234)
    n = ROWS
    for kind in TEXT_KINDS:
        yield f"nli premise={kind}", "nli", pa.table({"premise": _text_column(kind, rng, n), "hypothesis": _text_column("string", rng, n), "label": _label_column("int", rng, n)})
        yield f"nli hypothesis={kind}", "nli", pa.table({"premise": _text_column("string", rng, n), "hypothesis": _text_column(kind, rng, n), "label": _label_column("names", rng, n)})
    for kind in LABEL_KINDS:
        yield f"nli label={kind}", "nli", pa.table({"premise": _text_column("string", rng, n), "hypothesis": _text_column("large_string", rng, n), "label": _label_column(kind, rng, n)})
    yield "nli all valid", "nli", pa.table({"premise": ["A man."] * n, "hypothesis": ["A dog."] * n, "label": [i % 3 for i in range(n)]})
    for kind in TEXT_KINDS:
        yield f"pairs query={kind}", "pairs", pa.table({"query": _text_column(kind, rng, n), "positive": _text_column("string", rng, n)})
    for kind in LIST_KINDS:
        yield f"pairs negative={kind}", "pairs", pa.table({"query": _text_column("string", rng, n), "positive": _text_column("dictionary", rng, n), "negative": _list_column(kind, rng, n)})
    wide = {"query": _text_column("string", rng, n), "positive": _text_column("string", rng, n)}
    for c, kind in (("negative_10", "string"), ("negative_2", "large_string"), ("negative_1", "dictionary")):
        wide[c] = _text_column(kind, rng, n)
    yield "pairs negative_1..10", "pairs", pa.table(wide)
    yield "pairs negative + negative_k", "pairs", pa.table(wide | {"negative": _list_column("list", rng, n)})
    yield "pairs negative_k of an odd type", "pairs", pa.table(wide | {"negative_3": _text_column("union", rng, n)})
    yield "pairs repeated column names", "pairs", pa.Table.from_arrays(
        [_text_column("string", rng, n), _text_column("string", rng, n), _text_column("string", rng, n), _text_column("int", rng, n), _text_column("string", rng, n)],
        names=["query", "positive", "negative_1", "negative_1", "query"],
    )
    for layout, column in (("labeled", "label"), ("scored", "score")):
        for kind in NUMBER_KINDS:
            yield f"{layout} {column}={kind}", layout, pa.table({"query": _text_column("string", rng, n), "passage": _text_column("string", rng, n), column: _number_column(kind, rng, n)})
        for kind in TEXT_KINDS:
            yield f"{layout} passage={kind}", layout, pa.table({"query": _text_column("string", rng, n), "passage": _text_column(kind, rng, n), column: _number_column("float64", rng, n)})
    for kind in TEXT_KINDS:
        yield f"eval query={kind}", "eval", pa.table({"query": _text_column(kind, rng, n), "positive": _list_column("list", rng, n)})
    for kind in LIST_KINDS:
        yield f"eval positive={kind}", "eval", pa.table({"query": _text_column("string", rng, n), "positive": _list_column(kind, rng, n), "negative": _list_column("list", rng, n)})
        yield f"eval negative={kind}", "eval", pa.table({"query": _text_column("string", rng, n), "positive": _list_column("string", rng, n), "negative": _list_column(kind, rng, n)})


def _variants(table):
    """The table as read (one chunk), in several chunks, sliced (arrays with an offset), and empty."""
    yield "one chunk", table
    yield "chunks", pa.concat_tables([table.slice(0, 7), table.slice(7, 100), table.slice(107)])
    yield "sliced", table.slice(13, 150)
    yield "empty", table.slice(0, 0)


def _outcome(fn, table, job, split, caplog):
    caplog.clear()
    try:
        result = fn(table, job, split, f"data.{split}")
    except DataError as exc:
        result = ("error", str(exc))
    else:
        if not isinstance(result, tuple):
            result = (result.table, result.layout, result.dropped, result.problems)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ce_ray.data.check"]
    return result, warnings


@pytest.mark.parametrize("drop_invalid", [False, True])
def test_vectorised_check_rows_matches_the_row_by_row_reference(drop_invalid, caplog):
    caplog.set_level(logging.WARNING, logger="ce_ray.data.check")
    flag = f"data.drop_invalid={str(drop_invalid).lower()}"
    jobs = {
        "nli": [load_job(None, ["task=nli", "data.train=/in/train.parquet", flag]),
                load_job(None, ["task=nli", "model.num_labels=4", "data.train=/in/train.parquet", flag])],
        "rerank": [load_job(None, ["task=rerank", "data.train=/in/train.parquet", "data.eval=/in/dev.parquet", flag])],
    }
    seen = set()
    for name, layout, table in _tables():
        for job in jobs["nli" if layout == "nli" else "rerank"]:
            split = "eval" if layout == "eval" else "train"
            for variant, t in _variants(table):
                where = f"{name}, {variant}, num_labels={job.num_labels}, drop_invalid={drop_invalid}"
                (ref, ref_log), (new, new_log) = (_outcome(f, t, job, split, caplog) for f in (_reference_check_rows, check_rows))
                assert new_log == ref_log, where
                if ref[0] == "error":
                    assert new == ref, where
                    seen.add("no valid rows" if "no valid rows" in ref[1] else "invalid rows")
                    continue
                assert new[0].schema == ref[0].schema, where
                assert new[0].equals(ref[0]), where
                assert repr(new[0].to_pylist()) == repr(ref[0].to_pylist()), where  # -0.0, float values exactly
                assert new[1:] == ref[1:], where
                seen.add("dropped" if ref[2] else "all valid")
    assert seen == ({"no valid rows", "dropped", "all valid"} if drop_invalid else {"no valid rows", "invalid rows", "all valid"})


def test_solid_characters_are_never_whitespace_for_str_strip():
    """check_rows leaves to str.strip only texts without a letter, mark, number, punctuation or symbol; that is
    safe only if no such character is whitespace for Python: checked over every code point."""
    import numpy as np
    import pyarrow.compute as pc

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    solid = pc.match_substring_regex(pa.array(chars), _SOLID).to_numpy(zero_copy_only=False)
    space = np.array([ch.isspace() for ch in chars])
    assert space.sum() > 20 and not (solid & space).any()


def test_texts_over_2_gib_are_split_into_chunks_not_refused():
    """Canonical text columns are ``string`` (32-bit offsets); rows whose texts would overflow are built in parts."""
    calls = []

    def build(start, stop):
        calls.append((start, stop))
        if stop - start > 3:
            raise pa.ArrowInvalid("Failed casting from large_string to string: input array too large")
        return pa.array(range(start, stop))

    parts = _in_parts(build, 0, 10)
    assert [p.to_pylist() for p in parts] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]

    def broken(start, stop):
        calls.append((start, stop))
        raise pa.ArrowInvalid("some other problem")

    calls.clear()
    with pytest.raises(pa.ArrowInvalid, match="some other problem"):
        _in_parts(broken, 0, 10)
    assert calls == [(0, 10)]
