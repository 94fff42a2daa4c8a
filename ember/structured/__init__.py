"""Constrained decoding: grammars compiled once, matched token by token, behind one small interface."""
