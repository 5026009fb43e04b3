"""OpenAI request bodies and their translation into the wire contract's `GenerateRequest`.

The HTTP app fills a `GenerateRequest` and hands it to the same `Frontend` as
the gRPC router, so there is one generation path and one set of checks on the
values (prompt length, sampling ranges, speculation). These models only check
what JSON can get wrong on its own: types, unknown or unsupported parameters,
and ranges the wire's integer fields cannot hold. Types are strict: "16" is not
a number and 1 is not a boolean.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.serve.chat import TURN_STOP, ChatMessage, render_chat
from specfleet.v1 import generation_pb2 as pb

UINT32_END = 2**32
UINT64_END = 2**64
INT64_RANGE = (-(2**63), 2**63)
MAX_STOP_STRINGS = 4
ALSO_ACCEPTED = {"logit_bias": [{}], "best_of": [1]}  # unsupported parameters: values besides the default that ask for nothing

MODES = {"auto": pb.Speculation.AUTO, "off": pb.Speculation.OFF, "fixed": pb.Speculation.FIXED}
RULES = {"chow": pb.Cascade.CHOW, "diff": pb.Cascade.DIFF, "opt": pb.Cascade.OPT}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CascadeOptions(_Body):
    rule: Literal["chow", "diff", "opt"] | None = Field(
        None, description="Deferral rule of a speculative cascade; unset: the target's configured default."
    )
    alpha: float | None = Field(None, description="Lenience in [0, 1]; 0 is lossless. Unset: the target's default.")

    def to_proto(self) -> pb.Cascade:
        cascade = pb.Cascade(rule=RULES[self.rule] if self.rule else pb.Cascade.RULE_UNSPECIFIED)
        if self.alpha is not None:
            cascade.alpha = self.alpha
        return cascade


class SpeculationOptions(_Body):
    """The `speculation` extension field: how this request speculates."""

    mode: Literal["auto", "off", "fixed"] = Field(
        "auto", description="auto: the cluster's current plan; off: the target alone; fixed: the drafter, exit and k below."
    )
    drafter: str | None = Field(None, description="fixed: the drafter's name (must be the target's paired drafter).")
    exit_layer: int | None = Field(None, ge=1, lt=UINT32_END, description="fixed: drafter exit; unset: its deepest.")
    k: int | None = Field(None, ge=1, lt=UINT32_END, description="fixed: draft tokens per round (this or tree required).")
    tree: str | None = Field(
        None, max_length=32, description="fixed: draft token trees of this shape instead of k tokens, "
        "'static-DEPTHxWIDTH' or 'dynamic-DEPTHxWIDTH' (e.g. 'dynamic-4x2').")
    cascade: CascadeOptions | None = Field(None, description="Verify as a speculative cascade; unset: the target's configured default (none configured: lossless).")

    @model_validator(mode="after")
    def _fixed_fields_need_fixed_mode(self) -> "SpeculationOptions":
        given = [name for name in ("drafter", "exit_layer", "k", "tree") if getattr(self, name) is not None]
        if given and self.mode != "fixed":
            raise ValueError(f"drafter, exit_layer, k and tree apply only with mode 'fixed'; got {', '.join(given)} with mode {self.mode!r}")
        return self

    def to_proto(self) -> pb.Speculation:
        speculation = pb.Speculation(mode=MODES[self.mode], drafter=self.drafter or "",
                                     exit_layer=self.exit_layer or 0, k=self.k or 0, tree=self.tree or "")
        if self.cascade is not None:
            speculation.cascade.CopyFrom(self.cascade.to_proto())
        return speculation


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the usage and no choices before [DONE].")


class GenerationBody(_Body):
    """What completions and chat completions share."""

    model: str = Field(description="Target model name, see GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, lt=UINT32_END, description="Most tokens to generate; unset: the server's default.")
    temperature: float | None = Field(None, description="Default 1.0; 0 decodes greedily.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1]; default 1.0.")
    n: int = Field(1, description="Choices per request: only 1 is supported.")
    stream: bool = Field(False, description="Stream the completion as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only with stream = true.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion; not included in it.")
    seed: int | None = Field(None, ge=0, lt=UINT64_END, description="Seed of the request's random stream; default random.")
    user: str | None = Field(None, description="Accepted for compatibility and ignored.")
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: leave unset.")
    # specfleet extensions
    top_k: int | None = Field(None, ge=0, lt=UINT32_END, description="Extension: keep the k most likely tokens; 0 keeps all.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    speculation: SpeculationOptions | None = Field(None, description="Extension: how to speculate; unset: auto.")
    return_token_ids: bool = Field(False, description="Extension: add prompt_token_ids and token_ids to each choice.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n = 1 is supported: this server returns one choice per request (got {n})")
        return n

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "echo", "logprobs", "suffix",
                     "best_of", "top_logprobs", check_fields=False)
    @classmethod
    def _only_the_default(cls, value, info: ValidationInfo):
        accepted = [cls.model_fields[info.field_name].default, *ALSO_ACCEPTED.get(info.field_name, [])]
        if value not in accepted:
            raise ValueError(f"this server does not support {info.field_name} (leave it unset)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS or not all(strings):
            raise ValueError(f"give at most {MAX_STOP_STRINGS} stop strings, none of them empty")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream = true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _generate_request(self, max_tokens: int | None) -> pb.GenerateRequest:
        request = pb.GenerateRequest(model=self.model, max_tokens=max_tokens or 0, ignore_eos=self.ignore_eos)
        for name in ("temperature", "top_p", "top_k", "seed"):
            if getattr(self, name) is not None:
                setattr(request, name, getattr(self, name))
        if self.speculation is not None:
            request.speculation.CopyFrom(self.speculation.to_proto())
        return request


class CompletionBody(GenerationBody):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="The text to complete, or its token ids. One prompt, not a batch.")
    echo: bool = Field(False, description="Not supported: leave unset.")
    logprobs: int | None = Field(None, description="Not supported: leave unset.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported: leave unset.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        """One clear message for every wrong shape (pydantic's union errors name both branches)."""
        if isinstance(prompt, str):
            return prompt
        low, end = INT64_RANGE
        if isinstance(prompt, list) and all(type(t) is int and low <= t < end for t in prompt):
            return prompt
        raise ValueError("prompt must be a string or a list of token ids (integers); batches are not supported")

    def generate_request(self) -> pb.GenerateRequest:
        request = self._generate_request(self.max_tokens)
        if isinstance(self.prompt, str):
            request.text = self.prompt
        else:
            request.token_ids.SetInParent()  # an empty list still counts as a (empty) prompt
            request.token_ids.ids.extend(self.prompt)
        return request


class ChatCompletionBody(GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, rendered by the chat template.")
    max_completion_tokens: int | None = Field(
        None, ge=1, lt=UINT32_END, description="Most tokens to generate (OpenAI's newer name for max_tokens)."
    )
    logprobs: bool = Field(False, description="Not supported: leave unset.")
    top_logprobs: int | None = Field(None, description="Not supported: leave unset.")

    @model_validator(mode="after")
    def _one_length_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens, not both")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [*super().stop_strings, TURN_STOP]

    def generate_request(self) -> pb.GenerateRequest:
        request = self._generate_request(self.max_completion_tokens or self.max_tokens)
        request.text = render_chat(self.messages)
        return request
