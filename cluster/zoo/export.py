"""Export one exit of the sorted drafter as an ordinary LlamaForCausalLM, for engines that know no exits."""

import copy
import re

from transformers import LlamaForCausalLM

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def export_exit(model: LlamaForCausalLM, exit_layer: int) -> LlamaForCausalLM:
    """A standalone model with num_hidden_layers = exit_layer: the first exit_layer layers, the shared
    final norm, embeddings and lm_head, copied. Its logits equal `exit_logits(model, ids, [exit_layer])`.
    """
    if not 1 <= exit_layer <= model.config.num_hidden_layers:
        raise ValueError(f"exit {exit_layer} outside 1..{model.config.num_hidden_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = exit_layer
    if hasattr(config, "exit_layers"):
        del config.exit_layers
    standalone = LlamaForCausalLM(config).to(model.dtype)
    state = {key: value for key, value in model.state_dict().items() if _keeps(key, exit_layer)}
    standalone.load_state_dict(state, strict=True)
    return standalone.eval()


def _keeps(key: str, exit_layer: int) -> bool:
    match = _LAYER_KEY.match(key)
    return match is None or int(match.group(1)) < exit_layer
