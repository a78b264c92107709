"""The exemplar prior: the encoder's means at the training inputs, one shared learned variance, leave-one-out."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from priors.base import Encoder, Prior
from priors.densities import LOG_2PI, DiagonalGaussianMixture

EXEMPLAR_SETS = ("all", "random", "knn", "random_knn")


class NearestNeighbours:
    """Exact k-nearest-neighbour search (Euclidean) among fixed points `[N, D]`.

    The distance to a query q ranks as |p|^2 - 2 q.p (|q|^2 is the same for every p): one
    matrix product, [q, 1] . [-2 p, |p|^2]. The columns are cut into chunks of
    `width`; the k nearest all lie in the k chunks with the smallest minima (each of those k
    minima is no farther than anything outside them), so the top-k runs over k chunks
    instead of all N columns. The points are padded once to whole chunks, at infinite
    distance.

    Args:
        points: `[N, D]`, detached.
        width: columns per chunk.
    """

    def __init__(self, points: Tensor, width: int = 64) -> None:
        n = points.shape[0]
        pad = (-n) % width
        self.n, self.width, self.points = n, width, points
        sq = torch.cat([points.square().sum(-1), points.new_full((pad,), math.inf)])
        self.keys = torch.cat([torch.cat([-2 * points, points.new_zeros(pad, points.shape[1])]), sq[:, None]], -1)

    @torch.no_grad()
    def search(self, query: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """Indices `[B, k]` of each query's k nearest points, nearest first; `exclude` `[B]` leaves one out
        each (-1: none)."""
        if not 1 <= k <= self.n - (exclude is not None):
            raise ValueError(f"NearestNeighbours: k must lie in [1, {self.n - (exclude is not None)}], got {k}")
        query = query.to(self.keys)
        score = torch.cat([query, query.new_ones(query.shape[0], 1)], -1) @ self.keys.T  # [B, Np]
        b = score.shape[0]
        rows = torch.arange(b, device=score.device)
        if exclude is not None:
            exclude = exclude.to(score.device)
            some = exclude >= 0
            score[rows[some], exclude[some]] = math.inf
        chunks = score.view(b, -1, self.width)
        if chunks.shape[1] <= k:
            return score.topk(k, dim=-1, largest=False).indices
        best = chunks.amin(-1).topk(k, dim=-1, largest=False).indices  # [B, k] chunk numbers
        candidates = chunks[rows[:, None], best].reshape(b, -1)  # [B, k * width]
        pick = candidates.topk(k, dim=-1, largest=False).indices
        return best.gather(1, pick // self.width) * self.width + pick % self.width

    def of_every_point(self, k: int, batch_size: int = 100) -> Tensor:
        """`[N, k]`: each point's k nearest other points, nearest first.

        Queries go `batch_size` at a time: at 100, the `[100, N]` scores of N = 50,000 points
        stay in cache (measured fastest on a 2-core CPU).
        """
        index = torch.arange(self.n, device=self.points.device)
        return torch.cat([self.search(self.points[b], k, exclude=b) for b in index.split(batch_size)])


VARIANCES = ("scalar", "per_dim")


class ExemplarPrior(Prior):
    """p(z | X without n) = 1/|S'| sum_{m in S'} N(z; mu(x_m), diag(sigma^2)), S' = S without n.

    The aggregate posterior made to learn (Norouzi et al. 2020). What sets it apart from
    the exact aggregate prior (`prior=aggregate`):

    * one learned variance sigma^2 shared by all exemplars (a scalar, or one per dimension
      with `variance=per_dim`), separate from the posteriors' own variances;
    * the exemplar means are computed by the current encoder inside the training graph,
      so gradients flow through them;
    * leave-one-out: a point's own exemplar is never in its prior;
    * an exemplar set per batch (`exemplars`): `all` N of them, a `random` subset of
      `num_exemplars`, or `knn`, each point's `k` nearest neighbours by their cached means
      (re-encoded with gradient), or `random_knn`, each point's `k` nearest within a random
      subset of `num_exemplars`: the paper's `random` objective at the cost of `knn`.

    In training (`context` = the batch's training-set indices) the log density is normalized
    by the number of exemplars actually summed (|S| - 1 when the point's own exemplar was
    drawn, else |S|; k for `knn`). For `random` that is an unbiased density estimate, so the
    loss stays a bound in expectation; for `knn` it is the retrieved neighbours' own density,
    log((N - 1) / k) above their share of the leave-one-out sum (docs/priors.md). For
    `random_knn` it is the neighbours' share of `random`'s sum, normalized as `random` is: a
    little below it, never above.
    Evaluation (no context: validation, the surgery, importance sampling) uses all N
    exemplars, no leave-one-out, from the cache of their means, which the trainer's
    `vae.callbacks.TrainingSetEncodings` callback refreshes after every epoch with the
    epoch's final encoder (and which the checkpoint stores).

    Built as a `_partial_` node (conf/prior/exemplar.yaml): `vae.build_model` completes it
    with the VAE's encoder and the training inputs, which are the exemplars. The encoder is
    held without being registered as a submodule (its parameters belong to the VAE).

    Args:
        latent_dim: size D of the latent space.
        encoder: the VAE's encoder, `x [B, P] -> (mu, logvar)`.
        train_x: the exemplars `[N, P]`, in the order of the training-set indices: the
            training images' grey levels (`vae.training_inputs`), as in the paper.
        exemplars: `all`, `random`, `knn` or `random_knn`.
        num_exemplars: |S| for `random` and `random_knn` (the paper: half the training set).
        k: neighbours per point for `knn` (the paper's retrieval variant: 10) and `random_knn`.
        variance: `scalar` (the paper) or `per_dim`.
        init_logvar: the initial log sigma^2.
        encode_batch_size: inputs per encoder call when the exemplars are encoded.
        gradient: False takes the exemplar means from the cache, detached, as the exact
            aggregate prior does: an ablation that separates the shared variance from the
            gradient through the exemplars (docs/priors.md).

    References:
        Norouzi, Fleet & Norouzi, "Exemplar VAE: Linking Generative Models, Nearest
        Neighbor Retrieval, and Data Augmentation", NeurIPS 2020.
    """

    def __init__(
        self,
        latent_dim: int,
        encoder: Encoder,
        train_x: Tensor,
        exemplars: str = "knn",
        num_exemplars: int = 1000,
        k: int = 10,
        variance: str = "scalar",
        init_logvar: float = 0.0,
        encode_batch_size: int = 1000,
        gradient: bool = True,
    ) -> None:
        super().__init__(latent_dim)
        if exemplars not in EXEMPLAR_SETS:
            raise ValueError(f"ExemplarPrior: exemplars must be one of {EXEMPLAR_SETS}, got {exemplars!r}")
        if variance not in VARIANCES:
            raise ValueError(f"ExemplarPrior: variance must be one of {VARIANCES}, got {variance!r}")
        if not isinstance(train_x, Tensor) or train_x.dim() != 2 or len(train_x) < 2:
            raise ValueError(
                "ExemplarPrior expects train_x of shape [N, data_dim] with N >= 2, got "
                f"{getattr(train_x, 'shape', train_x)!r}"
            )
        n = len(train_x)
        # Each knob is checked against the data where its exemplar set uses it.
        checks = [
            ("encode_batch_size", encode_batch_size, None),
            ("num_exemplars", num_exemplars, n if exemplars in ("random", "random_knn") else None),
            ("k", k, {"knn": n - 1, "random_knn": int(num_exemplars) - 1}.get(exemplars)),
        ]
        for name, value, top in checks:
            if int(value) != value or value < 1 or (top is not None and value > top):
                span = "inf" if top is None else top
                raise ValueError(f"ExemplarPrior: {name} must be an integer in [1, {span}], got {value!r}")
        self.exemplars = exemplars
        self.num_exemplars = int(num_exemplars)
        self.k = int(k)
        self.variance = variance
        self.encode_batch_size = int(encode_batch_size)
        if not isinstance(gradient, bool):
            raise ValueError(f"ExemplarPrior: gradient must be true or false, got {gradient!r}")
        self.gradient = gradient
        self.logvar = nn.Parameter(torch.full((1 if variance == "scalar" else self.latent_dim,), float(init_logvar)))
        # The cache of all N exemplar means (detached): the knn search and evaluation use it.
        self.register_buffer("cache_mu", torch.zeros(0, self.latent_dim))
        self._neighbours: Tensor | None = None  # [N, k]: each exemplar's k nearest in the cache, on first use
        self._mixture: tuple[Tensor, DiagonalGaussianMixture] | None = None  # (its logvar, `_all_exemplars()`)
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_train_x", train_x)

    @property
    def num_points(self) -> int:
        return len(self._train_x)

    # ---- filled by vae.callbacks.TrainingSetEncodings ------------------------------

    @property
    def needs_encodings(self) -> bool:
        return self.cache_mu.shape[0] != self.num_points

    @property
    def encoding_inputs(self) -> Tensor:
        """The exemplars themselves: the callback encodes these for the cache, not the binarized training set."""
        return self._train_x

    @torch.no_grad()
    def update_encodings(self, mu: Tensor, logvar: Tensor) -> None:
        """Take the exemplars' means `[N, D]` (the encoder's at `encoding_inputs`, after an epoch) as the cache."""
        if mu.shape != (self.num_points, self.latent_dim):
            raise ValueError(
                f"ExemplarPrior: needs the means of its {self.num_points} exemplars, [N, {self.latent_dim}]; got "
                f"{tuple(mu.shape)}"
            )
        self.cache_mu = mu.detach().to(self.cache_mu)
        self._neighbours = self._mixture = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        incoming = state_dict.get(prefix + "cache_mu")
        if incoming is not None and incoming.shape != self.cache_mu.shape:
            self.cache_mu = torch.empty_like(incoming, dtype=self.cache_mu.dtype, device=self.cache_mu.device)
        self._neighbours = self._mixture = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._neighbours = self._mixture = None  # .to() / .double() move the cache: what is built on it follows
        return super()._apply(fn, recurse)

    # ---- pieces -----------------------------------------------------------------

    def _encode_means(self, index: Tensor) -> Tensor:
        """The current encoder's means of exemplars `index`, inside the autograd graph.

        With `gradient=False`, the cached means of the last epoch instead, detached. So too
        with a frozen encoder (a prior fitted after training, `python -m priors.fit`): there
        the cache holds what re-encoding would give, and no gradient could reach the encoder.
        """
        device = self.logvar.device
        frozen = not any(q.requires_grad for q in self._encoder.parameters())
        if not self.gradient or frozen:
            return self._cached()[index.to(self.cache_mu.device)].to(device)
        x = self._train_x.index_select(0, index.cpu())
        return torch.cat([self._encoder(b.to(device))[0] for b in x.split(self.encode_batch_size)])

    def _component_logvar(self, n: int) -> Tensor:
        return self.logvar.expand(n, self.latent_dim)

    def _all_exemplars(self) -> DiagonalGaussianMixture:
        """The evaluation density: all N cached means with the shared variance, no leave-one-out.

        With gradients on, built from the live variance (differentiable in it). Without, one
        mixture serves every call until the cache or the variance's value changes: a
        validation pass evaluates it batch after batch, and its float64 constants over all N
        exemplars cost more than a batch's own work to rebuild.
        """
        cache = self._cached()
        if torch.is_grad_enabled() and self.logvar.requires_grad:
            return DiagonalGaussianMixture(cache, self._component_logvar(len(cache)), small_components=0)
        logvar = self.logvar.detach()
        if self._mixture is None or not torch.equal(self._mixture[0], logvar):
            mixture = DiagonalGaussianMixture(cache, self._component_logvar(len(cache)).detach(), small_components=0)
            self._mixture = (logvar.clone(), mixture)
        return self._mixture[1]

    def _cached(self) -> Tensor:
        if self.needs_encodings:
            raise RuntimeError(
                "ExemplarPrior has no cached exemplar means yet: the trainer's TrainingSetEncodings callback gives "
                "them (or update_encodings(mu, logvar), or load a checkpoint)"
            )
        return self.cache_mu

    def _leave_one_out(self, z: Tensor, index: Tensor) -> Tensor:
        """Training: log p(z_i | exemplars S_i without i), flat z `[B, D]`, index `[B]`."""
        n, device = self.num_points, z.device
        if self.exemplars == "knn":
            if self._neighbours is None:
                # Every point's neighbours at once: the cache, and so the neighbours, hold for the epoch.
                self._neighbours = NearestNeighbours(self._cached()).of_every_point(self.k)
            neighbours = self._neighbours[index.to(self._neighbours.device)]
            return self._neighbour_density(z, neighbours) - math.log(self.k)
        chosen = (
            torch.arange(n, device=device)
            if self.exemplars == "all"
            else torch.randperm(n, device=device)[: self.num_exemplars]
        )
        position = torch.full((n,), -1, dtype=torch.int64, device=device)
        position[chosen] = torch.arange(len(chosen), device=device)
        if self.exemplars == "random_knn":
            cache, own = self._cached(), position[index]
            chosen_c = chosen.to(cache.device)
            found = NearestNeighbours(cache[chosen_c]).search(cache[index.to(cache.device)], self.k, exclude=own)
            summed = len(chosen) - (own >= 0).to(z.dtype)  # what `random` sums over: |S| - 1 or |S|
            return self._neighbour_density(z, chosen_c[found]) - summed.log()
        mu = self._encode_means(chosen)
        mixture = DiagonalGaussianMixture(mu, self._component_logvar(len(chosen)))
        return mixture.log_prob(z, exclude=position[index])  # normalized by |S| - 1 or |S|: what was summed

    def _neighbour_density(self, z: Tensor, neighbours: Tensor) -> Tensor:
        """log sum_j N(z_b; mu(x_{neighbours[b, j]}), sigma^2) `[B]`, unnormalized: the exemplars
        `neighbours` `[B, k]` re-encoded with gradient (each distinct one once)."""
        with torch.no_grad():
            unique, slot = neighbours.to(z.device).unique(return_inverse=True)
        mu = self._encode_means(unique)[slot]  # [B, k, D], with gradient
        var_log = self.logvar.to(z.dtype)
        log_terms = -0.5 * (
            self.latent_dim * LOG_2PI
            + var_log.expand(self.latent_dim).sum()
            + ((z[:, None, :] - mu).square() * torch.exp(-var_log)).sum(-1)
        )
        return torch.logsumexp(log_terms.double(), dim=-1).to(z.dtype)

    # ---- the contract ---------------------------------------------------------------

    def _log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            return self._all_exemplars().log_prob(z)
        index = context.reshape(-1).to(z.device, torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_points):
            raise IndexError(
                f"ExemplarPrior.log_prob: context indices must lie in [0, {self.num_points}), got range "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        return self._leave_one_out(z.reshape(-1, self.latent_dim), index).reshape(z.shape[:-1])

    def _sample(self, n: int) -> Tensor:
        with torch.no_grad():
            return self._all_exemplars().sample(n)

    def extra_repr(self) -> str:
        size = {
            "all": "",
            "random": f", num_exemplars={self.num_exemplars}",
            "knn": f", k={self.k}",
            "random_knn": f", num_exemplars={self.num_exemplars}, k={self.k}",
        }[self.exemplars]
        sizes = f"latent_dim={self.latent_dim}, N={self.num_points}"
        detached = "" if self.gradient else ", gradient=False"
        return f"{sizes}, exemplars={self.exemplars}{size}, variance={self.variance}{detached}"
