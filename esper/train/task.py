"""The teacher-student task: a fixed random *teacher* network makes the labels, a
*student* host learns them. Nothing is downloaded.

The teacher is a tanh stem followed by strong residual MLP blocks (the shape of
the bundled ``residual_mlp`` blueprint); the student host is a two-layer tanh
MLP of the same width with seed sites at both hidden layers (``stem``, ``mid``,
schema ``float32[B, width]``). The host can only approximate the teacher's
residual blocks; grafting ``residual_mlp`` seeds at its sites gives it what it
lacks, so growth shows in the loss. Batches are a pure function of (seed,
step): any run, resumed or repeated, sees the same data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TaskConfig:
    d_in: int = 16
    width: int = 64
    """Width of the host's hidden layers: its sites' schema is ``float32[B, width]``."""
    d_out: int = 4
    teacher_blocks: int = 2
    teacher_hidden: int = 256
    teacher_gain: float = 2.0
    """Scales the teacher's weights: larger is sharper, harder to fit."""
    batch: int = 256
    val_size: int = 2048
    seed: int = 0


class _TeacherBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class Teacher(nn.Module):
    """Fixed random labeller; outputs standardised to zero mean, unit variance."""

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        self.stem = nn.Linear(cfg.d_in, cfg.width)
        blocks = [_TeacherBlock(cfg.width, cfg.teacher_hidden) for _ in range(cfg.teacher_blocks)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cfg.width, cfg.d_out)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            for m in (self.stem, *(b.up for b in blocks), *(b.down for b in blocks)):
                m.weight.mul_(cfg.teacher_gain)
        self.requires_grad_(False)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(cfg.d_out))
        self.register_buffer("std", torch.ones(cfg.d_out))
        with torch.no_grad():
            y = self._raw(torch.randn(8192, cfg.d_in, generator=g))
            self.mean.copy_(y.mean(0))
            self.std.copy_(y.std(0))

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._raw(x) - self.mean) / self.std


class StudentHost(nn.Module):
    """The host that starts too small: ``head(mid(stem(x)))``, tanh layers of
    width ``cfg.width``. Sites sit at the outputs of ``stem`` and ``mid``."""

    SITES = ("stem", "mid")

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(cfg.d_in, cfg.width), nn.Tanh())
        self.mid = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.Tanh())
        self.head = nn.Linear(cfg.width, cfg.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.stem(x)))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TeacherStudentTask:
    """Data, host and loss of one teacher-student run on ``device``."""

    name = "teacher-student"

    def __init__(self, cfg: TaskConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg or TaskConfig()
        self.device = torch.device(device)
        self.teacher = Teacher(self.cfg).to(self.device)
        g = torch.Generator().manual_seed(self.cfg.seed + 7919)
        x = torch.randn(self.cfg.val_size, self.cfg.d_in, generator=g).to(self.device)
        self.val_x, self.val_y = x, self.teacher(x)
        self._g = torch.Generator()

    @property
    def site_schemas(self) -> dict[str, tuple[tuple[str | int, ...], str]]:
        """Site name → (shape, dtype), what ``add_seed_sites`` takes."""
        return {site: (("B", self.cfg.width), "float32") for site in StudentHost.SITES}

    def make_host(self, seed: int | None = None) -> StudentHost:
        """A fresh host; the same ``seed`` gives the same initial weights."""
        torch.manual_seed(self.cfg.seed + 1 if seed is None else seed)
        return StudentHost(self.cfg).to(self.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s training batch (a pure function of the task seed and step)."""
        self._g.manual_seed(self.cfg.seed * 1_000_003 + step)
        x = torch.randn(self.cfg.batch, self.cfg.d_in, generator=self._g).to(self.device)
        return x, self.teacher(x)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(pred, target)

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        """Validation MSE on the fixed held-out set (eval mode; one host sync)."""
        was = model.training
        model.eval()
        try:
            return float(self.loss(model(self.val_x), self.val_y))
        finally:
            model.train(was)
