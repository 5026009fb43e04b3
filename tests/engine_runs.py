"""Driving a SpeculationEngine in tests."""

from actors.engine import SpeculationEngine


def run_to_end(engine: SpeculationEngine) -> dict:
    """Step until no sequence is live; every sequence's emitted tokens, by seq_id."""
    tokens: dict = {}
    while engine.num_live:
        for update in engine.step():
            tokens.setdefault(update.seq_id, []).extend(update.new_tokens)
    return tokens
