"""sodkern.stepwise_weights against a float64 reference and the public reference loop, both backends."""

import math

import pytest
import torch

from sodkern.ops.step_weights import stepwise_weights
from sodkern.reference import reference_stepwise_weights


@pytest.fixture(params=["torch", "tiled"])
def backend(request, monkeypatch):
    """Step weights have one Triton implementation ("tiled" and "chunked" both run it): two runs suffice."""
    if request.param == "tiled":
        pytest.importorskip("triton")
    monkeypatch.setenv("SODKERN_BACKEND", request.param)
    return request.param


def ref_float64(s, tau, mask, eps=1e-6, delta=0.2):
    """Independent float64 reference: lists of steps per row, then the telescoped formula."""
    B, T = mask.shape
    tw = torch.zeros(B, T, dtype=torch.float64)
    all_d, all_w = [], []
    for i in range(B):
        runs, t = [], 0
        m = [bool(v) for v in mask[i].tolist()]
        while t < T:
            if m[t]:
                a = t
                while t < T and m[t]:
                    t += 1
                runs.append((a, t))
            else:
                t += 1
        d = [sum(abs(float(s[i, u]) - float(tau[i, u])) for u in range(a, b)) / (b - a) for a, b in runs]
        w = [1.0] + [min((d[0] + eps) / (dk + eps), 1 + delta) for dk in d[1:]] if d else []
        for (a, b), wk in zip(runs, w):
            tw[i, a:b] = wk
        all_d.append(d)
        all_w.append(w)
    return tw, all_d, all_w


def random_case(B, T, p_on=0.7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # runs of random length: a Markov chain keeps some long steps and some one-token steps
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        state = bool(torch.rand(1, generator=g) < 0.5)
        for t in range(T):
            if torch.rand(1, generator=g) < 0.25:
                state = not state
            mask[i, t] = state and torch.rand(1, generator=g) < p_on + 0.3
    s = -torch.rand(B, T, generator=g, dtype=torch.float64).mul(3).to(dtype)
    tau = -torch.rand(B, T, generator=g, dtype=torch.float64).mul(3).to(dtype)
    return s, tau, mask


def check(out, s, tau, mask, eps=1e-6, delta=0.2):
    tw, ds, ws = ref_float64(s, tau, mask, eps, delta)
    torch.testing.assert_close(out.token_weights.double(), tw, rtol=2e-6, atol=2e-6)
    K = max((len(d) for d in ds), default=0)
    assert out.step_divergence.shape == (mask.shape[0], K)
    assert out.step_weights.shape == (mask.shape[0], K)
    assert out.num_steps.dtype == torch.int64
    assert out.num_steps.tolist() == [len(d) for d in ds]
    for i, (d, w) in enumerate(zip(ds, ws)):
        n = len(d)
        torch.testing.assert_close(
            out.step_divergence[i, :n].double(), torch.tensor(d, dtype=torch.float64), rtol=2e-6, atol=1e-6
        )
        torch.testing.assert_close(
            out.step_weights[i, :n].double(), torch.tensor(w, dtype=torch.float64), rtol=2e-6, atol=2e-6
        )
        assert torch.isnan(out.step_divergence[i, n:]).all() and torch.isnan(out.step_weights[i, n:]).all()
    assert out.token_weights.dtype == torch.float32
    assert (out.token_weights[~mask.bool()] == 0).all()


@pytest.mark.parametrize("B,T", [(3, 37), (5, 101), (1, 1), (4, 64)])
def test_random_matches_float64(backend, B, T):
    s, tau, mask = random_case(B, T, seed=B * 1000 + T)
    check(stepwise_weights(s, tau, mask), s, tau, mask)


def test_matches_public_reference_loop(backend):
    s, tau, mask = random_case(6, 83, seed=7)
    out = stepwise_weights(s, tau, mask)
    torch.testing.assert_close(out.token_weights, reference_stepwise_weights(s, tau, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_mask_dtypes_and_bf16_logps(backend, mask_dtype):
    s, tau, mask = random_case(3, 45, seed=3, dtype=torch.bfloat16)
    out = stepwise_weights(s, tau, mask.to(mask_dtype))
    check(out, s.double(), tau.double(), mask)


def test_edge_cases(backend):
    T = 40
    mask = torch.zeros(6, T, dtype=torch.int64)
    mask[1, :] = 1  # one step over the whole row
    mask[2, [0, 2, 4, 39]] = 1  # one-token steps, one touching the last column
    mask[3, 30:] = 1  # step touching the last column
    mask[4, 5:9] = 1
    mask[4, 20:25] = 1
    mask[5, ::2] = 1  # 20 one-token steps, the block carries cross mid-step
    s = torch.randn(6, T)
    tau = s.clone()  # d = 0 everywhere
    out = stepwise_weights(s, tau, mask)
    check(out, s, tau, mask)
    assert out.num_steps.tolist() == [0, 1, 4, 1, 2, 20]
    assert torch.isnan(out.step_weights[0]).all()  # a row with no step: all padding, no NaN in tokens
    assert torch.isfinite(out.token_weights).all()
    w = out.token_weights
    assert (w[mask.bool()] == 1).all()  # d = 0: (0 + eps) / (0 + eps) = 1


def test_patterns_stable_erroneous_recovery(backend):
    """The three patterns of SOD's Figure 5, on constructed divergences."""
    T = 60
    mask = torch.zeros(3, T)
    for a in (0, 15, 30, 45):
        mask[:, a : a + 10] = 1
    s = torch.zeros(3, T)
    tau = torch.zeros(3, T)
    per_step = {0: [0.5, 0.5, 0.5, 0.5], 1: [0.5, 1.0, 2.0, 4.0], 2: [0.5, 2.0, 1.0, 0.25]}
    for row, ds in per_step.items():
        for k, a in enumerate((0, 15, 30, 45)):
            tau[row, a : a + 10] = -ds[k]
    out = stepwise_weights(s, tau, mask, delta=0.2)
    w = out.step_weights
    assert torch.allclose(w[0], torch.ones(4))  # stable
    assert (w[1, 1:] < 1).all() and (w[1, 1:].diff() < 0).all()  # erroneous: decays
    assert w[2, 1] < w[2, 2] and math.isclose(float(w[2, 3]), 1.2, rel_tol=1e-6)  # recovery, clipped at 1 + delta


def test_non_finite_outside_mask_is_ignored(backend):
    s, tau, mask = random_case(2, 50, seed=11)
    s = s.masked_fill(~mask, float("-inf"))
    tau = tau.masked_fill(~mask, float("nan"))
    out = stepwise_weights(s, tau, mask)
    assert torch.isfinite(out.token_weights).all()
    check(out, s.nan_to_num(0, 0, 0), tau.nan_to_num(0, 0, 0), mask)


def test_bad_inputs():
    s, tau, mask = random_case(2, 10)
    with pytest.raises(ValueError, match="teacher_logp"):
        stepwise_weights(s, tau[:, :9], mask)
    with pytest.raises(ValueError, match="response_mask"):
        stepwise_weights(s, tau, mask.float() * 2)
    with pytest.raises(ValueError, match="response_mask"):
        stepwise_weights(s, tau, mask[:, :5])
    bad = tau.clone()
    bad[mask] = float("nan")
    with pytest.raises(ValueError, match="teacher_logp"):
        stepwise_weights(s, bad, mask)
    with pytest.raises(ValueError, match="old_logp"):
        stepwise_weights(s[0], tau[0], mask[0])


def test_old_keyword_name_still_works():
    """``student_logp`` is the deprecated name of ``old_logp`` (one name per quantity along the data path)."""
    s, tau, mask = random_case(3, 17)
    expected = stepwise_weights(old_logp=s, teacher_logp=tau, response_mask=mask).token_weights
    with pytest.warns(DeprecationWarning, match="old_logp"):
        old = stepwise_weights(student_logp=s, teacher_logp=tau, response_mask=mask).token_weights
    with pytest.warns(DeprecationWarning, match="old_logp"):
        ref = reference_stepwise_weights(student_logp=s, teacher_logp=tau, response_mask=mask)
    assert torch.equal(old, expected)
    torch.testing.assert_close(ref, expected)
    with pytest.raises(TypeError, match="old_logp"):
        stepwise_weights(s, tau, mask, student_logp=s)


def test_empty_batch(backend):
    out = stepwise_weights(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5))
    assert out.token_weights.shape == (0, 5) and out.step_weights.shape == (0, 0)
