"""The offline fake LLM provider and the demo agents behind `tokenwatch demo`."""
