"""OpenAI bodies become the wire contract's GenerateRequest field for field (no fleet needed)."""

import pytest
from pydantic import ValidationError

from cluster.serve.openai_models import ChatCompletionBody, CompletionBody
from specfleet.v1 import generation_pb2 as pb


def test_unset_sampling_fields_stay_unset_so_the_frontend_applies_its_defaults():
    request = CompletionBody.model_validate({"model": "m", "prompt": "hi"}).generate_request()
    assert request == pb.GenerateRequest(model="m", text="hi")
    assert not any(request.HasField(name) for name in ("temperature", "top_p", "top_k", "seed"))


def test_every_field_reaches_the_wire():
    body = CompletionBody.model_validate({
        "model": "m", "prompt": [5, 6], "max_tokens": 9, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 2**63,
        "ignore_eos": True,
        "speculation": {"mode": "fixed", "drafter": "d", "exit_layer": 2, "k": 4, "cascade": {"rule": "opt", "alpha": 0.25}},
    })
    speculation = pb.Speculation(mode=pb.Speculation.FIXED, drafter="d", exit_layer=2, k=4,
                                 cascade=pb.Cascade(rule=pb.Cascade.OPT, alpha=0.25))
    assert body.generate_request() == pb.GenerateRequest(
        model="m", token_ids=pb.TokenIds(ids=[5, 6]), max_tokens=9, temperature=0, top_p=0.5, top_k=3, seed=2**63,
        ignore_eos=True, speculation=speculation,
    )


def test_a_cascade_may_leave_rule_and_alpha_to_the_targets_default():
    body = CompletionBody.model_validate({"model": "m", "prompt": "x", "speculation": {"cascade": {}}})
    cascade = body.generate_request().speculation.cascade
    assert body.generate_request().speculation.HasField("cascade")
    assert cascade.rule == pb.Cascade.RULE_UNSPECIFIED and not cascade.HasField("alpha")


def test_an_empty_token_list_is_still_a_prompt():
    request = CompletionBody.model_validate({"model": "m", "prompt": []}).generate_request()
    assert request.WhichOneof("prompt") == "token_ids" and list(request.token_ids.ids) == []


def test_chat_renders_the_template_and_stops_at_the_next_user_turn():
    body = ChatCompletionBody.model_validate({
        "model": "m", "max_completion_tokens": 7, "stop": "END",
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    })
    request = body.generate_request()
    assert request.text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye\n\nAssistant:"
    assert request.max_tokens == 7 and body.stop_strings == ["END", "\nUser:"]


@pytest.mark.parametrize("value", [2**32, -1])
def test_values_the_wire_cannot_hold_are_refused(value):
    with pytest.raises(ValidationError, match="max_tokens"):
        CompletionBody.model_validate({"model": "m", "prompt": "x", "max_tokens": value})
