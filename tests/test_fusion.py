"""Fusion with the retriever: the rule, the weight fitted on eval rows, and metrics equal to the library evaluator's."""

from __future__ import annotations

import numpy as np
import pytest

from ce_ray.fusion import WEIGHTS, fit_calibration, fit_scales, fit_weight, fused_scores, fusion_report, rerank_metrics, zscores


def _queries(rng, n, reranker_noise, retriever_noise):
    out = []
    for _ in range(n):
        relevance = np.array([1.0] + [0.0] * 9)
        out.append({
            "logits": relevance * 2 + rng.normal(0, reranker_noise, 10) + 5.0,  # another scale and offset
            "cosines": relevance * 0.2 + rng.normal(0, retriever_noise, 10) + 0.4,
            "positives": 1,
        })  # fmt: skip
    return out


def test_zscores_and_the_fused_rule_without_fitted_scales():
    assert zscores(np.array([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]  # one document, or all tied
    np.testing.assert_allclose(zscores(np.array([1.0, 3.0])), [-1.0, 1.0])
    logits, cosines = np.array([0.0, 10.0, 5.0]), np.array([0.9, 0.1, 0.5])
    np.testing.assert_allclose(fused_scores(logits, cosines, 0.0), zscores(logits))
    np.testing.assert_allclose(fused_scores(logits, cosines, 1.0), zscores(cosines))
    np.testing.assert_allclose(fused_scores(logits, cosines, 0.5), 0.5 * zscores(logits) + 0.5 * zscores(cosines))


def test_the_fitted_rule_scores_a_document_alone_as_in_any_request_and_its_sigmoid_is_calibrated():
    rng = np.random.default_rng(2)
    queries = _queries(rng, 100, reranker_noise=1.2, retriever_noise=0.12)
    scales = fit_scales(queries)
    pairs = np.concatenate([q["logits"] for q in queries])
    assert scales["logit_mean"] == pytest.approx(pairs.mean()) and scales["logit_std"] == pytest.approx(pairs.std())
    logits, cosines = queries[0]["logits"], queries[0]["cosines"]
    fused = fused_scores(logits, cosines, 0.3, scales)
    np.testing.assert_allclose(fused, 0.7 * (logits - scales["logit_mean"]) / scales["logit_std"]
                               + 0.3 * (cosines - scales["cosine_mean"]) / scales["cosine_std"])  # fmt: skip
    for i in range(len(logits)):  # one document alone, or with any others: the same score
        assert fused_scores(logits[i:i + 1], cosines[i:i + 1], 0.3, scales)[0] == pytest.approx(fused[i])
        assert fused_scores(logits[: i + 1], cosines[: i + 1], 0.3, scales)[i] == pytest.approx(fused[i])
    assert fused_scores(logits[:1], cosines[:1], 0.3)[0] == 0.0  # z-scores: one document carries no information

    # The calibration is a logistic regression: the mean probability is the positives' share (1 in 10), it ranks
    # as the fused score does, and it predicts relevance better than the uncalibrated sigmoid.
    report = fusion_report(queries, None, "bi-encoder")
    assert report["normalisation"] == "fixed-scales" and report["scales"] == scales  # unrounded: served as scored
    cal = report["calibration"]
    raw = np.concatenate([fused_scores(q["logits"], q["cosines"], report["weight"], report["scales"]) for q in queries])
    calibrated = np.concatenate([fused_scores(q["logits"], q["cosines"], report["weight"], report["scales"], cal) for q in queries])
    labels = np.concatenate([np.arange(10) < 1 for _ in queries])
    prob = 1 / (1 + np.exp(-calibrated))
    assert cal["scale"] > 0 and prob.mean() == pytest.approx(0.1, abs=1e-3)
    assert (np.argsort(raw) == np.argsort(calibrated)).all()
    log_loss = lambda p: -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))  # noqa: E731
    assert log_loss(prob) < log_loss(1 / (1 + np.exp(-raw)))
    separable = fit_calibration(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))  # finite all the same
    assert np.isfinite([separable["scale"], separable["bias"]]).all() and separable["scale"] > 0


def test_serving_takes_the_fitted_scales_and_falls_back_to_z_scores_for_older_models(tmp_path):
    from ce_ray.config import ServeConfig
    from ce_ray.quality import write_model_quality
    from ce_ray.serving.model import fusion_settings

    fitted = fusion_report(_queries(np.random.default_rng(3), 60, 1.2, 0.12), None, "bundled:all-MiniLM-L6-v2")
    (tmp_path / "new").mkdir()
    write_model_quality(str(tmp_path / "new"), {"task": "rerank", "fusion": fitted})
    auto = fusion_settings(ServeConfig(model=str(tmp_path / "new"), fusion="auto"), str(tmp_path / "new"))
    assert auto["normalisation"] == "fixed-scales" and auto["weight"] == fitted["weight"]
    assert auto["scales"] == fitted["scales"] and auto["calibration"] == fitted["calibration"]
    other = 0.95 if fitted["weight"] != 0.95 else 0.9  # a weight by hand: the scales, but no calibration (fitted at w)
    by_hand = fusion_settings(ServeConfig(model=str(tmp_path / "new"), fusion=other), str(tmp_path / "new"))
    assert by_hand["scales"] == fitted["scales"] and "calibration" not in by_hand and by_hand["source"] == "serve.fusion"

    (tmp_path / "old").mkdir()  # written before the fitted scales: z-scores within each request
    write_model_quality(str(tmp_path / "old"), {"task": "rerank", "fusion": {"weight": 0.4, "normalisation": "zscore-per-query", "retriever": "r"}})
    old = fusion_settings(ServeConfig(model=str(tmp_path / "old"), fusion="auto"), str(tmp_path / "old"))
    assert old == {"weight": 0.4, "normalisation": "zscore-per-query", "retriever": "r", "source": "auto (fitted on the eval rows)"}


def test_the_weight_follows_the_better_scorer_and_never_loses_to_the_pure_model_on_eval():
    rng = np.random.default_rng(0)
    good_reranker = _queries(rng, 80, reranker_noise=0.1, retriever_noise=1.0)
    assert fit_weight(good_reranker)[0] == 0.0  # fusion would only hurt: the pure model is kept
    good_retriever = _queries(rng, 80, reranker_noise=5.0, retriever_noise=0.01)
    weight, curve = fit_weight(good_retriever)
    assert weight > 0.5 and curve[weight] == 1.0 > curve[0.0]  # the smallest weight that ranks every positive first
    both = _queries(rng, 160, reranker_noise=1.2, retriever_noise=0.12)
    weight, curve = fit_weight(both)
    assert 0 < weight < 1 and curve[weight] > curve[0.0] and curve[weight] > curve[1.0]
    assert set(curve) == set(WEIGHTS) and curve[weight] == max(curve.values())
    report = fusion_report(both[:80], both[80:], "bi-encoder")
    assert report["weight"] in WEIGHTS and report["eval"]["ndcg@10"] >= fit_weight(both[:80])[1][0.0]
    scales = fit_scales(both[:80])  # the eval rows' scales, applied to the test rows
    assert report["test"]["ndcg@10"] == pytest.approx(rerank_metrics([(fused_scores(q["logits"], q["cosines"], report["weight"], scales), 1) for q in both[80:]])["ndcg@10"])


def test_metrics_are_the_library_evaluators_on_the_same_scores():
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    rng = np.random.default_rng(1)
    samples, scored = [], []
    for i in range(30):
        positives, negatives = [f"p{i}-{j}" for j in range(1 + i % 2)], [f"n{i}-{j}" for j in range(12)]
        scores = rng.normal(size=len(positives) + len(negatives))
        samples.append({"query": f"q{i}", "positive": positives, "negative": negatives})
        scored.append((scores, len(positives)))

    class Scores:  # the evaluator asks a model for its scores of the pairs, in its order (positives, then negatives)
        def predict(self, pairs, **kwargs):
            return np.concatenate([s for s, _ in scored])

    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, write_csv=False)
    evaluator.store_metrics_in_model_card_data = lambda *a, **k: None  # Scores has no model card
    expected = evaluator(Scores())
    got = rerank_metrics(scored)
    for key in ("map", "mrr@10", "ndcg@10"):
        assert got[key] == pytest.approx(expected[key])


def test_the_pure_test_metrics_from_the_fusions_predictions_are_the_library_evaluators(tiny_model, qa_files, tmp_path):
    """A rerank run scores each test pair once: the pure model's test metrics come from the predictions fusion
    makes anyway, and they equal what ``CrossEncoderRerankingEvaluator`` (``Task.evaluate``) gives on the same rows."""
    from ce_ray.config import load_job
    from ce_ray.data.prepare import load_prepared, prepare_split
    from ce_ray.modeling import load_for_inference
    from ce_ray.quality import fuse_with_retriever
    from ce_ray.tasks import TASKS

    job = load_job(None, [
        "task=rerank", f"model.name={tiny_model}", f"data.train={qa_files['dev']}", f"data.eval={qa_files['dev']}",
        f"data.test={qa_files['dev']}", "train.eval_batch_size=7", f"run.output_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    model = load_for_inference(tiny_model)
    eval_split, test_split = prepare_split(job, "eval"), prepare_split(job, "test")
    got = fuse_with_retriever(job, model, eval_split, test_split)
    expected = TASKS["rerank"].evaluate(model, load_prepared(test_split.uri).data.table, job.train.eval_batch_size)
    assert got["pure_test"] == expected
    assert got["fusion"]["test"] is not None and got["fusion"]["retriever"] == job.baseline_model
