"""Samplers (flow matching: UniPC, Euler, Flow-GRPO SDE)."""
