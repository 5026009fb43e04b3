"""The project's CPU kernels: the packed float16 matmul (the same products as float32 weights), its int8 form for
drafters (the products of the quantized weights), and attention over the KV store (the same softmax attention as
torch's), each giving a row the same bits whatever the batch."""

import pytest
import torch

from actors import cpu_kernels, packed_linear
from actors.drafters import ModelDrafter
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="needs a CPU with AVX-512 or AVX2, and g++")


def _weight(k: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=generator).half().float()  # values float16 holds, as in a zoo checkpoint


def test_only_weights_float16_holds_exactly_are_packable():
    assert packed_linear.packable(_weight(40, 64))
    assert not packed_linear.packable(torch.randn(40, 64) / 3)  # float32 mantissas float16 would round
    assert not packed_linear.packable(_weight(40, 48))  # not a whole number of tiles
    assert not packed_linear.packable(_weight(40, 64).double())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 70])
def test_packed_matmul_matches_float32(rows):
    weight = _weight(200, 96)
    x = torch.randn(rows, 200)
    assert torch.allclose(packed_linear.packed_linear(x, packed_linear.pack(weight)), x @ weight, rtol=1e-5, atol=1e-4)


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The float32 values an int8-quantized weight [K, N] multiplies by: its int8 entries times its column scales."""
    quantized = packed_linear.quantize(weight)  # [N/32, 4 + K, 32]
    header, values = quantized[:, : packed_linear.SCALE_ROWS], quantized[:, packed_linear.SCALE_ROWS :]
    scales = header.contiguous().view(torch.float32).reshape(-1)  # [N]
    return values.permute(1, 0, 2).reshape(weight.shape).float() * scales


def test_int8_quantization_keeps_each_weight_within_half_a_step_of_its_column():
    weight = torch.randn(200, 96)
    step = weight.abs().amax(dim=0) / packed_linear.INT8_LEVELS  # [N]
    assert ((_dequantized(weight) - weight).abs() <= step / 2 + 1e-7).all()
    assert not packed_linear.quantizable(torch.randn(40, 48))  # not a whole number of tiles


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 70])
def test_int8_matmul_multiplies_by_the_quantized_weights(rows):
    weight = torch.randn(200, 96)
    x = torch.randn(rows, 200)
    out = packed_linear.packed_linear(x, packed_linear.quantize(weight))
    assert torch.allclose(out, x @ _dequantized(weight), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("store", [packed_linear.pack, packed_linear.quantize])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(store):
    packed = store(_weight(320, 128))
    x = torch.randn(3, 7, 320)
    together = packed_linear.packed_linear(x, packed)  # [3, 7, 128]
    alone = torch.stack([torch.stack([packed_linear.packed_linear(x[i, j][None], packed)[0] for j in range(7)])
                         for i in range(3)])
    assert torch.equal(together, alone)


@needs_kernel
def test_a_compiled_graph_calls_the_kernel():
    packed, weight = packed_linear.pack(_weight(64, 32)), _weight(64, 32)
    step = torch.compile(lambda x: torch.relu(packed_linear.packed_linear(x, packed)), dynamic=True, fullgraph=True)
    x = torch.randn(2, 5, 64)
    assert torch.allclose(step(x), torch.relu(x @ weight), rtol=1e-5, atol=1e-4)


def _reference_attention(q, keys, values, slots, positions, window, scale):
    """Softmax attention in float64, one query at a time, over the keys its position sees."""
    batch, width, heads, _ = q.shape
    groups = heads // keys.shape[2]
    out = torch.empty_like(q)
    for b in range(batch):
        for t in range(width):
            last = int(positions[b, t]) + 1
            first = max(0, int(positions[b, t]) - window + 1) if window else 0
            for h in range(heads):
                seen_keys = keys[slots[b], first:last, h // groups].double()  # [n, D]
                seen_values = values[slots[b], first:last, h // groups].double()
                weights = torch.softmax(seen_keys @ q[b, t, h].double() * scale, dim=0)
                out[b, t, h] = (weights @ seen_values).float()
    return out


ATTENTION_CASES = {  # batch, width, query heads, key heads, head_dim, cached length after the step, window
    "one token": (1, 1, 5, 5, 64, 100, None),
    "a verify, grouped heads": (3, 5, 4, 2, 32, 37, None),
    "a wide step": (2, 16, 8, 8, 48, 300, None),
    "a sliding window": (2, 4, 4, 4, 16, 50, 8),
    "the widest head": (1, 2, 2, 1, 256, 17, None),
}


def _attention_inputs(batch, width, heads, kv_heads, head_dim, key_length, slots_in_store=4, positions_in_store=400):
    generator = torch.Generator().manual_seed(batch * width + head_dim)
    store = [torch.randn(slots_in_store, positions_in_store, kv_heads, head_dim, generator=generator) for _ in "kv"]
    q = torch.randn(batch, width, heads, head_dim, generator=generator)
    slots = torch.randperm(slots_in_store, generator=generator)[:batch]
    positions = torch.arange(key_length - width, key_length).repeat(batch, 1)  # [B, T]: a step's last tokens
    return q, *store, slots, positions


@needs_kernel
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_cached_attention_matches_softmax_attention(case):
    batch, width, heads, kv_heads, head_dim, key_length, window = ATTENTION_CASES[case]
    inputs = _attention_inputs(batch, width, heads, kv_heads, head_dim, key_length)
    got = cpu_kernels.cached_attention(*inputs, window, head_dim**-0.5)
    want = _reference_attention(*inputs, window, head_dim**-0.5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_query_gets_the_same_attention_bits_alone_and_in_a_batch():
    q, keys, values, slots, positions = _attention_inputs(3, 5, 4, 2, 32, 60)
    together = cpu_kernels.cached_attention(q, keys, values, slots, positions, None, 0.2)  # [3, 5, 4, 32]
    for b in range(3):
        for t in range(5):
            alone = cpu_kernels.cached_attention(q[b : b + 1, t : t + 1], keys, values, slots[b : b + 1],
                                                 positions[b : b + 1, t : t + 1], None, 0.2)
            assert torch.equal(alone[0, 0], together[b, t])


@needs_kernel
def test_a_runner_on_the_kernels_scores_as_one_on_torchs(target_path):
    """A prompt (wide chunks: SDPA), then a decode step and a verify (narrow: attention in the kernel)."""
    ours, torchs = (ModelRunner.from_pretrained(str(target_path), cpu_kernels=k) for k in (True, False))
    assert ours.step.attends_in_kernel and not torchs.step.attends_in_kernel
    assert any(packed_linear.is_packed(b) for b in ours.step.buffers())
    assert not any(packed_linear.is_packed(b) for b in torchs.step.buffers())
    for runner in (ours, torchs):
        runner.add_sequence("s")
    for tokens in (list(range(3, 40)), [7], [9, 4, 11, 12, 5]):
        scores = [runner.forward(["s"], [tokens])[0] for runner in (ours, torchs)]
        assert torch.allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_checkpoint_of_float16_values_packs_every_matmul_and_a_perturbed_one_does_not(target_path):
    from actors.forward import DecoderStep
    from actors.loading import load_causal_lm

    model = load_causal_lm(str(target_path))
    assert DecoderStep(model, 64, kernels=True).packs_every_matmul
    assert not DecoderStep(model, 64, kernels=False).packs_every_matmul
    with torch.no_grad():
        model.lm_head.weight.add_(1e-4)  # float32 values between float16's
    assert not DecoderStep(model, 64, kernels=True).packs_every_matmul


@needs_kernel
def test_only_a_drafter_stores_its_weights_in_int8(target_path, drafter_path):
    with pytest.raises(InvalidRequest, match="only a drafter"):
        ModelRunner.from_pretrained(str(target_path), int8_weights=True)
    drafter = ModelRunner.serving(str(drafter_path), RunnerSettings(compile="eager"), drafts=True)  # the default
    assert drafter.step.lm_head.dtype == torch.int8
    target = ModelRunner.serving(str(target_path), RunnerSettings(compile="eager"))
    assert not any(b.dtype == torch.int8 for b in target.step.buffers())


@needs_kernel
def test_greedy_speculation_with_an_int8_drafter_equals_the_targets_own_output(target, drafter_path, prompts):
    drafter = ModelRunner.from_pretrained(str(drafter_path), drafts=True, int8_weights=True)
    params = make_sampling_params(temperature=0, max_tokens=24, ignore_eos=True)
    plain = SpeculativeGenerator(target).generate(prompts, params)
    for exit_layer in drafter.exit_layers:
        speculative = SpeculativeGenerator(target, ModelDrafter(drafter), k=4, exit_layer=exit_layer)
        assert [r.tokens for r in speculative.generate(prompts, params)] == [r.tokens for r in plain]
