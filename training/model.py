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

__all__ = ["VAE", "build_model", "reparameterize"]


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
        self.net = _mlp([math.prod(config.data_shape) + label_dim, *config.hidden_dims])
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
            self.prior_means = nn.Parameter(torch.zeros(config.num_classes, config.latent_dim))

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

    def sample_latent(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws n latents from the prior p(z[|y]); (n, latent_dim)."""
        mean = self.prior_mean(y, n)
        return reparameterize(mean, torch.zeros_like(mean), generator)

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
