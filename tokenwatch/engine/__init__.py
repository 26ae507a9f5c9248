"""The live state of agents: admission, recording, control and the figures the UI shows."""
