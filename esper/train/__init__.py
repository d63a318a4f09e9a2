"""Training workers: a host on a synthetic task, grown by Kasmina with the kernels
the pipeline deploys, steered by a pluggable controller (``esper train``)."""

from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus
from esper.train.controller import (
    Controller,
    Decision,
    Germinate,
    Observation,
    PlateauController,
    SeedView,
    Transition,
)
from esper.train.loop import TrainConfig, Trainer, TrainResult
from esper.train.run import TrainRun
from esper.train.task import TaskConfig, TeacherStudentTask

__all__ = [
    "Controller",
    "Decision",
    "Germinate",
    "KernelCatalog",
    "KernelInfo",
    "KernelStatus",
    "Observation",
    "PlateauController",
    "SeedView",
    "TaskConfig",
    "TeacherStudentTask",
    "TrainConfig",
    "TrainResult",
    "TrainRun",
    "Trainer",
    "Transition",
]
