"""A footer that drops whole keys, least needed first, rather than cutting the row mid-word."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

PALETTE_WIDTH = 13
"""`▏^p palette ` docked on the right."""


class KeysFooter(Footer):
    """Shows the keys that fit: those named in `first` (in that order of need), then the rest
    as listed; a key that does not fit whole is left to `?` help and the command palette."""

    def __init__(self, first: Sequence[str] = ("question_mark", "q"), **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._first = tuple(first)
        self._shown_width = 0

    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        keys = [
            w for w in widgets if isinstance(w, FooterKey) and not w.has_class("-command-palette")
        ]
        dropped = set(map(id, keys)) - set(map(id, self._fitting(keys)))
        yield from (w for w in widgets if id(w) not in dropped)

    def _fitting(self, keys: list[FooterKey]) -> Iterable[Widget]:
        room = self.app.size.width - (PALETTE_WIDTH if self.show_command_palette else 0)
        order = sorted(keys, key=lambda k: (self._rank(k.key), keys.index(k)))
        for key in order:
            room -= len(key.key_display) + len(key.description) + 3  # ` k Kill ` and a space
            if room < 0:
                return
            yield key

    def _rank(self, key: str) -> int:
        return self._first.index(key) if key in self._first else len(self._first)

    def on_resize(self) -> None:
        if self.app.size.width != self._shown_width:
            self._shown_width = self.app.size.width
            self.call_after_refresh(self.recompose)
