"""Every loss gets its data in the format it needs, through the one preparation path, and trains on it (tiny model, no Ray)."""

from __future__ import annotations

import pandas as pd
import pytest

from ce_ray.config import load_job
from ce_ray.data import DataError, load_prepared, load_split, mine_negatives, needs_mining, prepare_split, rerank_groups
from ce_ray.tasks import LOSSES, bce_pos_weight, build_loss


@pytest.fixture()
def rerank_rows(tmp_path):
    """Queries with a positive and two labelled negatives each (already has negatives: no mining)."""
    frame = pd.DataFrame(
        {
            "query": [f"What is fact {i}?" for i in range(8)],
            "positive": [f"Fact {i} is that the sky is blue on day {i}." for i in range(8)],
            "negative": [[f"Unrelated sentence {i}a.", f"Unrelated sentence {i}b."] for i in range(8)],
        }
    )
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    return str(path)


def prepared_table(job):
    """The training rows exactly as workers get them: read, checked, grouped, mined, shaped, saved."""
    return load_prepared(prepare_split(job, "train").uri).data.table


def shaped(path: str, loss: str, *overrides: str):
    out = f"{path}.runs"
    job = load_job(None, ["task=rerank", f"data.train={path}", f"train.loss={loss}", f"run.output_dir={out}", *overrides])
    return job, prepared_table(job)


def test_bce_gets_labeled_pairs_and_auto_pos_weight(rerank_rows):
    job, table = shaped(rerank_rows, "BinaryCrossEntropyLoss")
    assert table.column_names == ["query", "passage", "label"]
    assert table.num_rows == 8 * 3
    assert sorted(set(table.column("label").to_pylist())) == [0.0, 1.0]
    assert bce_pos_weight(job.loss, table) == pytest.approx(2.0)  # negatives per positive


def test_mnrl_gets_tuples_without_labels(rerank_rows):
    _, table = shaped(rerank_rows, "MultipleNegativesRankingLoss")
    assert table.column_names == ["query", "positive", "negative_1", "negative_2"]
    assert table.num_rows == 8


def test_listwise_losses_get_lists(rerank_rows):
    for loss in ("ListNetLoss", "LambdaLoss"):
        _, table = shaped(rerank_rows, loss)
        assert table.column_names == ["query", "docs", "labels"]
        row = table.slice(0, 1).to_pylist()[0]
        assert len(row["docs"]) == 3 and row["labels"] == [1.0, 0.0, 0.0]


def test_score_losses_need_teacher_scores(rerank_rows, tmp_path):
    for loss in ("MSELoss", "MarginMSELoss"):
        with pytest.raises(DataError, match=f"train.loss: {loss} learns from teacher scores"):
            shaped(rerank_rows, loss)
    scored = tmp_path / "scored.parquet"
    pd.DataFrame({"query": ["q1", "q1", "q1"], "passage": ["a", "b", "c"], "score": [9.0, 1.5, -3.0]}).to_parquet(scored)
    _, table = shaped(str(scored), "MSELoss")
    assert table.column_names == ["query", "passage", "score"]
    _, table = shaped(str(scored), "MarginMSELoss")
    assert table.to_pydict() == {"query": ["q1", "q1"], "doc_a": ["a", "a"], "doc_b": ["b", "c"], "label": [7.5, 12.0]}
    with pytest.raises(DataError, match="BinaryCrossEntropyLoss needs labels in \\[0, 1\\]"):
        shaped(str(scored), "BinaryCrossEntropyLoss")


def test_positive_only_pairs_never_train_bce_without_negatives(qa_files):
    mapping = "{query: question, positive: answer}"
    job = load_job(
        None,
        ["task=rerank", f"data.train={{path: {qa_files['train']}, columns: {mapping}}}", "data.negatives.mine=never"],
    )
    groups = rerank_groups(load_split(job, "train"))
    assert not groups.has_negatives
    with pytest.raises(DataError, match="needs negatives but data.train has positive pairs only"):
        needs_mining(LOSSES[job.loss.name], groups, job.data.negatives.mine)
    assert needs_mining(LOSSES["MultipleNegativesRankingLoss"], groups, "never") is False  # in-batch negatives need no mining


def test_mining_adds_hard_negatives_that_are_not_positives(qa_files):
    """Real mining with the bundled all-MiniLM-L6-v2 on real QA pairs."""
    mapping = "{query: question, positive: answer}"
    job = load_job(None, ["task=rerank", f"data.train={{path: {qa_files['train']}, columns: {mapping}, select: 48}}", "data.negatives.num=3"])
    groups = rerank_groups(load_split(job, "train"))
    assert needs_mining(LOSSES[job.loss.name], groups, job.data.negatives.mine)
    mined = mine_negatives(groups, job.data.negatives)
    assert mined.queries == groups.queries
    with_negatives = 0
    for original, docs, labels in zip(groups.docs, mined.docs, mined.labels):
        positives = {d for d, lab in zip(docs, labels) if lab > 0}
        negatives = [d for d, lab in zip(docs, labels) if lab <= 0]
        assert positives == set(original)
        assert not positives & set(negatives)
        assert len(negatives) <= 3
        with_negatives += bool(negatives)
    assert with_negatives >= 0.8 * len(groups.queries)


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_the_cluster_paths_search_finds_the_negatives_mine_hard_negatives_finds(qa_files, sampling):
    """data.prepare_on: cluster mines with select_negatives (exact search in corpus blocks, the library's filters) on
    shards of the queries; here, in one process, against sentence-transformers' mine_hard_negatives (the driver path):
    the same candidates pass the filters, so with sampling: top the negatives are the same, best first. With random,
    each query's draw is seeded by (seed, query), so any sharding of the queries gives the same negatives."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from ce_ray.data.mining import _mine_here, select_negatives
    from ce_ray.modeling import resolve_model_name

    mapping = "{query: question, positive: answer}"
    job = load_job(None, ["task=rerank", f"data.train={{path: {qa_files['train']}, columns: {mapping}}}", "data.negatives.num=3",
                          f"data.negatives.sampling={sampling}", "data.negatives.max_score=0.6", "data.negatives.range_min=1",
                          "data.negatives.range_max=20", "data.negatives.precision=fp32"])  # fmt: skip
    cfg = job.data.negatives
    groups = rerank_groups(load_split(job, "train"))
    pairs_q = [q for q, docs in zip(groups.queries, groups.docs) for _ in docs]
    pairs_p = [d for docs in groups.docs for d in docs]
    corpus = list(dict.fromkeys(pairs_p))
    encoder = SentenceTransformer(resolve_model_name(cfg.model))
    corpus_emb = encoder.encode_document(corpus, normalize_embeddings=True, convert_to_numpy=True)
    query_emb = encoder.encode_query(groups.queries, normalize_embeddings=True, convert_to_numpy=True)
    positive_ids = [[corpus.index(d) for d in docs] for docs in groups.docs]
    max_positives = max(len(docs) for docs in groups.docs)

    def search(rows: range, block: int) -> list[list[str]]:
        found = select_negatives(query_emb[list(rows)], corpus_emb, [positive_ids[i] for i in rows], cfg, 20, max_positives, list(rows), block=block)
        return [[corpus[i] for i in ids] for ids in found]

    n = len(groups.queries)
    whole = search(range(n), block=len(corpus))
    assert whole == search(range(0, 40), block=17) + search(range(40, n), block=32)  # shards and corpus blocks
    assert all(len(negatives) <= 3 and not set(negatives) & set(docs) for negatives, docs in zip(whole, groups.docs))
    assert sum(map(len, whole)) >= 2 * n  # the filters leave most queries their 3 negatives
    if sampling == "top":
        library = _mine_here(pairs_q, pairs_p, None, cfg, 20, None)
        assert whole == [library.get(q, []) for q in groups.queries]


@pytest.mark.parametrize("block", [32, 96, 1000, 4096])
def test_the_block_search_skips_chunks_yet_finds_the_exact_top_k(block):
    """select_negatives' search scores the corpus a block at a time and, after the first, merges only the 32-column
    chunks that reach a query's k-th best so far: the result is torch.topk over the whole similarity matrix."""
    import torch
    from sentence_transformers.util import cos_sim

    from ce_ray.data.mining import _top_k

    gen = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(3000, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(corpus[:40] + 0.3 * torch.randn(40, 16, generator=gen), dim=1)
    expected_scores, expected_ids = torch.topk(cos_sim(queries, corpus), k=101, dim=1)
    scores, ids = _top_k(queries, corpus, 101, block, "cpu")
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores)


def test_bf16_mining_embeds_in_bf16_and_finds_nearly_the_fp32_negatives(qa_files):
    """data.negatives.precision: bf16 runs the encoder's forward under autocast; the embeddings stay fp32 and within
    bf16 rounding of fp32's, so mining finds the same negatives but for near-ties. auto is bf16 exactly where the CPU
    computes it natively."""
    import numpy as np

    from ce_ray.data.mining import load_encoder
    from ce_ray.runtime import native_bf16

    mapping = "{query: question, positive: answer}"
    jobs = {
        p: load_job(None, ["task=rerank", f"data.train={{path: {qa_files['train']}, columns: {mapping}, select: 48}}",
                           "data.negatives.num=3", "data.negatives.sampling=top", f"data.negatives.precision={p}"])
        for p in ("fp32", "bf16", "auto")
    }  # fmt: skip
    texts = pd.read_parquet(qa_files["train"])["answer"].head(64).tolist()
    emb = {p: load_encoder(job.data.negatives).encode_document(texts, normalize_embeddings=True) for p, job in jobs.items()}
    assert emb["bf16"].dtype == np.float32 and not np.array_equal(emb["bf16"], emb["fp32"])
    assert (emb["bf16"] * emb["fp32"]).sum(1).min() > 0.999
    assert np.array_equal(emb["auto"], emb["bf16" if native_bf16(use_gpu=False) else "fp32"])
    assert jobs["fp32"].data.negatives.rows_key() != jobs["bf16"].data.negatives.rows_key()  # cached apart

    groups = rerank_groups(load_split(jobs["fp32"], "train"))
    mined = {p: mine_negatives(groups, jobs[p].data.negatives) for p in ("fp32", "bf16")}
    same = [len({*a} & {*b}) / max(len(a), 1) for a, b in zip(mined["fp32"].docs, mined["bf16"].docs)]
    assert np.mean(same) > 0.9, same


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_a_step_on_its_shaped_data(loss, tiny_model, tmp_path, rerank_rows):
    """The shaped columns are exactly what the sentence-transformers loss consumes."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from datasets import Dataset

    from ce_ray.modeling import load_cross_encoder

    if LOSSES[loss].task == "nli":
        frame = pd.DataFrame({"premise": ["A man sleeps.", "A dog runs."] * 4, "hypothesis": ["A person rests.", "A cat sits."] * 4, "label": [0, 2] * 4})
        frame.to_parquet(tmp_path / "nli.parquet")
        job = load_job(None, ["task=nli", f"data.train={tmp_path / 'nli.parquet'}", "train.loss={name: CrossEntropyLoss, label_smoothing: 0.1, class_weights: balanced}", f"run.output_dir={tmp_path / 'runs'}"])
    elif LOSSES[loss].needs_scores:
        frame = pd.DataFrame({"query": ["q1"] * 4 + ["q2"] * 4, "passage": list("abcdefgh"), "score": [5.0, 1.0, 0.5, -1.0] * 2})
        frame.to_parquet(tmp_path / "scored.parquet")
        job = load_job(None, ["task=rerank", f"data.train={tmp_path / 'scored.parquet'}", f"train.loss={loss}", f"run.output_dir={tmp_path / 'runs'}"])
    else:
        job = load_job(None, ["task=rerank", f"data.train={rerank_rows}", f"train.loss={loss}", f"run.output_dir={tmp_path / 'runs'}"])
    table = prepared_table(job)
    model = load_cross_encoder(job.model.model_copy(update={"name": tiny_model}), job.task, device="cpu")
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset(table), loss=build_loss(job.loss, model, table))
    output = trainer.train()
    assert trainer.state.global_step == 2
    assert output.training_loss == output.training_loss and output.training_loss < float("inf")  # finite
