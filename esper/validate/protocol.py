"""What the runner sends the sandbox (JSON on its stdin); the answer is a
``ValidationReport`` (JSON on its stdout). No pickle: both sides parse plain
JSON into frozen models, so a broken or hostile kernel can corrupt neither."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from esper.validate.policy import ValidationPolicy

# Progress lines the sandbox writes on stderr: "<PREFIX> <event> <name>".
PROGRESS_PREFIX = "@@esper-validate"


class ExpectedKernel(BaseModel):
    """The kernel row the artifact must match (its manifest is checked against it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_key: str
    blueprint_hash: str
    target: str
    dtype: str
    backend: str
    digest: str | None = None


class SandboxRequest(BaseModel):
    """One validation: the artifact's bytes (a file), the key to verify them with,
    the kernel they claim to be, the blueprint as submitted, and the policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    artifact_path: str
    public_key_pem: str
    expected: ExpectedKernel
    blueprint: dict[str, Any] = Field(description="the submitted BlueprintIR as JSON")
    policy: ValidationPolicy = Field(default_factory=ValidationPolicy)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto": CUDA when the target is this GPU's arch (or cpu target: CPU)."""
