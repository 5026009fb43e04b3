"""Token trees in the runner: one tree forward scores every path as a chain would, and compaction is exact."""

import pytest
import torch

from actors.errors import InvalidRequest
from actors.trees import TreeShape, chain_parents, depths_of, path_of, visibility

ATOL = 1e-4  # float32 rounding between differently shaped matmuls
# A tree of 6 nodes under the pending token (offset 0): two children of the root, a grandchild
# under each, and a great-grandchild under each of those.
TREE_TOKENS = [21, 22, 23, 24, 25, 26]
NODE_PARENTS = [-1, -1, 0, 1, 2, 3]  # node indices, -1: the root
TREE_PARENTS = [-1] + [p + 1 for p in NODE_PARENTS]  # region offsets: the pending token is entry 0, node i entry i + 1


def paths_to_each_node(parents: list[int]) -> list[list[int]]:
    """For every region entry, the offsets from the root down to it."""
    paths = []
    for node, parent in enumerate(parents):
        paths.append(([] if parent < 0 else paths[parent]) + [node])
    return paths


def test_a_tree_forward_scores_every_node_as_its_own_chain_would(target, prompts):
    context = prompts[3]
    target.add_sequence("tree")
    target.forward(["tree"], [context[:-1]])
    start = target.cached_length("tree")
    region = [context[-1], *TREE_TOKENS]
    scored = target.forward_tree(["tree"], [region], [start], [TREE_PARENTS])[0]  # [7, V]
    for entry, path in enumerate(paths_to_each_node(TREE_PARENTS)):
        target.add_sequence(("chain", entry))
        chain = target.forward([("chain", entry)], [context[:-1] + [region[o] for o in path]])[0]
        torch.testing.assert_close(scored[entry], chain[-1], atol=ATOL, rtol=0)


def test_a_batch_of_trees_and_chains_of_different_sizes_equals_each_row_alone(target, prompts):
    rows = [(prompts[0], [5] + TREE_TOKENS, TREE_PARENTS)]
    rows.append((prompts[2], [7, 8, 9], chain_parents(3)))
    rows.append((prompts[4], [9], [-1]))
    ids = [("batch", i) for i in range(len(rows))]
    for seq_id, (context, _, _) in zip(ids, rows):
        target.add_sequence(seq_id)
        target.forward([seq_id], [context])
    batched = target.forward_tree(ids, [r[1] for r in rows], [len(r[0]) for r in rows], [r[2] for r in rows])
    for i, (context, tokens, parents) in enumerate(rows):
        target.add_sequence(("alone", i))
        target.forward([("alone", i)], [context])
        alone = target.forward_tree([("alone", i)], [tokens], [len(context)], [parents])[0]
        torch.testing.assert_close(batched[i], alone, atol=ATOL, rtol=0)


def test_a_tree_can_grow_level_by_level_on_the_cache(drafter_runner, prompts):
    """How a dynamic tree is drafted: each level is fed against the levels already cached."""
    context = prompts[5]
    runner = drafter_runner
    runner.add_sequence("grown")
    runner.forward(["grown"], [context])
    start = runner.cached_length("grown")
    levels = [[31, 32], [33, 34]]
    parents = [-1, -1, 0, 1]
    runner.forward_tree(["grown"], [levels[0]], [start], [parents[:2]])
    grown = runner.forward_tree(["grown"], [levels[1]], [start], [parents])[0]  # [2, V]
    runner.add_sequence("whole")
    runner.forward(["whole"], [context])
    whole = runner.forward_tree(["whole"], [levels[0] + levels[1]], [start], [parents])[0]
    torch.testing.assert_close(grown, whole[2:], atol=ATOL, rtol=0)


def test_compacting_the_accepted_path_leaves_the_cache_of_a_plain_prefill(target, prompts):
    context = prompts[6]
    target.add_sequence("tree")
    target.forward(["tree"], [context[:-1]])
    start = target.cached_length("tree")
    target.forward_tree(["tree"], [[context[-1], *TREE_TOKENS]], [start], [TREE_PARENTS])
    path = [0, 2, 4]  # the pending token, node 1 (token 22) and node 3 (token 24), region offsets
    target.keep_path("tree", start, path)
    assert target.cached_tokens("tree") == context + [22, 24]
    after = target.forward(["tree"], [[40]])[0]
    target.add_sequence("plain")
    plain = target.forward(["plain"], [context + [22, 24, 40]])[0]
    torch.testing.assert_close(after, plain[-1:], atol=ATOL, rtol=0)


def test_a_tree_row_must_end_its_region(target, prompts):
    target.add_sequence("bad")
    target.forward(["bad"], [prompts[0]])
    start = target.cached_length("bad")
    with pytest.raises(InvalidRequest, match="region"):
        target.forward_tree(["bad"], [[1, 2]], [start], [[-1, 0, 1]])
    with pytest.raises(InvalidRequest, match="parents"):
        target.forward_tree(["bad"], [[1, 2]], [start], [[-1, 1]])


def test_tree_helpers():
    assert depths_of([-1, 0, 0, 1, 2, 3]) == [0, 1, 1, 2, 2, 3]
    assert visibility([-1, 0, 0, 1]).tolist() == [
        [True, False, False, False], [True, True, False, False], [True, False, True, False], [True, True, False, True]]
    assert path_of([5, 6, 7, 8], [-1, -1, 0, 1], [6, 8, 9]) == [1, 3]
    shape = TreeShape.parse("dynamic-4x3")
    assert (shape.depth, shape.width, shape.dynamic, shape.nodes, shape.label) == (4, 3, True, 12, "dynamic-4x3")
    with pytest.raises(ValueError):
        TreeShape.parse("bushy-4")
