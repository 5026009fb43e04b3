"""One `specfleet up` serving a target of every supported family, each with a drafter of its own family,
reached through gRPC and HTTP as users reach it; greedy output equals the target's own, decoded in process."""

import json
import urllib.request

import grpc
import pytest
from up_server import free_port, start_up, stop
from tiny_models import FAMILY_CONFIGS, build_family

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

FAMILIES = sorted(FAMILY_CONFIGS)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("families")
    paths = {name: (build_family(folder / f"{name}-target", tokenizer, name, seed=21),
                    build_family(folder / f"{name}-drafter", tokenizer, name, seed=22, exit_layers=[1, 2, 3]))
             for name in FAMILIES}
    http_port = free_port()
    lines = ["pools:", "  draft: {resources: {draft: 1}, num_cpus: 0}", "  target: {resources: {target: 1}, num_cpus: 0}",
             "drafters:", *[f"  {name}-drafter: {{path: {d}, pool: draft}}" for name, (_, d) in paths.items()],
             "targets:", *[f"  {name}: {{path: {t}, pool: target, drafter: {name}-drafter, exit_layer: 2, k: 3}}"
                           for name, (t, _) in paths.items()],
             f"server: {{grpc_port: 0, http_port: {http_port}}}", "controller: {adaptive: false}"]
    config = folder / "cluster.yaml"
    config.write_text("\n".join(lines) + "\n")
    process, address = start_up(config, folder / "up.log")
    yield {"grpc": address, "http": f"http://127.0.0.1:{http_port}/v1", "paths": paths}
    stop(process)


@pytest.fixture(scope="module")
def prompt(prompts) -> list[int]:
    return prompts[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_target_and_drafter_of_the_family_serve_exactly_through_both_doors(served, family, prompt):
    target_path, _ = served["paths"][family]
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    [expected] = SpeculativeGenerator(ModelRunner.from_pretrained(target_path)).generate([prompt], params)
    with grpc.insecure_channel(served["grpc"]) as channel:
        reply = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
            model=family, token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
            timeout=300)
    assert list(reply.token_ids) == expected.tokens
    assert reply.speculation.drafted > 0  # the drafter of its family drafted
    body = json.dumps({"model": family, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                       "return_token_ids": True})
    request = urllib.request.Request(f"{served['http']}/completions", body.encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert json.loads(response.read())["choices"][0]["token_ids"] == expected.tokens
