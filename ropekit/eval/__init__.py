"""Long-context evaluation: perplexity vs length and per-position loss (``perplexity``), FIRST-SENTENCE-
RETRIEVAL and passkey (``retrieval``), result rows for all of them (``run``), and lm-eval tasks (``harness``)."""
