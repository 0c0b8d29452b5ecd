"""The metric registry (restune_diffusion/metrics): every registered metric on every collected input of its kind, the
field prefixes of a protocol's sources, and the README's worked example of adding a metric (issue 24)."""

import json
import types

import numpy as np
import pytest
from test_fid import _write_images, weights  # noqa: F401  (weights: the random-Inception fixture)
from test_readme import snippet

from restune_diffusion import metrics
from restune_diffusion.evaluation.runner import evaluate_folders
from restune_diffusion.metrics import Metric, Source, measure
from restune_diffusion.metrics.fid import fid_from_features
from restune_diffusion.metrics.kid import kid_from_features


def readme_metric() -> types.ModuleType:
    """The README's example metric file, as the module restune_diffusion/metrics/mean_distance.py would be."""
    code = snippet('MEAN_DISTANCE = Metric("mean_distance"')
    assert "from .metric import Metric" in code
    module = types.ModuleType("restune_diffusion.metrics.mean_distance")
    exec(compile(code.replace("from .metric import", "from restune_diffusion.metrics.metric import"), "README.md",
                 "exec"), module.__dict__)
    return module


def test_measure_computes_each_metric_on_each_source_of_its_kind_under_the_sources_prefix():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 4)), rng.normal(0.5, 1.0, size=(16, 4))
    hits = {"shape": np.array([True, False, True, True]), "all": np.array([False, False, True, True]),
            "seen": np.array(["star", "none", "star", "star"])}
    sources = {"judge": Source("features", "domain_"), "asked": Source("hits", "concept_")}
    row = measure(sources, {"judge": real}, {"judge": fake, "asked": hits}, {"seed": 3, "kid_subsets": 4})
    assert list(row) == ["domain_fid", "domain_kid_mean", "domain_kid_std", "domain_kid_subset_size",
                         "concept_accuracy"]  # source order, then registry order; no CLIP score: nothing collected
    assert row["domain_fid"] == fid_from_features(real, fake)
    assert (row["domain_kid_mean"], row["domain_kid_std"], row["domain_kid_subset_size"]) == kid_from_features(
        real, fake, subsets=4, subset_size=1000, seed=3)
    assert row["concept_accuracy"] == {"shape": 0.75, "all": 0.5}  # boolean checks only
    assert measure({"clip": Source("clip_scores")}, {}, {"clip": None}, {}) == {"clip_score": None}


def test_a_metric_or_source_of_an_unknown_kind_is_a_named_error():
    with pytest.raises(ValueError, match="metric 'x': consumes must be one of .*'features'.*got 'feature'"):
        Metric("x", "feature", lambda real, fake, context: {})
    with pytest.raises(ValueError, match="source kind: expected one of"):
        Source("pixels")


def test_the_readme_example_metric_in_the_registry_is_in_a_folder_result(tmp_path, weights, monkeypatch):  # noqa: F811
    example = readme_metric()
    monkeypatch.setitem(metrics.METRICS, "mean_distance", example.MEAN_DISTANCE)  # its line in the registry
    _write_images(tmp_path / "real", range(3))
    _write_images(tmp_path / "fake", range(3, 6))
    with pytest.warns(UserWarning, match="rank-deficient"):
        result = evaluate_folders(tmp_path / "real", tmp_path / "fake", tmp_path / "out", inception_weights=weights,
                                  device="cpu", kid_subsets=2)
    assert 0 < result["mean_distance"] <= result["fid"]  # FID = this term + a trace term >= 0
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["mean_distance"] == result["mean_distance"]
