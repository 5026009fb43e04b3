"""The committed Python modules match the .proto, and import as the installed package."""

import importlib.util
from pathlib import Path

import pytest

from specfleet.v1 import generation_pb2 as pb

PROTOS = Path(__file__).resolve().parent.parent / "protos"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_protos", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"])
def test_generated_modules_are_up_to_date(tmp_path, name):
    load_generator().generate(tmp_path)
    fresh = (tmp_path / "specfleet" / "v1" / name).read_text()
    committed = (PROTOS / "specfleet" / "v1" / name).read_text()
    assert fresh == committed, f"protos/specfleet/v1/{name} is stale: run python protos/generate.py"


def test_optional_sampling_fields_distinguish_unset_from_zero():
    request = pb.GenerateRequest(model="target-s", text="def f():", temperature=0.0)
    decoded = pb.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    assert not decoded.HasField("top_p") and decoded.WhichOneof("prompt") == "text"
    assert decoded.speculation.mode == pb.Speculation.MODE_UNSPECIFIED
