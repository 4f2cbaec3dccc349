"""VAE and CVAE (concat or learned-prior conditioning) with MLP or convolutional networks.

`encode` and `decode` hold no randomness and no data-dependent control flow, so the exporter
can trace each into an ONNX graph with a dynamic batch axis; noise is drawn outside them
(`reparameterize`, `VAE.sample_latent`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaeserve.training.config import ModelConfig

__all__ = ["VAE", "build_model", "log_normal_mixture", "reparameterize"]

_LOG_2PI = math.log(2.0 * math.pi)


def build_model(config: ModelConfig) -> VAE:
    """Returns a freshly initialised model for `config` (torch's default initialisation)."""
    return VAE(config)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draws z = μ + σ·ε with ε ~ N(0, I) (Kingma & Welling 2014, section 2.4).

    The seed write-up draws ε with rand_like, i.e. uniform on [0, 1): that shifts the mean by
    σ/2 and shrinks the variance twelvefold, so the standard normal is used here.

    Args:
        mu: posterior means, any shape.
        logvar: posterior log-variances, same shape.
        generator: optional generator for reproducible noise; torch's global one otherwise.
        eps: the standard normal noise itself, of the shape of `mu` (distributed training
            draws a global batch's noise once and gives each rank its part).

    Returns:
        A sample of the shape of `mu` that carries gradients to `mu` and `logvar`.
    """
    if eps is not None:
        if eps.shape != mu.shape:
            raise ValueError(f"eps: shape {tuple(eps.shape)}, expected {tuple(mu.shape)}")
    elif generator is None:
        eps = torch.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + eps * torch.exp(0.5 * logvar)  # (..., latent_dim)


def log_normal_mixture(
    z: torch.Tensor,
    means: torch.Tensor,
    logvars: torch.Tensor,
    log_weights: torch.Tensor | None,
) -> torch.Tensor:
    """log Σ_k w_k N(z; m_k, diag exp(logvars_k)) summed over the latent axis; (...,).

    Args:
        z: (..., D) latents.
        means, logvars: (K, D) components; with ``log_weights`` None, K is 1 (a single
            Gaussian) or the rows of z (one Gaussian per row, as a prior CVAE's μ_y).
        log_weights: (K,) mixture log-weights, or None for a single Gaussian per row.

    The mixture's quadratic form is expanded into matrix products in float64, so memory is
    (rows, K) rather than (rows, K, D), and the cancellation of the expansion (|z|²/σ² can
    be 1e5 for σ² = e^-10) stays far below float32 resolution; vaeserve.engine.sampling
    computes the same sums in numpy.
    """
    if log_weights is None:
        var_inv = torch.exp(-logvars)
        return -0.5 * (_LOG_2PI + logvars + (z - means).pow(2) * var_inv).sum(-1)
    z64, m64, lv64 = z.double(), means.double(), logvars.double()
    var_inv = torch.exp(-lv64)  # (K, D)
    quad = (
        z64.pow(2) @ var_inv.T - 2.0 * z64 @ (m64 * var_inv).T + (m64.pow(2) * var_inv).sum(-1)
    )  # (..., K)
    log_norm = -0.5 * (z.shape[-1] * _LOG_2PI + lv64.sum(-1))  # (K,)
    log_comp = log_weights.double() + log_norm - 0.5 * quad
    return torch.logsumexp(log_comp, dim=-1).to(z.dtype)


def _spread_means(num_classes: int, latent_dim: int, scale: float) -> torch.Tensor:
    """Starting class means: each at distance `scale` from 0 on an axis of its own (random
    unit directions when there are more classes than axes); zeros for scale 0."""
    if scale == 0:
        return torch.zeros(num_classes, latent_dim)
    if num_classes <= latent_dim:
        return scale * torch.eye(num_classes, latent_dim)
    directions = torch.randn(num_classes, latent_dim)
    return scale * directions / directions.norm(dim=1, keepdim=True)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _conv_sizes(height: int, width: int, n: int) -> list[tuple[int, int]]:
    # Each stride-2 convolution (kernel 3, padding 1) maps a side s to ceil(s / 2).
    sizes = [(height, width)]
    for _ in range(n):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class _MlpEncoder(nn.Module):
    def __init__(self, config: ModelConfig, label_dim: int) -> None:
        super().__init__()
        sizes = [math.prod(config.data_shape) + label_dim, *config.hidden_dims]
        self.net = _mlp(sizes)
        self.out_dim = config.hidden_dims[-1]

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        h = x.flatten(1)  # (B, C*H*W)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        return self.net(h)  # (B, hidden_dims[-1])


class _MlpDecoder(nn.Module):
    def __init__(self, config: ModelConfig, label_dim: int, out_channels: int) -> None:
        super().__init__()
        _, height, width = config.data_shape
        hidden = list(reversed(config.hidden_dims))
        self.net = nn.Sequential(
            _mlp([config.latent_dim + label_dim, *hidden]),
            nn.Linear(hidden[-1], out_channels * height * width),
            nn.Unflatten(1, (out_channels, height, width)),
        )

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        if onehot is not None:
            z = torch.cat([z, onehot], dim=1)
        return self.net(z)  # (B, out_channels, H, W)


class _ConvEncoder(nn.Module):
    def __init__(self, config: ModelConfig, label_dim: int) -> None:
        super().__init__()
        channels = [config.data_shape[0], *config.hidden_dims]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Flatten(1))
        h, w = _conv_sizes(*config.data_shape[1:], len(config.hidden_dims))[-1]
        # The label joins after the convolutions, as input of the μ / log σ² heads.
        self.out_dim = channels[-1] * h * w + label_dim

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        h = self.net(x)  # (B, hidden_dims[-1] * h * w)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=1)
        return h


class _ConvDecoder(nn.Module):
    def __init__(self, config: ModelConfig, label_dim: int, out_channels: int) -> None:
        super().__init__()
        sizes = _conv_sizes(*config.data_shape[1:], len(config.hidden_dims))
        channels = [out_channels, *config.hidden_dims]
        h, w = sizes[-1]
        layers: list[nn.Module] = [
            nn.Linear(config.latent_dim + label_dim, channels[-1] * h * w),
            nn.ReLU(),
            nn.Unflatten(1, (channels[-1], h, w)),
        ]
        for i in range(len(config.hidden_dims), 0, -1):
            # output_padding restores an even side that the stride-2 convolution halved.
            target_h, target_w = sizes[i - 1]
            pad = (1 - target_h % 2, 1 - target_w % 2)
            layers.append(
                nn.ConvTranspose2d(
                    channels[i], channels[i - 1], 3, stride=2, padding=1, output_padding=pad
                )
            )
            if i > 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        if onehot is not None:
            z = torch.cat([z, onehot], dim=1)
        return self.net(z)  # (B, out_channels, H, W)


class VAE(nn.Module):
    """A VAE, or a CVAE when `config.kind == "cvae"`.

    Conditioning "concat" (Sohn et al. 2015) feeds the one-hot label to the encoder and the
    decoder and keeps the prior N(0, I). Conditioning "prior" (the seed's section 5) keeps
    encoder q(z|x) and decoder p(x|z) label-free and learns one prior mean per class:
    p(z|y) = N(μ_y, I).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.data_shape[0]
        label_dim = config.num_classes if config.conditioning == "concat" else 0
        out_channels = 2 * channels if config.likelihood == "gaussian-learned" else channels
        if config.arch == "mlp":
            self.encoder = _MlpEncoder(config, label_dim)
            self.decoder = _MlpDecoder(config, label_dim, out_channels)
        else:
            self.encoder = _ConvEncoder(config, label_dim)
            self.decoder = _ConvDecoder(config, label_dim, out_channels)
        self.to_mu = nn.Linear(self.encoder.out_dim, config.latent_dim)
        self.to_logvar = nn.Linear(self.encoder.out_dim, config.latent_dim)
        if config.num_classes is not None:
            # Indexing an identity matrix is the one-hot: a Gather in ONNX, fixed shapes.
            eye = torch.eye(config.num_classes)
            self.register_buffer("_label_eye", eye, persistent=False)
        if config.conditioning == "prior":
            means = _spread_means(config.num_classes, config.latent_dim, config.prior_mean_scale)
            self.prior_means = nn.Parameter(means)
        if config.prior == "vamp":
            # Logits of the pseudo-inputs: their sigmoid keeps them images in (0, 1). Small
            # noise around grey; train.py may start them from training images instead.
            shape = (config.prior_components, *config.data_shape)
            self.pseudo_logits = nn.Parameter(0.1 * torch.randn(shape))

    @property
    def encoder_takes_label(self) -> bool:
        return self.config.conditioning == "concat"

    @property
    def decoder_takes_label(self) -> bool:
        return self.config.conditioning == "concat"

    @property
    def needs_label(self) -> bool:
        """True for every CVAE: the loss and the sampler need the class."""
        return self.config.kind == "cvae"

    def _onehot(self, y: torch.Tensor | None, where: str) -> torch.Tensor | None:
        if not self.encoder_takes_label:
            return None
        if y is None:
            raise ValueError(f"y: a concat CVAE needs int64 class indices (B,) for {where}")
        return self._label_eye[y]  # (B, num_classes)

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps images to the posterior q(z|x[, y]).

        Args:
            x: float32 (B, C, H, W) in [0, 1].
            y: int64 (B,) class indices; required for a concat CVAE, ignored otherwise.

        Returns:
            (mu, logvar), each (B, latent_dim); logvar clamped to the config's range.
        """
        h = self.encoder(x, self._onehot(y, "encode"))
        mu = self.to_mu(h)  # (B, latent_dim)
        logvar = torch.clamp(self.to_logvar(h), self.config.logvar_min, self.config.logvar_max)
        return mu, logvar

    def decoder_params(
        self, z: torch.Tensor, y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Parameters of p(x|z[, y]) as the loss wants them: Bernoulli gives "logits"."""
        raw = self.decoder(z, self._onehot(y, "decode"))  # (B, C or 2C, H, W)
        if self.config.likelihood == "bernoulli":
            return {"logits": raw}
        channels = self.config.data_shape[0]
        params = {"mean": torch.sigmoid(raw[:, :channels])}
        if self.config.likelihood == "gaussian-learned":
            params["log_sigma"] = torch.clamp(
                raw[:, channels:], self.config.log_sigma_min, self.config.log_sigma_max
            )
        return params

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Maps latents to the parameters of p(x|z[, y]), named as the ONNX outputs.

        Args:
            z: float32 (B, latent_dim).
            y: int64 (B,) class indices; required for a concat CVAE, ignored otherwise.

        Returns:
            Bernoulli: {"probs"}; "gaussian": {"mean"}; "gaussian-learned": {"mean",
            "log_sigma"}; each (B, C, H, W).
        """
        params = self.decoder_params(z, y)
        if "logits" in params:
            return {"probs": torch.sigmoid(params["logits"])}
        return params

    def prior_mean(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """Mean of p(z[|y]) for n latents: μ_y for a prior CVAE, zeros otherwise; (n, latent)."""
        if self.config.conditioning != "prior":
            return self.to_mu.bias.new_zeros(n, self.config.latent_dim)
        if y is None:
            raise ValueError("y: a prior CVAE needs int64 class indices (B,) for its prior")
        return self.prior_means[y]

    @property
    def gaussian_prior(self) -> bool:
        """True when p(z[|y]) is one Gaussian N(μ_y, I), whose KL has a closed form."""
        return self.config.prior == "normal"

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A VampPrior as a Gaussian mixture: component means and log-variances, each (K, D),
        and log-weights (K,) (uniform): what the exporter publishes."""
        if self.config.prior != "vamp":
            raise ValueError(f"prior: {self.config.prior!r} is not a mixture")
        means, logvars = self.encode(torch.sigmoid(self.pseudo_logits))
        count = self.config.prior_components
        log_weights = means.new_full((count,), -math.log(count))
        return means, logvars, log_weights

    def log_prior(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z[|y]) summed over the latent axis; z (..., D) -> (...,)."""
        if self.gaussian_prior:
            mean = self.prior_mean(y, 1 if y is None else len(y))  # broadcasts over samples
            return log_normal_mixture(z, mean, torch.zeros_like(mean), None)
        return log_normal_mixture(z, *self.prior_components())

    def sample_latent(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws n latents from the prior p(z[|y]); (n, latent_dim)."""
        if self.gaussian_prior:
            mean = self.prior_mean(y, n)
            return reparameterize(mean, torch.zeros_like(mean), generator)
        means, logvars, log_weights = self.prior_components()
        probs = log_weights.exp()
        if generator is not None:  # multinomial draws on its generator's device
            probs = probs.to(generator.device)
        pick = torch.multinomial(probs, n, replacement=True, generator=generator).to(means.device)
        return reparameterize(means[pick], logvars[pick], generator)

    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draws z from the prior and returns `decode(z, y)` (the decoder's mean images)."""
        if self.needs_label and y is None:
            raise ValueError("y: a CVAE samples class-conditionally; pass class indices (n,)")
        return self.decode(self.sample_latent(n, y, generator), y)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One reparameterized pass: returns (mu, logvar, decoder_params(z))."""
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)  # (B, latent_dim)
        return mu, logvar, self.decoder_params(z, y)
