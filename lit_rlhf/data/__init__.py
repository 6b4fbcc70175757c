"""Data: record sources (built-in tasks, local files, hub datasets) -> tokenised examples -> DataModules.

One module per record kind: :mod:`.preference` (chosen/rejected pairs); shared pieces in :mod:`.sources`
(loading + field mapping + errors), :mod:`.render` (chat templates, tokenisation, truncation), :mod:`.tasks`
(built-in synthetic tasks with verifiers).
"""
