"""Driving a SpeculationEngine in tests."""

from actors.engine import SpeculationEngine


def run_to_end(engine: SpeculationEngine) -> dict:
    """Step until no sequence is live; every sequence's emitted tokens, by seq_id."""
    tokens: dict = {}
    while engine.num_live:
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    return tokens


def run_with_arms(engine: SpeculationEngine, after_step=lambda: None) -> tuple[dict, dict]:
    """Step until no sequence is live, calling `after_step()` after each step; each sequence's emitted
    tokens and the set of (exit, k) arms its rounds used, by seq_id."""
    tokens: dict = {}
    arms: dict = {}
    while engine.num_live:
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
            arms.setdefault(update.seq_id, set()).add(update.arm)
        after_step()
    return tokens, arms
