"""Batch jobs: OpenAI's files and batches and Fireworks' datasets and batch inference jobs, over one job runner
that replays each input line through the live endpoint in-process, at a lower priority than live traffic."""
