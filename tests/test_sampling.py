import pytest
import torch

from actors.errors import InvalidRequest
from actors.sampling import logits_to_probs, make_generator, make_sampling_params, sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def test_greedy_is_a_point_mass_on_the_argmax():
    probs = logits_to_probs(LOGITS, make_sampling_params(temperature=0))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_temperature_one_is_plain_softmax():
    probs = logits_to_probs(LOGITS, make_sampling_params(temperature=1.0))
    torch.testing.assert_close(probs, torch.softmax(LOGITS, -1))


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    probs = logits_to_probs(LOGITS, make_sampling_params(top_k=2))
    expected = torch.softmax(torch.tensor([[2.0, 1.0]]), -1)
    torch.testing.assert_close(probs[:, :2], expected)
    assert probs[:, 2:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    full = torch.softmax(LOGITS, -1)[0]  # [0.52, 0.19, 0.12, 0.03, 0.07] roughly
    probs = logits_to_probs(LOGITS, make_sampling_params(top_p=0.6))[0]
    assert (probs > 0).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(probs[:2], full[:2] / full[:2].sum())


def test_top_p_always_keeps_the_most_likely_token():
    probs = logits_to_probs(LOGITS, make_sampling_params(top_p=1e-6))[0]
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_seeded_generators_repeat_and_differ():
    probs = torch.full((1, 50), 1 / 50)
    draws = lambda seed: [int(sample(probs, g)) for g in [make_generator(seed)] for _ in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -3}, "seed"),
        ({"temprature": 1.0}, "temprature"),
    ],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(InvalidRequest, match=field):
        make_sampling_params(**values)
