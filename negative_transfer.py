"""
ANT: diffusion training as multi-task learning over clusters of timesteps.

Go et al., "Addressing Negative Transfer in Diffusion Models", NeurIPS 2023
(https://arxiv.org/abs/2306.00354, official code: https://github.com/gohyojun15/ANT_diffusion).

Each timestep t in {0..T-1} is a denoising task. ANT groups the T tasks into K contiguous
intervals (interval clustering) and treats each interval as one task for a multi-task method:
Uncertainty Weighting (UW), PCGrad or Nash-MTL. What the paper specifies, and where it lives:

  interval clustering, min over l_1 = 0 < l_2 < ... < l_K of sum_i cost(I_i)  interval_clustering
  cost(I) = sum_{t in I} |v_t - v_c|, c = (l + r + 1) // 2, with v = t, SNR(t)
            or log-SNR(t) (timestep / SNR clustering cost)                   deviation_cost_matrix
  cost(I) = -sum_{t in I} TAS(c, t) (gradient clustering cost)               affinity_cost_matrix
  TAS(t1, t2) = cosine similarity of the loss gradients of t1 and t2         gradient_affinity
  the whole recipe for a noise schedule or a TAS matrix                      cluster_timesteps
  B/K timesteps drawn uniformly inside each cluster                          stratified_timesteps
  L_k = mean loss over the samples of cluster k                              cluster_losses
  UW: sum_k 0.5 (exp(-s_k) L_k / K + s_k)                                    UncertaintyWeighting
  PCGrad: g_k -= (g_k . g_j / |g_j|^2) g_j when g_k . g_j < 0, sum over k    pcgrad
  Nash-MTL: alpha_k (G G^T alpha)_k = 1 with G the gradients of L_k (not
            L_k / K; solved for G G^T / |G G^T|_F, then rescaled),
            loss sum_k alpha_k L_k / K                                       nash_mtl_weights, NashMTL
  per-cluster gradients G (K, P) for PCGrad and Nash-MTL: one forward and
            backward per cluster's slice of the batch                        sliced_task_gradients
            or K backward passes through the whole batch's graph             task_gradients
  their combination sum_k w_k g_k, written as the update's gradient         weighted_sum, write_flat_grad

Where we depart from the official code, and why:
- Interval clustering. The official DP costs O(K T^3), never allows a first cluster of a
  single timestep (at stage j the previous clusters must end at index >= j, so the first
  cluster holds at least two steps), treats every zero-cost candidate as infeasible, and
  returns boundaries off by one (each cluster starts at the previous cluster's last index; the
  last one ends at a hard-coded 1000). On the linear schedule with K = 5 it returns
  (0,0),(1,2),(3,7),(8,26),(27,1000); the true optimum is [0,1) [1,2) [2,5) [5,18) [18,1000)
  with cost 8074.75. We solve the same problem exactly, in O(K T^2) with prefix sums, and
  return half-open intervals.
- Ties in the clustering (e.g. for the timestep cost, lengths 199,199,200,201,201 cost the
  same as five 200s) are broken towards the most even partition (least sum of squared
  lengths), then towards the earliest start; so the timestep objective gives equal intervals,
  the official uniform split [int(k T / K), int((k + 1) T / K)) when K divides T. Otherwise both
  have sizes floor(T / K) or ceil(T / K), possibly in another order (T = 1000, K = 6: 166, 166,
  167, 167, 167, 167 where the official split gives 166, 167, 167, 166, 167, 167).
- Stratified sampling spreads B % K leftover samples over the first clusters. The official
  `sample_t_batch` draws int(B/K) per cluster and returns fewer than B timesteps when K does
  not divide B.
- Per-cluster gradients. The official PCGrad and Nash-MTL code runs one forward over the batch and
  K backward passes through it, each the cost of a full backward. A DiT treats its samples
  independently (no batch statistics), so g_k, the gradient of L_k, depends only on cluster k's
  samples: `sliced_task_gradients` runs one forward and one backward on each cluster's slice of the
  batch, which gives the same G (up to float rounding) for about the cost of one step.
- PCGrad visits the other tasks only (the official shuffle includes the task itself), draws the
  order from a caller-seeded torch.Generator (official: Python's global `random`, which differs
  across ranks), and computes every dot product from one float64 Gram matrix.
- Nash-MTL: the official cvxpy/ECOS problem fails silently on newer cvxpy, and the failure is
  swallowed by a bare `except`, so alpha stays at 1 forever (plain averaging). We solve each
  convex subproblem of the concave-convex procedure with scipy's trust-constr; when one fails
  (38 of 1000 random, badly scaled Gram matrices in one sweep), Newton's method on the
  equivalent convex problem 0.5 a^T A a - sum log a gives the same Nash point. A failure of both is reported
  (`info["success"] = False`) so that the caller keeps its previous alpha and logs it.
  Each subproblem minimises only the linearised objective, for which the Nash point is a fixed
  point; the official one also adds sum(A x), and then it is not always one (see _nash_subproblem).
  The official stopping rules can end far from the Nash point on an ill-conditioned Gram matrix
  (they accept 0.7 off, or stop after 20 iterations up to 3e5 off, and report success): where the
  result misses alpha_k (A alpha)_k = 1 by more than 1e-3, Newton's method finishes the solve.
  Like the official code, we solve for the normalised Gram matrix and return the alpha of the
  unnormalised G G^T (the paper's equation). The official stopping rules, however, measure the
  normalised equation's residual and the change of alpha at the unnormalised alpha; ours measure
  both on the normalised scale.
- Task affinity: the official script needs T gradients, each over 1000 images, and stores all
  of them. We use groups of timesteps (100 by default) that share the same images and noise,
  and a fixed-size CountSketch when P > sketch_dim, so memory stays bounded.

CLI (the library above needs only torch, numpy and scipy; the plots need Pillow):
    python negative_transfer.py cluster --objective log-snr -k 5 --plot clusters.png
    python negative_transfer.py affinity --ckpt CKPT.pt --data PATH --out tas.npy
`affinity` loads train.py checkpoints through this repo's sample.py and data.py, and writes with fid.py's
atomic_write; elsewhere call gradient_affinity(grad_fn, T) with a grad_fn of your own.
"""

import argparse
import itertools
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from scipy.optimize import Bounds, LinearConstraint, NonlinearConstraint, linprog, minimize

OBJECTIVES = ("timestep", "snr", "log-snr", "gradient")
UW_LR = 0.025  # learning rate of the s_k parameter group (official train scripts)
UW_WEIGHT_DECAY = 0.0  # no weight decay on the s_k (official)
NASH_EVERY = 25  # Nash-MTL solves for alpha every 25 steps and keeps it in between (official)
NASH_MAX_NORM = 1.0  # gradient-norm clip after a Nash-MTL step (official and Navon et al.)
NASH_MAX_ITER = 20  # concave-convex iterations per solve (official and Navon et al.)
_TIE_RTOL = 1e-12  # interval costs closer than this (relative to the costs summed) count as tied
_GRAM_CHUNK = 1 << 20  # columns of G per float64 chunk when forming G G^T

# -----------------------------------------------------------------------------
# Interval clustering


def interval_clustering(cost, num_clusters):
    """
    Exact interval clustering by dynamic programming (ANT, interval clustering problem).

    Splits {0, ..., T-1} into `num_clusters` contiguous non-empty intervals minimising the sum
    of their costs. cost[l, r] is the cost of the inclusive interval [l, r] (l <= r); entries
    below the diagonal are never read. Runs in O(K T^2) time and O(T^2) memory.

    Ties: costs within 1e-12 of the minimum, relative to the magnitude of the costs summed, count as
    equal. Among them the DP keeps the most even partition (least sum of squared lengths), then the
    one whose last interval starts earliest, which makes the choice deterministic.

    Returns (intervals, total_cost): intervals is a list of half-open (start, stop) pairs that
    cover [0, T) in order; total_cost is the DP optimum as a float.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
        raise ValueError(f"cost must be a square (T, T) matrix, got shape {cost.shape}")
    T = cost.shape[0]
    if int(num_clusters) != num_clusters or not 1 <= num_clusters <= T:
        raise ValueError(f"num_clusters must be an integer in [1, T={T}], got {num_clusters}")
    K = int(num_clusters)
    l = np.arange(T)[:, None]  # (T, 1) interval start
    r = np.arange(T)[None, :]  # (1, T) interval end (inclusive)
    valid = l <= r  # (T, T)
    if not np.all(np.isfinite(cost[valid])):
        raise ValueError("cost[l, r] must be finite for every l <= r")
    c = np.where(valid, cost, np.inf)  # (T, T) cost of [l, r]
    sq = np.where(valid, (r - l + 1.0) ** 2, np.inf)  # (T, T) squared length, the tie-break
    best, best_sq = c[0].copy(), sq[0].copy()  # (T,) one interval covering [0, r]
    starts = np.zeros((K, T), dtype=np.int64)  # starts[k, r]: start of the last of k+1 intervals
    cols = np.arange(T)
    for k in range(1, K):
        prev = np.concatenate(([np.inf], best[:-1]))  # (T,) prev[l]: k intervals over [0, l-1]
        prev_sq = np.concatenate(([np.inf], best_sq[:-1]))  # (T,)
        total = prev[:, None] + c  # (T, T) k intervals over [0, l-1], then [l, r]
        low = total.min(axis=0)  # (T,)
        # Rounding in a sum is relative to its terms, so the tolerance is too: not to the minimum, which can be
        # ~0, and not floored at 1, which made it absolute for costs below 1 (costs of 1e-13 clustered by the tie-break)
        tol = _TIE_RTOL * (np.abs(prev)[:, None] + np.abs(c))  # (T, T)
        tied = total <= low + np.where(np.isfinite(tol), tol, 0.0)  # (T, T)
        total_sq = np.where(tied, prev_sq[:, None] + sq, np.inf)  # (T, T)
        arg = total_sq.argmin(axis=0)  # (T,) first minimum: the earliest start among ties
        starts[k] = arg
        best, best_sq = total[arg, cols], total_sq[arg, cols]
    bounds, end = [T], T - 1
    for k in range(K - 1, 0, -1):
        start = int(starts[k, end])
        bounds.append(start)
        end = start - 1
    bounds.append(0)
    bounds.reverse()
    return list(zip(bounds[:-1], bounds[1:])), float(best[T - 1])


def deviation_cost_matrix(values):
    """
    Cost matrix of the timestep and SNR clustering costs (ANT, interval clustering objectives).

    cost[l, r] = sum_{t=l..r} |v_t - v_c| with centre c = (l + r + 1) // 2, for a monotone
    sequence v (timestep index, SNR or log-SNR, all monotone in t). c is a median index; the
    official SNR code's round((l + r + 1) / 2) (half to even) picks the element above the median
    for an odd length with an odd midpoint, e.g. c = 2 for [0, 2], which costs more. Monotonicity
    fixes the sign of every term, so each entry takes O(1) from prefix sums. Entries with l > r
    are +inf.
    Returns a (T, T) float64 array.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("values must be a non-empty 1-D array of finite numbers")
    step = np.diff(v)
    if np.all(step >= 0):
        sign = 1.0
    elif np.all(step <= 0):
        sign = -1.0
    else:
        raise ValueError("values must be monotone in t (timesteps, SNR and log-SNR all are); "
                         "for other sequences build the (T, T) cost matrix yourself")
    T = v.size
    S = np.concatenate(([0.0], np.cumsum(v)))  # (T+1,) S[i] = v_0 + ... + v_{i-1}
    l = np.arange(T)[:, None]  # (T, 1)
    r = np.arange(T)[None, :]  # (1, T)
    c = (l + r + 1) // 2  # (T, T) centre, within [l, r] when l <= r
    vc = v[c]  # (T, T)
    below = vc * (c - l) - (S[c] - S[l])  # (T, T) sum_{t=l}^{c-1} (v_c - v_t) for increasing v
    above = (S[r + 1] - S[c]) - vc * (r + 1 - c)  # (T, T) sum_{t=c}^{r} (v_t - v_c)
    cost = np.maximum(sign * (below + above), 0.0)  # a sum of |.| is >= 0; clip rounding
    return np.where(l <= r, cost, np.inf)


def affinity_cost_matrix(tas):
    """
    Cost matrix of the gradient clustering cost (ANT, interval clustering objectives).

    cost[l, r] = -sum_{t=l..r} TAS[c, t] with centre c = (l + r + 1) // 2, where TAS is the
    (T, T) task affinity matrix (see gradient_affinity). Each entry takes O(1) from row prefix
    sums. Entries with l > r are +inf. Returns a (T, T) float64 array.
    """
    A = np.asarray(tas, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"tas must be a square (T, T) matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError("tas must be finite")
    T = A.shape[0]
    R = np.zeros((T, T + 1))  # (T, T+1) R[i, j] = sum_{t<j} TAS[i, t]
    R[:, 1:] = np.cumsum(A, axis=1)
    l = np.arange(T)[:, None]  # (T, 1)
    r = np.arange(T)[None, :]  # (1, T)
    c = (l + r + 1) // 2  # (T, T)
    cost = -(R[c, r + 1] - R[c, l])  # (T, T)
    return np.where(l <= r, cost, np.inf)


def cluster_timesteps(num_clusters, objective="timestep", alphas_cumprod=None, tas=None,
                      num_timesteps=None):
    """
    Interval clustering of the T timesteps under one of the paper's objectives (ANT, Sec. on
    interval clustering): "timestep" (|t - c|, gives equal intervals), "snr" (|SNR(t) - SNR(c)|,
    the paper's; lopsided towards small t), "log-snr" (our option: balanced in noise level) or
    "gradient" (-TAS(c, t), needs `tas`).

    SNR(t) = abar_t / (1 - abar_t) is computed in float64 from `alphas_cumprod` (T,), which the
    caller takes from its noise schedule: a numpy array, a list or a tensor on any device, every
    value in (0, 1) and none above the one before (t = 0 the least noisy; from betas (T,) it is
    cumprod(1 - betas)). For DiT's linear schedule a float32 copy gives the float64 clusters.
    `num_timesteps` is needed only for "timestep" when neither alphas_cumprod nor tas is given;
    when given it must agree with them.
    Returns (intervals, total_cost) as interval_clustering does.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "gradient":
        if tas is None:
            raise ValueError("objective 'gradient' needs tas=(T, T) task affinity; compute it with "
                             "`python negative_transfer.py affinity`")
        cost = affinity_cost_matrix(tas)
    elif objective == "timestep":
        sizes = [n for n in (num_timesteps,
                             None if alphas_cumprod is None else len(alphas_cumprod),
                             None if tas is None else len(tas)) if n is not None]
        if not sizes:
            raise ValueError("objective 'timestep' needs num_timesteps (or alphas_cumprod)")
        if len(set(sizes)) > 1:
            raise ValueError(f"num_timesteps, alphas_cumprod and tas disagree on T: {sizes}")
        cost = deviation_cost_matrix(np.arange(sizes[0], dtype=np.float64))
    else:
        if alphas_cumprod is None:
            raise ValueError(f"objective {objective!r} needs alphas_cumprod from the noise schedule")
        if isinstance(alphas_cumprod, torch.Tensor):  # e.g. a buffer on the GPU
            alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)  # bfloat16 has no numpy type
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or abar.size == 0:
            raise ValueError(f"alphas_cumprod must be a 1-D (T,) array, got shape {abar.shape}")
        bad = np.flatnonzero(~((abar > 0) & (abar < 1)))
        if bad.size:
            i = int(bad[0])
            if abar[i] >= 1:
                fix = "compute the schedule in float64 (in float16/32, 1 - beta rounds to 1 for a tiny beta)"
            elif abar[i] == 0:
                fix = "a zero-terminal-SNR schedule is not supported by the SNR objectives; use objective 'timestep'"
            else:
                fix = "pass alpha-bar, the cumulative product of 1 - beta"
            raise ValueError(f"alphas_cumprod must lie in (0, 1), but alphas_cumprod[{i}] = {float(abar[i])}: {fix}")
        rise = np.flatnonzero(np.diff(abar) > 0)
        if rise.size:  # betas lie in (0, 1) too, and would cluster silently by the wrong values
            i = int(rise[0])
            raise ValueError(f"alphas_cumprod must not increase with t, but alphas_cumprod[{i + 1}] > "
                             f"alphas_cumprod[{i}]: pass alpha-bar, cumprod(1 - betas), not the betas, with "
                             f"t = 0 (the least noise) first")
        if objective == "snr":
            values = abar / (1.0 - abar)  # (T,)
        else:
            values = np.log(abar) - np.log1p(-abar)  # (T,)
        cost = deviation_cost_matrix(values)
    if num_timesteps is not None and cost.shape[0] != num_timesteps:
        raise ValueError(f"num_timesteps={num_timesteps} but the schedule/TAS has T={cost.shape[0]}")
    return interval_clustering(cost, num_clusters)


# -----------------------------------------------------------------------------
# Training with clusters: sampling, per-cluster losses, UW


def stratified_timesteps(batch_size, intervals, generator=None, device=None):
    """
    Stratified timesteps (ANT, training with clusters): cluster k gets B // K samples, plus one
    of the B % K leftovers if k < B % K, and its timesteps are uniform over [start_k, stop_k).
    The samples come in cluster order; pair them with a shuffled data batch.

    Everything runs on `device` with no host sync. `generator` must live on that device (for
    CUDA: torch.Generator(device="cuda")). Returns t (B,) long and cluster (B,) long.
    """
    K = len(intervals)
    if K == 0 or any(int(lo) != lo or int(hi) != hi or not 0 <= lo < hi for lo, hi in intervals):
        raise ValueError(f"intervals must be non-empty (start, stop) pairs of ints, got {intervals}")
    if batch_size < K:
        raise ValueError(f"batch_size={batch_size} < {K} clusters: every cluster needs a sample")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}; "
                         f"create it with torch.Generator(device={str(device)!r})")
    counts = stratified_counts(batch_size, K)
    full = lambda n, value: torch.full((n,), int(value), dtype=torch.long, device=device)
    start = torch.cat([full(n, lo) for n, (lo, hi) in zip(counts, intervals)])  # (B,)
    size = torch.cat([full(n, hi - lo) for n, (lo, hi) in zip(counts, intervals)])  # (B,)
    cluster = torch.cat([full(n, k) for k, n in enumerate(counts)])  # (B,)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)  # (B,)
    t = start + torch.minimum((u * size).long(), size - 1)  # (B,) the min guards u*size rounding up
    return t, cluster


def stratified_counts(batch_size, num_clusters):
    """The number of samples stratified_timesteps gives each cluster: B // K, plus one of the B % K leftovers for
    the first B % K clusters. A list of K ints; cluster k is the k-th slice of the batch with this length."""
    return [batch_size // num_clusters + (1 if k < batch_size % num_clusters else 0) for k in range(num_clusters)]


def cluster_counts(cluster, num_clusters):
    """(K,) float32 number of samples in each cluster, for cluster ids (B,) in [0, K). index_add, not bincount:
    CUDA's bincount reads the ids' maximum on the host, a sync every step."""
    return torch.zeros(num_clusters, device=cluster.device).index_add_(0, cluster, torch.ones_like(cluster, dtype=torch.float))


def cluster_losses(per_sample_loss, cluster, num_clusters, counts=None):
    """
    Per-cluster loss L_k = mean of the per-sample losses in cluster k (ANT, training with
    clusters). per_sample_loss (B,) (average each sample's loss over C, H, W first), cluster (B,)
    int64 or int32 with values in [0, K) (not checked: that would wait for the device).
    Differentiable, computed with index_add (no host sync). Returns (K,) float32.

    A cluster with no sample gets L_k = 0; stratified_timesteps never leaves one empty. If t comes
    from another sampler (e.g. curriculum.Curriculum), label it with
    cluster = torch.bucketize(t, starts, right=True) - 1 (starts: the (K,) interval starts, on t's
    device) and pass present = cluster_counts(cluster, K) > 0 to UncertaintyWeighting, else the s_k
    of an empty cluster falls without end.

    counts (K,), optional, replaces this batch's cluster_counts as the divisor. Under DDP, when the
    ranks' counts differ (such a sampler), pass the all-rank mean counts (all_reduce_mean of this
    rank's) and present = counts > 0: the ranks' average of L_k, and of its gradients, is then the
    mean over cluster k's samples on all ranks, as on one big batch.
    """
    if per_sample_loss.dim() != 1 or cluster.shape != per_sample_loss.shape:
        raise ValueError(f"per_sample_loss and cluster must both be (B,), got "
                         f"{tuple(per_sample_loss.shape)} and {tuple(cluster.shape)}")
    loss = per_sample_loss.float()  # (B,)
    sums = loss.new_zeros(num_clusters).index_add(0, cluster, loss)  # (K,)
    if counts is None:
        counts = cluster_counts(cluster, num_clusters)  # (K,)
    return sums / torch.where(counts > 0, counts, 1.0)  # (K,) 0 for a cluster with no sample


class UncertaintyWeighting(nn.Module):
    """
    Uncertainty Weighting over clusters (ANT-UW; Kendall et al., CVPR 2018):
    loss = sum_k 0.5 * (exp(-s_k) * L_k / K + s_k), with learnable s_k = `log_vars`, init 0.

    The 1/K scales L_k only, not s_k, as in the official train scripts (they divide each L_k
    by K before the UW term). At the optimum exp(-s_k) = K / L_k, so the effective weight of
    L_k is 0.5 / L_k whether or not L_k is scaled; the 1/K changes only the start (weights
    0.5/K instead of 0.5). Put `log_vars` in their own optimiser group with lr UW_LR and weight
    decay UW_WEIGHT_DECAY. Under DDP average their gradient across ranks too
    (all_reduce_mean(uw.log_vars.grad)), because L_k differs per rank.
    """

    def __init__(self, num_clusters):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(num_clusters))  # (K,) s_k

    def forward(self, losses, present=None):
        """losses (K,) -> scalar. present (K,) bool, optional: clusters with no sample in the
        batch (e.g. hidden by a curriculum) add nothing, so their s_k get no gradient (an optimiser
        with momentum still moves an s_k that had one before); K stays the total number of clusters."""
        if losses.shape != self.log_vars.shape:
            raise ValueError(f"losses must be ({self.log_vars.numel()},), got {tuple(losses.shape)}")
        K = self.log_vars.numel()
        terms = 0.5 * (torch.exp(-self.log_vars) * losses / K + self.log_vars)  # (K,)
        if present is not None:
            if present.shape != terms.shape:
                raise ValueError(f"present must be ({K},), got {tuple(present.shape)}")
            terms = terms * present.to(terms.dtype)  # a product, so no host sync
        return terms.sum()

    def weights(self):
        """exp(-s_k), (K,), detached, for logging. (The official code logs 0.5 * exp(-s_k).)"""
        return torch.exp(-self.log_vars.detach())


# -----------------------------------------------------------------------------
# Per-cluster gradients, PCGrad, Nash-MTL


def _gradient_matrix(num_tasks, params):
    """The checked parameter list and a zero G (K, P) in their dtype and device."""
    params = list(params)
    if not params:
        raise ValueError("params must be a non-empty list of parameters")
    if any(not p.requires_grad for p in params):
        raise ValueError("every parameter in params must require grad (a DiT's pos_embed does not); "
                         "pass [p for p in model.parameters() if p.requires_grad]")
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("params must share one dtype and device")
    P = sum(p.numel() for p in params)
    return params, torch.zeros(num_tasks, P, dtype=params[0].dtype, device=params[0].device)  # (K, P)


def _gradient_row(loss, params, row, retain_graph):
    """row (P,) <- the gradient of the scalar loss with respect to params, flattened in their order (zeros where
    the loss does not reach a parameter)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    offset = 0
    for p, g in zip(params, grads):
        if g is not None:
            row[offset:offset + p.numel()].copy_(g.reshape(-1))
        offset += p.numel()


def sliced_task_gradients(loss_fn, sizes, params):
    """
    Per-cluster gradients G (K, P) with one forward and one backward per cluster, flattened in parameter order.
    Used by ANT-PCGrad and ANT-Nash (train.py).

    The batch holds the clusters in consecutive slices of lengths `sizes` (K ints; stratified_timesteps's order,
    whose lengths stratified_counts gives). loss_fn(k, rows) runs the model on the samples in the slice `rows` alone
    and returns the scalar loss of cluster k (L_k, or L_k / K as PCGrad's official scale); a cluster with no sample
    keeps a zero row and is not run. Each slice's graph is freed by its backward before the next slice's forward.

    For a model that treats its samples independently, as a DiT does (attention within a sample, no batch
    statistics), L_k depends on cluster k's samples only, so this is task_gradients on the whole batch up to float
    rounding, at about the cost of one forward and backward of the batch instead of K backward passes through it; and
    only one slice's activations are alive at a time. A model with batch statistics (BatchNorm) needs task_gradients.
    Under DDP, run it inside `model.no_sync()` (autograd.grad does not trigger DDP's all-reduce), then call
    all_reduce_mean(G).
    """
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 0:
        raise ValueError(f"sizes must be the K slice lengths (ints >= 0), got {sizes}")
    params, G = _gradient_matrix(len(sizes), params)  # (K, P)
    start = 0
    for k, n in enumerate(sizes):
        if n:
            _gradient_row(loss_fn(k, slice(start, start + n)), params, G[k], retain_graph=False)
        start += n
    return G


def task_gradients(losses, params):
    """
    Per-cluster gradients G (K, P) of the losses L_k (K,) with respect to `params`, flattened in
    parameter order, by K backward passes through the shared graph (torch.autograd.grad with
    retain_graph=True, so the graph survives for a later backward). This is what the official code
    does, and works for any model; for one whose samples do not interact (a DiT),
    sliced_task_gradients gets the same G for the FLOPs of one forward and backward of the batch,
    where these K backward passes cost about 2K forwards. Parameters a loss does not reach
    get zeros. Under DDP run the forward inside `model.no_sync()` (autograd.grad does not trigger
    DDP's all-reduce), then call all_reduce_mean(G).
    """
    if losses.dim() != 1:
        raise ValueError("losses must be (K,)")
    params, G = _gradient_matrix(losses.numel(), params)  # (K, P)
    for k in range(losses.numel()):
        if losses[k].requires_grad:  # a pass's gradients are freed when _gradient_row returns, so two never coexist with G
            _gradient_row(losses[k], params, G[k], retain_graph=True)
    return G


def write_flat_grad(params, flat):
    """Write a flat gradient (P,) into the .grad of `params` (in order), copying it."""
    params = list(params)
    P = sum(p.numel() for p in params)
    if flat.shape != (P,):
        raise ValueError(f"flat must have shape ({P},), got {tuple(flat.shape)}")
    offset = 0
    for p in params:
        g = flat[offset:offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = g.detach().to(dtype=p.dtype, copy=True)
        else:
            p.grad.copy_(g)
        offset += p.numel()


def all_reduce_mean(tensor, group=None):
    """
    Average `tensor` in place over the ranks of `group` when torch.distributed is initialised
    (no-op otherwise), and return it. Average G (K, P) before pcgrad / NashMTL.update, so that
    every rank makes the same projection and the same alpha. Each call moves K times the
    gradient volume of a DDP step.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(dist.get_world_size(group))
    return tensor


def gram_matrix(grads):
    """G G^T (K, K) in float64 on grads' device, accumulated over float64 chunks of columns
    (exact products of float32 entries; unaffected by TF32 matmul settings)."""
    if grads.dim() != 2:
        raise ValueError(f"grads must be (K, P), got shape {tuple(grads.shape)}")
    K, P = grads.shape
    gram = torch.zeros(K, K, dtype=torch.float64, device=grads.device)  # (K, K)
    for start in range(0, P, _GRAM_CHUNK):
        chunk = grads[:, start:start + _GRAM_CHUNK].double()  # (K, chunk)
        gram += chunk @ chunk.T
    return gram


def pcgrad_coefficients(gram, order):
    """
    PCGrad projections written in the basis of the original gradients (ANT-PCGrad;
    Yu et al., NeurIPS 2020). For each k, visiting j in order[k]: if g_k^PC . g_j < 0, then
    g_k^PC -= (g_k^PC . g_j / |g_j|^2) g_j, always against the original g_j; a zero g_j is
    skipped. Every g_k^PC is a combination of the g_j, so all dot products come from the
    float64 Gram matrix (K, K). Returns C (K, K) float64 with g_k^PC = sum_j C[k, j] g_j.
    Runs on gram's device without host sync.
    """
    K = gram.shape[0]
    if gram.shape != (K, K):
        raise ValueError(f"gram must be square, got {tuple(gram.shape)}")
    if len(order) != K or any(sorted(int(j) for j in order[k]) != [j for j in range(K) if j != k]
                              for k in range(K)):
        raise ValueError("order[k] must be a permutation of the task indices other than k")
    gram = gram.double()
    sq = gram.diagonal()  # (K,) |g_j|^2
    tiny = torch.finfo(torch.float64).tiny
    coef = torch.eye(K, dtype=torch.float64, device=gram.device)  # (K, K)
    for k in range(K):
        for j in order[k]:
            j = int(j)
            dot = coef[k] @ gram[:, j]  # () g_k^PC . g_j
            conflict = (dot < 0) & (sq[j] > 0)
            coef[k, j] -= torch.where(conflict, dot / sq[j].clamp_min(tiny), torch.zeros_like(dot))
    return coef


def pcgrad(grads, generator=None, order=None):
    """
    PCGrad over clusters (ANT-PCGrad): project each g_k (rows of grads (K, P)) off the other
    gradients it conflicts with, in a random order, and return the sum of the projected
    gradients (P,) in grads' dtype.

    order[k] is the visiting order of the tasks j != k. When it is None, each order[k] is drawn
    with torch.randperm from `generator`, a CPU torch.Generator that the caller seeds the same
    on every rank (None: torch's global CPU RNG). The official code scales every L_k by 1/K;
    PCGrad is linear in that scale, so pass the gradients of L_k / K to match it.
    """
    K = grads.shape[0]
    if order is None:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("pcgrad draws its order on the host: pass a CPU torch.Generator")
        order = []
        for k in range(K):
            others = [j for j in range(K) if j != k]
            order.append([others[i] for i in torch.randperm(K - 1, generator=generator).tolist()])
    return weighted_sum(grads, pcgrad_coefficients(gram_matrix(grads), order).sum(0))


def weighted_sum(grads, weights):
    """sum_k weights[k] * grads[k] (P,) for grads (K, P) and weights (K,) on grads' device: the combined
    gradient of PCGrad and of a Nash-MTL update step. One row at a time in grads' dtype, so the products
    are plain float32 arithmetic (no TF32 matmul) and no second (K, P) tensor is made (13.5 GB for DiT-XL/2, K = 5)."""
    if grads.dim() != 2 or weights.shape != (grads.shape[0],):
        raise ValueError(f"expected grads (K, P) and weights (K,), got {tuple(grads.shape)} and {tuple(weights.shape)}")
    weights = weights.to(grads.dtype)  # (K,)
    out = torch.zeros(grads.shape[1], dtype=grads.dtype, device=grads.device)  # (P,)
    for k in range(grads.shape[0]):
        out.addcmul_(grads[k], weights[k])
    return out


def _nash_feasible_start(A, prev_alpha):
    """A point on the boundary of {alpha > 0: alpha_k (A alpha)_k >= 1}, or None if that set is
    empty. Candidates (previous alpha, ones, 1/sqrt(diag A), else a phase-I LP point) are scaled
    onto the boundary; we keep the one with the smallest phi = sum_k log(alpha_k (A alpha)_k)."""
    K = A.shape[0]
    candidates = [np.ones(K)]
    if prev_alpha is not None:
        candidates.append(np.asarray(prev_alpha, dtype=np.float64).reshape(K))
    if np.all(np.diag(A) > 0):
        candidates.append(1.0 / np.sqrt(np.diag(A)))

    def onto_boundary(alpha):
        # A alpha > 0 by more than rounding: with exactly opposed gradients (A singular, no Nash point) the start
        # 1/sqrt(diag A) gives A alpha ~ 1e-16 |A| alpha, which once passed, was scaled by 1e8 onto the boundary
        # and came back as a "solution" with success
        if not (np.all(np.isfinite(alpha)) and np.all(alpha > 0) and np.all(A @ alpha > 1e-9 * (np.abs(A) @ alpha))):
            return None
        return alpha / np.sqrt(np.min(alpha * (A @ alpha)))

    starts = [a for a in map(onto_boundary, candidates) if a is not None]
    if not starts:
        # Phase I: maximise s subject to A x >= s, x >= s, sum x = 1; strictly feasible iff s > 0.
        c = np.zeros(K + 1)
        c[-1] = -1.0
        A_ub = np.vstack([np.hstack([-A, np.ones((K, 1))]), np.hstack([-np.eye(K), np.ones((K, 1))])])  # (2K, K+1)
        A_eq = np.hstack([np.ones((1, K)), np.zeros((1, 1))])  # (1, K+1)
        lp = linprog(c, A_ub=A_ub, b_ub=np.zeros(2 * K), A_eq=A_eq, b_eq=[1.0],
                     bounds=[(None, None)] * (K + 1))
        if lp.status != 0 or lp.x[-1] <= 1e-9:  # s > 0 beyond the LP's own tolerance
            return None
        starts = [onto_boundary(lp.x[:K])]
    return min(starts, key=lambda a: np.sum(np.log(a * (A @ a))))


def _nash_subproblem(A, alpha):
    """One concave-convex step of Nash-MTL (Navon et al., ICML 2022): minimise
    the linearisation of phi(x) = sum_k log x_k + log (A x)_k at `alpha` over the convex set
    {x > 0, A x > 0, log x_k + log (A x)_k >= 0}. `alpha` must be feasible. Solved with scipy's
    trust-constr in variables z = x / alpha, from the strictly feasible start z = 1.05.
    The official cvxpy problem minimises sum(A x) plus this linearisation divided by |G G^T|_F (its
    alpha is on the unnormalised scale); we leave sum(A x) out.
    The Nash solution alpha_k (A alpha)_k = 1 is a fixed point of this step (KKT with every
    multiplier 1). With sum(A x) it is not always one: from the exact Nash point the official
    subproblem has a feasible point of lower objective in 15 of 344 random Gram matrices (K = 2..8,
    rows up to 55-fold apart, a conflicting pair in half), so its iterates can leave it. The tests
    check the final alpha against an independent solver. Returns the new alpha (K,) or None."""
    K = A.shape[0]
    grad_phi = 1.0 / alpha + A @ (1.0 / (A @ alpha))  # (K,) gradient of phi at alpha
    B = A * alpha[None, :]  # (K, K) A diag(alpha), so A x = B z
    h = grad_phi * alpha  # (K,) the linear objective in z
    log_alpha = np.log(alpha)
    tiny = np.finfo(np.float64).tiny  # trust-constr may probe outside the domain of the logs

    def constraint(z):
        return log_alpha + np.log(np.maximum(z, tiny)) + np.log(np.maximum(B @ z, tiny))

    def constraint_jac(z):
        return np.diag(1.0 / z) + B / (B @ z)[:, None]

    def constraint_hess(z, v):
        return -(np.diag(v / z ** 2) + (B.T * (v / (B @ z) ** 2)) @ B)

    try:
        result = minimize(
            lambda z: h @ z, np.full(K, 1.05), jac=lambda z: h, hess=lambda z: np.zeros((K, K)),
            method="trust-constr", bounds=Bounds(np.zeros(K), np.full(K, np.inf)),
            constraints=[LinearConstraint(B, 0.0, np.inf),
                         NonlinearConstraint(constraint, 0.0, np.inf, jac=constraint_jac,
                                             hess=constraint_hess)],
            options=dict(gtol=1e-12, xtol=1e-12, maxiter=500))
    except (ValueError, np.linalg.LinAlgError):
        return None
    new = alpha * result.x  # (K,)
    if not (np.all(np.isfinite(new)) and np.all(new > 0) and np.all(A @ new > 0)):
        return None
    if np.min(np.log(new) + np.log(A @ new)) < -1e-6:  # infeasible beyond solver tolerance
        return None
    return new


def _nash_newton(A, alpha, max_iter=100):
    """The Nash point straight from its convex form: for PSD A, alpha_k (A alpha)_k = 1 is where
    the gradient A a - 1/a of f(a) = 0.5 a^T A a - sum_k log a_k vanishes, and f is strictly
    convex on a > 0. Damped Newton from a feasible `alpha`, halving the step until a stays > 0
    and f decreases (Armijo), until the Newton decrement is at the rounding level of f. The
    fallback when a concave-convex subproblem fails. Returns the new alpha (K,), or None if it
    does not converge (e.g. A is singular along a direction >= 0, where f is unbounded below)."""
    def f(a):
        return 0.5 * a @ A @ a - np.sum(np.log(a))

    a = alpha.copy()  # (K,)
    for _ in range(max_iter):
        grad = A @ a - 1.0 / a  # (K,)
        try:
            d = np.linalg.solve(A + np.diag(1.0 / a ** 2), grad)  # (K,) Newton direction
        except np.linalg.LinAlgError:
            return None
        f_a, decrement = f(a), grad @ d  # decrement: the squared Newton decrement ~ 2 (f(a) - min f)
        if decrement < 1e-14 * max(1.0, abs(f_a)):
            return a
        step = 1.0
        while np.any(a - step * d <= 0) or f(a - step * d) > f_a - 0.25 * step * decrement:
            step /= 2
            if step < 1e-12:
                return None
        a = a - step * d
    return None


def nash_mtl_weights(gram, prev_alpha=None, max_iter=NASH_MAX_ITER, change_tol=1e-6,
                     residual_tol=1e-3):
    """
    Nash-MTL weights over clusters (ANT-Nash; Navon et al., "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Eq. 3 / Alg. 1): alpha > 0 with alpha_k (G G^T alpha)_k = 1,
    where `gram` = G G^T (K, K), so that the update d = G^T alpha has d . g_k = 1 / alpha_k.

    As in the official code, the problem is solved for the normalised A = G G^T / |G G^T|_F,
    whose solution is sqrt(|G G^T|_F) times alpha, and rescaled at the end: the same alpha as
    the official constraint, with well-conditioned subproblems. The concave-convex procedure
    (_nash_ccp) runs up to `max_iter` convex subproblems from the best of prev_alpha / ones /
    1/sqrt(diag A) scaled to feasibility, and stops when alpha moves less than change_tol or
    |A alpha - 1/alpha| < residual_tol (the official thresholds; here both are measured on the
    normalised scale, the official code measures them at the unnormalised alpha).

    Returns (alpha (K,) float64 numpy or None, info). info has success, converged, iterations,
    residual (normalised scale), message, newton. For PSD A the answer is also the minimiser of
    the convex 0.5 a^T A a - sum log a: when a subproblem fails, that problem is solved by
    Newton's method instead (_nash_newton), and info["newton"] is True. On failure (non-finite
    gradients, a zero cluster gradient, no alpha > 0 with A alpha > 0 because the gradients
    conflict too strongly, or both solvers failing) alpha is None: keep the previous alpha and
    log info["message"]. Whatever stopped the loop, its alpha is then checked against the equation
    itself: if max_k |alpha_k (A alpha)_k - 1| > residual_tol (the absolute stopping residual lets
    a large alpha through far from it, and 20 iterations do not always reach it), Newton's method
    solves it from that alpha (info["newton"] True; _nash_polish). Only if Newton fails as well
    does that alpha come back as it is, with converged=False if the loop ran out of iterations
    (success=True, as in the official code).
    """
    if isinstance(gram, torch.Tensor):
        gram = gram.detach().double().cpu().numpy()
    M = np.asarray(gram, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"gram must be a square (K, K) matrix G G^T, got shape {M.shape}")
    info = dict(success=False, converged=False, iterations=0, residual=float("nan"), message="", newton=False)
    if not np.all(np.isfinite(M)):
        info["message"] = "non-finite Gram matrix (NaN/inf gradients)"
        return None, info
    norm = np.linalg.norm(M)
    if norm == 0:
        info["message"] = "all cluster gradients are zero"
        return None, info
    zero = np.flatnonzero(np.diag(M) <= 0)
    if zero.size:  # |g_k| = 0: alpha_k (M alpha)_k = 1 has no solution, whatever the other gradients
        info["message"] = f"cluster(s) {zero.tolist()} have a zero gradient"
        return None, info
    A = 0.5 * (M + M.T) / norm  # (K, K) normalised, symmetric to rounding
    scale = math.sqrt(norm)  # alpha solves A's equation  <=>  alpha / scale solves M's
    start = None if prev_alpha is None else np.asarray(prev_alpha, dtype=np.float64) * scale
    alpha = _nash_ccp(A, start, max_iter, change_tol, residual_tol, info)
    return (None if alpha is None else alpha / scale), info


def _nash_ccp(A, prev_alpha, max_iter, change_tol, residual_tol, info):
    """The concave-convex procedure of nash_mtl_weights on the normalised A (K, K): alpha (K,)
    with alpha_k (A alpha)_k = 1, or None; fills `info` as described there."""
    alpha = _nash_feasible_start(A, prev_alpha)
    if alpha is None:
        info["message"] = "no alpha > 0 with A alpha > 0: the cluster gradients conflict too strongly"
        return None
    residual = float(np.linalg.norm(A @ alpha - 1.0 / alpha))
    info["residual"] = residual
    if residual < residual_tol:  # the start already solves it (e.g. a warm start)
        info.update(success=True, converged=True, message="start satisfies the residual")
        return _nash_polish(A, alpha, residual_tol, info)
    for it in range(1, max_iter + 1):
        new = _nash_subproblem(A, alpha)
        if new is None:  # trust-constr gives up now and then (see the module docstring)
            new = _nash_newton(A, alpha)
            if new is None or np.max(np.abs(new * (A @ new) - 1.0)) > 1e-6:
                info.update(iterations=it, message=f"convex subproblem failed at iteration {it}, and so did Newton's method")
                return None
            residual = float(np.linalg.norm(A @ new - 1.0 / new))
            info.update(success=True, converged=True, iterations=it, residual=residual, newton=True,
                        message=f"convex subproblem failed at iteration {it}; solved by Newton's method instead")
            return new
        change = float(np.linalg.norm(new - alpha))
        alpha = new
        residual = float(np.linalg.norm(A @ alpha - 1.0 / alpha))
        info.update(iterations=it, residual=residual)
        if residual < residual_tol or change < change_tol:
            info.update(success=True, converged=True, message="converged")
            return _nash_polish(A, alpha, residual_tol, info)
    info.update(success=True, message=f"not converged after {max_iter} iterations")
    return _nash_polish(A, alpha, residual_tol, info)


def _nash_polish(A, alpha, tol, info):
    """Check the concave-convex result against the equation itself, max_k |alpha_k (A alpha)_k - 1| <= tol
    (scale-free: the same for A and G G^T). The official stopping rules measure |A alpha - 1/alpha|, an
    absolute residual: on an ill-conditioned A alpha is large, passes it while alpha_k (A alpha)_k is still
    0.7 off, or 20 iterations end up to 3e5 off with success reported. Then Newton's method (_nash_newton) solves
    the same equation from alpha; if it fails too, alpha comes back unchanged."""
    error = float(np.max(np.abs(alpha * (A @ alpha) - 1.0)))
    if error <= tol:
        return alpha
    new = _nash_newton(A, alpha)
    if new is None or np.max(np.abs(new * (A @ new) - 1.0)) > 1e-6:
        return alpha
    info.update(success=True, converged=True, newton=True, residual=float(np.linalg.norm(A @ new - 1.0 / new)),
                message=f"{info['message']}, but max_k |alpha_k (A alpha)_k - 1| was {error:.3g}: solved by Newton's method")
    return new


class NashMTL:
    """
    Nash-MTL state for ANT-Nash training (official recipe). alpha starts at ones. Every `every`
    steps it is re-solved from per-cluster gradients (should_update(), then update(G)); in
    between it is kept. The loss is sum_k alpha_k L_k / K, and the caller clips the gradient
    norm to `max_norm`. Call step() at the end of each training step, after should_update() and
    loss(), as the official counter advances after use (calling it first moves the solves to
    steps 24, 49, ...); or pass the 0-based step to should_update(step), as train.py does. On
    update steps the combined gradient (alpha @ G) / K, G the gradients of L_k given to update(),
    can be written directly, weighted_sum(G, alpha / K) then write_flat_grad, which saves one backward. state_dict holds
    plain Python types.
    """

    def __init__(self, num_clusters, every=NASH_EVERY, max_norm=NASH_MAX_NORM,
                 max_iter=NASH_MAX_ITER):
        self.num_clusters = num_clusters
        self.every = every
        self.max_norm = max_norm
        self.max_iter = max_iter
        self.alpha = np.ones(num_clusters)  # (K,) float64
        self.steps = 0  # training steps taken, advanced by step()
        self.updates = 0  # successful solves
        self.failures = 0  # solves that kept the previous alpha
        self._alpha_cache = None  # ((device, dtype), tensor): alpha crosses to the device once

    def step(self):
        """Advance the step counter; call once per training step."""
        self.steps += 1

    def should_update(self, step=None):
        """True on the steps where alpha is re-solved, step % every == 0 (step 0 included).
        `step` defaults to the internal counter."""
        return (self.steps if step is None else step) % self.every == 0

    def update(self, grads):
        """Re-solve alpha from per-cluster gradients grads (K, P) of the cluster losses L_k, not
        L_k / K (official; alpha scales as 1 / |grads|). Average them across ranks first. Keeps
        the previous alpha on failure. Returns the solver's info dict."""
        if grads.dim() != 2 or grads.shape[0] != self.num_clusters:
            raise ValueError(f"grads must be ({self.num_clusters}, P), got {tuple(grads.shape)}")
        alpha, info = nash_mtl_weights(gram_matrix(grads), self.alpha, self.max_iter)
        if alpha is None:
            self.failures += 1
        else:
            self.alpha = alpha
            self.updates += 1
            self._alpha_cache = None
        return info

    def alpha_tensor(self, like):
        """alpha (K,) as a tensor with the device and dtype of `like`, copied only after updates."""
        key = (like.device, like.dtype)
        if self._alpha_cache is None or self._alpha_cache[0] != key:
            self._alpha_cache = (key, torch.as_tensor(self.alpha, dtype=like.dtype, device=like.device))
        return self._alpha_cache[1]

    def loss(self, losses):
        """sum_k alpha_k L_k / K for losses (K,)."""
        if losses.shape != (self.num_clusters,):
            raise ValueError(f"losses must be ({self.num_clusters},), got {tuple(losses.shape)}")
        return (self.alpha_tensor(losses) * losses).sum() / self.num_clusters

    def state_dict(self):
        """alpha and the step / update / failure counters, as plain Python types."""
        return dict(alpha=[float(a) for a in self.alpha], steps=self.steps, updates=self.updates,
                    failures=self.failures)

    def load_state_dict(self, state):
        """Restore from state_dict(); the number of clusters must match."""
        alpha = np.asarray(state["alpha"], dtype=np.float64)
        if alpha.shape != (self.num_clusters,):
            raise ValueError(f"state has {alpha.size} alphas, expected {self.num_clusters}")
        self.alpha = alpha
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
        self.failures = int(state["failures"])
        self._alpha_cache = None


# -----------------------------------------------------------------------------
# Task affinity (gradient clustering objective)


def _count_sketch(flat, dim, seed, chunk=1 << 22):
    """CountSketch of flat (P,) into (dim,) float64 (Charikar et al., 2002): coordinate i adds
    sign_i * flat_i to bucket h_i. The hash comes from a seeded generator, drawn chunk by chunk,
    so the same seed gives the same sketch for every call and nothing of size P x dim exists.
    Inner products are unbiased, with variance at most (|a|^2 |b|^2 + (a.b)^2) / dim, as for a
    dense Gaussian projection, at O(P) cost per gradient instead of O(P dim)."""
    gen = torch.Generator(device=flat.device).manual_seed(seed)
    out = torch.zeros(dim, dtype=torch.float64, device=flat.device)  # (dim,)
    for start in range(0, flat.numel(), chunk):
        x = flat[start:start + chunk].double()  # (n,)
        bucket = torch.randint(dim, x.shape, generator=gen, device=flat.device)  # (n,)
        sign = torch.randint(2, x.shape, generator=gen, device=flat.device, dtype=torch.float64)  # (n,) 0/1
        out.index_add_(0, bucket, x * (2.0 * sign - 1.0))
    return out


def gradient_affinity(grad_fn, num_timesteps, groups=100, batch_size=32, sketch_dim=4096, seed=0):
    """
    Task affinity score TAS (T, T) (ANT, task affinity / gradient clustering cost): the cosine
    similarity of loss gradients between timesteps. Timesteps are pooled into `groups`
    contiguous groups, [g T // groups, (g + 1) T // groups) (equal when groups divides T). For
    group g we call grad_fn(t) with t (batch_size,) long (CPU), drawn uniformly inside the group
    (seeded); grad_fn returns the flat gradient (P,). The group-by-group
    cosine matrix is then expanded to (T, T).

    When P <= sketch_dim the raw gradients are used, so the result is exact. Otherwise each
    gradient is compressed to a CountSketch of size sketch_dim with the same hash for every
    group, which keeps memory at groups x sketch_dim. Averaging over checkpoints is left to
    the caller.
    """
    T = int(num_timesteps)
    if not 1 <= groups <= T or batch_size < 1 or sketch_dim < 1:
        raise ValueError(f"need 1 <= groups <= T={T}, batch_size >= 1 and sketch_dim >= 1")
    edges = [g * T // groups for g in range(groups + 1)]
    gen = torch.Generator().manual_seed(seed)
    features, P = [], None
    for g in range(groups):
        t = torch.randint(edges[g], edges[g + 1], (batch_size,), generator=gen)  # (batch_size,)
        flat = grad_fn(t).detach()  # (P,)
        if flat.dim() != 1 or (P is not None and flat.numel() != P):
            raise ValueError(f"grad_fn must return a flat (P,) gradient of fixed size, got "
                             f"{tuple(flat.shape)}")
        P = flat.numel()
        feature = flat.double() if P <= sketch_dim else _count_sketch(flat, sketch_dim, seed)
        norm = feature.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"gradient of timesteps [{edges[g]}, {edges[g + 1]}) is zero or "
                             f"non-finite; its cosine similarity is undefined")
        features.append((feature / norm).cpu())
    F = torch.stack(features)  # (groups, d) unit rows
    similarity = (F @ F.T).clamp(-1.0, 1.0).numpy()  # (groups, groups)
    group_of = np.repeat(np.arange(groups), np.diff(edges))  # (T,)
    return similarity[np.ix_(group_of, group_of)]  # (T, T)


def load_tas(path):
    """The TAS (T, T) matrix that `gradient_affinity` gave and the `affinity` command saved as .npy, or a
    ValueError that names the file and says what to pass (not numpy's error for a missing file, a folder or an .npz)."""
    try:
        tas = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the task affinity matrix {path} ({e}); give the (T, T) .npy that "
                         f"`python negative_transfer.py affinity` writes") from None
    if not isinstance(tas, np.ndarray):  # an .npz archive
        tas.close()
        raise ValueError(f"{path} is an .npz archive, not a task affinity matrix; give the (T, T) .npy that "
                         f"`python negative_transfer.py affinity` writes")
    return tas


# -----------------------------------------------------------------------------
# Command line: `cluster` prints (and draws) a clustering; `affinity` computes TAS


def _alphas_cumprod(schedule, num_timesteps):
    """alpha-bar (T,) float64 of the "linear" (DiT/ADM: 1e-4..0.02 scaled by 1000/T) or
    "cosine" (Nichol & Dhariwal, max beta 0.999) schedule. Mirrors diffusion.get_beta_schedule
    so this module does not import diffusion.py."""
    T = num_timesteps
    if schedule == "linear":
        scale = 1000.0 / T
        betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    elif schedule == "cosine":
        f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1.0 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'linear' or 'cosine'")
    return np.cumprod(1.0 - betas)


def _plot_clusters(path, intervals, title, values=None, value_label="", tas=None):
    """Draw the intervals as coloured bands over the timestep axis with labelled boundaries and
    the clustered value as a curve, plus the TAS heat map when given. PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    T = intervals[-1][1]
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    palette = [(141, 211, 199), (255, 255, 179), (190, 186, 218), (251, 128, 114),
               (128, 177, 211), (253, 180, 98), (179, 222, 105), (252, 205, 229)]
    W, left, right = 960, 70, 40
    width = W - left - right
    heat = 360 if tas is not None else 0
    band_top = 76 + (heat + 40 if tas is not None else 0)
    band_h = 180
    H = band_top + band_h + 76
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), title, fill="black", font=font)
    x_of = lambda t: left + t / T * width

    if tas is not None:
        A = np.clip(np.asarray(tas, dtype=np.float64), -1.0, 1.0)  # (T, T)
        pos, neg = np.clip(A, 0, 1)[..., None], np.clip(-A, 0, 1)[..., None]  # (T, T, 1) each
        rgb = 255 - pos * np.array([0, 180, 180]) - neg * np.array([180, 180, 0])  # red +, blue -
        tile = Image.fromarray(rgb.astype(np.uint8)).resize((heat, heat), Image.NEAREST)
        x0, y0 = left, 56
        img.paste(tile, (x0, y0))
        draw.rectangle([x0, y0, x0 + heat, y0 + heat], outline="black")
        for start, _ in intervals[1:]:
            p = start / T * heat
            draw.line([x0 + p, y0, x0 + p, y0 + heat], fill="black")
            draw.line([x0, y0 + p, x0 + heat, y0 + p], fill="black")
        draw.text((x0 + heat + 20, y0), "task affinity TAS(t1, t2)", fill="black", font=font)
        draw.text((x0 + heat + 20, y0 + 22), "rows t1, columns t2, t = 0 top-left", fill="black",
                  font=small)
        for i, (label, colour) in enumerate([("+1", (255, 75, 75)), ("0", (255, 255, 255)),
                                             ("-1", (75, 75, 255))]):
            y = y0 + 56 + 24 * i
            draw.rectangle([x0 + heat + 20, y, x0 + heat + 40, y + 16], fill=colour, outline="black")
            draw.text((x0 + heat + 48, y), label, fill="black", font=small)

    for k, (start, stop) in enumerate(intervals):
        draw.rectangle([x_of(start), band_top, x_of(stop), band_top + band_h],
                       fill=palette[k % len(palette)])
    level = None  # (T,) clustered value scaled to [0, 1], drawn as a curve
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        level = (v - v.min()) / (float(v.max() - v.min()) or 1.0)
        ys = band_top + band_h - 8 - level * (band_h - 16)
        draw.line([(x_of(t + 0.5), float(y)) for t, y in enumerate(ys)], fill="black", width=2)
        draw.text((left, 32), f"curve: {value_label} from {v[0]:.3g} (t = 0) to {v[-1]:.3g} "
                  f"(t = {T - 1})", fill="black", font=small)
    last_x = [-1e9, -1e9]  # right-most labelled boundary in each of two label rows
    for k, (start, stop) in enumerate(intervals):
        if k > 0:
            draw.line([x_of(start), band_top - 4, x_of(start), band_top + band_h], fill="black")
        x = x_of(start)
        free = [row for row in (0, 1) if x - last_x[row] > 30]
        if free:  # crowded boundaries are left to the interval list under the axis
            draw.text((x - 4, band_top - 18 - 14 * free[0]), str(start), fill="black", font=small)
            last_x[free[0]] = x
        if x_of(stop) - x > 70:  # label the band where the curve is not
            low = level is not None and level[start:stop].mean() < 0.5
            y = band_top + 6 if low else band_top + band_h - 40
            draw.text((x + 6, y), f"cluster {k}", fill="black", font=small)
            draw.text((x + 6, y + 16), f"[{start}, {stop})", fill="black", font=small)
    draw.text((x_of(T) - 10, band_top - 18), str(T), fill="black", font=small)
    draw.rectangle([left, band_top, left + width, band_top + band_h], outline="black")
    for tick in range(0, T + 1, max(T // 4, 1)):
        draw.line([x_of(tick), band_top + band_h, x_of(tick), band_top + band_h + 5], fill="black")
        draw.text((x_of(tick) - 10, band_top + band_h + 8), str(tick), fill="black", font=small)
    draw.text((left + width // 2 - 40, band_top + band_h + 28), "timestep t", fill="black", font=font)
    listing = "intervals: " + " ".join(f"[{start},{stop})" for start, stop in intervals)
    draw.text((left, band_top + band_h + 52), listing, fill="black", font=small)
    img.save(path)


def _cluster_command(args):
    least = 21 if args.schedule == "linear" else 1  # linear: beta_T = 0.02 * 1000 / T must stay below 1
    if args.objective != "gradient" and args.timesteps < least:
        raise SystemExit(f"--timesteps {args.timesteps}: the {args.schedule} schedule needs at least {least} (the papers: 1000)")
    tas = None if args.tas is None else load_tas(args.tas)
    values, label = None, ""
    if args.objective == "gradient":
        if tas is None:
            raise SystemExit("--objective gradient needs --tas tas.npy (from the `affinity` command)")
        intervals, cost = cluster_timesteps(args.clusters, "gradient", tas=tas)
        source = f"TAS {args.tas}"
    else:
        abar = _alphas_cumprod(args.schedule, args.timesteps)
        intervals, cost = cluster_timesteps(args.clusters, args.objective, alphas_cumprod=abar,
                                            num_timesteps=args.timesteps)
        source = f"{args.schedule} schedule"
        values, label = {
            "timestep": (np.arange(args.timesteps, dtype=np.float64), "t"),
            "snr": (abar / (1.0 - abar), "SNR"),
            "log-snr": (np.log(abar) - np.log1p(-abar), "log-SNR"),
        }[args.objective]
    T = intervals[-1][1]
    print(f"objective {args.objective}, K={args.clusters}, T={T}, {source}")
    print("cluster  start   stop   size")
    for k, (start, stop) in enumerate(intervals):
        print(f"{k:7d} {start:6d} {stop:6d} {stop - start:6d}")
    print(f"total cost {cost:.6f}")
    if args.plot:
        title = f"ANT interval clustering: {args.objective}, K={args.clusters}, T={T} " \
                f"({source}), cost {cost:.6g}"
        _plot_clusters(args.plot, intervals, title, values=values, value_label=label, tas=tas)
        print(f"wrote {args.plot}")


def _affinity_command(args):
    # Project modules are imported here only, so the module itself needs none of them.
    try:
        from data import LatentFolder, load_dataset, to_model_input
        from fid import atomic_write
        from sample import load_model, resolve_device
    except ImportError as e:
        raise SystemExit(f"the affinity command needs this repo's data.py, fid.py and sample.py ({e}); elsewhere, call "
                         f"gradient_affinity(grad_fn, T) with a grad_fn of your own") from None

    for flag, value in (("--groups", args.groups), ("--batch-size", args.batch_size), ("--batches", args.batches),
                        ("--sketch-dim", args.sketch_dim)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be a positive number")
    if not args.out:  # it wrote a hidden file, .npy, in the working folder
        raise SystemExit("--out is empty; pass the .npy to write, e.g. tas.npy")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):  # checked before the gradients, not after
        raise SystemExit(f"--out {args.out}: cannot write there ({folder} is not a writable folder); pass another path")
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"  # the name np.save gives it
    if os.path.exists(out):  # an earlier TAS: hours of gradients, and the default --out is the same tas.npy each time
        raise SystemExit(f"--out {args.out}: {out} exists; TAS files are not overwritten: delete it or pass another path")
    device = resolve_device(args.device)  # a ValueError that says what to do for a typo or a GPU not there
    # Every checkpoint loads, fits the data, and all share one T, before any gradient: a typo, another T or data of
    # another kind later in the list stopped the command only after the gradients of the checkpoints before it.
    by_size = {}  # image size -> dataset

    def check(ckpt):  # -> (the dataset at its image size, its T)
        _, diffusion, train_args = load_model(ckpt, use_ema=False)  # the weights used below
        train_args = train_args if isinstance(train_args, dict) else vars(train_args)
        image_size = train_args.get("image_size")
        if image_size is None:
            raise SystemExit(f"{ckpt}: its args carry no image_size")
        if image_size not in by_size:
            by_size[image_size] = load_dataset(args.data, image_size)
        dataset = by_size[image_size]
        if isinstance(dataset, LatentFolder) != bool(train_args.get("latent")):
            kinds = ("VAE latents", "images")
            raise SystemExit(f"{ckpt} was trained on {kinds[not train_args.get('latent')]}, but {args.data} holds "
                             f"{kinds[not isinstance(dataset, LatentFolder)]}; pass its training data ({train_args.get('data')})")
        classes = (train_args.get("num_classes"), getattr(dataset, "num_classes", None))
        if None not in classes and classes[0] != classes[1]:  # labels past the model's would index its null class or beyond
            raise SystemExit(f"{ckpt} was trained on {classes[0]} classes, but {args.data} has {classes[1]}; "
                             f"pass its training data ({train_args.get('data')})")
        return dataset, len(diffusion.alphas_cumprod)

    checked = {ckpt: check(ckpt) for ckpt in args.ckpt}
    if len({T for _, T in checked.values()}) > 1:
        listed = ", ".join(f"{ckpt}: T={T}" for ckpt, (_, T) in checked.items())
        raise SystemExit(f"the checkpoints differ in their number of timesteps ({listed}); TAS averages over "
                         f"checkpoints of one diffusion, so pass those of one run")
    total = None
    for ckpt in args.ckpt:
        model, diffusion, _ = load_model(ckpt, device=device, use_ema=False)
        model.train()  # the training objective, label dropout included (reseeded per group)
        dataset = checked[ckpt][0]
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                             drop_last=True,
                                             generator=torch.Generator().manual_seed(args.seed))
        noise_gen = torch.Generator().manual_seed(args.seed)
        batches = []  # the same images and noise for every group: lower-variance comparisons
        for x0, y in itertools.islice(loader, args.batches):
            # The training objective's input: uint8 images to [-1, 1] as train.py does (no flip:
            # every group sees the same images); latents are stored ready to use.
            x0 = x0.float() if isinstance(dataset, LatentFolder) else to_model_input(x0, flip=False)
            noise = torch.randn(x0.shape, generator=noise_gen)
            batches.append((x0.to(device), y.to(device), noise.to(device)))
        if len(batches) < args.batches:
            raise SystemExit(f"{args.data} has fewer than {args.batches} batches of {args.batch_size}")
        params = [p for p in model.parameters() if p.requires_grad]

        def grad_fn(t):  # t (batches * batch_size,) -> flat gradient (P,)
            torch.manual_seed(args.seed)  # same label-dropout draws for every group
            flat = torch.zeros(sum(p.numel() for p in params), device=device)  # (P,)
            for i, (x0, y, noise) in enumerate(batches):
                t_i = t[i * args.batch_size:(i + 1) * args.batch_size].to(device)  # (B,)
                out = diffusion.training_losses(model, x0, t_i, dict(y=y), noise=noise)
                loss = out["loss"].mean() / len(batches)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                flat += torch.cat([torch.zeros(p.numel(), device=device) if g is None
                                   else g.reshape(-1).float() for p, g in zip(params, grads)])
                del grads  # not alive through the next batch's backward (4P bytes)
            return flat

        tas = gradient_affinity(grad_fn, len(diffusion.alphas_cumprod), groups=args.groups,
                                batch_size=args.batch_size * args.batches,
                                sketch_dim=args.sketch_dim, seed=args.seed)
        total = tas if total is None else total + tas
        print(f"{ckpt}: mean TAS {tas.mean():.4f}")
    tas = total / len(args.ckpt)
    atomic_write(out, lambda f: np.save(f, tas))  # a write cut short leaves no half file to block the rerun
    print(f"wrote {out} {tas.shape}, averaged over {len(args.ckpt)} checkpoint(s)")


def main(argv=None):
    """CLI: `cluster` prints (and draws) a clustering; `affinity` computes TAS from checkpoints."""
    parser = argparse.ArgumentParser(description="ANT interval clustering and task affinity "
                                                 "(Go et al., NeurIPS 2023)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cluster", help="print (and draw) the optimal interval clustering")
    c.add_argument("--objective", choices=OBJECTIVES, default="snr",
                   help="clustering cost (the paper uses snr, timestep and gradient; log-snr is ours)")
    c.add_argument("-k", "--clusters", type=int, default=5, help="number of clusters (paper: 5)")
    c.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="noise schedule for snr / log-snr")
    c.add_argument("--timesteps", type=int, default=1000,
                   help="diffusion steps T (--objective gradient takes T from --tas)")
    c.add_argument("--tas", default=None, help="(T, T) task affinity .npy for --objective gradient")
    c.add_argument("--plot", default=None, help="write a PNG of the clustering here")
    a = sub.add_parser("affinity", help="task affinity TAS (T, T) from training checkpoints")
    a.add_argument("--ckpt", nargs="+", required=True, help="train.py checkpoints; TAS is averaged")
    a.add_argument("--data", required=True, help="dataset path for data.load_dataset ('shapes' ok)")
    a.add_argument("--groups", type=int, default=100, help="timestep groups (TAS resolution)")
    a.add_argument("--batch-size", type=int, default=32, help="images per batch")
    a.add_argument("--batches", type=int, default=4, help="fixed batches per gradient")
    a.add_argument("--sketch-dim", type=int, default=4096, help="CountSketch size (exact if P <= it)")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="tas.npy", help="output .npy")
    args = parser.parse_args(argv)
    if args.command == "cluster" and args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"--plot {args.plot}: the clustering is drawn as a PNG; pass a path ending in .png")
    try:  # a bad file, value or path ends in one line, not a traceback
        if args.command == "cluster":
            _cluster_command(args)
        else:
            _affinity_command(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"negative_transfer.py {args.command}: error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
