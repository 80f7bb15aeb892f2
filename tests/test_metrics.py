"""Metrics from exactly reduced sums: the same for any partition of the rows, and equal to scikit-learn's."""

import pytest


@pytest.mark.parametrize("classes", [2, 4])
def test_reduced_metrics_match_sklearn_and_any_partition(classes):
    import torch
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    from lepton import metrics

    g = torch.Generator().manual_seed(0)
    out = torch.randn(301, classes, generator=g)
    y = torch.randint(0, classes, (301,), generator=g)
    whole = metrics.finish(
        "classification", metrics.batch_sums("classification", out, y, classes), classes, True
    )
    parts = sum(
        metrics.batch_sums("classification", out[a:b], y[a:b], classes)
        for a, b in ((0, 100), (100, 101), (101, 301))
    )
    split = metrics.finish("classification", parts, classes, True)
    assert split["confusion_matrix"] == whole["confusion_matrix"]
    assert split["f1"] == whole["f1"] and split["accuracy"] == whole["accuracy"]
    pred = out.argmax(1).numpy()
    assert whole["precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert whole["recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert whole["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    if classes == 2:
        exact = roc_auc_score(y, torch.softmax(out, 1)[:, 1].numpy())
        assert whole["roc_auc"] == pytest.approx(exact, abs=2e-3) and split["roc_auc"] == whole["roc_auc"]
        # a confident classifier (logit margins of tens): binning the probability put most rows in the
        # end bins, where ties read a 0.996 classifier as 0.955
        margin = 30 * torch.randn(2000, generator=g, dtype=torch.float64)
        labels = (margin + 20 * torch.randn(2000, generator=g, dtype=torch.float64) > 0).long()
        logits = torch.stack([torch.zeros_like(margin), margin], 1)
        got = metrics.finish("classification", metrics.batch_sums("classification", logits, labels, 2), 2)
        assert got["roc_auc"] == pytest.approx(roc_auc_score(labels, margin), abs=2e-3)
