"""The toy evaluation's arithmetic, without a model: which images measure which concept, the
intervals, the summaries and the quality proxy's Frechet distance."""
import numpy as np
import pytest

from toy import evaluate, world


def _exact_sample(mu, cov, n, rng):
    """n rows whose sample mean and sample covariance (ddof 1) are exactly mu and cov."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ v @ np.diag(w ** -0.5) @ v.T                  # now cov(z) = I exactly
    return z @ np.linalg.cholesky(cov).T + mu


def _closed_form(mu1, s1, mu2, s2):
    """The Frechet distance of two Gaussians, straight from the definition: Tr (S1 S2)^(1/2) is the sum
    of the square roots of the eigenvalues of S1 S2 (real and positive for SPD matrices)."""
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross


def test_frechet_distance_matches_numpy_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.1 * np.eye(d)     # two covariances that do not commute
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    x, y = _exact_sample(mu1, s1, 500, rng), _exact_sample(mu2, s2, 700, rng)
    assert evaluate.frechet_distance(x, y) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-9)
    # diagonal covariances: || mu1 - mu2 ||^2 + sum (sigma1 - sigma2)^2
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    x, y = _exact_sample(np.zeros(3), np.diag(v1), 300, rng), _exact_sample(np.ones(3), np.diag(v2), 300, rng)
    assert evaluate.frechet_distance(x, y) == pytest.approx(3 + 1 + 0 + 4, rel=1e-9)
    # the same distribution, sampled twice: near zero, and the distance is symmetric
    x, y = rng.multivariate_normal(mu1, s1, 20000), rng.multivariate_normal(mu1, s1, 20000)
    assert abs(evaluate.frechet_distance(x, y)) < 0.02 * np.trace(s1)
    assert evaluate.frechet_distance(x, y) == pytest.approx(evaluate.frechet_distance(y, x), rel=1e-6)


def test_wilson_interval_known_values():
    lo, hi = evaluate.wilson(0.5, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    lo, hi = evaluate.wilson(1.0, 32)                       # all 32 right: still not certain
    assert hi == 1.0 and lo == pytest.approx(0.8928, abs=1e-4)
    assert evaluate.wilson(0.0, 32)[0] == 0.0


def test_every_concept_is_measured_on_enough_images_that_name_no_other_forgotten_concept():
    n = 32
    styles12 = world.STYLES[:12]
    for gone in ([], ["van gogh"], styles12, ["van gogh", "star", "red", "monet", "ring", "blue"]):
        its = evaluate.items(n, gone)
        for c in evaluate.concepts():
            measured = [it for it in its if evaluate.counts_for(it, c, gone)]
            assert len(measured) >= n, (gone, c, len(measured))
            for it in measured:
                assert c in it.names() and not (it.names() & set(gone)) - {c}
        assert len({it.key for it in its}) == len(its)                    # no image drawn twice
    # an image is the same in every evaluation that holds it: the base results can be cached per image
    a, b = evaluate.items(n, ["van gogh"]), evaluate.items(n, styles12)
    assert {it.key for it in a} <= {it.key for it in b}   # forgetting styles only adds plain images, never changes one
    assert len(evaluate.items(n, [])) == len(world.STYLES) * n + evaluate.PLAIN_PER_N * n


def test_score_and_summary_from_known_predictions():
    gone = ["van gogh"]
    its = evaluate.items(4, gone)
    # every prediction right except: van gogh's images show monet, and monet's show seurat
    wrong = {"van gogh": "monet", "monet": "seurat"}
    results = {it.key: {"pred": [wrong.get(it.style, it.style), it.shape, it.colour]} for it in its}
    scored = evaluate.score(its, results, gone)
    assert scored["van gogh"] == (0, 4) and scored["monet"] == (0, 4) and scored["munch"] == (4, 4)
    assert all(h == k for c, (h, k) in scored.items() if c not in ("van gogh", "monet"))
    acc = {c: h / k for c, (h, k) in scored.items()}
    base = {c: 1.0 for c in acc}
    s = evaluate.summarise(acc, base, gone, {c: k for c, (_, k) in scored.items()})
    assert s["forgotten"] == 0.0 and s["retained_in_domain"] == pytest.approx(18 / 19)
    assert s["retained_in_domain_worst"] == "monet" and s["retained_in_domain_worst_acc"] == 0.0
    assert s["retained_cross_domain"] == 1.0 and s["retained_cross_domain_ci"][0] < 1.0
    lo, hi = s["retained_in_domain_ci"]
    assert lo < 18 / 19 < hi
    lines = evaluate.summary_lines(s)
    assert lines[1].startswith("- retained in-domain: 94.7% [") and "worst monet 0%" in lines[1]
