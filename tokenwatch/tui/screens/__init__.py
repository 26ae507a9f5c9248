"""The dashboard's screens: main, agent detail, report, and the dialogs keys open."""
