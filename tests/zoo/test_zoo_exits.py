import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from cluster.zoo.exits import exit_layers_of, exit_logits
from cluster.zoo.export import export_exit
from cluster.zoo.train import distill_loss, sorted_loss


def test_deepest_exit_equals_model_logits(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        exits = exit_logits(tiny_llama, ids, [1, 2, 4])
        full = tiny_llama(ids).logits
    assert set(exits) == {1, 2, 4}
    torch.testing.assert_close(exits[4], full, rtol=0, atol=1e-5)
    assert not torch.allclose(exits[2], full, atol=1e-2)


def test_exits_match_hidden_states_except_the_normed_last(tiny_llama: LlamaForCausalLM) -> None:
    """Pins the transformers behaviour exits.py works around: hidden_states[L] is raw for L < n, normed for L = n."""
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        hidden = tiny_llama(ids, output_hidden_states=True).hidden_states
        exits = exit_logits(tiny_llama, ids, [1, 2, 3])
        norm, head = tiny_llama.model.norm, tiny_llama.lm_head
        for layer in (1, 2, 3):
            torch.testing.assert_close(exits[layer], head(norm(hidden[layer])), rtol=0, atol=1e-5)
        logits = tiny_llama(ids).logits
        torch.testing.assert_close(head(hidden[4]), logits, rtol=0, atol=1e-5)
        assert not torch.allclose(head(norm(hidden[4])), logits, atol=1e-2)
    assert len(hidden) == 5


def test_exits_with_padding_match_the_model(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        exits = exit_logits(tiny_llama, ids, [4], attention_mask=mask)
        full = tiny_llama(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(exits[4][keep], full[keep], rtol=0, atol=1e-5)


def test_exit_layers_are_validated(tiny_llama: LlamaForCausalLM) -> None:
    assert exit_layers_of(tiny_llama) == [1, 2, 4]
    with pytest.raises(ValueError):
        exit_logits(tiny_llama, torch.zeros(1, 3, dtype=torch.long), [5])


@pytest.mark.parametrize("layer", [1, 2, 4])
def test_exported_exit_equals_exit_logits(tiny_llama: LlamaForCausalLM, layer: int) -> None:
    ids = torch.randint(0, 97, (2, 11))
    standalone = export_exit(tiny_llama, layer)
    assert standalone.config.num_hidden_layers == layer and len(standalone.model.layers) == layer
    assert not hasattr(standalone.config, "exit_layers")
    assert standalone.lm_head.weight.data_ptr() == standalone.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(standalone(ids).logits, exit_logits(tiny_llama, ids, [layer])[layer], rtol=0, atol=1e-5)
    standalone.model.layers[0].mlp.up_proj.weight.data += 1  # a copy: the drafter is untouched
    assert not torch.equal(standalone.model.layers[0].mlp.up_proj.weight, tiny_llama.model.layers[0].mlp.up_proj.weight)


def test_sorted_loss_is_mean_of_standalone_exit_losses(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (3, 13))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss, per_exit = sorted_loss(tiny_llama, inputs, targets, [1, 2, 4])
    expected = {
        layer: F.cross_entropy(export_exit(tiny_llama, layer)(inputs).logits.flatten(0, 1), targets.flatten())
        for layer in (1, 2, 4)
    }
    for layer, value in expected.items():
        torch.testing.assert_close(per_exit[layer], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, sum(expected.values()) / 3, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert tiny_llama.model.layers[3].mlp.up_proj.weight.grad is not None


def test_sorted_loss_with_distillation_mixes_ce_and_kl(tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (2, 9))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    teacher = torch.randn(2, 8, 97)
    loss, per_exit = sorted_loss(tiny_llama, inputs, targets, [1, 4], teacher_logits=teacher, distill_weight=0.25)
    with torch.no_grad():
        logits = exit_logits(tiny_llama, inputs, [1])[1]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    p = teacher.softmax(-1)
    kl = (p * (p.log() - logits.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(per_exit[1].detach(), 0.75 * ce + 0.25 * kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distill_loss(teacher, teacher), torch.tensor(0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, (per_exit[1] + per_exit[4]) / 2)
