"""Analysis passes: compute facts about the IR; cached by the pass manager."""
