"""The local OpenAI/Anthropic-compatible reverse proxy that sees, prices and gates every call."""
