"""How a sequence speculates: one typed value, validated where a request enters, carried as is to the engine.

The front door (gRPC and HTTP) turns the wire's speculation into a `SpeculationSpec`
once; the target actor and its engine receive that value, not loose keyword
arguments. `None` fields follow the target's plan (which the controller tunes);
`k = 0` decodes the sequence plainly.
"""

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.cascades import CascadeParams
from actors.trees import TreeShape

MAX_DRAFT_LENGTH = 64  # the largest k anywhere: beyond it a round costs more than any drafter saves


class SpeculationSpec(BaseModel):
    """One sequence's speculation: overrides of its target's plan, and how its drafts are verified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int | None = Field(
        None, ge=0, le=MAX_DRAFT_LENGTH, description="Draft length; 0 decodes plainly; None follows the target's plan."
    )
    exit_layer: int | None = Field(
        None, ge=1, description="Drafter exit (layers run) to draft from; None follows the target's plan."
    )
    cascade: CascadeParams | None = Field(
        None, description="Verify against this speculative cascade instead of the target alone; None is lossless."
    )
    tree: TreeShape | None = Field(
        None, description="Draft a token tree of this shape instead of a chain (k then stays None); None: a chain, "
        "or the target's plan when k is None too.",
    )

    @model_validator(mode="after")
    def _one_draft_shape(self) -> "SpeculationSpec":
        if self.tree is not None and (self.k is not None or self.cascade is not None):
            raise ValueError("a tree draft takes neither k nor a cascade: give the tree shape alone")
        return self


FOLLOW_PLAN = SpeculationSpec()
NO_SPECULATION = SpeculationSpec(k=0)
