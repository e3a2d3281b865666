import math

import pytest
import torch

from nerfstudio_pruning.vedal import retention_head
from nerfstudio_pruning.vedal.gate import ConvergenceGate

from nerfstudio_pruning.vedal.retention_head import (
    MLP_CHUNK_ROWS,
    PartialLogits,
    RetentionHead,
    RetentionHeadConfig,
    bernoulli_kl,
    binary_concrete,
    encoding_dim,
    gaussian_features,
    hard_mask,
    positional_encoding,
    proposition_1_optimum,
    retention_regulariser,
    robust_bounds,
    temperature,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --- KL -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pi", [0.05, 0.2, 0.5])
def test_kl_zero_at_prior_positive_elsewhere_and_matches_formula(pi):
    p = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    kl = bernoulli_kl(p, pi)
    direct = p * torch.log(p / pi) + (1 - p) * torch.log((1 - p) / (1 - pi))
    assert torch.allclose(kl, direct, rtol=1e-12, atol=1e-15)
    assert bernoulli_kl(torch.tensor(pi, dtype=torch.float64), pi).abs().item() < 1e-15
    away = (p - pi).abs() > 1e-6
    assert (kl[away] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_finite_at_zero_and_one_with_exact_limits(dtype):
    pi = 0.2
    p = torch.tensor([0.0, 1.0], dtype=dtype, requires_grad=True)
    kl = bernoulli_kl(p, pi)
    assert torch.isfinite(kl).all()
    assert kl[0].item() == pytest.approx(-math.log(1 - pi), rel=1e-6)
    assert kl[1].item() == pytest.approx(-math.log(pi), rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[0] < 0 < p.grad[1]


def test_kl_gradient_sign_points_towards_prior():
    pi = 0.2
    p = torch.tensor([0.01, 0.1, 0.19, 0.21, 0.5, 0.99], dtype=torch.float64, requires_grad=True)
    bernoulli_kl(p, pi).sum().backward()
    expected = torch.log(p / pi) - torch.log((1 - p) / (1 - pi))
    assert torch.allclose(p.grad, expected.detach())
    assert torch.equal(torch.sign(p.grad), torch.sign(p.detach() - pi))


# --- Binary Concrete, hard mask, temperature -----------------------------------------------------------------


def test_binary_concrete_becomes_hard_as_tau_goes_to_zero():
    logits = torch.full((50_000,), logit(0.3))
    hard_fraction = []
    for tau in [1.0, 0.1, 0.01, 1e-3]:
        z = binary_concrete(logits, tau, generator=torch.Generator().manual_seed(0))
        hard_fraction.append(((z < 1e-3) | (z > 1 - 1e-3)).float().mean().item())
    assert all(a < b for a, b in zip(hard_fraction, hard_fraction[1:])), hard_fraction
    assert hard_fraction[0] < 0.2
    assert hard_fraction[-1] > 0.99


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_binary_concrete_keeps_bernoulli_probability(p, tau):
    # P(z > 1/2) = P(logit + Logistic > 0) = sigmoid(logit) for every tau.
    n = 200_000
    z = binary_concrete(torch.full((n,), logit(p)), tau, generator=torch.Generator().manual_seed(1))
    tolerance = 5 * math.sqrt(p * (1 - p) / n)
    assert abs((z > 0.5).float().mean().item() - p) < tolerance


def test_binary_concrete_concentrates_at_half_for_large_tau_and_stays_inside_unit_interval():
    z = binary_concrete(torch.linspace(-3, 3, 100_000), 100.0, generator=torch.Generator().manual_seed(2))
    assert (z - 0.5).abs().mean().item() < 0.02
    assert (z - 0.5).abs().max().item() < 0.05
    z1 = binary_concrete(torch.linspace(-3, 3, 100_000), 1.0, generator=torch.Generator().manual_seed(2))
    assert ((z1 > 0) & (z1 < 1)).all()


def test_binary_concrete_survives_extreme_uniform_draws(monkeypatch):
    # torch.rand can return exactly 0 (and values within one ulp of 1); the noise must stay finite there.
    extremes = torch.tensor([0.0, 0.0, 1.0 - 2.0**-24, 1.0 - 2.0**-24])

    def fake_rand(shape, generator=None, dtype=None, device=None):
        return extremes.to(dtype=dtype, device=device).reshape(shape)

    monkeypatch.setattr(torch, "rand", fake_rand)
    logits = torch.tensor([0.0, 2.0, 0.0, -2.0], requires_grad=True)
    z = binary_concrete(logits, 1.0)
    assert ((z > 0) & (z < 1)).all()
    z.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()


def test_binary_concrete_is_reproducible_and_differentiable():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    a = binary_concrete(logits, 0.5, generator=torch.Generator().manual_seed(3))
    b = binary_concrete(logits, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    a.sum().backward()
    # z is increasing in the logit; float32 saturation can make single gradients exactly 0, never negative.
    assert torch.isfinite(logits.grad).all() and (logits.grad >= 0).all() and (logits.grad > 0).float().mean() > 0.95


def test_hard_mask_matches_probability_threshold():
    logits = torch.linspace(-8, 8, 1001)
    assert torch.equal(hard_mask(logits), torch.sigmoid(logits) >= 0.5)
    assert torch.equal(hard_mask(logits, 0.9), logits >= logit(0.9))


def test_temperature_is_a_geometric_anneal():
    assert temperature(0, 1.0, 0.1, 1000) == pytest.approx(1.0)
    assert temperature(1000, 1.0, 0.1, 1000) == pytest.approx(0.1)
    assert temperature(500, 1.0, 0.1, 1000) == pytest.approx(math.sqrt(0.1))
    assert temperature(5000, 1.0, 0.1, 1000) == pytest.approx(0.1)
    assert temperature(-5, 1.0, 0.1, 1000) == pytest.approx(1.0)
    taus = [temperature(s, 2.0, 0.05, 100) for s in range(101)]
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


# --- Regulariser and Proposition 1 ---------------------------------------------------------------------------


def test_regulariser_sums_kl_over_gated_and_averages_p_over_all():
    prior_pi = 0.2
    logits = torch.tensor([-30.0, -2.0, 0.0, 2.0, 40.0], dtype=torch.float64, requires_grad=True)
    gated = torch.tensor([True, True, False, True, True])
    total, parts = retention_regulariser(logits, gated, prior_pi=prior_pi, lambda_kl=0.3, lambda_sparsity=0.7)
    p = torch.sigmoid(logits.detach())
    expected_kl = bernoulli_kl(p[gated], prior_pi).sum()
    assert parts["kl_sum"].item() == pytest.approx(expected_kl.item(), rel=1e-9)
    assert total.item() == pytest.approx(0.3 * expected_kl.item() + 0.7 * p.mean().item(), rel=1e-9)
    assert parts["n_gated"].item() == 4
    total.backward()
    assert torch.isfinite(logits.grad).all()
    # An ungated Gaussian feels only the sparsity term: d/dlogit (lambda_s * mean p) = lambda_s p (1 - p) / N.
    assert logits.grad[2].item() == pytest.approx(0.7 * 0.25 / 5)
    # Gated ones are pulled towards logit(pi): positive gradient above it, negative below.
    assert logits.grad[1] < 0 < logits.grad[3]


def per_gaussian_objective(p: torch.Tensor, importance: torch.Tensor, lambda_kl: float, pi: float):
    """Expected cost of retaining i with probability p: lose Delta_i when it is dropped, pay the KL prior."""
    return (1 - p) * importance + lambda_kl * bernoulli_kl(p, pi)


@pytest.mark.parametrize("lambda_kl", [0.5, 0.2])
def test_proposition_1_derivation_by_finite_differences(lambda_kl):
    pi = 0.2
    importance = torch.linspace(0.0, 3.0, 31, dtype=torch.float64)
    p_star = proposition_1_optimum(importance, lambda_kl, pi)
    # Differences in logit space: near p = 1 a fixed step in p would overshoot the interval and the curvature
    # lambda / (p (1 - p)) would swamp the difference quotient.
    logit_star = torch.logit(p_star)
    h = 1e-5

    def cost_at(logit_value):
        return per_gaussian_objective(torch.sigmoid(logit_value), importance, lambda_kl, pi)

    slope = (cost_at(logit_star + h) - cost_at(logit_star - h)) / (2 * h)
    assert slope.abs().max().item() < 1e-8
    # The same quotient is clearly nonzero a little away from p*, so the check above can fail.
    assert (cost_at(logit_star + 0.1) - cost_at(logit_star - 0.1)).abs().min().item() > 0
    # And it is the minimum, not just a stationary point: any other p on a fine grid costs more.
    grid = torch.linspace(1e-4, 1 - 1e-4, 2001, dtype=torch.float64)
    costs = per_gaussian_objective(grid[None, :], importance[:, None], lambda_kl, pi)
    at_optimum = per_gaussian_objective(p_star, importance, lambda_kl, pi)
    assert (costs >= at_optimum[:, None] - 1e-12).all()
    # Sanity of the closed form itself: Delta = 0 keeps the prior, and the 0.5 crossing is at lambda*log((1-pi)/pi).
    assert p_star[0].item() == pytest.approx(pi)
    crossing = lambda_kl * math.log((1 - pi) / pi)
    assert proposition_1_optimum(torch.tensor(crossing), lambda_kl, pi).item() == pytest.approx(0.5)




@pytest.mark.parametrize("lambda_kl", [0.5, 0.2])
def test_head_trained_on_expected_drop_cost_reaches_proposition_1(lambda_kl, single_thread):
    # The head sees Delta_i as its one extra feature (besides random positions), so p* = sigmoid(Delta/lambda +
    # logit pi) is a monotone function of one input and representable; the test is then on the objective and
    # the regulariser's units, through the real head and regulariser.
    n = 200
    importance = torch.linspace(0.0, 3.0, n)
    means = torch.rand(n, 3, generator=torch.Generator().manual_seed(0))
    prior_pi = 0.2
    torch.manual_seed(1)
    head = RetentionHead(RetentionHeadConfig(n_extra_features=1))
    steps = 1000
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=1e-4)
    gated = torch.ones(n, dtype=torch.bool)
    for _ in range(steps):
        logits = head(means, importance[:, None])
        regulariser, _ = retention_regulariser(logits, gated, prior_pi, lambda_kl, lambda_sparsity=0.0)
        loss = ((1 - torch.sigmoid(logits)) * importance).sum() + regulariser
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        p = torch.sigmoid(head(means, importance[:, None]))
    p_star = proposition_1_optimum(importance, lambda_kl, prior_pi)
    assert (p - p_star).abs().max().item() < 0.01
    # Which Gaussians the hard mask would remove agrees with the closed-form threshold, away from the boundary.
    boundary = lambda_kl * math.log((1 - prior_pi) / prior_pi)
    clear = (importance - boundary).abs() > 0.05
    assert torch.equal((p >= 0.5)[clear], (importance > boundary)[clear])


# --- Encoding and head ---------------------------------------------------------------------------------------


def test_positional_encoding_layout_bounds_and_clamp():
    x = torch.tensor([[0.0, 5.0, -2.0], [10.0, 5.0, 2.0], [20.0, 100.0, 0.0]])
    encoded = positional_encoding(x, 3, bounds=([0.0, 0.0, -2.0], [10.0, 10.0, 2.0]))
    assert encoded.shape == (3, encoding_dim(3)) == (3, 21)
    normalised = torch.tensor([[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.allclose(encoded[:, :3], normalised)
    for k in range(3):
        angle = math.pi * 2**k * normalised
        assert torch.allclose(encoded[:, 3 + 6 * k : 6 + 6 * k], torch.sin(angle), atol=1e-6)
        assert torch.allclose(encoded[:, 6 + 6 * k : 9 + 6 * k], torch.cos(angle), atol=1e-6)
    own = positional_encoding(x, 0, bounds=None)
    assert torch.allclose(own.min(dim=0).values, torch.full((3,), -1.0))
    assert torch.allclose(own.max(dim=0).values, torch.full((3,), 1.0))


def test_robust_bounds_ignore_outliers():
    means = torch.rand(1000, 3, generator=torch.Generator().manual_seed(0))
    means[:5] = 1e4
    lo, hi = robust_bounds(means, tail_fraction=0.01)
    assert (lo >= 0).all() and (lo < 0.05).all()
    assert (hi <= 1).all() and (hi > 0.95).all()


def test_head_parameter_count():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    default = RetentionHead()
    d = encoding_dim(2) + 2
    assert count(default) == (d + 1) * 64 + 65 * 64 + 65 == 5377
    assert count(RetentionHead(RetentionHeadConfig(n_extra_features=0))) == 5249
    assert 4500 <= count(default) <= 6000


def test_head_starts_near_keep_prob_and_is_spatially_smooth():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = RetentionHead(RetentionHeadConfig(n_extra_features=0), bounds=(-1.0, 1.0))
    far = torch.rand(2000, 3, generator=generator) * 2 - 1
    near = far + 1e-3 * torch.randn(2000, 3, generator=generator)
    with torch.no_grad():
        logits_far, logits_near = head(far), head(near)
    p = torch.sigmoid(logits_far)
    assert (p - 0.99).abs().max().item() < 0.01
    nearby_change = (logits_near - logits_far).abs().max().item()
    spread = (logits_far - logits_far.mean()).abs().max().item()
    assert spread > 0, "the head must depend on position at all"
    assert nearby_change < 0.02 * spread
    assert (torch.sigmoid(logits_near) - p).abs().max().item() < 1e-3


def test_head_features_are_standardised_and_inputs_detached():
    torch.manual_seed(0)
    head = RetentionHead()
    means = torch.randn(500, 3, requires_grad=True)
    opacity_logits = torch.randn(500, 1) * 3
    log_scales = torch.randn(500, 3) - 4
    features = gaussian_features(opacity_logits, log_scales).requires_grad_(True)
    assert features.shape == (500, 2)
    logits = head(means, features)
    assert logits.shape == (500,)
    # Changing the scene's length unit shifts every log-scale by a constant: p must not change.
    rescaled = gaussian_features(opacity_logits, log_scales + math.log(7.5))
    assert torch.allclose(head(means, rescaled), logits, atol=1e-5)
    logits.sum().backward()
    assert means.grad is None and features.grad is None
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError):
        head(means)


def test_head_bounds_survive_state_dict():
    head = RetentionHead(RetentionHeadConfig(n_extra_features=0), bounds=([-2.0, -1.0, 0.0], [2.0, 1.0, 3.0]))
    copy = RetentionHead(RetentionHeadConfig(n_extra_features=0))
    copy.load_state_dict(head.state_dict())
    means = torch.randn(100, 3)
    assert torch.equal(copy(means), head(means))


def test_chunked_head_gives_the_plain_mlps_logits_and_gradients(monkeypatch):
    """The head evaluates its MLP in chunks of rows (and again in the backward pass); logits and parameter
    gradients must be those of one plain evaluation, up to float32 summation order."""
    from nerfstudio_pruning.vedal import retention_head

    torch.manual_seed(0)
    n = 1000
    means, features, weights = torch.randn(n, 3), torch.randn(n, 2), torch.randn(n)
    head = RetentionHead()
    head.set_bounds(*robust_bounds(means))
    with torch.no_grad():  # away from the initial constant output, so every layer's gradient matters
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))

    def logits_and_grads(chunk_rows):
        monkeypatch.setattr(retention_head, "MLP_CHUNK_ROWS", chunk_rows)
        head.zero_grad()
        logits = head(means, features)
        (torch.sigmoid(logits) * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in head.parameters()]

    plain_logits, plain_grads = logits_and_grads(10**9)
    chunked_logits, chunked_grads = logits_and_grads(96)  # 10 full chunks and a partial one
    torch.testing.assert_close(chunked_logits, plain_logits, rtol=1e-6, atol=1e-6)
    for chunked, plain in zip(chunked_grads, plain_grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(head(means, features), plain_logits, rtol=1e-6, atol=1e-6)


def test_subsampled_head_gradient_is_unbiased():
    """With gradient_rows < N the parameter gradient is taken through a random subset of rows, reweighted: the
    mean over many draws must equal the full gradient, element by element, within a few standard errors of that
    mean; the same test rejects the estimate without its N / rows weight."""
    torch.manual_seed(0)
    n, rows, draws = 200, 20, 1500
    means, features, weights = torch.randn(n, 3), torch.randn(n, 2), torch.randn(n)
    head = RetentionHead(RetentionHeadConfig(gradient_rows=0))
    head.set_bounds(*robust_bounds(means))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))

    def gradient() -> torch.Tensor:
        head.zero_grad()
        logits = head(means, features)
        (torch.sigmoid(logits) * weights).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in head.parameters()])

    full = gradient()
    full_logits = head(means, features).detach()
    head.config.gradient_rows = rows
    sampled_logits = head(means, features).detach()
    torch.testing.assert_close(sampled_logits, full_logits)  # the forward pass is never subsampled
    samples = torch.stack([gradient() for _ in range(draws)]).double()
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(draws)
    assert not torch.equal(samples[0], samples[1])  # draws differ: the gradient is sampled
    tolerance = 5 * standard_error + 1e-7
    assert ((mean - full.double()).abs() <= tolerance).all()
    unweighted = mean * rows / n
    assert ((unweighted - full.double()).abs() > tolerance).float().mean() > 0.5


@pytest.mark.parametrize("on_gated_rows", [False, True])
def test_the_head_and_its_regulariser_read_nothing_back_to_the_host(on_gated_rows, monkeypatch):
    """A step of the head (forward, Binary Concrete or the straight-through removal mask with a target, KL and
    sparsity, backward with a subsampled gradient) on tensors of the meta device, which hold no values: any read
    of a value on the host (.item(), bool(tensor), boolean indexing, nonzero) raises there. Both forms of the head:
    on every row, and on the gated rows (as a training step runs it)."""
    from nerfstudio_pruning.vedal.controller import VedalConfig, VedalController
    from nerfstudio_pruning.vedal.gate import ConvergenceGate
    from nerfstudio_pruning.vedal.retention_head import retention_inputs

    n = 4000
    meta = torch.device("meta")
    monkeypatch.setattr(retention_head, "GATED_ROWS_AT_MOST", 1.0)  # 3/4 gated here: on_rows evaluates those
    for target in (None, 1000):
        config = VedalConfig(finetune_start_step=0, hard_prune_step=100, head_gradient_rows=512,
                             target_gaussians=target)
        vedal = VedalController(config, ssim_lambda=0.2, device=meta)
        vedal.finetune_started_at, vedal.start_gaussians = 0, n
        gate = ConvergenceGate(vedal.gate_config(), n)
        gate.update(torch.rand(n), step=0)  # on the CPU: the gate's own refresh may read counts back
        gate.eligible = torch.arange(n) < 3 * n // 4
        gate._to(meta)
        vedal.gate = gate
        vedal.importance_scale = 1e-6
        head = RetentionHead(config.retention_head_config(), bounds=([-1.0] * 3, [1.0] * 3)).to(meta)
        means, raw = torch.empty(n, 3, device=meta), torch.empty(n, device=meta, requires_grad=True)
        scales = torch.empty(n, 3, device=meta)
        for step in (10, 93, 97):  # sampled masks; the hand-over to the removal's mask; its fixed decision
            assert vedal.hard_mask_phase(step) == (step > 90)
            gated = vedal.gated_mask(n)
            assert vedal.any_gated(n)
            if on_gated_rows:
                head_logits = lambda: head.on_rows(*retention_inputs(means, raw, scales), gated,  # noqa: E731
                                                   vedal.gated_count(n))
            else:
                head_logits = lambda: head(*retention_inputs(means, raw, scales))  # noqa: E731
            opacities, logits = vedal.training_opacity_logits(raw, head_logits, gated, step)
            loss = opacities.sum() + sum(vedal.regulariser(logits, gated, step).values())
            loss.backward()
            assert (logits is None) == (step == 97) and raw.grad.device == meta
        assert head.output.weight.grad.device == meta and vedal.decided.device == meta


# --- the head on the gated rows only (a training step) -------------------------------------------------------------


def _perturbed_head(config: RetentionHeadConfig, bounds=None) -> RetentionHead:
    head = RetentionHead(config, bounds=bounds)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


def _assert_equal_but_for_gemm_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for a few rows that differ in their last bits: the CPU's sgemm computes a row's dot products with
    a micro-kernel chosen by the row's place in its block of rows (the last rows of a matrix whose height is not a
    multiple of the block go through a tail kernel, one row alone through a matrix-vector kernel), and the kernels
    order their multiply-adds differently. So a row's logit depends, in its last bits, on which rows share its MLP
    chunk: one row alone already differs from the same row inside a matrix."""
    assert actual.shape == expected.shape
    tolerance = 8 * torch.finfo(expected.dtype).eps * expected.abs().clamp_min(1.0)
    assert ((actual - expected).abs() <= tolerance).all()
    assert (actual == expected).float().mean() > 0.95


@pytest.mark.parametrize("bounded", [True, False])
def test_the_head_on_the_gated_rows_gives_forwards_logits_there(bounded):
    """on_rows builds the inputs of the gated rows alone (box and feature standardisation of all N: these are equal
    bit for bit to forward's) and runs the MLP on them in chunks of their own. Its logits equal forward's but for
    float rounding in the odd row (`_assert_equal_but_for_gemm_rounding`). The other rows hold 0, and where nothing
    can be left out (everything gated, or no subsampled gradient) forward's own logits come back."""
    torch.manual_seed(0)
    n = 2 * MLP_CHUNK_ROWS + 333
    means, features = 3 * torch.randn(n, 3), torch.randn(n, 2)
    config = RetentionHeadConfig(gradient_rows=256)
    head = _perturbed_head(config, bounds=robust_bounds(means) if bounded else None)
    gated = torch.rand(n) < 0.3
    index = torch.nonzero(gated).squeeze(-1)
    inputs = head.input_rows(means, features)
    assert torch.equal(inputs(index), inputs()[index])
    full = head(means, features).detach()
    partial = head.on_rows(means, features, gated, int(gated.sum()))
    assert isinstance(partial, PartialLogits)
    _assert_equal_but_for_gemm_rounding(partial.logits[gated].detach(), full[gated])
    assert torch.equal(partial.logits[~gated], torch.zeros(int((~gated).sum())))
    everything = torch.ones(n, dtype=torch.bool)
    assert torch.equal(head.on_rows(means, features, everything, n), head(means, features))
    most = torch.rand(n) < 0.9  # above GATED_ROWS_AT_MOST: cheaper to evaluate them all
    assert torch.equal(head.on_rows(means, features, most, int(most.sum())), head(means, features))
    config.gradient_rows = 0
    assert torch.equal(head.on_rows(means, features, gated, int(gated.sum())), head(means, features))
    # The MLP's forward without gradient (in place, chunk by chunk) is the plain MLP's on the same matrix, bit for bit.
    with torch.no_grad():
        assert torch.equal(head(means, features), head.mlp(inputs()).squeeze(-1))


def _vedal_step(vedal, head, means, features, raw, gated, step, partial, reconstruction_weights):
    """One training step's VEDAL part: masks, regulariser, backward; (masked opacities, terms, d/d raw, d/d head)."""
    from nerfstudio_pruning.vedal.controller import VedalController  # noqa: F401 (the type of `vedal`)

    head.zero_grad()
    raw = raw.detach().clone().requires_grad_()
    n = raw.numel()
    if partial:
        head_logits = lambda: head.on_rows(means, features, gated, vedal.gated_count(n))  # noqa: E731
    else:
        head_logits = lambda: head(means, features)  # noqa: E731
    opacities, logits = vedal.training_opacity_logits(raw, head_logits, gated, step)
    assert isinstance(logits, PartialLogits) == (partial and logits is not None)
    terms = vedal.regulariser(logits, gated, step)
    ((opacities * reconstruction_weights).sum() + sum(terms.values())).backward()
    head_grads = [None if p.grad is None else p.grad.clone() for p in head.parameters()]
    return opacities.detach(), {k: v.detach() for k, v in terms.items()}, raw.grad, head_grads


@pytest.mark.parametrize("target", [None, 900])
def test_a_step_with_the_head_on_the_gated_rows_matches_the_step_with_every_row(target):
    """The training step with on_rows against the one with forward over every row, from the same random state:
    the rendered opacities, the KL and the gradient of every Gaussian's opacity are equal but for the float
    rounding of the logits themselves (they read the gated rows only), the head's gradient is the same estimator
    with the same rows (drawn at the same point of the random stream), equal to float rounding; the sparsity term
    is an estimate (its own test below). Steps:
    sampled masks, the hand-over blend (with a target the removal takes ungated Gaussians too: of 3,000, 2,100 go,
    1,000 gated and then 1,100 ungated by importance) and the fixed decision (no head)."""
    from nerfstudio_pruning.vedal.controller import VedalConfig, VedalController

    torch.manual_seed(0)
    n = 3000
    means, features, raw = torch.randn(n, 3), torch.randn(n, 2), torch.randn(n)
    weights = torch.randn(n)
    gated = torch.arange(n) % 3 == 0
    config = VedalConfig(finetune_start_step=0, hard_prune_step=100, head_gradient_rows=256, target_gaussians=target,
                         sparsity_weight=30.0)  # a sparsity gradient the size of the others: it must match too
    head_config = config.retention_head_config()
    head = _perturbed_head(head_config, bounds=robust_bounds(means))
    controllers = []
    for _ in range(2):
        vedal = VedalController(config, ssim_lambda=0.2)
        vedal.finetune_started_at, vedal.start_gaussians = 0, n
        vedal.gate = ConvergenceGate(vedal.gate_config(), n)
        vedal.gate.update(torch.linspace(0, 1, n), step=0)
        vedal.gate.eligible = gated
        vedal.importance_scale = 1e-3
        controllers.append(vedal)
    for step in (10, 93, 97):
        results = []
        for vedal, partial in zip(controllers, (False, True)):
            torch.manual_seed(step)
            results.append(_vedal_step(vedal, head, means, features, raw, gated, step, partial, weights))
        (opacities, terms, raw_grad, head_grads), (opacities_p, terms_p, raw_grad_p, head_grads_p) = results
        torch.testing.assert_close(opacities_p, opacities, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(raw_grad_p, raw_grad, rtol=1e-5, atol=1e-7)
        assert terms.keys() == terms_p.keys() == ({"retention_kl", "retention_sparsity"} if step < 97 else set())
        if step == 97:
            assert torch.equal(controllers[1].decided, controllers[0].decided)
            continue
        torch.testing.assert_close(terms_p["retention_kl"], terms["retention_kl"], rtol=1e-5, atol=0)
        assert terms_p["retention_sparsity"] != terms["retention_sparsity"]  # estimated: its test is below
        for grad_p, grad in zip(head_grads_p, head_grads):
            assert grad.abs().sum() > 0
            torch.testing.assert_close(grad_p, grad, rtol=1e-5, atol=1e-6)
    if target is not None:  # the removal took ungated Gaussians, ranked by importance, not by (unevaluated) logits
        assert int(controllers[1].decided.sum()) == n - target and int((controllers[1].decided & ~gated).sum()) == 1100


def test_the_sparsity_estimate_and_the_head_gradient_through_the_gated_rows_are_unbiased():
    """With the head on the gated rows, mean_i p_i over all N is estimated from the step's gradient rows (exact
    over the gated, N / m x the sampled ungated ones), and with it the head's gradient. Over many steps (draws) both
    average to the full evaluation's values within 5 standard errors, element by element; the estimate that
    drops the ungated rows' sparsity gradient is rejected by the same test."""
    torch.manual_seed(0)
    n, rows, draws = 300, 24, 1500
    means, features, weights = torch.randn(n, 3), torch.randn(n, 2), torch.randn(n)
    gated = torch.rand(n) < 0.3
    count = int(gated.sum())
    head = _perturbed_head(RetentionHeadConfig(gradient_rows=0), bounds=robust_bounds(means))

    def loss_of(logits, mean_p):
        # a gated-only term (as the KL and the masked render are) and the sparsity term over all N, weighted so that
        # each row's share of it is the size of a gated row's term
        return (torch.where(gated, torch.sigmoid(logits), 0.0) * weights).sum() + n * mean_p

    head.zero_grad()
    full_logits = head(means, features)
    full_mean_p = torch.sigmoid(full_logits).mean()
    loss_of(full_logits, full_mean_p).backward()
    full = torch.cat([p.grad.reshape(-1) for p in head.parameters()]).double()
    head.config.gradient_rows = rows

    def draw(ungated_gradient=True):
        head.zero_grad()
        partial = head.on_rows(means, features, gated, count)
        assert isinstance(partial, PartialLogits)
        mean_p = partial.mean_probability()
        if not ungated_gradient:  # the same value, but only the gated rows' part of its gradient
            exact = torch.where(gated, torch.sigmoid(partial.logits), 0.0).sum() / n
            mean_p = exact + (mean_p - exact).detach()
        loss_of(partial.logits, mean_p).backward()
        return float(mean_p), torch.cat([p.grad.reshape(-1) for p in head.parameters()])

    values, grads = zip(*(draw() for _ in range(draws)))
    values, grads = torch.tensor(values).double(), torch.stack(grads).double()
    assert values.std() > 0 and not torch.equal(grads[0], grads[1])  # both are sampled
    assert abs(values.mean() - float(full_mean_p)) <= 5 * values.std() / math.sqrt(draws)
    tolerance = 5 * grads.std(0) / math.sqrt(draws) + 1e-7
    assert ((grads.mean(0) - full).abs() <= tolerance).all()
    biased = torch.stack([draw(ungated_gradient=False)[1] for _ in range(300)]).double()
    assert ((biased.mean(0) - full).abs() > 5 * biased.std(0) / math.sqrt(300) + 1e-7).float().mean() > 0.3
