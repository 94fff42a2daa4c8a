"""Protocol ⇄ engine: prompts, sampling defaults, output assembly. Knows nothing of HTTP."""
