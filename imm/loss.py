"""IMM's training loss: moment matching between two flow-map estimates of the same marginal at time s.

For a group of M clean latents y_1..M that share times s <= r < t (and noise eps_i ~ N(0, sigma_d^2)):

    y_t = (1 - t) y + t eps,    y_r = (1 - r) y + r eps                     (same eps: DDIM interpolation)
    f_st = f_theta(y_t, t, s, y_drop)           (trained)
    f_sr = stopgrad f_theta(y_r, r, s, y)       (target: the same network one small step closer to s)
    loss = wout(t) * MMD_k^2(f_st, f_sr),   k(a, b) = exp(-w(t, s) ||a - b|| / (C H W sigma))

with the biased MMD over all M x M pairs (i = j included), w = 1 / (sigma_d |t - s|) and
wout = alpha_t^a / (alpha_t^2 + sigma_t^2) * (-1/2 dlogsnr/dt) * sigmoid(b - logsnr_t). r sits a step of
eta_high / 2^k below t in eta = sigma_t / alpha_t (and at least min_tr_gap below t in time).

The target network is `net` itself under no_grad (lumalabs' IMM and the Neon fine-tuning call the online DDP
network for both branches; the EMA is used only for sampling), with label dropout on the trained branch only.
Settings default to the Neon fine-tuning (SinaAlemohammad/Neon imm/configs/im256.yaml); numbers match the
official `IMMLoss` (imm/training/loss.py there) given the same draws.
"""
from __future__ import annotations

import numpy as np
import torch

from neon.errors import NeonError


class IMMLoss:
    def __init__(self,
                 sigma: float = 1.0,                # kernel bandwidth (the distance is also divided by C*H*W)
                 sample_t_mode: str = "uniform",    # 'uniform' in t (Neon) or 'lognormal' in eta (IMM's default)
                 P_mean: float = -1.1,              # lognormal mode: log-eta mean
                 P_std: float = 2.0,                # lognormal mode: log-eta std
                 matrix_size: int = 4,              # M: samples per group sharing (t, r, s)
                 sample_repeat: int = 1,            # only 1 (the official code breaks otherwise)
                 label_dropout: float = 0.1,        # probability of training f_st on the null class
                 k: int = 12,                       # r = t one step of eta_high / 2^k earlier
                 a: float = 2,                      # wout: alpha_t^a
                 b: float = 4,                      # wout: sigmoid(b - logsnr_t)
                 min_tr_gap: float | None = 1e-4):  # r <= t - min_tr_gap
        if sample_t_mode not in ("uniform", "lognormal"):
            raise NeonError(f"IMM loss sample_t_mode must be 'uniform' or 'lognormal', got {sample_t_mode!r}")
        if sample_repeat != 1:
            raise NeonError(f"IMM loss sample_repeat={sample_repeat} is not supported (only 1)")
        if not isinstance(matrix_size, int) or matrix_size < 1:
            raise NeonError(f"IMM loss matrix_size must be a positive integer, got {matrix_size!r}")
        self.sigma, self.sample_t_mode, self.P_mean, self.P_std = sigma, sample_t_mode, P_mean, P_std
        self.matrix_size, self.label_dropout, self.k, self.a, self.b = matrix_size, label_dropout, k, a, b
        self.min_tr_gap = min_tr_gap

    # -- times ---------------------------------------------------------------------------------------------
    def draw_uniform(self, groups: int, device) -> torch.Tensor:
        """The uniform draw behind one time per group, in the dtype the official code draws it."""
        dtype = torch.float64 if self.sample_t_mode == "uniform" else torch.get_default_dtype()
        return torch.rand(groups, device=device, dtype=dtype)

    def _eta_from_uniform(self, net, u: torch.Tensor, log_low: float, eta_high: torch.Tensor,
                          log_eta_high: torch.Tensor):
        """A uniform draw -> (eta, log eta) with eta in [eta_low, eta_high] (float64, per group)."""
        if self.sample_t_mode == "uniform":  # uniform in t between t(eta_low) and t(eta_high)
            low_t = net.eta_to_t(torch.full_like(log_eta_high, net.nt_low))
            t = u.to(torch.float64) * (net.eta_to_t(eta_high) - low_t) + low_t
            log_eta = -0.5 * net.logsnr(t)
        else:  # lognormal in eta, truncated to [log_low, log_eta_high] by inverting the CDF
            dist = torch.distributions.Normal(torch.full_like(log_eta_high, self.P_mean),
                                              torch.full_like(log_eta_high, self.P_std))
            lo = dist.cdf(torch.full_like(log_eta_high, log_low))
            log_eta = dist.icdf(u * (dist.cdf(log_eta_high) - lo) + lo)
        return log_eta.exp(), log_eta

    def sample_times(self, net, u_t: torch.Tensor, u_s: torch.Tensor):
        """Uniform draws (G,) -> times t, r, s (G,) float64 with eps <= s <= r < t <= T."""
        eta_high = torch.full(u_t.shape, net.nt_high, dtype=torch.float64, device=u_t.device)
        log_eta_high = torch.full_like(eta_high, float(np.log(net.nt_high)))
        # The official lognormal lower bound for t is max(eta_low, 1e-8) used as a *log* eta (so eta_t >= 1,
        # t >= 1/2), while the one for s is log(max(eta_low, 1e-8)); both are kept as they are.
        eta_t, log_eta_t = self._eta_from_uniform(net, u_t, max(net.nt_low, 1e-8), eta_high, log_eta_high)
        eta_s, _ = self._eta_from_uniform(net, u_s, float(np.log(max(net.nt_low, 1e-8))), eta_t, log_eta_t)
        eta_s = torch.minimum(eta_s, eta_t).clamp(min=net.nt_low)
        eta_r = (eta_t - (net.nt_high - net.nt_low) * 0.5 ** self.k).clamp(min=net.nt_low, max=net.nt_high)
        t, r, s = net.eta_to_t(eta_t), net.eta_to_t(eta_r), net.eta_to_t(eta_s)
        if self.min_tr_gap is not None:
            r = torch.minimum(r, (t - self.min_tr_gap).clamp(min=net.nt_low))
        r = torch.maximum(r, s).clamp(min=net.eps)
        return t, r, s

    def weights(self, net, t: torch.Tensor, s: torch.Tensor):
        """Kernel weight w = 1 / (sigma_d |t - s|) and loss weight wout(t), (G,) each."""
        w = 1 / (t - s).abs() / net.sigma_data
        alpha_t, sigma_t = net.alpha_sigma(t)
        neg_dlogsnr_dt = 2 * (1 / (1 - t) / t)
        wout = alpha_t ** self.a / (alpha_t ** 2 + sigma_t ** 2) * 0.5 * neg_dlogsnr_dt \
            * (self.b - net.logsnr(t)).sigmoid()
        return w, wout

    # -- the kernel and the MMD ------------------------------------------------------------------------------
    def kernel(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Laplace kernel between all pairs of a group: x, y (G, M, C, H, W), w (G,) -> (G, M, M)."""
        sq = ((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).flatten(3).sum(-1)
        dist = sq.clamp_min(1e-8).sqrt() / np.prod(x.shape[2:]) / self.sigma
        return torch.exp(-dist * w[:, None, None])

    # -- the loss ------------------------------------------------------------------------------------------
    def terms(self, net, y: torch.Tensor, labels: torch.Tensor, draws: dict | None = None) -> dict:
        """Every quantity of one loss evaluation.

        net: IMMPrecond (or a DDP wrapper of one); y: clean latents (B, C, H, W), B a multiple of matrix_size;
        labels: one-hot (B, label_dim). draws: optional {'u_t', 'u_s' (G,), 'drop_mask' (B,) bool,
        'noise' (B, C, H, W) already times sigma_d}; anything missing is drawn from the global RNG in the
        official order (u_t, u_s on y's device, the dropout mask on the CPU, then the noise).
        Returns a dict with t, r, s, w, wout, loss (G,), f_st, f_sr (G, M, C, H, W) and the rest."""
        precond = getattr(net, "module", net)
        draws = dict(draws or {})
        B, M = y.shape[0], self.matrix_size
        if B % M:
            raise NeonError(f"IMM loss: batch {B} is not a multiple of the group size {M}")
        G = B // M
        u_t = draws["u_t"] if "u_t" in draws else self.draw_uniform(G, y.device)
        u_s = draws["u_s"] if "u_s" in draws else self.draw_uniform(G, y.device)
        t, r, s = self.sample_times(precond, u_t.to(y.device), u_s.to(y.device))
        drop = draws["drop_mask"] if "drop_mask" in draws else torch.rand(B) < self.label_dropout
        labels_drop = torch.where(drop.to(labels.device)[:, None], torch.zeros_like(labels), labels)
        noise = draws["noise"] if "noise" in draws else torch.randn_like(y) * precond.sigma_data

        t_b, r_b, s_b = (v.repeat_interleave(M).reshape(-1, 1, 1, 1) for v in (t, r, s))  # (G,) -> (B, 1, 1, 1)
        y_t = precond.add_noise(y, t_b, noise)
        y_r = precond.add_noise(y, r_b, noise)  # DDIM from y_t to r with the known eps

        rng = _RngState(y.device)  # both branches see the same dropout mask (if the DiT has dropout)
        f_st = net(y_t, t_b, s_b, labels_drop)
        rng.restore()
        with torch.no_grad():
            f_sr = net(y_r, r_b, s_b, labels, force_fp32=True)

        f_st, f_sr = f_st.unflatten(0, (G, M)), f_sr.unflatten(0, (G, M))
        w, wout = self.weights(precond, t, s)
        inter_sample_sim = self.kernel(f_st, f_st, w).mean((1, 2))
        inter_gt_sim = self.kernel(f_sr, f_sr, w).mean((1, 2))
        cross_sim = self.kernel(f_st, f_sr, w).mean((1, 2))
        loss = wout * (inter_sample_sim + inter_gt_sim - 2 * cross_sim)
        loss = torch.where(loss.isnan().any(), torch.nan_to_num(loss), loss)  # as official: NaN anywhere -> finite
        return dict(t=t, r=r, s=s, u_t=u_t, u_s=u_s, drop_mask=drop, labels_drop=labels_drop, noise=noise,
                    y_t=y_t, y_r=y_r, f_st=f_st, f_sr=f_sr, w=w, wout=wout, inter_sample_sim=inter_sample_sim,
                    inter_gt_sim=inter_gt_sim, cross_sim=cross_sim, loss=loss)

    def __call__(self, net, y: torch.Tensor, labels: torch.Tensor, draws: dict | None = None) -> torch.Tensor:
        """Per-group loss (G,); training minimises its mean."""
        return self.terms(net, y, labels, draws)["loss"]


class _RngState:
    """Snapshot of the generator that dropout on `device` draws from, to replay it for the target branch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.state = torch.cuda.get_rng_state(device) if self.cuda else torch.get_rng_state()

    def restore(self) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)
