"""What a method with queries renders (config) and its live selection of Gaussians with undo; shared by every
method whose Gaussians can be selected (text, click, referring expression)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Tuple

from torch import Tensor

QueryMode = Literal["highlight", "isolate", "remove"]


@dataclass
class QueryConfig:
    """A text query applied to every render (ns-render, the viewer at start-up); also what the viewer edits."""

    text: str = ""
    """Text to look for; empty = no query."""
    negatives: Tuple[str, ...] = ()
    """Phrases the selection must be less like than the query (e.g. "table" when querying "mug")."""
    threshold: Optional[float] = None
    """Selection threshold of the method's score (see the method's docs); None = the method's default."""
    mode: QueryMode = "highlight"
    """How the selection shows in the RGB render: highlight (tinted), isolate (only it), remove (all but it)."""
    highlight_color: Tuple[float, float, float] = (1.0, 0.25, 0.1)
    """Tint of highlighted Gaussians."""


@dataclass
class QueryState:
    """The live selection of a model (Gaussians [N] bool), a per-Gaussian score and the query that made them, with
    an undo history."""

    selection: Optional[Tensor] = None
    relevancy: Optional[Tensor] = None
    query: Any = None
    """What produced the selection (e.g. the text), for methods that render it per view; None for clicks."""
    history: List[Tuple[Optional[Tensor], Optional[Tensor], Any]] = field(default_factory=list)

    max_undo: int = 32
    """Undo steps kept (each holds an [N] mask)."""

    def push(self, selection: Optional[Tensor], relevancy: Optional[Tensor] = None, query: Any = None) -> None:
        """Make ``selection`` current; the previous one can be restored by :meth:`undo`."""
        self.history.append((self.selection, self.relevancy, self.query))
        del self.history[: -self.max_undo]
        self.selection, self.relevancy, self.query = selection, relevancy, query

    def undo(self) -> bool:
        """Restore the previous selection; False if there is none."""
        if not self.history:
            return False
        self.selection, self.relevancy, self.query = self.history.pop()
        return True
