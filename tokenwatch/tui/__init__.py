"""The Textual dashboard: a client of the supervisor's event stream and commands."""
