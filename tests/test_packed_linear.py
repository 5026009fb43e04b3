"""The packed float16 matmul kernel: the same products as float32 weights, whatever the batch."""

import pytest
import torch

from actors import packed_linear
from actors.runner import ModelRunner

needs_kernel = pytest.mark.skipif(not packed_linear.available(), reason="needs a CPU with AVX-512 and g++")


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


@needs_kernel
def test_a_row_gets_the_same_bits_alone_and_in_a_batch():
    packed = packed_linear.pack(_weight(320, 128))
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


@needs_kernel
def test_a_packed_runner_scores_as_an_unpacked_one(target_path):
    packed, plain = (ModelRunner.from_pretrained(str(target_path), packed_weights=p) for p in (True, False))
    assert any(packed_linear.is_packed(b) for b in packed.step.buffers())
    assert not any(packed_linear.is_packed(b) for b in plain.step.buffers())
    prompt = list(range(3, 40))
    for runner in (packed, plain):
        runner.add_sequence("s")
    scores = [runner.forward(["s"], [prompt])[0] for runner in (packed, plain)]
    assert torch.allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_checkpoint_of_float16_values_packs_every_matmul_and_a_perturbed_one_does_not(target_path):
    from actors.forward import DecoderStep
    from actors.loading import load_causal_lm

    model = load_causal_lm(str(target_path))
    assert DecoderStep(model, 64, packed=True).packs_every_matmul
    assert not DecoderStep(model, 64, packed=False).packs_every_matmul
    with torch.no_grad():
        model.lm_head.weight.add_(1e-4)  # float32 values between float16's
    assert not DecoderStep(model, 64, packed=True).packs_every_matmul
