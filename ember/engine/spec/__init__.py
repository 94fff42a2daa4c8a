"""Speculative decoding: where draft tokens come from and how many a sequence gets.

Drafts are verified by the target model itself in the step that computes the decode token (see
ember.engine.step), so a wrong draft costs compute, never correctness.
"""
