"""Model zoo: corpus, tokenizer, targets and a sorted multi-exit drafter trained by the project.

Entry points: `cluster.zoo.cli.add_zoo_commands` (the `specfleet zoo train|eval` commands),
`cluster.zoo.exits.exit_logits` (the exit contract) and `cluster.zoo.export.export_exit`.
"""
