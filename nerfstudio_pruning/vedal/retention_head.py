"""VEDAL's variational retention head and its regulariser.

A small MLP maps a position encoding of each Gaussian's mean (plus optional per-Gaussian features) to a
retention logit, p_i = sigmoid(logit_i). During fine-tuning gated Gaussians render with opacity o_i * z_i,
z_i ~ BinaryConcrete(logit_i, tau); the objective adds lambda_KL * sum_{gated} KL(Bern(p_i) || Bern(pi))
+ lambda_s * mean_i p_i. With Delta_i the loss increase from removing Gaussian i (same units as the training
loss), the per-Gaussian expected cost (1 - p_i) Delta_i + lambda_KL KL_i is minimised at
p_i* = sigmoid(Delta_i / lambda_KL + logit pi) (Proposition 1), so Gaussians with
Delta_i < lambda_KL * log((1 - pi) / pi) end below 0.5 and are removed.

Plain torch on purpose: no nerfstudio import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Bound = Union[float, Sequence[float], Tensor]


@dataclass
class RetentionHeadConfig:
    """The head's network: its shape, its starting point and how its gradient is computed. What it is trained
    towards (the prior, the weights of the regulariser, the temperature) is VEDAL's, in `VedalConfig`, which sets
    the two fields it exposes as flags (initial_keep_probability, head_gradient_rows); the paper gives the
    architecture (2 x 64 ReLU, ~5k parameters) but not the rest, and each default says why it was chosen."""

    n_freqs: int = 2
    """Sin/cos octaves of the normalised mean. Two octaves (periods of one and one half scene extent) keep p
    smooth at the scale of single Gaussians, as the paper intends, and put the head at ~5.4k parameters with
    the default features (four octaves would be ~6.1k, one ~5.0k but barely position-aware)."""

    hidden: int = 64
    """Hidden width, from the paper."""

    depth: int = 2
    """Number of hidden layers, from the paper."""

    n_extra_features: int = 2
    """Per-Gaussian features appended to the encoding; 0 turns them off. The default two are the opacity logit
    and the mean log-scale (see `gaussian_features`): removing i changes a pixel by T alpha_i (R - c_i) with
    alpha_i = o_i G_i, so opacity and footprint size drive Delta_i, and position alone cannot tell apart two
    Gaussians at the same place. Without them p* of Proposition 1 is not representable by the head."""

    init_keep_prob: float = 0.99
    """p at initialisation (via the output bias). Fine-tuning starts from a trained model: near 1, the masked
    render equals the trained render, so the reconstruction term starts from its optimum and the head is
    pulled down only where the KL prior outweighs a Gaussian's importance. At p ~ 0.5, sampling would drop
    about half of the gated Gaussians at every step and wreck the render the head learns from."""

    gradient_rows: int = 2048
    """Rows (Gaussians) through which the head's parameter gradient is taken at each step; 0: all of them. On CPU,
    while at most GATED_ROWS_AT_MOST of the Gaussians are gated, a training step runs the forward pass on the
    gated rows only (`RetentionHead.on_rows`: nothing else reads the others' logits), otherwise on every
    Gaussian; either way the
    gradient of the loss with respect to the head's parameters, sum_i dL/dlogit_i x dlogit_i/dtheta, is estimated
    from this many rows drawn uniformly with replacement and weighted by N / rows: the same gradient in
    expectation (tests/test_retention_head.py checks it), at a cost that does not grow with N. dL/dlogit_i itself
    (reconstruction through z_i, KL) is exact for every evaluated Gaussian; only the sum over them is sampled (and,
    with the gated rows only, the sparsity term's mean over all N, from the same rows).
    The relative noise of the estimate is that of a mean over `rows` draws, whatever N is (a mini-batch, as MLPs
    are usually trained); with 2048, one chunk of the MLP (MLP_CHUNK_ROWS), the head's backward pass costs what it
    costs at 2048 Gaussians: at 55k Gaussians on CPU a fine-tuning step went from 1.44x splatfacto's with 8192
    rows to 1.28x (docs/vedal_gs.md)."""


def encoding_dim(n_freqs: int) -> int:
    return 3 + 6 * n_freqs


def robust_bounds(means: Tensor, tail_fraction: float = 0.01) -> Tuple[Tensor, Tensor]:
    """Per-axis bounds that ignore the tail_fraction outermost means on each side. Unbounded scenes have a few
    far-away background Gaussians; min/max bounds would squeeze the rest of the scene into a sliver of the
    encoding's range."""
    n = means.shape[0]
    k_lo = max(1, int(math.floor(tail_fraction * n)) + 1)
    k_hi = max(1, n - int(math.floor(tail_fraction * n)))
    values = means.detach()
    lo = values.kthvalue(min(k_lo, n), dim=0).values
    hi = values.kthvalue(k_hi, dim=0).values
    return lo, hi


def positional_encoding(x: Tensor, n_freqs: int, bounds: Optional[Tuple[Bound, Bound]] = None) -> Tensor:
    """[N, 3] positions -> [N, 3 + 6 n_freqs]: the position normalised to [-1, 1] followed by
    sin(2^k pi x), cos(2^k pi x) for k < n_freqs.

    bounds: (lo, hi), scalars or per-axis; None uses the min/max of x itself. Positions outside the bounds are
    clamped: the raw coordinate would otherwise grow without limit and the periodic terms would alias far
    Gaussians onto the scene interior.
    """
    return torch.cat(positional_encoding_parts(x, n_freqs, bounds), dim=-1)


def positional_encoding_parts(x: Tensor, n_freqs: int, bounds: Optional[Tuple[Bound, Bound]] = None) -> List[Tensor]:
    """The column blocks of `positional_encoding`, for a caller that concatenates them with more columns."""
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"positions must be [N, 3], got {tuple(x.shape)}")
    lo, hi = encoding_box(x, bounds)
    span = (hi - lo).clamp_min(torch.finfo(x.dtype).eps)
    normalised = (2.0 * (x - lo) / span - 1.0).clamp(-1.0, 1.0)
    parts = [normalised]
    for k in range(n_freqs):
        angle = (math.pi * 2.0**k) * normalised
        parts.append(torch.sin(angle))
        parts.append(torch.cos(angle))
    return parts


def gaussian_features(opacity_logits: Tensor, log_scales: Tensor) -> Tensor:
    """The default extra features: splatfacto's raw opacity (a logit, [N] or [N, 1]) and the mean of its raw
    log-scales ([N, 3]), i.e. the log of the geometric-mean radius."""
    return torch.stack([opacity_logits.reshape(-1), log_scales.mean(dim=-1)], dim=-1)


def retention_inputs(means: Tensor, opacity_logits: Tensor, log_scales: Tensor) -> Tuple[Tensor, Tensor]:
    """Detached (means, features) for the head, with non-finite entries made neutral.

    The head standardises its features over all Gaussians, so one Gaussian with a NaN parameter (splatfacto
    occasionally diverges a few) would make every p NaN. Such a Gaussian gets the mean features of the others
    and a mean at the origin instead.
    """
    means = means.detach()
    features = gaussian_features(opacity_logits, log_scales).detach()
    # Unconditionally, not behind a test of whether anything is non-finite: that test would read a value back to
    # the host at every step (a device synchronisation on a GPU); the replacement costs a few elementwise passes.
    finite_features = torch.isfinite(features)
    typical = torch.where(finite_features, features, 0.0).sum(0) / finite_features.sum(0).clamp_min(1)
    features = torch.where(finite_features, features, typical)
    means = torch.nan_to_num(means, nan=0.0, posinf=0.0, neginf=0.0)  # one pass, where isfinite + where took two
    return means, features


class RetentionHead(nn.Module):
    """MLP (depth x hidden ReLU) from encoded means (+ features) to one retention logit per Gaussian."""

    def __init__(self, config: Optional[RetentionHeadConfig] = None, bounds: Optional[Tuple[Bound, Bound]] = None):
        super().__init__()
        self.config = config if config is not None else RetentionHeadConfig()
        cfg = self.config
        if not 0.0 < cfg.init_keep_prob < 1.0:
            raise ValueError("init_keep_prob must be in (0, 1)")
        layers = []
        width = encoding_dim(cfg.n_freqs) + cfg.n_extra_features
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            width = cfg.hidden
        self.output = nn.Linear(width, 1)
        self.mlp = nn.Sequential(*layers, self.output)
        with torch.no_grad():
            self.output.bias.fill_(math.log(cfg.init_keep_prob / (1.0 - cfg.init_keep_prob)))
        # NaN marks "no bounds": forward then normalises by the current means. Buffers, so checkpoints keep them.
        self.register_buffer("bounds_lo", torch.full((3,), math.nan))
        self.register_buffer("bounds_hi", torch.full((3,), math.nan))
        # Whether the buffers hold bounds, kept on the host: asking the buffers at every forward pass would be a
        # device synchronisation per step. Set with the buffers (set_bounds, loading a state dict).
        self._bounded = False
        if bounds is not None:
            self.set_bounds(*bounds)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bounded = not bool(torch.isnan(self.bounds_lo).any())

    def set_bounds(self, lo: Bound, hi: Bound) -> None:
        """Fix the encoding's box (e.g. `robust_bounds(means)` once at the start of fine-tuning), so p of a
        Gaussian does not change because other Gaussians moved or were pruned."""
        with torch.no_grad():
            self.bounds_lo.copy_(torch.as_tensor(lo, dtype=self.bounds_lo.dtype).expand(3))
            self.bounds_hi.copy_(torch.as_tensor(hi, dtype=self.bounds_hi.dtype).expand(3))
        self._bounded = True

    def forward(self, means: Tensor, extra_features: Optional[Tensor] = None) -> Tensor:
        """means [N, 3], extra_features [N, n_extra_features] -> logits [N].

        Inputs are detached: the head should learn to read positions and opacities, not have the KL prior
        move or fade Gaussians through its inputs to make its own job easier.
        """
        inputs = self.input_rows(means, extra_features)
        return _chunked_mlp(self.mlp, inputs(), MLP_CHUNK_ROWS, self.config.gradient_rows).squeeze(-1)

    def input_rows(self, means: Tensor, extra_features: Optional[Tensor] = None) -> "HeadInputRows":
        """The MLP's inputs for these Gaussians, built for any subset of rows on demand (`HeadInputRows`)."""
        cfg = self.config
        dtype = self.output.weight.dtype
        means = means.detach().to(dtype)
        box = encoding_box(means, (self.bounds_lo, self.bounds_hi) if self._bounded else None)
        features = None
        if cfg.n_extra_features:
            if extra_features is None:
                raise ValueError(f"head expects {cfg.n_extra_features} extra features per Gaussian")
            features = extra_features.detach().to(dtype).reshape(means.shape[0], -1)
            if features.shape[1] != cfg.n_extra_features:
                raise ValueError(f"expected {cfg.n_extra_features} extra features, got {features.shape[1]}")
            # Standardised over the current Gaussians: log-scales shift with the scene's units and opacity
            # logits span ~[-10, 10]; unscaled, they would dominate the [-1, 1] encoding in the first layer.
            mean = features.mean(dim=0, keepdim=True)
            std = features.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
            features = (features - mean) / std
        elif extra_features is not None:
            raise ValueError("head was configured without extra features (n_extra_features = 0)")
        return HeadInputRows(means, features, box, cfg.n_freqs)

    def on_rows(self, means: Tensor, extra_features: Optional[Tensor], rows: Tensor,
                count: int) -> Union[Tensor, "PartialLogits"]:
        """What a training step needs of the head: the logits of the Gaussians in `rows` ([N] bool, `count` of them,
        a number the caller knows on the host), as `PartialLogits`; equal to forward's on those rows to float
        rounding: each row's input is built with the box and standardisation of all N (equal bit for bit), but the
        CPU's sgemm picks its micro-kernel by a row's place in its block of rows, so the odd row's logit differs in
        its last bits. The other rows hold 0.

        The parameter gradient is forward's estimate: gradient_rows rows drawn uniformly from all N with the weight
        N / gradient_rows, the rows outside `rows` entering through the sparsity term's estimate
        (`PartialLogits.mean_probability`). Without a subsampled gradient (gradient_rows 0 or at least N) every
        row's logit enters the gradient anyway, and with every row in `rows` there is nothing to leave out: forward's
        full [N] logits are returned then, as they are when more than GATED_ROWS_AT_MOST of the rows are asked for
        and on a GPU."""
        n, m = rows.numel(), self.config.gradient_rows
        inputs = self.input_rows(means, extra_features)
        # Not on a GPU: there the head's pass is a few small GEMMs against a render, GATED_ROWS_AT_MOST was
        # measured on a CPU only, and nonzero_static has a CUDA kernel only in recent torch releases.
        if not 0 < m < n or count > GATED_ROWS_AT_MOST * n or means.device.type == "cuda":
            return _chunked_mlp(self.mlp, inputs(), MLP_CHUNK_ROWS, m).squeeze(-1)
        # nonzero_static with the host's count: plain nonzero would read the count back from the device.
        index = torch.nonzero_static(rows, size=count).squeeze(-1)
        sample = GradientRows(n, m, means.device)
        params = tuple(p for p in self.mlp.parameters() if p.requires_grad)
        logits = _RowsMLP.apply(self.mlp, inputs, index, sample, MLP_CHUNK_ROWS, *params)
        return PartialLogits(logits, rows, self.mlp, inputs, sample)


# Above this fraction of the rows on_rows evaluates them all (forward): gathering the rows' inputs, scattering their
# logits and the sparsity term's own pass over the sampled rows then cost about what the rows left out save.
# Measured with benchmarks/training/bench_vedal_step.py at 55k Gaussians on the Intel VM (CPU time, one thread, four
# runs, docs/vedal_gs.md): a whole step at 50% gated cost 1.18-1.24x splatfacto's on the gated rows against
# 1.20-1.24x on every row; at 10-30% gated 1.12-1.16x on the gated rows, where every row cost ~1.2x.
# Either way the logits and the gradient's estimator are the same (to float rounding).
GATED_ROWS_AT_MOST = 0.4


def encoding_box(means: Tensor, bounds: Optional[Tuple[Bound, Bound]]) -> Tuple[Tensor, Tensor]:
    """(lo, hi) of `positional_encoding`: the given bounds, or without them the min/max of the means."""
    if bounds is None:
        if means.shape[0]:
            return means.detach().min(dim=0).values, means.detach().max(dim=0).values
        return (torch.zeros(3, dtype=means.dtype, device=means.device),
                torch.ones(3, dtype=means.dtype, device=means.device))
    return (torch.as_tensor(bounds[0], dtype=means.dtype, device=means.device),
            torch.as_tensor(bounds[1], dtype=means.dtype, device=means.device))


@dataclass
class HeadInputRows:
    """The head's MLP inputs (encoded mean, standardised features) for any rows of the N Gaussians, built when asked
    for. The encoding's box and the features' standardisation are those of all N, fixed here, so a row's input is
    the same whichever other rows are built with it; the encoding itself is per row and elementwise."""

    means: Tensor
    features: Optional[Tensor]
    box: Tuple[Tensor, Tensor]
    n_freqs: int

    @property
    def num_rows(self) -> int:
        return self.means.shape[0]

    def __call__(self, index: Optional[Tensor] = None) -> Tensor:
        """[len(index), D] inputs of the rows `index` (all rows, in order, without one)."""
        means = self.means if index is None else self.means[index]
        # One concatenation of the encoding's blocks and the features: the inputs of the gated rows are built at
        # every fine-tuning step.
        parts = positional_encoding_parts(means, self.n_freqs, self.box)
        if self.features is not None:
            parts.append(self.features if index is None else self.features[index])
        return torch.cat(parts, dim=-1)


class GradientRows:
    """The rows through which one training step's head gradient is taken: m drawn uniformly with replacement from
    the N rows, once per step, when first asked for (by the sparsity term's estimate in the loss, else by the
    backward pass), from the generator of the device, as `_ChunkedMLP`'s backward pass draws them; `grad` collects
    what the loss sends back through the sampled rows' own logits (`_SampledRowLogits`)."""

    def __init__(self, n: int, m: int, device: torch.device) -> None:
        self.n, self.m, self.device = n, m, device
        self.index: Optional[Tensor] = None
        self.grad: Optional[Tensor] = None
        self._inputs: Optional[Tensor] = None

    def draw(self) -> Tensor:
        if self.index is None:
            self.index = torch.randint(0, self.n, (self.m,), device=self.device)
        return self.index

    def inputs(self, rows: "HeadInputRows") -> Tensor:
        """The MLP inputs of the drawn rows, built once: the loss's estimate and the backward pass both need them."""
        if self._inputs is None:
            self._inputs = rows(self.draw())
        return self._inputs

    def add_grad(self, grad: Tensor) -> None:
        self.grad = grad if self.grad is None else self.grad + grad


class PartialLogits:
    """The head's retention logits of one training step, evaluated on some rows only (`RetentionHead.on_rows`).

    `logits` [N]: the head's logit on the evaluated rows, 0 on the others, in the graph of the head's parameters.
    Every consumer of a training step's logits reads the gated rows only (the Binary Concrete mask and its
    hand-over blend render the ungated at z = 1, the removal's mask ranks the gated by p and the ungated by their
    importance EMA, the KL sums over the gated) except the sparsity term lambda_s mean_i p_i, which runs over all N:
    `mean_probability` estimates it."""

    def __init__(self, logits: Tensor, evaluated: Tensor, mlp: nn.Module, inputs: HeadInputRows,
                 sample: GradientRows) -> None:
        self.logits, self.evaluated = logits, evaluated
        self._mlp, self._inputs, self._sample = mlp, inputs, sample

    def mean_probability(self) -> Tensor:
        """mean_i sigmoid(logit_i) over all N, unbiased: the evaluated rows' sum exactly, the others' from the step's
        gradient rows, sum_{j in sample, not evaluated} p_j x N / m, whose expectation is their sum. Its gradient
        through the sampled rows is the full sparsity gradient's estimate of forward's backward pass (the same rows
        and weights), so the head's gradient is the same estimator as with every row evaluated."""
        sample = self._sample
        sampled = _SampledRowLogits.apply(self.logits, self._mlp, self._inputs, sample, MLP_CHUNK_ROWS)
        exact = torch.where(self.evaluated, torch.sigmoid(self.logits), 0.0).sum()
        others = torch.where(self.evaluated[sample.index], 0.0, torch.sigmoid(sampled)).sum() * (sample.n / sample.m)
        return (exact + others) / sample.n


def logit_values(logits: Union[Tensor, PartialLogits]) -> Tensor:
    """The [N] logits tensor of either form (on_rows returns both)."""
    return logits.logits if isinstance(logits, PartialLogits) else logits


# Rows of the head's MLP evaluated at once. The head runs on every Gaussian at every fine-tuning step; with all of
# them at once each hidden layer is N x 64 floats (44 MB at 170k Gaussians), and on a CPU the ReLUs and their
# backward stream those from memory: at 170k Gaussians the head took about half of a vedal-gs step. Chunks keep
# them in cache: 8192 rows (2 MB per layer) on the AMD VM of ad89afe; on the Intel VM of 2026-12-06, 2048 rows
# (0.5 MB) took 43 ms against 57 for the forward pass over 55k rows, 82 against 117 with the subsampled backward
# (medians of 6 alternating rounds, one thread, a shared machine), so 2048.
MLP_CHUNK_ROWS = 2048


def _chunked_mlp(mlp: nn.Module, inputs: Tensor, chunk_rows: int, gradient_rows: int = 0) -> Tensor:
    """mlp(inputs) for inputs that need no gradient, evaluated `chunk_rows` rows at a time in both passes; with
    gradient_rows > 0 (and fewer than the rows), the parameter gradient is estimated from that many rows
    (`_ChunkedMLP`)."""
    n = inputs.shape[0]
    sampled = 0 < gradient_rows < n
    if not torch.is_grad_enabled():
        return _mlp_rows(mlp, inputs, chunk_rows)
    if n <= chunk_rows and not sampled:
        return mlp(inputs)
    params = tuple(p for p in mlp.parameters() if p.requires_grad)
    return _ChunkedMLP.apply(mlp, inputs, chunk_rows, gradient_rows if sampled else 0, *params)


def _mlp_rows(mlp: nn.Sequential, inputs: Tensor, chunk_rows: int) -> Tensor:
    """mlp(inputs) without autograd, `chunk_rows` rows at a time, equal to it bit for bit: each Linear is the addmm
    nn.Linear calls, but the ReLUs work in place and each chunk's output goes straight into its rows of the result.
    nn.Sequential allocates a new tensor per ReLU and the chunks' outputs were concatenated: at 55k rows on the
    Intel VM (one thread) this takes 5.5 ms where that took 9.3."""
    layers = list(mlp)
    result = inputs.new_empty(inputs.shape[0], layers[-1].out_features)
    with torch.no_grad():
        for part, out in zip(inputs.split(chunk_rows), result.split(chunk_rows)):
            h = part
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    h = torch.addmm(layer.bias, h, layer.weight.t()) if layer.bias is not None else h @ layer.weight.t()
                elif isinstance(layer, nn.ReLU) and h is not part:  # never in place on the caller's inputs
                    h = h.relu_()
                else:
                    h = layer(h)
            out.copy_(h)
    return result


def _parameter_gradients(mlp: nn.Module, inputs: Tensor, grad_output: Tensor, chunk_rows: int) -> List[Tensor]:
    """sum over rows of grad_output_i x d mlp(inputs_i) / d theta for the MLP's trainable parameters, by running
    the forward pass again one chunk at a time and taking that chunk's gradients while its activations are still
    in cache."""
    params = [p for p in mlp.parameters() if p.requires_grad]
    totals = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for part, grad_part in zip(inputs.split(chunk_rows), grad_output.split(chunk_rows)):
            grads = torch.autograd.grad(mlp(part), params, grad_part, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total += grad
    return totals


class _ChunkedMLP(torch.autograd.Function):
    """The forward pass keeps no activations; the backward pass runs the forward again one chunk at a time
    (`_parameter_gradients`). The gradients are those of the plain MLP, summed over chunks (so their float32
    rounding differs: 5.5e-6 relative at 170k rows).

    With gradient_rows > 0 the backward pass does this for gradient_rows rows drawn uniformly with replacement
    (torch's generator of the inputs' device, so a run's random state in its checkpoints covers it), each
    weighted by N / gradient_rows: E[(N/m) sum_{j<m} g_{I_j}] = N E[g_I] = sum_i g_i, with g_i the row's
    contribution grad_output_i x d mlp(x_i) / d theta. The indices are drawn and gathered on the device: nothing
    is read back to the host."""

    @staticmethod
    def forward(ctx, mlp, inputs, chunk_rows, gradient_rows, *params):
        ctx.mlp, ctx.chunk_rows, ctx.gradient_rows = mlp, chunk_rows, gradient_rows
        ctx.save_for_backward(inputs)
        return _mlp_rows(mlp, inputs, chunk_rows)

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        if ctx.gradient_rows:
            n, m = inputs.shape[0], ctx.gradient_rows
            rows = torch.randint(0, n, (m,), device=inputs.device)
            inputs, grad_output = inputs[rows], grad_output[rows] * (n / m)
        return (None, None, None, None, *_parameter_gradients(ctx.mlp, inputs, grad_output, ctx.chunk_rows))


class _RowsMLP(torch.autograd.Function):
    """[N] logits: the MLP on the rows `index` of the inputs, 0 on the others. Backward: the parameter gradient
    through the step's gradient rows (`GradientRows`, drawn by now if the loss's sparsity estimate asked for them),
    each weighted by N / m as in `_ChunkedMLP`, plus what the loss sent back through the sampled rows' own logits:
    for a sampled row outside `index` that is the sparsity term's gradient (its weight N / m already in the
    estimate), for one inside, 0, its gradient coming through the [N] output. So each sampled row carries its
    full dL/dlogit x N / m, as in `_ChunkedMLP` with the same rows."""

    @staticmethod
    def forward(ctx, mlp, inputs, index, sample, chunk_rows, *params):
        ctx.mlp, ctx.inputs, ctx.sample, ctx.chunk_rows = mlp, inputs, sample, chunk_rows
        values = _mlp_rows(mlp, inputs(index), chunk_rows).squeeze(-1)
        return values.new_zeros(inputs.num_rows).index_put_((index,), values)

    @staticmethod
    def backward(ctx, grad_output):
        sample = ctx.sample
        index = sample.draw()
        weights = grad_output[index] * (sample.n / sample.m)
        if sample.grad is not None:
            weights = weights + sample.grad
        grads = _parameter_gradients(ctx.mlp, sample.inputs(ctx.inputs), weights[:, None], ctx.chunk_rows)
        return (None, None, None, None, None, *grads)


class _SampledRowLogits(torch.autograd.Function):
    """[m] logits of the step's gradient rows (drawn here if not yet), for the sparsity term's estimate. Its input
    `logits` (the `_RowsMLP` output) is there for the order of the backward pass only: this node's backward hands
    the gradient of these logits to the `GradientRows` before `_RowsMLP`'s backward, which needs it, can run."""

    @staticmethod
    def forward(ctx, logits, mlp, inputs, sample, chunk_rows):
        ctx.sample = sample
        return _mlp_rows(mlp, sample.inputs(inputs), chunk_rows).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        ctx.sample.add_grad(grad)
        return None, None, None, None, None


def binary_concrete_logits(logits: Tensor, tau: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """The logit of a relaxed Bernoulli sample: (logit + log u - log(1 - u)) / tau, u ~ U(0, 1), differentiable
    in the logits. u is kept within machine epsilon of (0, 1): log(0) would give an infinite noise and a NaN
    gradient; the clamp bounds the logistic noise at about +-16 in float32, far out in its tails."""
    if tau <= 0:
        raise ValueError("tau must be > 0")
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(eps, 1.0 - eps)
    noise = torch.log(u) - torch.log1p(-u)
    return (logits + noise) / tau


def binary_concrete(logits: Tensor, tau: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Relaxed Bernoulli sample z = sigmoid(`binary_concrete_logits`), in (0, 1)."""
    return torch.sigmoid(binary_concrete_logits(logits, tau, generator))


def hard_mask(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Inference mask [p >= threshold], compared in logit space so that no precision is lost near p = 1."""
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    return logits >= math.log(threshold / (1.0 - threshold))


def bernoulli_kl(p: Tensor, prior_pi: Union[float, Tensor]) -> Tensor:
    """KL(Bern(p) || Bern(pi)) elementwise. Exact 0 * log 0 = 0 at p in {0, 1}; the logs see p clamped to the
    smallest normal number so the gradient there is large but finite instead of NaN."""
    pi = torch.as_tensor(prior_pi, dtype=p.dtype, device=p.device)
    tiny = torch.finfo(p.dtype).tiny
    q = 1.0 - p
    return p * (torch.log(p.clamp_min(tiny)) - torch.log(pi)) + q * (torch.log(q.clamp_min(tiny)) - torch.log1p(-pi))


def _bernoulli_kl_from_logits(logits: Tensor, prior_pi: float) -> Tensor:
    """Same KL with log p and log(1 - p) taken from the logits: exact and with finite gradients even when
    sigmoid(logit) rounds to 0 or 1 (the head starts at p = 0.99 and can go much further)."""
    p = torch.sigmoid(logits)
    log_p = nn.functional.logsigmoid(logits)
    log_q = nn.functional.logsigmoid(-logits)
    return p * (log_p - math.log(prior_pi)) + (1.0 - p) * (log_q - math.log1p(-prior_pi))


def temperature(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Geometric anneal tau_start -> tau_end over anneal_steps, constant outside [0, anneal_steps]. Geometric,
    not linear: the sample sharpness depends on 1/tau, so equal ratios per step give an even sharpening."""
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError("temperatures must be > 0")
    if anneal_steps <= 0:
        return float(tau_end)
    progress = min(max(step / anneal_steps, 0.0), 1.0)
    return float(tau_start * (tau_end / tau_start) ** progress)


def retention_regulariser(
    logits: Union[Tensor, PartialLogits], gated_mask: Tensor, prior_pi: float, lambda_kl: float,
    lambda_sparsity: float
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """lambda_KL * sum_{gated} KL(Bern(p_i) || Bern(pi)) + lambda_s * mean_i p_i.

    Sum, not mean, over the gated Gaussians: the reconstruction loss responds to each Gaussian separately
    (Delta_i), so each gated Gaussian must carry its own lambda_KL for Proposition 1 to hold in the units of
    Delta. A mean would divide lambda_KL by the gated count, which changes at every gate refresh, so the
    prune threshold would drift as the gate opened. No extra scaling is applied: lambda_KL is small (~1e-6)
    but float32 handles it, and the total is O(lambda_KL * N) like the loss changes it trades against.

    prior_pi is pi, lambda_kl is lambda_KL in the units of Delta (the training loss: 0.8 L1 + 0.2 D-SSIM, mean over
    pixels), lambda_sparsity is lambda_s: per Gaussian it shifts the Proposition 1 threshold by lambda_s / N.

    Logits evaluated on the gated rows only (`PartialLogits`, a training step's) give the same KL and an unbiased
    estimate of mean_i p_i (`PartialLogits.mean_probability`).

    Returns (total, parts): 'kl' and 'sparsity' are the weighted terms (in the graph); 'kl_sum', 'mean_p' and
    'n_gated' are detached diagnostics.
    """
    partial = logits if isinstance(logits, PartialLogits) else None
    logits = logit_values(logits)
    if gated_mask.shape != logits.shape:
        raise ValueError(f"gated_mask {tuple(gated_mask.shape)} does not match logits {tuple(logits.shape)}")
    gated = gated_mask.to(device=logits.device, dtype=torch.bool)
    # Masked, not indexed: logits[gated] would size its result from the mask's count, read back to the host.
    kl = torch.where(gated, _bernoulli_kl_from_logits(logits, prior_pi), 0.0).sum()
    if partial is not None:
        mean_p = partial.mean_probability()
    else:
        p = torch.sigmoid(logits)
        mean_p = p.mean() if p.numel() else p.sum()
    kl_term = lambda_kl * kl
    sparsity_term = lambda_sparsity * mean_p
    parts = {
        "kl": kl_term,
        "sparsity": sparsity_term,
        "kl_sum": kl.detach(),
        "mean_p": mean_p.detach(),
        "n_gated": gated.sum().detach(),
    }
    return kl_term + sparsity_term, parts


def proposition_1_optimum(importance: Tensor, lambda_kl: float, prior_pi: float) -> Tensor:
    """p_i* = sigmoid(Delta_i / lambda_KL + logit pi), the minimiser of (1 - p) Delta + lambda_KL KL(p || pi)."""
    return torch.sigmoid(importance / lambda_kl + math.log(prior_pi / (1.0 - prior_pi)))
