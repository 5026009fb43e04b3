"""The chat template: messages rendered as a plain-text transcript for the zoo's models.

The zoo's models are plain language models (no chat tuning, no special turn
tokens), so a conversation becomes text they can continue:

    System: You write Python.

    User: Add two numbers.

    Assistant:

Each message is "<Role>: <content>", messages are separated by a blank line,
and the prompt ends with "Assistant:" for the model to complete. The reply ends
at the end-of-sequence token, at `max_tokens`, or where the model starts the
next user turn (the stop string "\\nUser:"), which is cut off like any stop
string. docs/http.md documents the same template.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
GENERATION_PROMPT = "Assistant:"
TURN_STOP = "\nUser:"  # the model starting the next user turn ends the reply


class TextPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"] = Field(description="The part's kind: only 'text' (no images or audio).")
    text: str = Field(description="The part's text.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks; 'developer' is rendered like 'system'. Tool messages are not supported."
    )
    content: str | list[TextPart] = Field(description="The message's text, or a list of text parts joined as one.")
    name: str | None = Field(None, description="Accepted for compatibility and ignored by the template.")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


def render_chat(messages: list[ChatMessage]) -> str:
    """The prompt text for a conversation (see the module docstring)."""
    turns = [f"{ROLE_NAMES[m.role]}: {m.text}" for m in messages]
    return TURN_SEPARATOR.join([*turns, GENERATION_PROMPT])
