"""Cluster config: YAML in, typed config out, readable errors for malformed files."""

from pathlib import Path

import pytest

from actors.errors import IncompatibleModels
from actors.loading import load_tokenizer
from cluster.config import InvalidConfig, default_config, load_config, parse_config
from cluster.defaults import models_dir
from cluster.placement import actor_options, check_vocabularies
from cluster.up_run import local_ray_resources

GOOD = """
pools:
  draft: {resources: {draft: 1}, num_cpus: 0.5}
  target: {resources: {target: 1}, num_gpus: 0.5, accelerator_type: H100}
drafters:
  sorted: {path: zoo/drafter, pool: draft}
targets:
  big: {path: /abs/target, pool: target, drafter: sorted, exit_layer: 2, k: 5, replicas: 2}
"""


def write(tmp_path, text):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_paths_resolved_against_it(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.drafters["sorted"].path == tmp_path / "zoo" / "drafter"
    assert str(config.targets["big"].path) == "/abs/target"
    assert config.targets["big"].k == 5 and config.server.grpc_port == 50051


def test_pools_become_ray_options(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    options = actor_options(config.pools["target"])
    assert options["resources"] == {"target": 1} and options["num_gpus"] == 0.5
    assert options["accelerator_type"] == "H100"
    assert local_ray_resources(config)["resources"] == {"draft": 1, "target": 2}


@pytest.mark.parametrize(
    "text, message",
    [
        ("pools: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        (GOOD.replace("pool: draft}", "pool: cheap}"), "names pool 'cheap'"),
        (GOOD.replace("drafter: sorted,", "drafter: other,"), "names drafter 'other'"),
        (GOOD.replace("k: 5", "k: 0"), "targets.big.k"),
        (GOOD.replace("k: 5", "k: 5, colour: red"), "colour"),
        (GOOD.replace("targets:\n  big", "targets: {}\nunused:\n  big"), "targets"),
    ],
)
def test_malformed_configs_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(InvalidConfig, match=message):
        load_config(write(tmp_path, text))


EMBEDDED = GOOD.replace("pool: draft}", "pool: draft, placement: embedded}")


def test_an_embedded_drafter_is_loaded_by_its_targets_and_needs_no_actor_of_its_own(tmp_path):
    config = load_config(write(tmp_path, EMBEDDED))
    assert config.embedded_drafter("big") is config.drafters["sorted"]
    assert load_config(write(tmp_path, GOOD)).embedded_drafter("big") is None
    assert local_ray_resources(config)["resources"] == {"target": 2}


@pytest.mark.parametrize(
    "text, message",
    [
        (EMBEDDED.replace("placement: embedded", "placement: embedded, replicas: 2"), "takes no replicas or autoscale"),
        (EMBEDDED.replace("placement: embedded", "placement: embedded, autoscale: {max_replicas: 2}"),
         "takes no replicas or autoscale"),
        (EMBEDDED.replace("replicas: 2}", "replicas: 2, overlap_rounds: true}"), "overlap rounds"),
        (EMBEDDED.replace("replicas: 2}", "replicas: 2, via: [mid]}\n  mid: {path: /abs/mid, pool: target}"),
         "starts the staged chains of \\['big'\\]"),
        (GOOD.replace("pool: draft}", "pool: draft, placement: inside}"), "placement"),
    ],
)
def test_what_an_embedded_drafter_cannot_do_is_refused(tmp_path, text, message):
    with pytest.raises(InvalidConfig, match=message):
        load_config(write(tmp_path, text))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidConfig, match="cannot read cluster config"):
        load_config(tmp_path / "absent.yaml")


def test_the_default_serves_the_zoo_targets_from_its_drafter():
    config = default_config()
    assert set(config.targets) == {"target-s", "target-m", "target-l", "target-xl"}
    assert all(t.drafter == "drafter" and t.path.parent == models_dir() for t in config.targets.values())


def test_the_example_config_is_the_default():
    example = load_config(Path(__file__).resolve().parent.parent / "deploy" / "configs" / "zoo.yaml")
    default = default_config()
    assert example.model_dump(exclude={"drafters", "targets"}) == default.model_dump(exclude={"drafters", "targets"})
    for kind in ("drafters", "targets"):
        mine, theirs = getattr(example, kind), getattr(default, kind)
        assert set(mine) == set(theirs)
        for name in mine:
            assert mine[name].path.resolve() == theirs[name].path.resolve()
            assert mine[name].model_dump(exclude={"path"}) == theirs[name].model_dump(exclude={"path"})


def test_a_drafter_of_another_vocabulary_drafts_chains_across_it_and_is_refused_anything_else(
        target_path, drafter_path, other_vocab_path):
    def config(drafter, **target):
        targets = {"t": {"path": str(target_path), "pool": "cpu", "drafter": "d", **target},
                   "m": {"path": str(target_path), "pool": "cpu"}}
        return parse_config({"pools": {"cpu": {}}, "drafters": {"d": {"path": str(drafter), "pool": "cpu"}},
                             "targets": targets})

    check_vocabularies(config(drafter_path))  # the same tokenizer
    check_vocabularies(config(other_vocab_path))  # another byte-level vocabulary: bridged
    for refused in ({"tree": "static-2x2"}, {"cascade": {"rule": "chow", "alpha": 0.5}}):
        with pytest.raises(IncompatibleModels, match="target 't' and .*other_vocab: .*chains only"):
            check_vocabularies(config(other_vocab_path, **refused))
    with pytest.raises(IncompatibleModels, match="target 't' and .*other_vocab: drafter and target tokenizers differ"):
        check_vocabularies(config(other_vocab_path, via=["m"]))  # the stages of a chain share one vocabulary


def test_the_foreign_vocabulary_example_pairs_the_zoos_drafter_8k_across_vocabularies():
    config = load_config(Path(__file__).resolve().parent.parent / "deploy" / "configs" / "foreign_vocabulary.yaml")
    check_vocabularies(config)  # bridged, not refused
    xl, drafter = config.targets["target-xl"], config.drafters[config.targets["target-xl"].drafter]
    assert drafter.path.resolve() == models_dir() / "drafter-8k" and xl.path.resolve() == models_dir() / "target-xl"
    assert len(load_tokenizer(drafter.path)) != len(load_tokenizer(xl.path))
