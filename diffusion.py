"""
Gaussian diffusion for DiT: noise schedules, SNR, training losses and samplers.

Follows Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: learned-range variance,
hybrid loss, cosine schedule, respacing) and Song et al. 2021 (DDIM), with the conventions of the
official DiT code (which uses openai/guided-diffusion). Every schedule quantity is computed in
float64 numpy and cast to float32 (float64 for a float64 tensor) only when it meets a tensor.

Loss weightings (applied per sample to the epsilon-MSE term only; the VLB term trains the variance):
- "constant": w = 1 (DiT).
- "min-snr":  w = min(SNR(t), gamma) / SNR(t)  (Hang et al. 2023, epsilon prediction; gamma = 5).
- "p2":       w = 1 / (k + SNR(t))**gamma      (Choi et al. 2022; k = 1, gamma = 1).
"""

import math

import numpy as np
import torch

WEIGHTINGS = ("constant", "min-snr", "p2")


# ----------------------------------------------------------------------------------------------
#                                   Schedules
# ----------------------------------------------------------------------------------------------

def get_beta_schedule(name, num_timesteps):
    """float64 betas (T,). "linear": DDPM's 1e-4..0.02, scaled by 1000/T (DiT, ADM);
    "cosine": Nichol & Dhariwal 2021 eq. 17, betas clipped at 0.999."""
    if name == "linear":
        if num_timesteps <= 20:  # beta_T = 0.02 * 1000 / T reaches 1: alpha_bar_T = 0 and a NaN loss or black samples
            raise ValueError(f"the linear schedule scaled to T={num_timesteps} timesteps ends at beta = 20 / T >= 1 "
                             f"(alpha_bar_T = 0); use at least 21 timesteps or the cosine schedule")
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)],
                        dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps, section_counts):
    """The original timesteps kept by respacing (improved DDPM, Sec. 4).

    section_counts: "250" (or "10,15,20": steps per equal section), or "ddim50" for DDIM's
    evenly strided steps. Returns a sorted list of original timesteps.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {desired} evenly strided steps out of {num_timesteps}")
    counts = [int(x) for x in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):  # a running float sum, as the official respace.py: at exact .5 ties
            steps.append(start + round(position))  # it can round differently from round(stride * j)
            position += stride
        start += size
    return sorted(set(steps))


# ----------------------------------------------------------------------------------------------
#                                   Gaussian diffusion
# ----------------------------------------------------------------------------------------------

class Diffusion:
    """A discrete Gaussian diffusion q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t = 0..T-1.

    The model predicts epsilon; with learn_sigma it also outputs v in [-1, 1] that interpolates the
    log variance between the posterior variance and beta_t ("learned range", improved DDPM eq. 15),
    and is trained with the hybrid loss MSE + VLB. Without it the variance is fixed to beta_t
    (DiT's "fixed large"). `timestep_map` holds the original timestep of each step; it is the
    identity except for respaced diffusions made by `respace`.
    """

    def __init__(self, num_timesteps=1000, schedule="linear", learn_sigma=True, weighting="constant",
                 min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0, betas=None, timestep_map=None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if weighting == "min-snr" and not min_snr_gamma > 0:  # gamma <= 0 gives every sample weight 0 (or < 0)
            raise ValueError(f"min_snr_gamma must be > 0 (Hang et al.: 5), got {min_snr_gamma}")
        if weighting == "p2" and not (p2_gamma >= 0 and p2_k >= 0):  # k < 0: k + SNR < 0 at high t, a weight < 0 or NaN
            raise ValueError(f"p2_gamma and p2_k must be >= 0 (Choi et al.: gamma 1, k 1), got {p2_gamma} and {p2_k}")
        self.schedule, self.learn_sigma, self.weighting = schedule, learn_sigma, weighting
        self.min_snr_gamma, self.p2_gamma, self.p2_k = min_snr_gamma, p2_gamma, p2_k
        betas = get_beta_schedule(schedule, num_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():  # beta = 1: alpha_bar = 0, x_0 = x_t / 0
            raise ValueError("betas must be a 1-D array in (0, 1): a beta of 1 leaves no signal and makes the "
                             "x_0 prediction (and Min-SNR's weight) divide by zero")
        if len(betas) < 2:
            raise ValueError("a diffusion needs at least 2 timesteps (the t = 0 variance is clipped to t = 1's); "
                             "sample with 2 or more steps")
        self.betas = betas  # (T,) float64, as is every schedule array below (timestep_map: int64)
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log(0) at t = 0 is replaced by the t = 1 value, as in improved DDPM.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self.loss_weight = self._loss_weight()
        self._cache = {}

    def _loss_weight(self):
        """Per-timestep weight of the epsilon-MSE term, float64 (T,)."""
        if self.weighting == "min-snr":
            return np.minimum(self.snr, self.min_snr_gamma) / self.snr
        if self.weighting == "p2":
            return 1.0 / (self.p2_k + self.snr) ** self.p2_gamma
        return np.ones(self.num_timesteps)

    def respace(self, section_counts):
        """A diffusion over a subset of the timesteps with the same marginals (improved DDPM, Sec. 4).

        betas are re-derived from the kept alphas_cumprod; `timestep_map` sends step i back to its
        original timestep, which is what the model (and a DTR router) sees.
        """
        try:
            keep = space_timesteps(self.num_timesteps, section_counts)
        except ValueError as e:  # a bad --steps flag: say what would work
            raise ValueError(f"{e}; use e.g. {min(250, self.num_timesteps)} (DDPM steps, at most "
                             f"{self.num_timesteps})") from None
        new_betas, last = [], 1.0
        for t in keep:
            new_betas.append(1.0 - self.alphas_cumprod[t] / last)
            last = self.alphas_cumprod[t]
        return Diffusion(schedule=self.schedule, learn_sigma=self.learn_sigma, weighting=self.weighting,
                         min_snr_gamma=self.min_snr_gamma, p2_gamma=self.p2_gamma, p2_k=self.p2_k,
                         betas=np.array(new_betas), timestep_map=self.timestep_map[keep])

    def _table(self, name, device):
        """A schedule array as a tensor on `device`, made once (float64, or int64 for timestep_map)."""
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(np.asarray(getattr(self, name))).to(device)
        return self._cache[key]

    def _extract(self, name, t, like):
        """Gather a float64 schedule array at integer steps t (N,), shaped (N, 1, ..., 1) to broadcast against
        `like`: float64 for a float64 `like` (exact analysis), float32 otherwise (as the official code)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self._table(name, t.device)[t].to(dtype).view(-1, *([1] * (like.ndim - 1)))

    def original_timesteps(self, t):
        """Map (N,) step indices of this (possibly respaced) diffusion to original timesteps (N,)."""
        return self._table("timestep_map", t.device)[t]

    # -------------------------------------------------------------------- forward process

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._extract("posterior_log_variance_clipped", t, x_t)

    def predict_xstart(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps(self, x_t, t, x_start):
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # -------------------------------------------------------------------- reverse process

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) from a raw model output.

        With learn_sigma the output is [eps, v]; v in [-1, 1] interpolates between the clipped
        posterior log variance and log beta_t (improved DDPM eq. 15)."""
        C = self._check_channels(model_output, x_t)
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C:]  # (N, C, H, W) each
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)  # (N, 1, 1, 1)
            max_log = self._extract("log_betas", t, x_t)  # (N, 1, 1, 1)
            frac = (v + 1) / 2  # (N, C, H, W)
            log_variance = frac * max_log + (1 - frac) * min_log  # (N, C, H, W)
        else:
            eps = model_output  # (N, C, H, W)
            log_variance = self._extract("fixed_log_variance", t, x_t).expand_as(x_t)  # (N, C, H, W)
        pred_xstart = self.predict_xstart(x_t, t, eps)  # (N, C, H, W)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    def _check_channels(self, model_output, x):
        """x's channel count C, after checking that model_output has 2C channels (eps, v) with learn_sigma and C
        (eps) without: slicing or broadcasting would otherwise hide a model built with the other learn_sigma."""
        C = x.shape[1]
        if model_output.shape[0] != x.shape[0] or model_output.shape[2:] != x.shape[2:]:  # e.g. a 2N-row CFG batch
            raise ValueError(f"the model output {tuple(model_output.shape)} must have the batch size and spatial "
                             f"shape of its input {tuple(x.shape)}; for guidance use guided_model_fn, which returns "
                             f"the conditional half")
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != want:
            raise ValueError(f"a {'learn_sigma' if self.learn_sigma else 'fixed-variance'} diffusion needs a model "
                             f"output of {want} channels, got {model_output.shape[1]}; build the model and the "
                             f"diffusion with the same learn_sigma")
        return C

    # -------------------------------------------------------------------- training

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses for (N,) timesteps t of this diffusion.

        Returns a dict of (N,) float32 tensors (float64 for a float64 x_start): "mse" (epsilon MSE,
        mean over pixels), "vb" (the VLB term in bits per dim, zero without learn_sigma), "weight"
        (the loss weighting) and "loss" = weight * mse + vb, the DiT hybrid objective. The VLB term
        sees a detached mean, so it trains only the variance (improved DDPM, Sec. 3.1). The model is
        called with the ORIGINAL timesteps.
        """
        if t.shape != (x_start.shape[0],):
            raise ValueError(f"t must have shape ({x_start.shape[0]},), got {tuple(t.shape)}")
        if noise is not None and noise.shape != x_start.shape:  # would broadcast into q_sample and the MSE
            raise ValueError(f"noise must have the shape of x_start {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)  # (N, C, H, W)
        out = _as_float(model(x_t, self.original_timesteps(t), **(model_kwargs or {})), x_t)  # (N, C_out, H, W)
        C = self._check_channels(out, x_start)
        eps = out[:, :C]  # (N, C, H, W)
        mse = (noise - eps).pow(2).mean(dim=(1, 2, 3))  # (N,)
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)  # (N, 2C, H, W)
            vb = self._vb_bits_per_dim(frozen, x_start, x_t, t)  # (N,)
        else:
            vb = torch.zeros_like(mse)
        weight = self._extract("loss_weight", t, mse)  # (N,)
        return {"loss": weight * mse + vb, "mse": mse, "vb": vb, "weight": weight}

    def _vb_bits_per_dim(self, model_output, x_start, x_t, t):
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim for t > 0, and the
        discretised Gaussian decoder NLL at t = 0 (DDPM eq. 5, improved DDPM Sec. 3.1). (N,)"""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _ = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)  # (N,)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -------------------------------------------------------------------- sampling

    @torch.no_grad()
    def ddpm_sample(self, model_fn, noise, clip_denoised=True, progress=False, noise_fn=None):
        """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) over this diffusion's steps (DDPM alg. 2).

        model_fn(x, t_original) -> raw model output; noise: (N, C, H, W) x_T. noise_fn(x) draws each
        step's N(0, I) noise shaped like x: torch.randn_like (the global RNG) by default; pass one
        with its own generators to keep the global stream untouched and a sample independent of its
        batch (sample.sample_indices)."""
        draw = torch.randn_like if noise_fn is None else noise_fn
        x = noise
        for i in _steps(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # (N,)
            out = _as_float(model_fn(x, self.original_timesteps(t)), x)  # (N, C_out, H, W)
            mean, log_var, _ = self.p_mean_variance(out, x, t, clip_denoised)  # (N, C, H, W) each
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * draw(x)  # (N, C, H, W)
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn, noise, clip_denoised=True, eta=0.0, progress=False, noise_fn=None):
        """DDIM sampling (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta > 0 draws step
        noise with noise_fn as ddpm_sample does."""
        draw = torch.randn_like if noise_fn is None else noise_fn
        x = noise
        for i in _steps(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # (N,)
            out = _as_float(model_fn(x, self.original_timesteps(t)), x)  # (N, C_out, H, W)
            _, _, x0 = self.p_mean_variance(out, x, t, clip_denoised)  # (N, C, H, W)
            eps = self.predict_eps(x, t, x0)  # (N, C, H, W)
            # The coefficients in float64, then cast: in float32, 1 - abar_prev near t = 0 keeps only a few digits.
            abar_prev = self._table("alphas_cumprod_prev", x.device)[t]  # (N,) float64
            sigma = eta * torch.sqrt(self._table("posterior_variance", x.device)[t])  # (N,) eq. 16: eta * sqrt(beta~_t)
            shape = (-1,) + (1,) * (x.ndim - 1)
            x = (x0 * torch.sqrt(abar_prev).to(x.dtype).view(shape)
                 + torch.sqrt(1 - abar_prev - sigma ** 2).to(x.dtype).view(shape) * eps)
            if i > 0 and eta > 0:
                x = x + sigma.to(x.dtype).view(shape) * draw(x)
        return x

    def sample(self, model_fn, noise, steps="250", clip_denoised=True, progress=False, noise_fn=None):
        """Sample with respaced steps: "250" (or any section counts) for DDPM, "ddim50" for DDIM;
        noise_fn as in ddpm_sample."""
        key = ("respaced", str(steps))  # made once: its tables then stay on the device across calls
        if key not in self._cache:
            self._cache[key] = self.respace(steps)
        sampler = self._cache[key]
        if str(steps).startswith("ddim"):
            return sampler.ddim_sample(model_fn, noise, clip_denoised, progress=progress, noise_fn=noise_fn)
        return sampler.ddpm_sample(model_fn, noise, clip_denoised, progress=progress, noise_fn=noise_fn)


def _as_float(out, like):
    """A model output in float32 (a bf16 one under autocast is lifted), or float64 for a float64 input `like`,
    so that a float64 analysis stays float64 end to end (_extract)."""
    return out.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def _steps(n, progress):
    steps = range(n - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, leave=False, desc="sampling")
    return steps


def guided_model_fn(model, y, cfg_scale, null_class, guided_channels=None):
    """model_fn(x, t) for the samplers: plain conditional model for cfg_scale == 1, else
    classifier-free guidance through model.forward_with_cfg on the doubled batch. null_class: the
    label of the unconditional embedding row (model.num_classes); guided_channels as in DiT.forward_with_cfg."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    y_null = torch.full_like(y, null_class)

    def fn(x, t):
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), cfg_scale,
                                     guided_channels=guided_channels)  # (2N, C_out, H, W)
        return out[: len(x)]
    return fn


# ----------------------------------------------------------------------------------------------
#                                   Gaussian helpers
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Fast tanh approximation of the standard normal CDF (as in DDPM's reference code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under N(means, e^(2 log_scales)),
    with the edge bins extended to infinity (DDPM Sec. 3.3). Elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
