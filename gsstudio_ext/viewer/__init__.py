"""viser controls shared by the methods (query panel, click select, edit panel)."""
