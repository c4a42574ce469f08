"""Several training sources in one job (``data.train`` as a list): keys, checks, mining together, mixing, caching.

No Ray here: preparing data runs on the driver, and the trainer's multi-dataset sampler is checked in-process
with a real ``CrossEncoderTrainer``.
"""

from __future__ import annotations

import pandas as pd
import pytest

from ce_ray.config import ConfigError, load_job
from ce_ray.data import DataError, load_prepared, prepare_split
from ce_ray.data import prepare as prepare_module


def _two_sources(tmp_path, frames, *overrides, task="nli"):
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"source{i}.parquet")
        frame.to_parquet(paths[-1])
    sources = ", ".join(f"{{path: {p}, name: s{i}}}" for i, p in enumerate(paths))
    return load_job(None, [f"task={task}", f"data.train=[{sources}]", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_overrides_reach_each_source_or_one_by_index():
    base = "data.train=[{path: a.parquet, select: 5}, {path: b.parquet, select: 7}]"
    job = load_job(None, ["task=nli", base, "data.train.select=null", "data.train.1.offset=3"])
    assert [(s.select, s.offset) for s in job.data.train] == [(None, 0), (None, 3)]
    assert [s.label() for s in job.data.train] == ["a", "b"]
    with pytest.raises(ConfigError) as info:
        load_job(None, ["task=nli", base, "data.train.2.select=3"])
    assert str(info.value) == "data.train: has 2 element(s), so data.train.2.select cannot be set"


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ("[a.parquet, {path: b.txt}]", "data.train[1]: cannot tell the format of 'b.txt' from its extension"),
        ("[a.parquet, {path: b.parquet, colums: {x: y}}]", "data.train[1].colums: unknown key"),
        ("[a.parquet, {path: b.parquet, weight: 2}]", "data.train[1].weight: weights apply with data.mix: weighted"),
        ("[]", "data.train: an empty list of sources"),
    ],
)
def test_config_errors_name_the_source_by_index(train, expected):
    with pytest.raises(ConfigError) as info:
        load_job(None, ["task=rerank", f"data.train={train}"])
    assert str(info.value).startswith(expected), str(info.value)


def test_bad_rows_and_columns_name_the_failing_source(tmp_path, nli_files):
    good = pd.read_parquet(nli_files["train"]).head(20)
    bad = good.copy()
    bad.loc[3, "hypothesis"] = "  "
    with pytest.raises(DataError) as info:
        prepare_split(_two_sources(tmp_path, [good, bad]), "train")
    assert str(info.value).startswith(f"data.train[1]: 1 invalid row(s) of 20 in {tmp_path / 'source1.parquet'}: row 3:")
    renamed = good.rename(columns={"premise": "text"})
    with pytest.raises(DataError) as info:
        prepare_split(_two_sources(tmp_path, [good, renamed]), "train")
    assert str(info.value).startswith("data.train[1]: nli rows need columns")


def test_rerank_sources_are_mined_together_counted_per_source_and_cached(tmp_path, shared_data, monkeypatch):
    first = pd.read_parquet(shared_data / "qa" / "train.parquet").head(40)
    second = pd.read_parquet(shared_data / "qa" / "extra.parquet").head(40)[["question", "answer"]]
    job = _two_sources(
        tmp_path, [first, second], "data.train.columns={query: question, positive: answer}",
        "train.loss=BinaryCrossEntropyLoss", "data.negatives.num=3", "data.negatives.sampling=top", task="rerank",
    )  # fmt: skip
    split = prepare_split(job, "train")
    assert [(s["key"], s["name"], s["read"]) for s in split.sources] == [("data.train[0]", "s0", 40), ("data.train[1]", "s1", 40)]
    assert sum(s["rows"] for s in split.sources) == split.rows
    rows = load_prepared(split.uri).data.table.to_pylist()
    # one search over both sources: some query of each source got a negative that is the other source's positive
    positives = [set(first["answer"]), set(second["answer"])]
    queries = [set(first["question"]), set(second["question"])]
    negatives = [r for r in rows if r["label"] == 0]
    for i in (0, 1):
        crossed = [r for r in negatives if r["query"] in queries[i] and r["passage"] in positives[1 - i]]
        assert crossed, f"no negative of source {i} came from the other source"
    assert {r["query"] for r in rows if r["label"] == 1} == queries[0] | queries[1]

    # a second prepare is a cache hit (nothing is mined again); a changed source is not
    def no_mining(*args, **kwargs):
        raise AssertionError("mined again")

    monkeypatch.setattr(prepare_module, "mine_negatives", no_mining)
    assert prepare_split(job, "train") == split
    second.head(30).to_parquet(tmp_path / "source1.parquet")
    with pytest.raises(AssertionError, match="mined again"):
        prepare_split(job, "train")


def test_weighted_mix_gives_each_source_its_share(tmp_path, nli_files):
    frame = pd.read_parquet(nli_files["train"])
    small, large = frame.head(30), frame.iloc[100:190]
    job = _two_sources(
        tmp_path, [small, large], "data.mix=weighted", "data.train.0.weight=3", "data.train.1.weight=1"
    )
    split = prepare_split(job, "train")
    assert [s["rows"] for s in split.sources] == [90, 30] and split.rows == 120
    premises = pd.Series(load_prepared(split.uri)["premise"])
    assert premises.isin(set(small["premise"])).sum() == 90  # the 30 rows of the small source, 3 times each
    assert premises[premises.isin(set(small["premise"]))].value_counts().eq(3).all()
    assert premises.isin(set(large["premise"])).sum() == 30 and premises.nunique() == 60


def test_round_robin_trains_on_one_source_per_batch_in_turn(tmp_path, nli_files, tiny_model):
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    from ce_ray.modeling import load_cross_encoder
    from ce_ray.tasks import build_loss
    from ce_ray.training.recipe import per_source, training_arguments

    frame = pd.read_parquet(nli_files["train"])
    sources = [frame.head(40), frame.iloc[100:160]]
    job = _two_sources(
        tmp_path, sources, "data.mix=round_robin", f"model.name={tiny_model}", "train.batch_size=8", "train.max_steps=6"
    )
    split = prepare_split(job, "train")
    rows = load_prepared(split.uri)
    assert split.rows == 100 and "source" in rows.column_names
    datasets = per_source(job, rows)
    assert {name: len(ds) for name, ds in datasets.items()} == {"s0": 40, "s1": 60}
    assert "source" not in datasets["s0"].column_names

    model = load_cross_encoder(job.model, job.task, device="cpu")
    args = training_arguments(job, 1, str(tmp_path / "out"), resuming=False)
    args.eval_strategy, args.eval_on_start = "no", False
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=datasets, loss=build_loss(job.loss, model, rows.data.table))
    owners = []
    for batch, _ in zip(trainer.get_train_dataloader(), range(6)):
        texts = set(batch["premise"])
        owner = [i for i, src in enumerate(sources) if texts <= set(src["premise"])]
        assert len(owner) == 1, "a batch mixed the sources"
        owners.append(owner[0])
    assert owners == [0, 1, 0, 1, 0, 1]
    assert trainer.train().global_step == 6


def test_a_run_of_several_sources_has_an_identity_that_names_each_source(tmp_path, nli_files):
    """``ce-ray train`` records what defines a run before it starts; with data.train a list, each source counts."""
    from ce_ray.runs import check_run_identity, run_identity

    frame = pd.read_parquet(nli_files["train"])
    job = _two_sources(tmp_path, [frame.head(20), frame.iloc[20:40]], f"run.output_dir={tmp_path / 'runs'}")
    identity = run_identity(job, "train")
    assert identity["data.train.0.path"].endswith("source0.parquet")
    assert identity["data.train.1.path"].endswith("source1.parquet")
    check_run_identity(job, "train", started=False)
    check_run_identity(job, "train", started=True)  # the same sources: a resume

    frame.iloc[40:70].to_parquet(tmp_path / "source1.parquet")  # the second source's content changes
    with pytest.raises(ConfigError, match=r"data\.train\.1\.stat"):
        check_run_identity(job, "train", started=True)


def test_a_search_resumes_when_only_where_its_refit_runs_changed(tmp_path, nli_files):
    """``tune.refit_set``'s ``scaling.*`` and ``run.*`` keys are machinery, as ``scaling`` and ``run`` are for the run
    itself: giving the refit more cores resumes the search; refitting with another loss is another search."""
    from ce_ray.runs import check_run_identity

    frame = pd.read_parquet(nli_files["train"])
    runs = f"run.output_dir={tmp_path / 'runs'}"
    refit = "tune.refit_set={data.train.select: null, run.checkpoint_every: 250, scaling.cpus_per_worker: 1}"
    job = _two_sources(tmp_path, [frame.head(20), frame.iloc[20:40]], runs, refit)
    check_run_identity(job, "tune", started=False)
    more_cores = _two_sources(tmp_path, [frame.head(20), frame.iloc[20:40]], runs, refit.replace("cpus_per_worker: 1", "cpus_per_worker: 2"))
    check_run_identity(more_cores, "tune", started=True)
    other_loss = _two_sources(tmp_path, [frame.head(20), frame.iloc[20:40]], runs, refit.replace("}", ", train.loss: CrossEntropyLoss}"))
    with pytest.raises(ConfigError, match=r"changed: tune\.refit_set\.train\.loss\)"):
        check_run_identity(other_loss, "tune", started=True)


def test_a_re_synced_copy_of_the_same_bytes_resumes_and_keeps_its_prepared_data(tmp_path, nli_files):
    """A new machine or a re-mounted volume gives the data files a new mtime, not new content: the run resumes and
    the prepared (mined) rows are a cache hit. The same size with other bytes is another source."""
    import os
    import shutil

    from ce_ray.data.prepare import prepare_split
    from ce_ray.runs import check_run_identity

    frame = pd.read_parquet(nli_files["train"])
    job = _two_sources(tmp_path, [frame.head(20), frame.iloc[20:40]], f"run.output_dir={tmp_path / 'runs'}")
    check_run_identity(job, "train", started=False)
    first = prepare_split(job, "train")

    source = tmp_path / "source0.parquet"
    stat = os.stat(source)
    shutil.copy(source, tmp_path / "copy.parquet")
    os.replace(tmp_path / "copy.parquet", source)  # re-synced: the same bytes, a new file and mtime
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
    assert os.stat(source).st_mtime_ns != stat.st_mtime_ns
    check_run_identity(job, "train", started=True)
    written = os.stat(os.path.join(first.uri, "ce_ray_split.json")).st_mtime_ns
    assert prepare_split(job, "train") == first  # the same key: the prepared rows are read back, not written again
    assert os.stat(os.path.join(first.uri, "ce_ray_split.json")).st_mtime_ns == written

    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: the size is the same, the content is not
    source.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"data\.train\.0\.stat\.sha256"):
        check_run_identity(job, "train", started=True)
