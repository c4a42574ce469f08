"""The model card of final/ and best/ without Ray: card data for the trainer, hub sources, sections rewritten in place.

The end-to-end checks (a real run's final/ and best/) sit in test_train.py, test_quality.py and test_tune.py.
"""

from __future__ import annotations

import os

import pytest

from ce_ray.config import load_job
from ce_ray.training.card import SearchSummary, add_search_summary, card_data, write_model_card


def hub_job(model: str):
    nli = {"hub": "sentence-transformers/all-nli", "subset": "pair-class"}
    return load_job(
        None,
        base={
            "task": "nli",
            "model": {"name": model},
            "data": {
                "train": {**nli, "split": "train", "select": 1000},
                "eval": {**nli, "split": "dev"},
                "test": {"path": "s3://bucket/nli/test.parquet?endpoint_override=minio:9000"},
            },
            "train": {"loss": {"name": "CrossEntropyLoss", "label_smoothing": 0.1}},
        },
    )


QUALITY = {
    "model": {"eval": {"accuracy": 0.8, "f1_macro": 0.7}, "test": {"accuracy": 0.75, "f1_macro": 0.65}},
    "baseline": None,
    "verdict": None,
}
HYPER = {"learning_rate": 5e-5, "batch_size": 64, "per_worker_batch_size": 64, "epochs": 1.0, "max_steps": -1,
         "warmup_ratio": 0.1, "weight_decay": 0.01, "precision": "bf16", "seed": 12}  # fmt: skip
SEARCH = SearchSummary(
    trials=8, stopped_early=3, metric="eval_accuracy", mode="max", search="optuna", scheduler="asha",
    best_trial="a1b2", best_step=120, best_value=0.8, params={"train.learning_rate": 5e-5, "train.batch_size": 64},
    exported="trial",
)  # fmt: skip


def test_card_data_starts_the_card_with_base_model_task_and_training_data():
    data = card_data(hub_job("bundled:all-MiniLM-L6-v2"))
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # the bundled copy's hub id
    assert data.train_datasets == [{"name": "sentence-transformers/all-nli/pair-class", "id": "sentence-transformers/all-nli"}]
    assert data.local_files_only is True  # HF_HUB_OFFLINE=1 (conftest): no hub look-ups from the workers
    assert data.task_name.startswith("natural language inference") and "ce-ray" in data.tags and "reranker" not in data.tags


def test_hub_sources_reach_the_front_matter_and_sections_are_replaced_not_repeated(tiny_model, tmp_path):
    from huggingface_hub import ModelCard
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.modeling import load_cross_encoder

    model_dir = str(tmp_path / "model")
    job = hub_job(tiny_model)
    load_cross_encoder(job.model, job.task).save_pretrained(model_dir)  # with sentence-transformers' own card
    for _ in range(2):  # tune re-carding a refit's final/ as best/: one section each, the latest facts
        write_model_card(model_dir, job, quality=QUALITY, metrics_before={"accuracy": 0.33}, hyperparameters=HYPER,
                         rows={"train": 1000, "eval": 500, "test": 200}, step=120)  # fmt: skip
        add_search_summary(model_dir, SEARCH)

    card = ModelCard.load(os.path.join(model_dir, "README.md"))
    assert card.data.base_model == "model" and card.data.datasets == ["sentence-transformers/all-nli"]
    assert card.data.pipeline_tag == "text-classification" and {"ce-ray", "ray-tune"} <= set(card.data.tags)
    test = [r for r in card.data.eval_results if r.dataset_split == "test"]
    dev = [r for r in card.data.eval_results if r.dataset_split == "dev"]
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in test} == {("test.parquet", "accuracy", 0.75), ("test.parquet", "f1_macro", 0.65)}
    assert {(r.dataset_type, r.dataset_config) for r in dev} == {("sentence-transformers/all-nli", "pair-class")}
    text = card.text
    assert text.count("## Training with ce-ray") == 1 and text.count("## Hyperparameter search") == 1
    assert "| train | hub `sentence-transformers/all-nli`, subset `pair-class`, split `train`, first 1,000 rows | 1,000 |" in text
    assert "| test | `s3://bucket/nli/test.parquet` | 200 |" in text and "minio" not in text  # no URI query
    assert "`CrossEntropyLoss(label_smoothing=0.1)`" in text and "| Precision | bf16 |" in text
    assert "| **accuracy** | 0.3300 | 0.8000 | 0.7500 |" in text
    assert "| Trials | 8 (3 stopped early) |" in text and "`train.learning_rate` = 5e-05, `train.batch_size` = 64" in text
    assert text.index("## Training with ce-ray") < text.index("## Hyperparameter search") < text.index("## Training Details")
    # still a model directory that loads, and saving it again (as push_to_hub does) keeps this card
    CrossEncoder(model_dir).save_pretrained(str(tmp_path / "again"))
    assert (tmp_path / "again" / "README.md").read_text() == (tmp_path / "model" / "README.md").read_text()


def test_a_model_without_a_card_gets_one(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_model_card(str(model_dir), hub_job(tiny_model), quality=QUALITY, metrics_before={}, hyperparameters=HYPER,
                     rows={"train": 1000, "eval": 500, "test": None})  # fmt: skip
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.base_model == "model" and card.text.startswith("\n# CrossEncoder based on model")
    assert "## Training with ce-ray" in card.text
    with pytest.raises(FileNotFoundError):  # a search summary needs the card it adds to
        add_search_summary(str(tmp_path / "nothing"), SEARCH)


def test_several_training_sources_each_get_a_row_with_their_rows_and_the_fused_score_its_column(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    from ce_ray.data.prepare import sources_text

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    job = load_job(None, base={
        "task": "rerank", "model": {"name": tiny_model},
        "data": {"train": [{"path": "qa/train.parquet", "select": 500}, {"hub": "org/qa-extra", "name": "extra", "weight": 2}],
                 "mix": "weighted", "eval": "qa/dev.parquet"},
    })  # fmt: skip
    sources = [{"name": "train", "key": "data.train[0]", "read": 500, "dropped": 2, "rows": 1200},
               {"name": "extra", "key": "data.train[1]", "read": 900, "dropped": 0, "rows": 2400}]  # fmt: skip
    quality = {
        "model": {"eval": {"ndcg@10": 0.8}, "test": {"ndcg@10": 0.81}},
        "baseline": {"model": "bundled:all-MiniLM-L6-v2", "eval": {"ndcg@10": 0.85}, "test": {"ndcg@10": 0.84}},
        "verdict": None,
        "fusion": {"weight": 0.35, "normalisation": "zscore-per-query", "eval": {"ndcg@10": 0.87}, "test": {"ndcg@10": 0.86}},
    }
    write_model_card(str(model_dir), job, quality=quality, metrics_before={"ndcg@10": 0.2}, hyperparameters=HYPER,
                     rows={"train": 3600, "eval": 40, "test": None, "train_sources": sources})  # fmt: skip
    card = ModelCard.load(model_dir / "README.md")
    assert "| train[0] | **train**: `qa/train.parquet`, first 500 rows | 1,200 |" in card.text
    assert "| train[1] | **extra**: hub `org/qa-extra`, split `train`, weight 2 | 2,400 |" in card.text
    assert "| train | the 2 sources above, `data.mix: weighted` | 3,600 |" in card.text
    assert card.data.datasets == ["org/qa-extra"]
    assert "| **ndcg@10** | 0.2000 | 0.8000 | 0.8100 | 0.8500 | 0.8400 | 0.8600 |" in card.text
    assert "fused with the retriever, weight 0.35 (test)" in card.text and "w = 0.35 fitted on the eval rows" in card.text
    assert sources_text(sources) == (
        "data.train[0] train 1,200 (of 500 read, 2 dropped); data.train[1] extra 2,400 (of 900 read)"
    )
