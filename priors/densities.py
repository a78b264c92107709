"""Log densities shared by the priors, the VAE and the surgery evaluator.

Every density keeps its full normalizing constant: the surgery terms (mutual
information, marginal KL) are absolute numbers and a dropped -1/2 log(2 pi) makes
them wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def diagonal_normal_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Log density of a diagonal Gaussian, summed over the last dimension.

    Args:
        z: points, shape `[..., D]`.
        mu: means, broadcastable to `z`.
        logvar: log variances, broadcastable to `z`.

    Returns:
        `log N(z; mu, diag(exp(logvar)))`, shape the broadcast of the inputs without
        the last dimension.
    """
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def diagonal_normal_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), diagonal, summed over the last dim.

    Returns:
        Shape of the broadcast inputs without the last dimension.
    """
    var_ratio = torch.exp(logvar - prior_logvar)
    mean_term = (mu - prior_mu).square() * torch.exp(-prior_logvar)
    return 0.5 * (var_ratio + mean_term - 1.0 - (logvar - prior_logvar)).sum(-1)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One reparameterized draw z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): z ~ N(mu, diag(exp(logvar))).

    Differentiable in `mu` and `logvar`. eps is `torch.randn(mu.shape, ...)` on mu's device and
    dtype, from `generator` (None: torch's global generator); for a contiguous `mu` that is
    the same stream as `torch.randn_like(mu)`.

    Args:
        mu: means, `[..., D]`.
        logvar: log variances, broadcastable to `mu`.
        generator: the random generator, or None for the global one.

    Returns:
        A draw of mu's shape.
    """
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def small_gaussian_mixture_log_prob(
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    log_weights: Tensor | None = None,
    chunk_size: int = 8192,
    exclude: Tensor | None = None,
) -> Tensor:
    """log sum_k w_k N(z; mu_k, diag(exp(logvar_k))) as float64 matrix products, differentiable in every input.

    The quadratic form is expanded into matrix products, [z^2, z] . [-prec/2, prec mu] + c_k,
    in float64: the expansion cancels large terms, which in float32 costs ~1e-3 nats for sharp
    components, while in float64 it stays ~1e-12 relative. This is the path for learned
    components (a mixture, a VampPrior, exemplars encoded inside the training graph); for
    fixed components `DiagonalGaussianMixture` uses the exact kernel below. Use that class
    rather than this function: it normalizes and picks the path.

    Args:
        z: points, `[..., D]`.
        mu: component means, `[K, D]`.
        logvar: component log variances, `[K, D]`.
        log_weights: `[K]` log weights; None: each 0 (the caller normalizes).
        chunk_size: points per chunk; at most `chunk_size x K` float64 values are live.
        exclude: optional `[...]` int64 (z's shape without the last dimension): each point
            leaves that component out (a negative value leaves nothing out).

    Returns:
        `[...]`, float64, unnormalized when `log_weights` is None.
    """
    f64 = torch.float64
    mu, logvar = mu.to(f64), logvar.to(f64)
    prec = torch.exp(-logvar)
    const = -0.5 * (mu.shape[1] * LOG_2PI + logvar.sum(-1) + (mu.square() * prec).sum(-1))
    if log_weights is not None:
        const = const + log_weights.to(f64)
    quadratic, linear = (-0.5 * prec).T, (mu * prec).T  # [D, K] each
    flat = z.reshape(-1, z.shape[-1]).to(f64)
    flat_exclude = None if exclude is None else exclude.reshape(-1).to(z.device, torch.int64)
    cols = torch.arange(mu.shape[0], device=z.device)
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        c = flat[start : start + chunk_size]
        lp = c.square() @ quadratic + c @ linear + const
        if flat_exclude is not None:
            lp = lp.masked_fill(cols == flat_exclude[start : start + chunk_size, None], -math.inf)
        out.append(torch.logsumexp(lp, dim=-1))
    lp = torch.cat(out) if out else flat.new_zeros(0)
    return lp.reshape(z.shape[:-1])


# ---- the mixture kernel ------------------------------------------------------------------
#
# logsumexp_n log N(z_m; mu_n, diag(exp(logvar_n))) for M points against N components: the
# hot spot of the aggregate-posterior prior and of the surgery evaluator.
#
# The matrix-product form  log N = [z^2, z] . [-prec/2, prec mu] + c_n  runs at matmul speed
# but in float32 loses 1e-3 nats and more to cancellation for sharp posteriors (the z^2 prec
# and mu^2 prec terms are large and nearly cancel). So the product only *locates* the
# entries that matter. Per block of components x points: the maximum over each `group` of
# components finds the groups within `margin` nats of a row's running maximum; inside
# those, the entries within the margin are recomputed exactly, by the direct formula
# sum_d (z_d - mu_d)^2 prec_d in float64 (no cancellation). Entries below the margin hold
# at most N exp(-margin) of a row's mass (margin = log N + 28: < 1e-12 relative) and are
# dropped. A block where more than `dense_fraction` of the entries qualify (broad
# posteriors, where nothing is negligible) is recomputed whole by a float64 matrix
# product instead, whose cancellation error is ~1e-16 relative; the rest of that row
# chunk is then computed the same way without locating, in cache-sized blocks, and the
# gradient of those blocks is summed while they are in cache (`_DenseSums`).
#
# Components that share their variances (the exemplar prior's sigma^2) take the product
# z . prec mu + c_n with D columns instead of 2D, the z^2 term being the same for every n.
#
# Components in index order scatter a point's neighbours over most groups (the exemplar
# prior's 50,000 means: ~1,400 within the margin of a point touch half of the groups), so
# nearly every block is dense. For calls of many points (`_worth_ordering`) the constants are
# therefore put in spatial order (`spatial_order`, a PCA tree's leaves of `group`
# components): a point's neighbours then fill a few groups, and a located block is computed
# densely over the union of its row chunk's candidate groups only (`_union_columns`) where
# that is cheaper than recomputing its entries one by one and the float64 product is accurate
# enough (`UNION_DENSE_TOLERANCE`). Entries outside the union are below the margin, as for the
# located path. Since the blocks then come in spatial order, each row's threshold starts from
# a floor, the best of one entry per group (`_Components.row_floor`), rather than from the
# maximum of the blocks before; a row chunk that reaches most groups through those entries
# (`_Components.reach`: broad posteriors) is computed densely without locating. Leave-one-out
# indices are mapped to the ordered columns (`_Components.local_exclude`); results and
# gradients do not depend on the order beyond rounding.
#
# The locating product's own error only has to be small next to the margin for the
# selection to be right. Per chunk of points a worst-case bound on it, (2D + 1) eps
# max_n [sum_d prec_nd (max|z| + |mu_nd|)^2 + |c_n|], is checked; where it exceeds half
# the margin (extremely sharp posteriors, log-variances below about -12), that chunk is
# located with a float64 product instead.


DEFAULT_GROUP = 32

#: Components from which the kernel's constants are put in spatial order (`spatial_order`):
#: below it the walk is cheap whatever the order.
ORDER_MIN_COMPONENTS = 8192
#: Points of one call from which the kernel runs on spatially ordered constants. Ordering
#: 50,000 x 40 components costs about what the unordered kernel spends on a few hundred
#: points; a training batch (M = 100, leaving itself out) ran 5-30% slower on them.
ORDER_MIN_ROWS = 1024
#: Components sampled by `_worth_ordering` to tell broad ones apart, and the fraction of the
#: sampled entries within the margin above which they count as broad.
ORDER_SAMPLE = 2048
ORDER_MAX_REACH = 0.5
#: Power iterations per segment for its principal direction in `spatial_order`.
ORDER_ITERATIONS = 8
#: float64 values of a row chunk's entries against the groups' representatives formed at once
#: (`_Components.row_floor`).
FLOOR_ELEMENTS = 1 << 20
#: Rows of a row chunk sampled for `_Components.reach`.
REACH_ROWS = 64


def spatial_order(points: Tensor, group: int = DEFAULT_GROUP, iterations: int = ORDER_ITERATIONS) -> Tensor:
    """A permutation that puts nearby points next to each other: the leaves of a PCA tree, in order.

    Each segment (at first all N points) is split at a multiple of `group` near its median
    along its top principal direction (from `iterations` power iterations, started from a
    fixed random stream), recursively, until segments hold at most `group` points. So every
    aligned run of `group` positions is one leaf, and a point's nearby components fall into
    few of them. All segments of a level are processed at once, padded to the longest: about
    11 levels of a few batched products for 50,000 points.

    Deterministic for given points, dtype and device. The order only affects speed.

    Args:
        points: `[N, D]`, in the metric that matters (the caller scales by the precisions).
        group: leaf size.
        iterations: power iterations per split.

    Returns:
        `[N]` int64: position -> index of the point placed there.
    """
    n, d = points.shape
    device = points.device
    x = torch.cat([points.detach().float(), points.new_zeros(1, d, dtype=torch.float32)])  # row n: padding
    generator = torch.Generator(device=device).manual_seed(0)
    perm = torch.arange(n, device=device)
    sizes = torch.tensor([n], device=device)
    while n > group and int(sizes.max()) > group:  # one host read per level
        nseg, width = sizes.shape[0], int(sizes.max())
        starts = torch.cumsum(sizes, 0) - sizes
        offsets = torch.arange(width, device=device)
        inside = offsets < sizes[:, None]  # [nseg, width]
        source = torch.where(inside, perm.take((starts[:, None] + offsets).clamp(max=n - 1)), n)
        xs = x.index_select(0, source.reshape(-1)).view(nseg, width, d)  # padding rows are 0
        # Each segment's covariance (padding adds nothing), then its top eigenvector.
        mean = xs.sum(1, keepdim=True) / sizes[:, None, None]  # [nseg, 1, D]
        cov = torch.bmm(xs.transpose(1, 2), xs) - sizes[:, None, None] * mean.transpose(1, 2) * mean
        v = torch.randn(nseg, d, 1, generator=generator, device=device)
        for _ in range(iterations):
            v = torch.bmm(cov, v)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        p = torch.bmm(xs, v).squeeze(-1).masked_fill(~inside, math.inf)  # padding sorts last
        within = torch.sort(p, dim=1, stable=True).indices
        perm = source.gather(1, within).masked_select(inside)  # each segment's first sizes[i] entries, in segment order
        left = torch.where(sizes > group, (sizes + group - 1) // group // 2 * group, sizes)
        sizes = torch.stack([left, sizes - left], 1).reshape(-1)
        sizes = sizes[sizes > 0]
    return perm


def _worth_ordering(z: Tensor, mu: Tensor, logvar: Tensor) -> bool:
    """Whether `spatial_order` pays for a kernel of the points `z` against the components.

    For many points against many components, unless they are broad: where, for a sample of
    `REACH_ROWS` points against a sample of `ORDER_SAMPLE` components, most entries lie within
    the margin of the point's best, every block is dense whatever the order.
    """
    m, n = z.shape[0], mu.shape[0]
    if n < ORDER_MIN_COMPONENTS or m < ORDER_MIN_ROWS:
        return False
    zs = z[:: -(-m // REACH_ROWS)].detach().double()
    step = -(-n // ORDER_SAMPLE)
    ms, ls = mu[::step].detach().double().to(z.device), logvar[::step].detach().double().to(z.device)
    prec = torch.exp(-ls)
    c = -0.5 * (ls.sum(-1) + (ms.square() * prec).sum(-1))
    lp = zs.square() @ (-0.5 * prec).T + zs @ (ms * prec).T + c  # [rows, sample], log N up to a constant
    within = lp >= lp.amax(-1, keepdim=True) - refine_margin(n)
    return float(within.double().mean()) <= ORDER_MAX_REACH


def refine_margin(n_components: int) -> float:
    """Nats below a row's maximum beyond which entries are dropped: the dropped mass is < 1e-12 relative."""
    return max(30.0, math.log(max(n_components, 1)) + 28.0)


@contextlib.contextmanager
def exact_float32_matmul(device: torch.device | str):
    """Pin CUDA float32 matmuls to full precision (no TF32) inside the block; restore the setting after.

    TF32 (10-bit mantissa) makes the matrix-product form of the Gaussian log density wrong
    by several nats. CPU matmuls are always full precision, so this is a no-op there.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    old_matmul, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch.backends.cudnn.allow_tf32 = old_cudnn


def _shared_row(logvar: Tensor) -> Tensor | None:
    """The `[D]` log variances every component shares, or None (an expanded tensor is read without a scan)."""
    if logvar.shape[0] == 1 or logvar.stride(0) == 0 or bool((logvar == logvar[:1]).all()):
        return logvar[0]
    return None


class _Components:
    """The mixture's per-component constants, padded to a multiple of `group` columns.

    Padding columns have log density -inf. The float64 pieces feed the exact
    recomputation; `y` and `c` (in the points' dtype) feed the locating matrix product.

    The matrix-product form is log N(z; n) = features(z) . y_n + c_n + row_term(z). In
    general the features are [z^2, z] (2D columns) and the row term is 0. When every
    component has the same variances (the exemplar prior's shared sigma^2), the z^2 term
    is the same for all n and leaves the product: the features are z (D columns) and the
    row term is -1/2 sum_d prec_d z_d^2, which halves the products.
    """

    def __init__(self, mu: Tensor, logvar: Tensor, group: int, dtype: torch.dtype, order: bool = False) -> None:
        n, d = mu.shape
        pad = (-n) % group
        mu, logvar = mu.detach(), logvar.detach()
        shared = _shared_row(logvar)
        # position -> component (`order`) and component -> position (`position`); None: index order.
        self.order: Tensor | None = None
        self.position: Tensor | None = None
        # One column per group (the component nearest the group's centroid), ordered constants only.
        self.representatives: Tensor | None = None
        if order and n > group:
            # Spatial order: a point's nearby components fill few groups, so the locating pass
            # finds few candidate groups. Distances scaled by the (typical) precisions.
            scale = torch.exp(-0.5 * (shared if shared is not None else logvar.mean(0)))
            self.order = spatial_order(mu * scale, group)
            self.position = torch.empty_like(self.order)
            self.position[self.order] = torch.arange(n, device=mu.device)
            mu = mu[self.order]
            if shared is None:
                logvar = logvar[self.order]
            full = n // group * group
            leaves = (mu[:full] * scale).float().view(-1, group, d)
            central = (leaves - leaves.mean(1, keepdim=True)).square().sum(-1).argmin(1)
            self.representatives = torch.arange(0, n, group, device=mu.device)  # a partial last group: its first
            self.representatives[: full // group] += central
        mu64 = torch.cat([mu.double(), mu.new_zeros(pad, d, dtype=torch.float64)])
        if shared is not None:  # the [D] constants once, not N times
            prec_row = torch.exp(-shared.double())
            self.shared_prec = prec_row
            prec64 = prec_row.expand(n + pad, d)
            h64 = (-0.5 * (d * LOG_2PI + shared.double().sum())).expand(n)
            quad = mu64.square() @ prec_row  # sum_d prec mu^2
            self.bound_b = (mu64.abs() @ prec_row)[:n]
        else:
            logvar64 = logvar.double()
            self.shared_prec = None
            prec64 = torch.cat([torch.exp(-logvar64), logvar64.new_zeros(pad, d)])
            h64 = -0.5 * (d * LOG_2PI + logvar64.sum(-1))
            quad = (prec64 * mu64.square()).sum(-1)
            self.bound_b = (prec64 * mu64.abs()).sum(-1)[:n]
        h64 = torch.cat([h64, h64.new_full((pad,), -math.inf)])  # log normalizer of each component
        self.n, self.d, self.group, self.n_padded = n, d, group, n + pad
        self.mu64, self.prec64, self.h64 = mu64, prec64, h64
        c64 = h64 - 0.5 * quad
        prec_mu64 = prec64 * mu64
        # y = the components' side of the product, with c_n as its last column (padding: -inf).
        side = prec_mu64 if self.shared_prec is not None else torch.cat([-0.5 * prec64, prec_mu64], dim=-1)
        self.y64 = torch.cat([side, c64[:, None]], dim=-1)  # [Np, 2D + 1] or [Np, D + 1]
        self.y = self.y64.to(dtype)
        # For the locating error bound: sum_d prec (t + |mu|)^2 + |c| = t^2 A + 2 t B + C.
        self.bound_a = prec64[:n].sum(-1)
        self.bound_c = quad[:n] + c64[:n].abs()
        self.representatives_y64 = None if self.representatives is None else self.y64[self.representatives]

    def row_floor(self, x64: Tensor, exclude: Tensor | None) -> Tensor | None:
        """`[M]` float64: a lower bound on each row's largest entry (without the row term), or None.

        The best of one entry per group (`representatives`), by the float64 product; a row's
        excluded column counts nothing. With ordered constants the blocks come in spatial
        order, so the maximum over the blocks before a block can be far below the row's own:
        the floor lets every block locate against the row's whole neighbourhood instead.
        """
        if self.representatives_y64 is None:
            return None
        floor = x64.new_full((x64.shape[0],), -math.inf)
        piece = max(1, FLOOR_ELEMENTS // max(x64.shape[0], 1))  # at most FLOOR_ELEMENTS values live
        for start in range(0, self.representatives.shape[0], piece):
            values = self._representative_entries(x64, exclude, slice(start, start + piece))  # [M, piece]
            floor = torch.maximum(floor, values.amax(-1))
        return floor

    def reach(self, x64: Tensor, exclude: Tensor | None, margin: float) -> float:
        """The fraction of groups within `margin` of some of a sample of the rows (ordered constants).

        Measured through the representatives on `REACH_ROWS` rows (every k-th), against each
        row's floor: an estimate, from below, of the union of a row chunk's candidate groups,
        which tells broad rows (every entry counts) apart cheaply.
        """
        step = -(-x64.shape[0] // REACH_ROWS)
        ex = None if exclude is None else exclude[::step]
        values = self._representative_entries(x64[::step], ex, slice(None))  # [rows, groups]
        return float((values >= values.amax(-1, keepdim=True) - margin).any(0).double().mean())

    def _representative_entries(self, x64: Tensor, exclude: Tensor | None, groups: slice) -> Tensor:
        """`[M, G]` float64: the rows' entries (without the row term) at the representatives of
        `groups`; a row's excluded column is -inf."""
        values = x64 @ self.representatives_y64[groups].T
        if exclude is not None:
            values.masked_fill_(self.representatives[groups] == exclude[:, None], -math.inf)
        return values

    def local_exclude(self, exclude: Tensor | None) -> Tensor | None:
        """Leave-one-out indices (component numbers; negative: none) as columns of these constants.

        An index outside [0, N) leaves nothing out (it matched only padding columns before).
        """
        if exclude is None or self.position is None:
            return exclude
        valid = (exclude >= 0) & (exclude < self.n)
        return torch.where(valid, self.position[exclude.clamp(0, self.n - 1)], -1)

    def features(self, z: Tensor) -> Tensor:
        """The points' side of the product, `[M, 2D + 1]` (`[M, D + 1]` with shared variances): y's
        columns, the last one (c) taken by a column of ones."""
        ones = z.new_ones(z.shape[0], 1)
        return torch.cat([z, ones] if self.shared_prec is not None else [z.square(), z, ones], dim=-1)

    def row_term(self, z64: Tensor) -> Tensor:
        """`[M]` float64: what the product leaves out of each row (0 unless the variances are shared)."""
        if self.shared_prec is None:
            return z64.new_zeros(z64.shape[0])
        return -0.5 * (z64.square() @ self.shared_prec)

    def weighted_sums(self, e: Tensor, span: tuple[int, int] | Tensor, total: Tensor) -> Tensor:
        """`[M, K + 1]` float64: e @ y over the components `span`, and `total`, e's row sums.

        With e = the exponentiated entries of a dense block, these are all the backward pass
        needs of it (`gradient_from_sums`): sum_n e_mn prec_n and sum_n e_mn prec_n mu_n.
        `span` is a range (n0, n1) of columns or, for a block over a union of candidate
        groups, their indices. The product over a range runs in e's dtype (z's, for float32
        points): such a block's components are broad, none sharp enough for float32 rounding
        of the weights to matter to a gradient. Over gathered columns (which may be sharper)
        it runs in float64. `total` is the pass's own float64 row sum of the block.
        """
        if isinstance(span, Tensor):
            y = self.y64.index_select(0, span)[:, :-1]
            return torch.cat([e.double() @ y, total[:, None]], dim=-1)
        y = (self.y if e.dtype == self.y.dtype else self.y64)[span[0] : span[1], :-1]
        return torch.cat([(e @ y).double(), total[:, None]], dim=-1)

    def gradient_from_sums(self, z: Tensor, sums: Tensor) -> Tensor:
        """sum_n w_mn prec_n (z_m - mu_n) from `weighted_sums` of the weights w, `[M, D]`."""
        wy, total = sums[:, :-1], sums[:, -1:]
        if self.shared_prec is None:  # y = [-prec/2, prec mu]
            return -2.0 * z * wy[:, : self.d] - wy[:, self.d :]
        return z * self.shared_prec.to(sums.dtype) * total - wy  # y = prec mu


@dataclasses.dataclass
class _Entries:
    """Exactly computed log densities of one block.

    Sparse (`dense=False`): `values[k, j]` = log N(z[row_start + rows[k]]; component cols[k, j]).

    Dense (`dense=True`): every row of the chunk (`rows`) against the block's components
    `span` = (n0, n1), exponentiated: log N(z[row_start + rows[k]]; n0 + j) =
    log(values[k, j]) + shift[k], with `values` in [0, 1] (the logsumexp's own scratch, in
    a buffer the next block reuses) and `total` their row sums. Or, over a union of
    candidate groups, `span` = the `[Nb]` int64 columns: column j is component span[j].
    """

    row_start: int
    rows: Tensor  # [K] int64, local to the row chunk
    values: Tensor  # [K, G] float64, or [K, Nb] exponentiated
    cols: Tensor | None = None  # [K, G] int64, sparse only
    span: tuple[int, int] | Tensor | None = None  # dense only
    shift: Tensor | None = None  # [K] float64, dense only
    total: Tensor | None = None  # [K] float64, dense only

    @property
    def dense(self) -> bool:
        return self.span is not None


#: Columns of a row chunk's first block, in groups: narrow, so that a chunk where every entry
#: counts (broad posteriors) finds out cheaply and computes the rest densely without locating.
FIRST_BLOCK_GROUPS = 128

#: Entries of a dense block (float64): small enough (8 MiB) to stay in cache while the block
#: is exponentiated and summed.
DENSE_BLOCK_ELEMENTS = 2**20


@dataclasses.dataclass(frozen=True)
class _BlockProfile:
    """How a device walks the M x N matrix (the result never depends on it).

    A CPU wants cache-sized blocks (the caller's `chunk_size x block_size`, 16 MiB) and a
    narrow first block. A GPU wants few, large blocks: each block costs a fixed sequence of
    kernel launches and two host synchronizations (the located entries' count), so
    hundreds of small blocks leave it idle; one block per row chunk across all N
    (`min_block_elements`, 512 MiB in float32) does the same work in a few launches.
    """

    min_block_elements: int  # a block is widened to at least this many entries
    first_block_groups: int | None  # width of a row chunk's first block (None: a full block)
    dense_block_elements: int  # entries of a dense float64 block


_CPU_BLOCKS = _BlockProfile(min_block_elements=0, first_block_groups=FIRST_BLOCK_GROUPS, dense_block_elements=0)
_CUDA_BLOCKS = _BlockProfile(min_block_elements=1 << 27, first_block_groups=None, dense_block_elements=1 << 26)


def _block_profile(device: torch.device) -> _BlockProfile:
    """The walk for `device` (a CPU's `dense_block_elements` is read from `DENSE_BLOCK_ELEMENTS`)."""
    if device.type == "cuda":
        return _CUDA_BLOCKS
    return dataclasses.replace(_CPU_BLOCKS, dense_block_elements=DENSE_BLOCK_ELEMENTS)


#: A located block's entries are computed densely over the union of its candidate groups (a
#: float64 product, `_union_columns`) instead of one by one where that union (all the chunk's
#: rows) has fewer than this many entries per entry of the rows' own candidate groups, which
#: bound the located entries: a located entry gathers and reduces D-vectors, a dense one is a
#: share of a matrix product and an exp (on the exemplar prior's case, D = 40, a CPU: 8, 32
#: and "always" within ~10% of each other; 1, "never", ~2x slower).
SPARSE_ENTRY_COST = 8.0

#: Nats: the float64 matrix product's worst-case rounding error (the locating bound in float64)
#: up to which a block's union of candidate groups may replace its exact recomputation; above it
#: (very sharp components) the entries stay on the direct formula.
UNION_DENSE_TOLERANCE = 1e-9

#: With spatially ordered components a block says little about the rest of its row chunk (the
#: candidates of nearby points crowd into a few blocks): only a block with more than this
#: fraction of candidate (group, point) pairs makes the rest of the chunk dense without locating.
#: The other blocks above `dense_fraction` are computed densely over their candidate groups.
REST_DENSE_FRACTION = 0.9

#: With ordered components, a row chunk whose rows reach more than this fraction of the groups
#: through the groups' representatives (`_Components.reach`) is computed densely throughout,
#: without locating: most groups would be candidates anyway (broad posteriors).
DENSE_REACH = 0.5


def _mixture_pass(
    z: Tensor,
    comps: _Components,
    exclude: Tensor | None,
    chunk_size: int,
    block_size: int,
    dense_fraction: float,
    visit: Callable[[_Entries], None] | None = None,
) -> Tensor:
    """Walk the M x N matrix in blocks of `block_size x chunk_size`; return the float64 logsumexp `[M]`.

    `exclude` holds columns of `comps` (`_Components.local_exclude`). `visit`, if given, sees
    every block's exact entries (the backward pass uses them); a dense block's exponentiated
    values live in a buffer the next block reuses.
    Memory: one `block_size x chunk_size` block in z's dtype (widened to the device's
    `_BlockProfile.min_block_elements`: 2^27 on a GPU) plus the exactly recomputed entries,
    at most `dense_fraction` of the block (their `[D]` float64 differences formed in pieces
    of `RECOMPUTE_ELEMENTS`), or one dense float64 block of at most as many entries as the
    located block and at most the profile's dense block (`DENSE_BLOCK_ELEMENTS` on a CPU).

    A row chunk's first block is `FIRST_BLOCK_GROUPS` groups wide on a CPU. Each located block
    is then computed one of three ways: its located entries one by one (the direct formula);
    densely over the union of its candidate groups, where that is cheaper and the float64
    product is accurate enough (`SPARSE_ENTRY_COST`, `UNION_DENSE_TOLERANCE`), or where more
    than `dense_fraction` of it qualifies but the components are spatially ordered; or, where
    more than `dense_fraction` qualifies (`REST_DENSE_FRACTION` for ordered components), densely
    along with the rest of the chunk, without locating, in blocks small enough to stay in cache
    while they are summed. Every way gives the same result to rounding: the entries left out are
    below the margin. The walk is deterministic, so the backward pass can repeat it.
    """
    m, d = z.shape
    group = comps.group
    margin = refine_margin(comps.n)
    profile = _block_profile(z.device)
    # The memory bound is the block's element count: a short row chunk (a training batch
    # against all N posteriors) takes correspondingly wider blocks, since every block pays
    # fixed per-block costs that dominate thin blocks. A GPU's blocks are wider still.
    rows_per_chunk = max(min(m, chunk_size), 1)
    elements = max(chunk_size * block_size, profile.min_block_elements)
    block_size = max(block_size, -(-elements // rows_per_chunk // group) * group)
    first_width = block_size if profile.first_block_groups is None else profile.first_block_groups * group
    dense_elements = max(profile.dense_block_elements, 1)
    dense_width = max(group, min(block_size, dense_elements // rows_per_chunk // group * group))
    rest_fraction = dense_fraction if comps.order is None else max(dense_fraction, REST_DENSE_FRACTION)
    # Which chunks the float32 product cannot locate, and which the float64 product computes to
    # `UNION_DENSE_TOLERANCE`: one host read for all of them.
    bounds = _locating_error_bounds(z, comps, chunk_size)
    locate64 = [bound > margin / 2 for bound in bounds]
    to64 = torch.finfo(torch.float64).eps / torch.finfo(z.dtype).eps
    union_ok = [bound * to64 <= UNION_DENSE_TOLERANCE for bound in bounds]
    out = torch.empty(m, dtype=torch.float64, device=z.device)
    for r0 in range(0, m, chunk_size):
        zc = z[r0 : r0 + chunk_size].detach()
        mc = zc.shape[0]
        z64 = zc.double()
        row64 = comps.row_term(z64)  # [mc]: the products below leave it out
        y = comps.y64 if locate64[r0 // chunk_size] else comps.y
        xt = comps.features(z64 if y is comps.y64 else zc).T.contiguous()  # [2D + 1 or D + 1, mc]
        row = row64.to(y.dtype)
        ex = None
        if exclude is not None:
            ex = exclude[r0 : r0 + chunk_size]
            ex = torch.where(ex >= 0, ex, torch.full_like(ex, -(1 << 62)))  # never matches a column
        running = torch.full((mc,), -math.inf, dtype=torch.float64, device=z.device)
        # Blocks are written into buffers reused across the row's blocks: allocating a
        # fresh multi-MiB tensor per block costs more (page faults) than the arithmetic.
        approx_buf: Tensor | None = None
        dense_buf: Tensor | None = None
        x64 = None if comps.representatives is None else comps.features(z64)
        floor = None
        dense = False
        if x64 is not None:
            dense = comps.reach(x64, ex, margin) > DENSE_REACH  # broad rows: the chunk densely, without locating
            floor = None if dense else comps.row_floor(x64, ex).to(y.dtype)
        n0 = 0
        while n0 < comps.n_padded and not (dense and n0 >= comps.n):  # dense blocks skip the padding
            width = dense_width if dense else (min(block_size, first_width) if n0 == 0 else block_size)
            n1 = min(n0 + width, comps.n_padded)
            columns = None  # the block's candidate groups' columns, where they are computed densely
            if not dense:
                if approx_buf is None:
                    approx_buf = torch.empty(block_size * mc, dtype=y.dtype, device=z.device)
                # Components along the first axis, so the group maximum reduces over a
                # non-innermost axis (vectorized along the points). The row term is left out;
                # c_n is the product's last column: a broadcast bias would be copied into the
                # block first (beta = 0 with the block as input copies nothing).
                approx = approx_buf[: (n1 - n0) * mc].view(n1 - n0, mc)
                approx = torch.addmm(approx, y[n0:n1], xt, beta=0, out=approx)
                if ex is not None:
                    _exclude_in_block(approx, ex - n0, components_first=True)
                grouped = approx.view(-1, group, mc)
                group_max = grouped.amax(1)  # [ng, mc]
                top = torch.maximum(running.to(approx.dtype) - row, group_max.amax(0))
                threshold = (top if floor is None else torch.maximum(top, floor)) - margin  # [mc]
                candidate = group_max >= threshold
                cand_groups, cand_rows = candidate.nonzero().unbind(-1)
                pairs = cand_groups.shape[0] * group
                if pairs > dense_fraction * approx.numel():
                    dense = pairs > rest_fraction * approx.numel()
                    if not dense:
                        columns = _union_columns(candidate, n0, group, comps.n)
                elif union_ok[r0 // chunk_size] and pairs:
                    # The union's entries against the candidate groups' (which bound the located ones).
                    union = int(candidate.any(1).sum()) * group * mc
                    if union < SPARSE_ENTRY_COST * pairs:
                        columns = _union_columns(candidate, n0, group, comps.n)
                if not dense and columns is None:
                    near = grouped[cand_groups, :, cand_rows] >= threshold[cand_rows][:, None]  # [K, G]
                    k, j = near.nonzero().unbind(-1)
                    rows = cand_rows[k]
                    cols = (n0 + cand_groups[k] * group + j)[:, None]  # [K', 1]
                    dense = rows.shape[0] > dense_fraction * approx.numel()
            if dense or columns is not None:
                if dense_buf is None:
                    dense_buf = torch.empty(mc * dense_width, dtype=torch.float64, device=z.device)
                    x64 = comps.features(z64) if x64 is None else x64
                if dense:
                    n1 = min(n1, n0 + dense_width)  # a located block found dense: its rest comes next
                    pieces = [(n0, min(n1, comps.n))]
                else:
                    pieces = list(columns.split(dense_width)) if columns.numel() else []
                for span in pieces:
                    values, shift, total = _dense_entries(x64, comps, span, ex, dense_buf)
                    shift = shift + row64
                    running = torch.logaddexp(running, shift + total.log())
                    if visit is not None:
                        every_row = torch.arange(mc, device=z.device)
                        visit(_Entries(r0, every_row, values, span=span, shift=shift, total=total))
            else:
                values = _exact_entries(z64, comps, rows, cols)  # [K', 1]
                if ex is not None:
                    values = values.masked_fill(cols == ex[rows][:, None], -math.inf)
                running = _merge_rows(running, rows, values)
                if visit is not None:
                    visit(_Entries(r0, rows, values, cols=cols))
            n0 = n1
        out[r0 : r0 + mc] = running
    return out


def _union_columns(candidate: Tensor, n0: int, group: int, n: int) -> Tensor:
    """The columns, ascending, of every group some row of a block (first column `n0`) may need.

    `candidate`: `[groups, rows]` bool, a group's candidacy per row. Padding columns (from
    `n` on, all in the last group) are left out.
    """
    groups = candidate.any(1).nonzero().squeeze(1)
    columns = (n0 + groups[:, None] * group + torch.arange(group, device=candidate.device)).reshape(-1)
    return columns[columns < n]


def _dense_entries(
    x64: Tensor, comps: _Components, span: tuple[int, int] | Tensor, ex: Tensor | None, buf: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every row of a chunk against the components `span` (a range, or columns), by the float64 product.

    Returns (values, shift, total): values = exp(entry - shift) in `buf` (without the row term),
    total their row sums. The excluded column `ex` of a row (if among them) counts nothing.
    """
    m = x64.shape[0]
    if isinstance(span, Tensor):
        y = comps.y64.index_select(0, span)
        local = None
        if ex is not None:
            at = torch.searchsorted(span, ex).clamp(max=span.shape[0] - 1)
            local = torch.where(span[at] == ex, at, -1)
    else:
        y = comps.y64[span[0] : span[1]]
        local = None if ex is None else ex - span[0]
    # c_n is the product's last column (no broadcast bias to copy in). Without the row term.
    values = torch.mm(x64, y.T, out=buf[: m * y.shape[0]].view(m, y.shape[0]))
    if local is not None:
        _exclude_in_block(values, local, components_first=False)
    top = values.amax(-1)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = values.sub_(shift[:, None]).exp_().sum(-1)
    return values, shift, total


#: float64 values of the direct formula's temporaries ([entries, D]) computed at once: a GPU's
#: wide blocks can locate tens of millions of entries, recomputed in pieces of this size.
RECOMPUTE_ELEMENTS = 1 << 24


def _exact_entries(z64: Tensor, comps: _Components, rows: Tensor, cols: Tensor) -> Tensor:
    """log N(z64[rows[k]]; component cols[k]) by the direct formula in float64, `[K, 1]` for cols `[K, 1]`."""
    piece = max(1, RECOMPUTE_ELEMENTS // max(comps.d, 1))
    out = []
    for i in range(0, rows.shape[0], piece):
        r, c = rows[i : i + piece], cols[i : i + piece]
        diff = z64[r][:, None, :] - comps.mu64[c]  # [k, 1, D]
        out.append(comps.h64[c] - 0.5 * (diff.square() * comps.prec64[c]).sum(-1))
    return out[0] if len(out) == 1 else torch.cat(out) if out else z64.new_zeros(0, 1)


def _locating_error_bounds(z: Tensor, comps: _Components, chunk_size: int) -> list[float]:
    """Worst-case error (nats) of the locating matrix product, in z's dtype, for each row chunk's points.

    Computed for every chunk at once and read in one host synchronization, not one per chunk.
    """
    n_chunks = -(-z.shape[0] // chunk_size)
    if comps.bound_a.numel() == 0:
        return [0.0] * n_chunks
    eps = torch.finfo(z.dtype).eps
    if n_chunks == 1:  # a training batch: as few operations as possible
        t = z.detach().abs().amax().double().reshape(1, 1)
    else:
        a = z.detach().abs().amax(-1)
        pad = n_chunks * chunk_size - a.shape[0]
        t = torch.cat([a, a.new_zeros(pad)]).view(n_chunks, chunk_size).amax(-1).double()[:, None]  # [chunks, 1]
    step = max(1, (1 << 22) // comps.bound_a.numel())  # chunks per slice: at most 4M values live
    worst = torch.cat(
        [(tt * tt * comps.bound_a + 2 * tt * comps.bound_b + comps.bound_c).amax(-1) for tt in t.split(step)]
    )
    return ((2 * comps.d + 1) * eps * worst).tolist()


def _exclude_in_block(block: Tensor, local: Tensor, components_first: bool) -> None:
    """Set each row's excluded component to -inf in a block, in place, without a host synchronization.

    `local[i]` is row i's excluded component relative to the block's first column; rows whose
    excluded component lies outside the block are written back unchanged.
    """
    width = block.shape[0] if components_first else block.shape[1]
    inside = (local >= 0) & (local < width)
    cols = local.clamp(0, width - 1)
    rows = torch.arange(local.shape[0], device=block.device)
    index = (cols, rows) if components_first else (rows, cols)
    block[index] = torch.where(inside, torch.full_like(block[index], -math.inf), block[index])


def _merge_rows(running: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """logaddexp each row of `running` with the logsumexp of its entries in `values` (rows may repeat)."""
    row_max = torch.full_like(running, -math.inf).scatter_reduce(0, rows, values.amax(-1), "amax")
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = torch.zeros_like(running).index_add_(0, rows, torch.exp(values - safe_max[rows][:, None]).sum(-1))
    return torch.logaddexp(running, safe_max + torch.log(sums))


#: Bytes of exact entries the forward pass may keep for the backward pass (a batch of 100
#: against N = 50,000 posteriors keeps at most 40 MiB, when every entry counts, and a few MiB
#: once the posteriors are sharp); beyond it the backward pass recomputes them.
SAVED_ENTRIES_BYTES = 64 * 2**20


class _DenseSums:
    """The backward pass's share of a row chunk's dense blocks, summed during the forward pass.

    For the chunk's rows, `sums` = sum over its dense entries of exp(entry - ref) [y_n, 1]
    (`_Components.weighted_sums`), rescaled as `ref` (per row) grows: a dense block's
    exponentials are used while they are in cache, and never stored.
    """

    def __init__(self, row_start: int) -> None:
        self.row_start = row_start
        self.sums: Tensor | None = None
        self.ref: Tensor | None = None

    def add(self, e: _Entries, comps: _Components, dtype: torch.dtype) -> None:
        values = e.values if isinstance(e.span, Tensor) else e.values.to(dtype)  # gathered columns: float64
        part = comps.weighted_sums(values, e.span, e.total)
        if self.sums is None:
            self.sums, self.ref = part, e.shift
            return
        ref = torch.maximum(self.ref, e.shift)
        self.sums = self.sums * torch.exp(self.ref - ref)[:, None] + part * torch.exp(e.shift - ref)[:, None]
        self.ref = ref


class _MixtureLogSumExp(torch.autograd.Function):
    """The kernel with a backward pass w.r.t. z.

    d/dz_m logsumexp_n log N(z_m; mu_n, var_n) = -sum_n w_mn (z_m - mu_n) / var_n with w the
    softmax over n; the dropped entries carry weight < 1e-12, and the kept ones are exact.
    When z needs a gradient, the forward pass keeps the entries it computed sparsely (up to
    `SAVED_ENTRIES_BYTES`) and sums the dense blocks' weighted components as it goes
    (`_DenseSums`); past the budget the backward pass walks the matrix again and recomputes
    the same entries (the walk is deterministic).
    """

    @staticmethod
    def forward(ctx, z, comps, exclude, chunk_size, block_size, dense_fraction, out_dtype):
        kept: list[_Entries] | None = [] if ctx.needs_input_grad[0] else None
        dense_sums: dict[int, _DenseSums] = {}
        room = SAVED_ENTRIES_BYTES

        def keep(e: _Entries) -> None:
            nonlocal kept, room
            if kept is None:
                return
            if e.dense:
                dense_sums.setdefault(e.row_start, _DenseSums(e.row_start)).add(e, comps, z.dtype)
                return
            room -= 8 * (e.values.numel() + e.cols.numel() + e.rows.numel())
            if room < 0:
                kept = None  # over budget: the backward pass recomputes
                return
            kept.append(e)

        out = _mixture_pass(
            z, comps, exclude, chunk_size, block_size, dense_fraction, visit=keep if kept is not None else None
        )
        ctx.save_for_backward(z, exclude, out)
        ctx.comps = comps
        ctx.kept = None if kept is None else (kept, list(dense_sums.values()))
        ctx.settings = (chunk_size, block_size, dense_fraction)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, exclude, out = ctx.saved_tensors
        chunk_size, block_size, dense_fraction = ctx.settings
        comps = ctx.comps
        z64 = z.detach().double()
        grad = torch.zeros_like(z64)

        def visit(e: _Entries) -> None:
            rows = e.row_start + e.rows
            if e.dense:
                sums = comps.weighted_sums(e.values, e.span, e.total) * torch.exp(e.shift - out[rows])[:, None]
                g = comps.gradient_from_sums(z64[rows], sums)
            else:
                w = torch.exp(e.values - out[rows][:, None])  # [K, G]
                g = ((z64[rows][:, None, :] - comps.mu64[e.cols]) * comps.prec64[e.cols] * w[..., None]).sum(1)
            grad.index_add_(0, rows, -g)

        with torch.no_grad():
            if ctx.kept is not None:
                sparse, dense = ctx.kept
                for e in sparse:
                    visit(e)
                for s in dense:
                    rows = slice(s.row_start, s.row_start + s.sums.shape[0])
                    sums = s.sums * torch.exp(s.ref - out[rows])[:, None]
                    grad[rows] -= comps.gradient_from_sums(z64[rows], sums)
            else:
                _mixture_pass(z, comps, exclude, chunk_size, block_size, dense_fraction, visit=visit)
        grad_z = (grad * grad_out.double()[:, None]).to(z.dtype)
        return grad_z, None, None, None, None, None, None


def gaussian_mixture_logsumexp(
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    exclude: Tensor | None = None,
    chunk_size: int = 2048,
    *,
    block_size: int = 2048,
    group: int = DEFAULT_GROUP,
    dense_fraction: float = 0.25,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """logsumexp over components n of log N(z_m; mu_n, diag(exp(logvar_n))), exactly and fast.

    The hot spot of the aggregate-posterior prior and of the surgery evaluator. A float32
    (or float64) matrix product locates, per row, the components within `refine_margin(N)`
    nats of the row's maximum; those entries are recomputed exactly by the direct formula
    in float64 and summed in float64, the rest (< 1e-12 of the mass) are dropped. Accurate
    to ~1e-9 nats (with `out_dtype=torch.float64`) whatever the posteriors' sharpness,
    where the bare float32 matrix product loses 1e-3 nats and more. See the comment above
    `refine_margin` for the method and its fallback for broad posteriors.

    The components' float64 constants are computed on every call; a caller evaluating the
    same components many times (a training loop against N posteriors) holds them in a
    `DiagonalGaussianMixture`, which computes them once (`bench/mixture_kernel.py`: M = 100
    against N = 50,000, D = 40, forward and backward in ~7 ms on 2 CPU cores for trained
    posteriors, ~25 ms for broad ones, where every entry counts). For many points against
    many components (`_worth_ordering`: M >= `ORDER_MIN_ROWS`, N >= `ORDER_MIN_COMPONENTS`,
    unless the components are broad) the constants are put in spatial order first
    (`spatial_order`, ~0.15 s for 50,000 x 40 on one core), so that a point's candidates fill
    few groups (see the comment above `refine_margin`).

    Differentiable w.r.t. `z`, exactly (from the kept entries and the dense blocks' sums, or
    recomputed block by block). If `mu` or `logvar` require gradients a plain chunked direct
    formula is used instead (slow, differentiable in everything).

    Memory is bounded whatever M and N are: one `chunk_size x block_size` block in z's
    dtype (16 MiB at the defaults; on a GPU at least 2^27 entries, 512 MiB, see
    `_BlockProfile`) or one dense float64 block of at most as many entries (and at most
    `DENSE_BLOCK_ELEMENTS`, 8 MiB, on a CPU; 2^26 entries on a GPU), the exactly recomputed
    entries of one block (at most `dense_fraction` of it, their `[D]` float64 differences
    in pieces of `RECOMPUTE_ELEMENTS`, 128 MiB), plus O(M + N D) float64 for the component
    constants and the result. The full M x N matrix is never formed. On CUDA the matrix
    products run with TF32 off (restored afterwards), and the walk makes few host
    synchronizations (two per block, one per call for the locating error bounds).

    Args:
        z: points, `[M, D]` (float32 or float64).
        mu: component means, `[N, D]`.
        logvar: component log variances, `[N, D]`.
        exclude: optional `[M]` int64; row m leaves component `exclude[m]` out (a
            negative value leaves nothing out).
        chunk_size: rows (points) per block.
        block_size: columns (components) per block; rounded up to a multiple of `group`.
        group: components per group in the locating step (a tuning knob).
        dense_fraction: above this fraction of qualifying groups, a block is recomputed
            whole in float64.
        out_dtype: dtype of the result (default z's dtype). The sum is formed in
            float64; `torch.float64` keeps all of it (a float32 result rounds a value
            of -1e4 nats to ~1e-3).

    Returns:
        `[M]` in `out_dtype`. Subtract `log N` (or `log(N - 1)` with `exclude`) for the
        mixture's log density. A row with every component excluded gives -inf.

    References:
        Hoffman & Johnson, "ELBO surgery", 2016 (the aggregate posterior q(z)).
    """
    if z.dim() != 2 or mu.dim() != 2 or mu.shape != logvar.shape or z.shape[1] != mu.shape[1]:
        raise ValueError(
            f"gaussian_mixture_logsumexp expects z [M, D], mu and logvar [N, D]; got {tuple(z.shape)}, "
            f"{tuple(mu.shape)}, {tuple(logvar.shape)}"
        )
    if exclude is not None and exclude.shape != z.shape[:1]:
        raise ValueError(f"exclude must have shape [M] = [{z.shape[0]}], got {tuple(exclude.shape)}")
    if chunk_size <= 0 or block_size <= 0 or group <= 0:
        raise ValueError(f"chunk_size, block_size and group must be positive; got {chunk_size}, {block_size}, {group}")
    if z.shape[0] == 0:
        return z.new_zeros(0, dtype=out_dtype)
    if mu.shape[0] == 0:
        return z.new_full((z.shape[0],), -math.inf, dtype=out_dtype)
    mu, logvar = mu.to(z.device), logvar.to(z.device)
    if exclude is not None:
        exclude = exclude.to(z.device, torch.int64)
    if torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad):
        return _mixture_logsumexp_direct(z, mu, logvar, exclude, chunk_size).to(out_dtype or z.dtype)
    if mu.shape[1] == 1 and not (torch.is_grad_enabled() and z.requires_grad):
        return _mixture_logsumexp_1d(z, mu, logvar, exclude, chunk_size * block_size).to(out_dtype or z.dtype)
    comps = _Components(mu, logvar, group, z.dtype, order=_worth_ordering(z, mu, logvar))
    return _kernel(z, comps, exclude, chunk_size, block_size, dense_fraction, out_dtype or z.dtype)


def _kernel(
    z: Tensor,
    comps: _Components,
    exclude: Tensor | None,
    chunk_size: int,
    block_size: int,
    dense_fraction: float,
    out_dtype: torch.dtype,
) -> Tensor:
    block_size = -(-block_size // comps.group) * comps.group
    exclude = comps.local_exclude(exclude)
    with exact_float32_matmul(z.device):
        return _MixtureLogSumExp.apply(z, comps, exclude, chunk_size, block_size, dense_fraction, out_dtype)


@torch.no_grad()
def _mixture_logsumexp_1d(z: Tensor, mu: Tensor, logvar: Tensor, exclude: Tensor | None, max_elements: int) -> Tensor:
    """One dimension: the direct formula h_n - prec_n (z - mu_n)^2 / 2 over every entry, chunked over rows.

    In one dimension the matrix product saves nothing and nearly every entry matters for
    broad (collapsed) dimensions, so every entry is computed, in the input dtype. The
    direct form has no cancellation: (z - mu) is exact to half an ulp of itself, so each
    entry is right to a few ulps of its value (float32: ~1e-6 nats where it matters).
    Memory: at most `max_elements` entries live at once.
    """
    prec = torch.exp(-logvar[:, 0])
    neg_half_prec = -0.5 * prec
    h = (-0.5 * (LOG_2PI + logvar[:, 0].double())).to(z.dtype)
    # ~1M entries per chunk measured fastest on a 2-core CPU (4 MiB in float32); never 1 row
    # at a time (torch's single-row logsumexp is far slower per entry).
    rows = max(8, min(max_elements, 1 << 20) // mu.shape[0])
    cols = torch.arange(mu.shape[0], device=z.device)
    out = []
    for start in range(0, z.shape[0], rows):
        lp = z[start : start + rows] - mu[:, 0]  # [rows, N]
        lp.square_().mul_(neg_half_prec).add_(h)
        if exclude is not None:
            lp.masked_fill_(cols == exclude[start : start + rows, None], -math.inf)
        out.append(torch.logsumexp(lp, dim=-1))
    return torch.cat(out)


def _mixture_logsumexp_direct(z: Tensor, mu: Tensor, logvar: Tensor, exclude: Tensor | None, chunk_size: int) -> Tensor:
    """The direct formula, chunked over rows (`chunk x N x D` live), differentiable in every input."""
    rows = max(1, chunk_size // max(1, mu.shape[1]))
    out = []
    for start in range(0, z.shape[0], rows):
        lp = diagonal_normal_log_prob(z[start : start + rows, None, :], mu, logvar)
        if exclude is not None:
            ex = exclude[start : start + rows]
            lp = lp.masked_fill(torch.arange(mu.shape[0], device=z.device) == ex[:, None], -math.inf)
        out.append(torch.logsumexp(lp, dim=-1))
    return torch.cat(out)


class DiagonalGaussianMixture:
    """p(z) = sum_k w_k N(z; mu_k, diag(exp(logvar_k))), normalized, with leave-one-out.

    The one mixture density of priorlab: the mixture, VampPrior, aggregate and exemplar
    priors and the surgery's aggregate posterior all evaluate through it. It picks its path:

    * components that need gradients (learned means, exemplars encoded inside the training
      graph), weighted components, or few of them (`small_components`): float64 matrix
      products, differentiable in everything (`small_gaussian_mixture_log_prob`);
    * many fixed, equally weighted components (N posteriors): the exact kernel
      (`gaussian_mixture_logsumexp`'s), whose float64 constants this object computes once,
      on first use per dtype, and keeps: in index order for calls of few points (a training
      batch), in spatial order for calls of many (`ORDER_MIN_ROWS`: the surgery's log q(z),
      importance sampling's draws). Build a new mixture when the components change.

    Args:
        mu: means `[K, D]`.
        logvar: log variances `[K, D]`.
        log_weights: `[K]` log weights, normalized; None: equal weights 1/K.
        small_components: up to this many components take the matrix-product path.
        chunk_size, block_size: the kernel's block (memory: chunk x block floats).
    """

    def __init__(
        self,
        mu: Tensor,
        logvar: Tensor,
        log_weights: Tensor | None = None,
        *,
        small_components: int = 1024,
        chunk_size: int = 2048,
        block_size: int = 2048,
    ) -> None:
        if mu.dim() != 2 or mu.shape != logvar.shape or mu.shape[0] == 0:
            raise ValueError(
                f"DiagonalGaussianMixture expects mu and logvar of one shape [K, D], K >= 1; "
                f"got {tuple(mu.shape)} and {tuple(logvar.shape)}"
            )
        if log_weights is not None and log_weights.shape != mu.shape[:1]:
            raise ValueError(f"log_weights must have shape [K] = [{mu.shape[0]}], got {tuple(log_weights.shape)}")
        self.mu, self.logvar, self.log_weights = mu, logvar, log_weights
        self.small_components = small_components
        self.chunk_size, self.block_size = chunk_size, block_size
        self._constants: dict[tuple[torch.dtype, bool], _Components] = {}  # by dtype and order

    @property
    def num_components(self) -> int:
        return self.mu.shape[0]

    def _needs_grad(self) -> bool:
        pieces = (self.mu, self.logvar, self.log_weights)
        return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in pieces)

    def log_prob(self, z: Tensor, exclude: Tensor | None = None, *, out_dtype: torch.dtype | None = None) -> Tensor:
        """log p(z), `[...]` for z `[..., D]` (formed in float64).

        Args:
            z: points `[..., D]`.
            exclude: optional int64 `[...]`: point i leaves component `exclude[i]` out and the
                rest is renormalized (leave-one-out); a negative value leaves nothing out.
            out_dtype: the result's dtype (default z's); `torch.float64` keeps every digit
                (a float32 result rounds a value of -1e4 nats to ~1e-3).
        """
        if z.shape[-1] != self.mu.shape[1]:
            raise ValueError(
                f"DiagonalGaussianMixture: z has {z.shape[-1]} dimensions, the components {self.mu.shape[1]}"
            )
        if exclude is not None:
            if exclude.shape != z.shape[:-1]:
                raise ValueError(f"exclude must have shape {tuple(z.shape[:-1])}, got {tuple(exclude.shape)}")
            exclude = exclude.to(z.device, torch.int64)
        k = self.num_components
        if self.log_weights is not None or self._needs_grad() or k <= self.small_components:
            lse = small_gaussian_mixture_log_prob(z, self.mu, self.logvar, self.log_weights, exclude=exclude)
        else:
            flat = z.reshape(-1, z.shape[-1])
            flat_ex = None if exclude is None else exclude.reshape(-1)
            if z.shape[-1] == 1 and not (torch.is_grad_enabled() and z.requires_grad):
                # One dimension (the surgery's per-dimension terms): the direct formula is faster.
                mu, logvar = self.mu.detach().to(z), self.logvar.detach().to(z)
                lse = _mixture_logsumexp_1d(flat, mu, logvar, flat_ex, self.chunk_size * self.block_size)
            else:
                comps = self._kernel_constants(flat)
                lse = _kernel(flat, comps, flat_ex, self.chunk_size, self.block_size, 0.25, torch.float64)
            lse = lse.double().reshape(z.shape[:-1])
        return (lse - self._log_normalizer(exclude, lse)).to(out_dtype or z.dtype)

    def _kernel_constants(self, z: Tensor) -> _Components:
        """The kernel's constants for the points `z`'s dtype, built on first use and kept: in
        spatial order (`spatial_order`) for a call of many points (`_worth_ordering`), in index
        order for a few (a training batch, whose points lie everywhere, gains nothing from the
        order) or against broad components."""
        order = _worth_ordering(z, self.mu, self.logvar)
        comps = self._constants.get((z.dtype, order))
        if comps is None:
            comps = self._constants[(z.dtype, order)] = _Components(
                self.mu.to(z.device), self.logvar.to(z.device), DEFAULT_GROUP, z.dtype, order=order
            )
        return comps

    def _log_normalizer(self, exclude: Tensor | None, like: Tensor) -> Tensor | float:
        k = self.num_components
        if self.log_weights is None:
            if exclude is None:
                return math.log(k)
            left_out = exclude >= 0
            if k == 1 and bool(left_out.any()):
                raise ValueError("DiagonalGaussianMixture: leaving one out of a single component leaves nothing")
            return torch.where(left_out, like.new_tensor(math.log(max(k - 1, 1))), like.new_tensor(math.log(k)))
        if exclude is None:
            return 0.0
        w = self.log_weights.to(like)[exclude.clamp(min=0)]
        return torch.where(exclude >= 0, torch.log1p(-torch.exp(w)), torch.zeros_like(w))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` draws, `[n, D]`: a component by its weight, then its Gaussian."""
        device = self.mu.device
        if n == 0:
            return self.mu.new_zeros(0, self.mu.shape[1]).detach()
        if self.log_weights is None:
            k = torch.randint(self.num_components, (n,), device=device, generator=generator)
        else:
            k = torch.multinomial(self.log_weights.detach().exp(), n, replacement=True, generator=generator)
        return reparameterize(self.mu[k], self.logvar[k], generator)


# ---- the one-dimensional marginals ---------------------------------------------------------
#
# The total correlation needs, at every sample z_m, each dimension's aggregate marginal
# log q(z_md) = logsumexp_n log N(z_md; mu_nd, s_nd^2) - log N: D one-dimensional mixtures
# of N components at M points, M N D (1e11 for MNIST) entries. Collapsed dimensions make
# every entry count, so no entry can be skipped, and every entry costs an exp. Instead,
# each dimension's M x N sum is reorganized around a grid of nodes, in the way of the fast
# Gauss transform (Greengard & Strain 1991), with the error of every step bounded:
#
# * Classes. The components of a dimension are split by log-variance into classes of
#   width `class_width`; a class's sharpest possible variance is exp(lv_edge) at its lower
#   edge. Each class has a grid of nodes g_k = 2 h k with half-spacing
#   h = tau exp(lv_edge / 2): every component's standard deviation is at least h / tau.
# * Local expansion. A point z in the node interval |z - g| <= h writes z = g + h u with
#   |u| <= 1. With x = (mu - g) / s and kappa = h / s (<= tau), exactly,
#       N(z; mu, s^2) = N(g; mu, s^2) exp(x kappa u - kappa^2 u^2 / 2)
#                     = N(g; mu, s^2) sum_r kappa^r He_r(x) u^r / r!,
#   the generating function of the Hermite polynomials He_r. Summing over the class's
#   components gives the node's polynomial in u, sum_r nu_r u^r with
#   nu_r = sum_n N(g; mu_n, s_n^2) kappa_n^r He_r(x_n) / r!, truncated at r = `order`.
#   Building the nu costs `order` multiply-adds per (component, node) pair; evaluating
#   them costs `order` per (point, class). The M x N entries are never formed.
# * Which pairs. A component is expanded at the nodes within its reach: the nodes whose
#   interval comes within rho_n = s_n sqrt(2 (c_n - L)) of mu_n, where c_n is the log of
#   its peak density and L = max_n c_n - `margin` (per dimension). Every entry left out is
#   below e^L, so they hold at most N e^L of each point's sum.
# * Truncation. The coefficients of exp(x kappa u - kappa^2 u^2 / 2) are majorized by
#   those of exp(|x| kappa u + kappa^2 u^2 / 2), so for any R >= 1 the terms beyond
#   `order` are at most R^-(order+1) exp(|x| kappa R + kappa^2 R^2 / 2) per component
#   (Cauchy's estimate); summed over each node's pairs, for R in `_TRUNCATION_RADII`.
# * Rounding. The alternating Hermite sums cancel: float64 rounding is estimated as
#   8 (order + 1) unit roundoffs of sum_n N(g; mu_n, s_n^2) exp(|x| kappa + kappa^2 / 2),
#   the sum of the terms' magnitudes (measured errors are ~100 times smaller).
#
# Every (point, dimension) thus carries a bound on its relative error, the sum of the
# three; where it exceeds `tolerance` (far outliers, where the sum itself is tiny) the
# value is recomputed by the direct float64 sum over all N. So the result is the float64
# logsumexp to `tolerance` (1e-12 nats per dimension by default; truncation and left-out
# entries bounded rigorously, rounding estimated) whatever the data, and the fast path is
# the common one. The work is one pass over ~30 nodes per component and
# the point evaluations: for N = M = 50,000, D = 40 about 3e7 pairs instead of 1e11
# entries. A dimension whose grid would be far too fine for the spread of its points
# (log-variances far below the points' range, e.g. -40) takes the direct sum.

#: Node half-spacing in units of the sharpest standard deviation a class can hold: larger
#: means fewer nodes per component, but longer expansions and more cancellation.
MARGINAL_TAU = 0.5
#: Terms of each node's expansion (the truncation bound at `MARGINAL_TAU` is ~1e-13 relative).
MARGINAL_ORDER = 26
#: Width, in log-variance, of the classes that share a grid.
MARGINAL_CLASS_WIDTH = 1.0
#: Nats below a dimension's highest peak density beyond which entries are left out.
MARGINAL_MARGIN = 60.0
#: Relative error bound above which a value is recomputed by the direct sum.
MARGINAL_TOLERANCE = 1e-12
_TRUNCATION_RADII = (3.0, 5.0)
#: Nodes of one dimension above which it takes the direct sum (the grid would be too fine).
_NODE_LIMIT = 1 << 22
#: One entry of the direct sum costs about this many expansion terms (its ~10 passes against 3).
_DIRECT_COST = 3


def _marginal_budgets(device: torch.device) -> tuple[int, int]:
    """(pairs per pass, evaluated entries per pass): small on a CPU, large on a GPU.

    A CPU's 2^19 pairs and 2^21 entries hold the working set at M = N = 50,000, D = 40 to
    ~360 MB (2^20 and 2^22 took ~620 MB, the largest stage of a default run's surgery:
    results/memory/README.md), at no measurable cost in time.
    """
    if device.type == "cuda":
        return 1 << 24, 1 << 25
    return 1 << 19, 1 << 21


def gaussian_mixture_marginals_logsumexp(
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    tolerance: float = MARGINAL_TOLERANCE,
    order: int = MARGINAL_ORDER,
    tau: float = MARGINAL_TAU,
    class_width: float = MARGINAL_CLASS_WIDTH,
    margin: float = MARGINAL_MARGIN,
    method: str = "auto",
    stats: dict[str, float] | None = None,
) -> Tensor:
    """Each dimension's mixture apart: logsumexp_n log N(z_md; mu_nd, exp(logvar_nd)), float64 `[M, D]`.

    The D one-dimensional aggregate marginals of the surgery's total correlation, for all M
    points at once, exact to `tolerance` nats per value against the float64 direct sum:
    a local expansion on a grid of nodes per dimension with every error bounded, and the
    direct sum wherever the bound is not met (see the comment above `MARGINAL_TAU`). About
    30 (component, node) pairs per component and `order` operations per pair, instead of
    M x N entries per dimension. Not differentiable.

    Memory: O((M + N) D) float64 for the inputs, classes and result; per pass at most
    2^19 pairs (~200 bytes each) and 2^21 evaluated (point, class) entries on a CPU (2^24
    and 2^25 on a GPU); nodes x (order + 4) float64 (~30 bytes x points' spread / node
    spacing: a few MB). Host synchronizations: a handful per pass of dimensions, none in
    the loops over pairs and terms.

    Args:
        z: points `[M, D]`.
        mu: component means `[N, D]`.
        logvar: component log-variances `[N, D]`.
        tolerance: a value whose relative error bound (truncation, left-out entries,
            estimated rounding) exceeds this is recomputed by the direct sum.
        order: terms of each node's expansion.
        tau: node half-spacing in units of the class's sharpest standard deviation.
        class_width: log-variance width of the classes that share a grid.
        margin: nats below the dimension's highest peak density at which entries are left out.
        method: "expand" (the expansion, the direct sum where its bound is not met), "direct"
            (the direct float64 sum for every value), or "auto": "direct" for a pass of
            dimensions where that is cheaper (few points: M x N entries against the pairs'
            `order` terms each), else "expand". The result is the same to `tolerance`.
        stats: if given, filled with `pairs`, `nodes`, `classes`, `direct` (values computed
            by the direct sum) and `direct_dims` (dimensions computed directly in full).

    Returns:
        `[M, D]` float64 on z's device; subtract log N for log q(z_d).
    """
    if z.dim() != 2 or mu.dim() != 2 or mu.shape != logvar.shape or z.shape[1] != mu.shape[1]:
        raise ValueError(
            f"gaussian_mixture_marginals_logsumexp expects z [M, D], mu and logvar [N, D]; got "
            f"{tuple(z.shape)}, {tuple(mu.shape)}, {tuple(logvar.shape)}"
        )
    if order < 1 or tau <= 0 or class_width <= 0:
        raise ValueError(f"order must be >= 1, tau and class_width > 0; got {order}, {tau}, {class_width}")
    if method not in ("auto", "expand", "direct"):
        raise ValueError(f"method must be 'auto', 'expand' or 'direct', got {method!r}")
    f64 = torch.float64
    m, d = z.shape
    device = z.device
    if stats is not None:
        stats.update(pairs=0, nodes=0, classes=0, direct=0, direct_dims=0)
    if m == 0 or d == 0:
        return torch.zeros(m, d, dtype=f64, device=device)
    if mu.shape[0] == 0:
        return torch.full((m, d), -math.inf, dtype=f64, device=device)
    with torch.no_grad():
        z64 = z.detach().to(f64)
        mu64 = mu.detach().to(device, f64)
        lv64 = logvar.detach().to(device, f64)
        pair_budget, eval_budget = _marginal_budgets(device)
        lv_min = lv64.amin(0)
        cls = torch.floor((lv64 - lv_min) / class_width).long()  # [N, D]
        # Per dimension: its classes, and its nodes' count were every class's grid dense
        # over the points' range (class c's spacing is exp(c w / 2) times class 0's).
        n_classes = cls.amax(0) + 1
        span = (z64.amax(0) - z64.amin(0)) / (2 * tau * torch.exp(0.5 * lv_min))
        ratio = math.exp(-0.5 * class_width)
        nodes_bound = (span + 2) * (1 - ratio**n_classes) / (1 - ratio)
        n_classes, nodes_bound = n_classes.tolist(), nodes_bound.tolist()  # the one host read of the set-up
        out = torch.empty(m, d, dtype=f64, device=device)
        direct = [j for j in range(d) if method == "direct" or not nodes_bound[j] <= _NODE_LIMIT]  # also inf / nan
        if direct:
            rows = torch.arange(m, device=device).repeat_interleave(len(direct))
            dims = torch.tensor(direct, device=device).repeat(m)
            out[rows, dims] = _marginals_direct(z64, mu64, lv64, rows, dims, eval_budget)
        if stats is not None:
            stats["direct_dims"] = len(direct)
            stats["direct"] += m * len(direct)
        # Passes over dimensions: each evaluates at most `eval_budget` (point, class) entries.
        fast = [j for j in range(d) if j not in set(direct)]
        start = 0
        while start < len(fast):
            stop, width = start, 0
            while stop < len(fast) and (stop == start or (width + n_classes[fast[stop]]) * m <= eval_budget):
                width += n_classes[fast[stop]]
                stop += 1
            dims = torch.tensor(fast[start:stop], device=device)
            out[:, dims] = _marginals_expanded(
                z64[:, dims],
                mu64[:, dims],
                lv64[:, dims],
                cls[:, dims],
                max(n_classes[j] for j in fast[start:stop]),
                settings=(tolerance, order, tau, class_width, margin, method),
                budgets=(pair_budget, eval_budget),
                stats=stats,
            )
            start = stop
    return out


def _marginals_direct(z: Tensor, mu: Tensor, lv: Tensor, rows: Tensor, dims: Tensor, budget: int) -> Tensor:
    """The direct float64 sum for the (point, dimension) entries `rows`, `dims`: logsumexp over all N."""
    n = mu.shape[0]
    out = []
    step = max(1, budget // n)
    for s in range(0, rows.shape[0], step):
        r, c = rows[s : s + step], dims[s : s + step]
        lvc = lv[:, c].T  # [E, N]
        lp = (z[r, c][:, None] - mu[:, c].T).square_().mul_(torch.exp(-lvc)).add_(lvc).add_(LOG_2PI).mul_(-0.5)
        out.append(torch.logsumexp(lp, dim=-1))
    return torch.cat(out) if out else z.new_zeros(0)


def _hermite_scales(order: int) -> list[float]:
    """t_r with t_0 = t_1 = 1, t_(r+1) = (r + 1) t_(r-1): xi_r = t_r c_r obeys a recurrence without a division."""
    t = [1.0, 1.0]
    while len(t) <= order:
        t.append(len(t) * t[-2])
    return t[: order + 1]


def _marginals_expanded(
    z: Tensor,
    mu: Tensor,
    lv: Tensor,
    cls: Tensor,
    n_classes: int,
    *,
    settings: tuple[float, int, float, float, float, str],
    budgets: tuple[int, int],
    stats: dict[str, float] | None,
) -> Tensor:
    """`gaussian_mixture_marginals_logsumexp` for a few dimensions (float64 inputs, classes `cls` `[N, D]`)."""
    tolerance, order, tau, class_width, margin, method = settings
    pair_budget, eval_budget = budgets
    m, d = z.shape
    n = mu.shape[0]
    device, f64 = z.device, torch.float64
    lv_min = lv.amin(0)
    peak = -0.5 * (LOG_2PI + lv)  # [N, D] log of each component's peak density
    shift = -0.5 * (LOG_2PI + lv_min)  # [D] the highest peak: sums are formed relative to it
    inv_sd = torch.exp(-0.5 * lv)

    # The classes present: q = d * n_classes + class, in increasing order (dimension-major).
    qid = cls + torch.arange(d, device=device) * n_classes
    present = torch.bincount(qid.reshape(-1), minlength=d * n_classes) > 0
    q_ids = present.nonzero().squeeze(-1)
    kc = q_ids.shape[0]
    q_dim = q_ids // n_classes
    half = tau * torch.exp(0.5 * (lv_min[q_dim] + (q_ids % n_classes) * class_width))  # [Kc] h of each class
    where = torch.full((d * n_classes,), -1, dtype=torch.long, device=device)
    where[q_ids] = torch.arange(kc, device=device)

    # The points' nodes: class q's nodes are numbered densely over the range its points occupy.
    zq = z[:, q_dim]  # [M, Kc]
    k_pt = torch.round(zq / (2 * half)).long()
    k_min, k_max = k_pt.amin(0), k_pt.amax(0)
    size = k_max - k_min + 1
    first_node = torch.cumsum(size, 0) - size - k_min  # node id = first_node[q] + k
    node = k_pt + first_node
    u = (zq - k_pt * (2 * half)) / half  # [M, Kc], |u| <= 1

    # Each component's reach: the nodes k_lo..k_hi of its class within rho_n of it.
    q = where[qid]  # [N, D]
    h = half[q]
    low = shift - margin  # [D] L
    slack = peak - low
    reach = torch.sqrt(2 * slack.clamp(min=0)) / inv_sd
    k_lo = torch.ceil((mu - h - reach) / (2 * h)).long().maximum(k_min[q])
    k_hi = torch.floor((mu + h + reach) / (2 * h)).long().minimum(k_max[q])
    counts = torch.where(slack > 0, (k_hi - k_lo + 1).clamp(min=0), torch.zeros_like(k_lo)).reshape(-1)
    ends = torch.cumsum(counts, 0)
    n_nodes, total = (int(v) for v in torch.stack([size.sum(), ends[-1]]).tolist())  # host read: the sizes
    if method == "auto" and (total + m * kc) * order > _DIRECT_COST * m * n * d:  # few points: sum directly
        rows = torch.arange(m, device=device).repeat_interleave(d)
        dims = torch.arange(d, device=device).repeat(m)
        if stats is not None:
            stats["direct"] += m * d
        return _marginals_direct(z, mu, lv, rows, dims, eval_budget).view(m, d)
    # Passes over the components, each with at most ~`pair_budget` pairs (a component has < 100).
    # The pass boundaries and their pair counts are read at once: the passes need no host read
    # (repeat_interleave is told its output size).
    targets = torch.arange(pair_budget, total + pair_budget, pair_budget, device=device)
    cuts = torch.searchsorted(ends, targets).clamp(max=n * d - 1)
    cuts, cut_ends = torch.stack([cuts, ends[cuts]]).tolist()

    nu = torch.zeros(order + 1, n_nodes, dtype=f64, device=device)
    weight_one = torch.zeros(n_nodes, dtype=f64, device=device)
    weight_far = torch.zeros(len(_TRUNCATION_RADII), n_nodes, dtype=f64, device=device)
    flat = [t.reshape(-1) for t in (mu, inv_sd, (peak - shift), h, k_lo, first_node[q])]
    scales = _hermite_scales(order)
    comp_start, pairs_before = 0, 0
    for cut, cut_end in zip(cuts, cut_ends, strict=True):
        comp_stop, n_pairs = cut + 1, cut_end - pairs_before
        if comp_stop <= comp_start or n_pairs == 0:
            comp_start, pairs_before = max(comp_start, comp_stop), cut_end
            continue
        c = counts[comp_start:comp_stop]
        comp = torch.repeat_interleave(torch.arange(comp_start, comp_stop, device=device), c, output_size=n_pairs)
        mu_p, inv_sd_p, rel_peak_p, h_p, k_lo_p, first_p = (t[comp] for t in flat)
        pair_first = (torch.cumsum(c, 0) - c).repeat_interleave(c, output_size=n_pairs)
        k = torch.arange(n_pairs, device=device) - pair_first + k_lo_p
        pos = k + first_p
        x = inv_sd_p * (mu_p - k * (2 * h_p))
        kappa = inv_sd_p * h_p
        e0 = rel_peak_p - 0.5 * x.square()  # log N(g; mu, s^2) - shift
        ax = x.abs() * kappa
        k2 = kappa.square()
        weight_one.scatter_add_(0, pos, torch.exp(e0 + ax + 0.5 * k2))
        for i, radius in enumerate(_TRUNCATION_RADII):
            weight_far[i].scatter_add_(0, pos, torch.exp(e0 + radius * ax + (0.5 * radius * radius) * k2))
        # xi_r = t_r a kappa^r He_r(x) / r!  (a = e^e0): xi_(r+1) = (t_(r-1) / t_r) kappa x xi_r - kappa^2 xi_(r-1).
        kx = kappa * x
        neg_k2 = k2.neg_()
        prev = torch.exp(e0)
        cur = kx * prev
        nu[0].scatter_add_(0, pos, prev)
        nu[1].scatter_add_(0, pos, cur)
        for r in range(1, order):
            prev.mul_(neg_k2).addcmul_(kx, cur, value=scales[r - 1] / scales[r])
            prev, cur = cur, prev
            nu[r + 1].scatter_add_(0, pos, cur)
        comp_start, pairs_before = comp_stop, cut_end
    if stats is not None:
        stats["pairs"] += total
        stats["nodes"] += n_nodes
        stats["classes"] += kc

    # Evaluate: each (point, class) entry's node polynomial at its u (Horner), and its error bound.
    coef = (nu / torch.tensor(scales, dtype=f64, device=device)[:, None]).T.contiguous()  # [nodes, order + 1]
    truncation = torch.stack(
        [radius ** -(order + 1) * weight_far[i] for i, radius in enumerate(_TRUNCATION_RADII)]
    ).amin(0)
    bound_node = truncation + (8 * (order + 1) * torch.finfo(f64).eps / 2) * weight_one
    node_flat, u_flat = node.reshape(-1), u.reshape(-1)
    value = torch.empty(m * kc, dtype=f64, device=device)
    step = max(1, eval_budget // (order + 1))
    for s in range(0, m * kc, step):
        v = coef[node_flat[s : s + step]]  # [B, order + 1]
        uu = u_flat[s : s + step]
        acc = v[:, order].clone()
        for r in range(order - 1, -1, -1):
            acc.mul_(uu).add_(v[:, r])
        value[s : s + step] = acc
    sums = torch.zeros(m, d, dtype=f64, device=device).index_add_(1, q_dim, value.view(m, kc))
    bound = torch.zeros(m, d, dtype=f64, device=device).index_add_(1, q_dim, bound_node[node])
    bound += n * math.exp(-margin)  # the entries left out, each below e^L = e^(shift - margin)
    out = torch.log(sums) + shift
    redo = (~(bound <= tolerance * sums)).nonzero()  # also catches sums of 0 or nan
    if redo.shape[0]:
        rows, dims = redo.unbind(-1)
        out[rows, dims] = _marginals_direct(z, mu, lv, rows, dims, eval_budget)
    if stats is not None:
        stats["direct"] += redo.shape[0]
    return out
