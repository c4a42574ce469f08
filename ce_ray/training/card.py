"""The model card (README.md) of ``final/`` and ``best/``: sentence-transformers' own, plus what ce-ray knows.

Two halves, one on each side of a run:

- :func:`card_data` (worker, before training): the ``CrossEncoderModelCardData`` the model is built
  with: base model, task, the training data's name (and hub id), tags. ``CrossEncoderTrainer`` fills
  in the rest as in the notebook flow (dataset statistics and samples, the loss and its config, the
  hyperparameters, training logs, eval metrics), and every checkpoint's README.md is that card.
- :func:`write_model_card` (driver, when ``final/`` or ``best/`` is staged): adds what only the driver
  knows to the chosen checkpoint's card: the job's data sources, loss options and hyperparameters,
  metrics before vs after training, the test score, the retriever baseline and the verdict (the
  ``ce_ray_quality.json`` of :mod:`ce_ray.quality`), in the YAML front matter (``base_model``,
  ``datasets``, ``pipeline_tag``, ``tags``, ``metrics``, ``model-index``) and in one section of the
  text. :func:`add_search_summary` adds tune's search (trials, metric, best hyperparameters) to ``best/``.

Each rewrites only its own section (between HTML comment markers), so running one again replaces
it, and README.md is written atomically (temp file, then rename). Data sources are named by path or
hub id only; ce-ray refuses URIs with inline credentials, and a URI's ``?query`` is left out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ce_ray import storage
from ce_ray.config import DataSource, JobConfig
from ce_ray.fusion import NORMALISATION
from ce_ray.modeling import hub_model_id
from ce_ray.tasks import TASKS

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from sentence_transformers.cross_encoder.model_card import CrossEncoderModelCardData

__all__ = ["CARD_FILE", "SearchSummary", "add_search_summary", "card_data", "write_model_card"]

CARD_FILE = "README.md"
CE_RAY_TAG = "ce-ray"
PIPELINE_TAGS = {"rerank": "text-ranking", "nli": "text-classification"}
_TASK_NAMES = {"rerank": "Reranking", "nli": "Natural Language Inference"}
_TAGS = {
    "rerank": ["sentence-transformers", "cross-encoder", "reranker", CE_RAY_TAG],
    "nli": ["sentence-transformers", "cross-encoder", "natural-language-inference", CE_RAY_TAG],
}
_SPLITS = ("train", "eval", "test")


@dataclass
class SearchSummary:
    """What :func:`add_search_summary` says about a Ray Tune search (filled in by ``ce-ray tune``)."""

    trials: int
    stopped_early: int
    metric: str  # as reported during training: eval_accuracy, eval_ndcg@10
    mode: str
    search: str  # optuna, random, grid
    scheduler: str  # asha, none
    best_trial: str
    best_step: int | None
    best_value: float
    params: dict[str, Any]  # the best trial's sampled values, by dotted key
    exported: str  # "trial" (its best checkpoint) or "refit" (its config trained again with tune.refit_set)
    refit_value: float | None = None
    refit_set: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# worker side: the card the trainer fills in
# --------------------------------------------------------------------------------------------
def card_data(job: JobConfig) -> CrossEncoderModelCardData:
    """The card data a training model starts with; the trainer adds data statistics, loss, hyperparameters, metrics."""
    from huggingface_hub import constants
    from sentence_transformers.cross_encoder.model_card import CrossEncoderModelCardData

    datasets = []
    for src in job.data.train_sources:
        dataset = {"name": _source_name(src)}
        if src.hub:
            dataset["id"] = src.hub
        datasets.append(dataset)
    data = CrossEncoderModelCardData(
        task_name=_task_sentence(job),
        tags=list(_TAGS[job.task]),
        train_datasets=datasets,
        local_files_only=constants.HF_HUB_OFFLINE,  # offline, no hub look-ups for dataset ids and the base model
    )
    data.base_model = hub_model_id(job.model.name)  # the hub's own lookup (online, hub ids) adds the revision
    data.base_model_revision = job.model.revision
    return data


def _task_sentence(job: JobConfig) -> str:
    if job.task == "rerank":
        return "text reranking and semantic search"
    labels = job.model.labels or [str(i) for i in range(job.num_labels)]
    return f"natural language inference (classifying a premise/hypothesis pair as {', '.join(labels)})"


# --------------------------------------------------------------------------------------------
# driver side: what the run knows, added to the staged model's card
# --------------------------------------------------------------------------------------------
def write_model_card(
    model_dir: str,
    job: JobConfig,
    *,
    quality: dict[str, Any],
    metrics_before: dict[str, float],
    hyperparameters: dict[str, Any],
    rows: dict[str, int | None],
    step: int | None = None,
) -> str:
    """Complete the card of a staged (local) model directory; returns the README.md path.

    Args:
        quality: :func:`ce_ray.quality.model_quality`'s result for this model (eval and test metrics,
            the retriever baseline, the verdict).
        metrics_before: eval metrics before training (the evaluation at step 0).
        hyperparameters: as in ``summary.json`` (learning rate, batch sizes, epochs, precision used...).
        rows: rows per split after checking (``train``, ``eval``, ``test``; None where absent).
        step: the training step of this model's checkpoint.
    """
    card = _load_card(model_dir, job)
    data = card.data
    base = hub_model_id(job.model.name)
    data.base_model = base
    data.library_name = "sentence-transformers"
    data.pipeline_tag = PIPELINE_TAGS[job.task]
    data.tags = _merge(data.tags, _TAGS[job.task])
    hub_ids = _merge([], [s.hub for s in [*job.data.train_sources, *_sources(job).values()] if s.hub])
    data.datasets = hub_ids or None
    data.model_name = data.model_name or f"CrossEncoder based on {base}"
    results = _eval_results(job, quality)
    data.eval_results = results or None
    data.metrics = list(dict.fromkeys(r.metric_type for r in results)) or None
    section = _run_section(job, quality, metrics_before, hyperparameters, rows, step)
    card.text = _put_section(card.text, "run", section, before="## Training Details")
    return _save(card, model_dir)


def add_search_summary(model_dir: str, search: SearchSummary) -> str:
    """Add (or replace) the hyperparameter-search section of a staged model's card; returns the README.md path."""
    card = _read_card(os.path.join(model_dir, CARD_FILE))
    card.data.tags = _merge(card.data.tags, ["ray-tune"])
    card.text = _put_section(card.text, "search", _search_section(search), before="## Training Details")
    return _save(card, model_dir)


def _load_card(model_dir: str, job: JobConfig) -> ModelCard:
    from huggingface_hub import ModelCard

    path = os.path.join(model_dir, CARD_FILE)
    if os.path.isfile(path):
        return _read_card(path)
    # the trainer logs and skips a card it cannot render; start a plain one then
    return ModelCard(f"---\nlibrary_name: sentence-transformers\n---\n\n# CrossEncoder based on {hub_model_id(job.model.name)}\n")


def _read_card(path: str) -> ModelCard:
    """The card in a local README.md (``ModelCard.load`` would ask the hub for a path that is missing)."""
    from huggingface_hub import ModelCard

    with open(path, encoding="utf-8") as f:
        return ModelCard(f.read())


def _save(card: ModelCard, model_dir: str) -> str:
    path = os.path.join(model_dir, CARD_FILE)
    storage.write_bytes(path, str(card).encode("utf-8"))
    return path


def _merge(existing: list[str] | None, extra: list[str]) -> list[str]:
    return list(dict.fromkeys([*(existing or []), *extra]))


def _sources(job: JobConfig) -> dict[str, DataSource]:
    """eval/test (and a single training source) by split; see :func:`_data_rows` for a data.train list."""
    return {split: src for split in _SPLITS if isinstance(src := getattr(job.data, split), DataSource)}


def _data_rows(job: JobConfig, rows: dict[str, Any]) -> list[list[Any]]:
    """The card's data table: a row per split, and per source of a data.train list (its training rows, then the mix)."""
    out: list[list[Any]] = []
    per_source = rows.get("train_sources") or []
    if isinstance(job.data.train, list):
        for i, src in enumerate(job.data.train):
            given = per_source[i] if i < len(per_source) else {}
            text = f"**{src.label()}**: {_source_text(src)}" + (f", weight {src.weight:g}" if src.weight else "")
            out.append([f"train[{i}]", text, given.get("rows")])
        out.append(["train", f"the {len(job.data.train)} sources above, `data.mix: {job.data.mix}`", rows.get("train")])
    elif job.data.train is not None:
        out.append(["train", _source_text(job.data.train), rows.get("train")])
    out += [[s, _source_text(src), rows.get(s)] for s, src in _sources(job).items() if s != "train"]
    return out


def _source_name(src: DataSource) -> str:
    """A short name: the hub id (and subset), or the file's name."""
    if src.hub:
        return f"{src.hub}/{src.subset}" if src.subset else src.hub
    return os.path.basename(src.path.split("?")[0].rstrip("/"))


def _source_text(src: DataSource) -> str:
    """Where the rows come from, as the job says (a URI without its ``?query``), and which of them."""
    if src.hub:
        text = f"hub `{src.hub}`" + (f", subset `{src.subset}`" if src.subset else "") + f", split `{src.split}`"
    else:
        text = f"`{src.path.split('?')[0]}`"
    if src.select and not src.offset:
        text += f", first {src.select:,} rows"
    elif src.offset:
        text += f", rows {src.offset:,} to {src.offset + src.select:,}" if src.select else f", from row {src.offset:,}"
    return text


def _eval_results(job: JobConfig, quality: dict[str, Any]) -> list:
    """The model's own eval and test metrics as ``EvalResult``s (the model-index); the baseline stays in the text."""
    from huggingface_hub import EvalResult

    results: list = []
    seen: set[tuple] = set()
    for split in ("test", "eval"):  # the same rows used twice are reported once, as test
        metrics, src = (quality.get("model") or {}).get(split), getattr(job.data, split)
        if not metrics or src is None:
            continue
        batch = [
            EvalResult(
                task_type=PIPELINE_TAGS[job.task],
                task_name=_TASK_NAMES[job.task],
                dataset_type=src.hub or _source_name(src),
                dataset_name=_source_name(src),
                dataset_config=src.subset,
                dataset_split=src.split if src.hub else split,
                metric_type=name,
                metric_name=name,
                metric_value=float(value),
            )
            for name, value in metrics.items()
        ]
        if batch and batch[0].unique_identifier not in seen:
            seen.add(batch[0].unique_identifier)
            results.extend(batch)
    return results


# --------------------------------------------------------------------------------------------
# the text sections
# --------------------------------------------------------------------------------------------
def _put_section(text: str, name: str, section: str, before: str) -> str:
    """``text`` with its ``name`` section replaced by ``section``, or inserted before the heading ``before`` (or appended)."""
    start, end = f"<!-- ce-ray:{name} -->", f"<!-- /ce-ray:{name} -->"
    block = f"{start}\n{section.strip()}\n{end}\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n*", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    at = text.find(f"\n{before}\n")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + block
    return text[: at + 1] + block + text[at + 1 :]


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], align: str = ":--", spec: str = ".4g") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--", *[align] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(_fmt(v, spec) for v in row) + " |" for row in rows]
    return lines


def _run_section(
    job: JobConfig,
    quality: dict[str, Any],
    before: dict[str, float],
    hyper: dict[str, Any],
    rows: dict[str, int | None],
    step: int | None,
) -> str:
    task, h = TASKS[job.task], hyper
    workers = job.scaling.num_workers
    plural = "s" if workers > 1 else ""
    which = f"the best checkpoint by eval {task.primary_metric}" if job.run.final == "best" else "the last checkpoint"
    facts = [
        ["Task", f"`{job.task}`: {task.description}"],
        ["Base model", f"`{hub_model_id(job.model.name)}`"],
        ["Loss", f"`{job.loss.label()}`"],
        ["Learning rate", _fmt(h["learning_rate"])],
        ["Batch size", f"{h['batch_size']} ({h['per_worker_batch_size']} per worker x {workers} worker{plural})"],
        ["Epochs / max steps", f"{_fmt(h['epochs'])} / {_fmt(h['max_steps'])}"],
        [
            "Warm-up ratio / weight decay / schedule",
            f"{h['warmup_ratio']} / {h['weight_decay']} / {job.train.lr_scheduler}",
        ],
        ["Precision", str(h["precision"])],
        ["Seed", str(h["seed"])],
        ["This model", which + (f", step {step}" if step is not None else "")],
    ]
    lines = [
        "## Training with ce-ray",
        "",
        f"Fine-tuned with ce-ray: Ray Train runs sentence-transformers' `CrossEncoderTrainer` on {workers} "
        f"worker{plural} ({'GPU' if job.scaling.use_gpu else 'CPU'}).",
        "",
        *_table(["", ""], facts),
        "",
        "### Data",
        "",
        *_table(["split", "source", "rows"], _data_rows(job, rows)),
        "",
        *_metrics_lines(job, quality, before),
    ]
    if quality.get("verdict"):
        lines += ["", f"**Verdict:** {quality['verdict']['message']}"]
    return "\n".join(lines)


def _metrics_lines(job: JobConfig, quality: dict[str, Any], before: dict[str, float]) -> list[str]:
    model = quality.get("model") or {}
    baseline = quality.get("baseline") or {}
    columns: list[tuple[str, dict[str, float]]] = [
        ("before training (eval)", before),
        ("after training (eval)", model.get("eval") or {}),
    ]
    if model.get("test"):
        columns.append(("after training (test)", model["test"]))
    if baseline.get("eval"):
        columns.append((f"retriever baseline `{hub_model_id(baseline['model'])}` (eval)", baseline["eval"]))
    if baseline.get("test"):
        columns.append((f"retriever baseline `{hub_model_id(baseline['model'])}` (test)", baseline["test"]))
    fusion = quality.get("fusion") or {}
    if fusion.get("test"):
        columns.append((f"fused with the retriever, weight {fusion['weight']:g} (test)", fusion["test"]))
    names = list(dict.fromkeys(k for _, metrics in columns for k in metrics))
    primary = TASKS[job.task].primary_metric
    body = [[f"**{n}**" if n == primary else n, *[metrics.get(n) for _, metrics in columns]] for n in names]
    intro = "Scored with sentence-transformers' evaluators on the eval rows before and after training"
    intro += ", then once on the test rows." if model.get("test") else "."
    if baseline.get("eval") or baseline.get("test"):
        intro += " The retriever baseline is the bi-encoder scored zero-shot (cosine) on the same candidates."
    if fusion:
        intro += (
            f" Fused: (1 - w) x this model's logit + w x the retriever's cosine, "
            + ("each standardised by its mean and standard deviation over the eval pairs, "
               if fusion.get("normalisation") == NORMALISATION else "z-scores over each query's candidates, ")
            + f"with w = {fusion['weight']:g} fitted on the eval rows (`serve.fusion: auto` serves it); it is "
            "reported apart and is not this model's own score."
        )
    return [
        "### Metrics before and after training",
        "",
        intro,
        "",
        *_table(["metric", *[c for c, _ in columns]], body, align="--:", spec=".4f"),
    ]


def _search_section(search: SearchSummary) -> str:
    plain = search.metric.removeprefix("eval_")
    params = ", ".join(f"`{k}` = {_param_text(v)}" for k, v in search.params.items()) or "-"
    if search.exported == "refit":
        exported = (
            f"the best trial's configuration trained again with {_settings(search.refit_set or {})} "
            f"(eval {plain} {_fmt(search.refit_value, '.4f')} vs the trial's {_fmt(search.best_value, '.4f')})"
        )
    else:
        exported = "the best trial's best checkpoint" + (
            f" (its refit scored eval {plain} {_fmt(search.refit_value, '.4f')}, lower)"
            if search.refit_value is not None
            else ""
        )
    facts = [
        ["Search", f"{search.search}, scheduler {search.scheduler}"],
        ["Trials", f"{search.trials} ({search.stopped_early} stopped early)"],
        ["Metric", f"eval {plain} ({search.mode})"],
        [
            "Best trial",
            f"`{search.best_trial}`: eval {plain} {_fmt(search.best_value, '.4f')}"
            + (f" at step {search.best_step}" if search.best_step is not None else ""),
        ],
        ["Best hyperparameters", params],
        ["This model", exported],
    ]
    return "\n".join(
        [
            "## Hyperparameter search",
            "",
            "This model comes out of a Ray Tune search run by ce-ray.",
            "",
            *_table(["", ""], facts),
        ]
    )


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"`{key}: {json.dumps(value)}`" for key, value in values.items()) or "the same settings"


def _param_text(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:  # a loss with options
        from ce_ray.config import LossConfig

        return f"`{LossConfig.model_validate(value).label()}`"
    return f"`{value}`" if isinstance(value, str) else _fmt(value)
