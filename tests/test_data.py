"""Reading sources and checking rows: formats, column mapping, row-numbered errors, drop_invalid."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ce_ray.config import load_job
from ce_ray.data import DataError, check_rows, load_split, read_source, rerank_groups


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
