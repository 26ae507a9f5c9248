"""What agents import: report usage and task boundaries to the supervisor (stdlib + openai only)."""
