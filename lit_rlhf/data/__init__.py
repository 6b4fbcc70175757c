"""Data: record sources (built-in tasks, local files, hub datasets) -> tokenised examples -> DataModules.

One module per record kind: :mod:`.sft` (prompt/response and conversations), :mod:`.preference` (chosen/rejected
pairs), :mod:`.prompts` (prompts for the online stages), :mod:`.scored` (reward-model pairs, scored and ranked
records; step-labelled solutions via :mod:`.step_labels`). Shared pieces: :mod:`.base` (the tokenizer a module is
given with ``connect`` and its train/validation records), :mod:`.sources` (reading, splitting, built-in task
splits, field access, errors), :mod:`.render` (chat templates, tokenisation, truncation), :mod:`.collate`,
:mod:`.loaders` (rank-sharded loaders), :mod:`.tasks` (built-in synthetic tasks). Nothing here loads a model: data
modules are given their tokenizer.
"""
