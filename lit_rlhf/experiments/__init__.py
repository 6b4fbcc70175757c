"""Thin entry points: ``python -m lit_rlhf.experiments.<stage>``."""
