"""Ember: a self-hosted LLM inference server, wire-compatible with the Fireworks AI and OpenAI APIs."""

import os

# torch's OpenMP threads otherwise spin for a while after every parallel region, taking the cores from
# Ember's kernel pool (measured: a 500-token prefill 840 -> 600 ms). It must be set before torch loads
# libgomp, so here, the first thing any `import ember...` runs; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
