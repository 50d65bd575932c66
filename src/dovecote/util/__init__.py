"""Small helpers with no dependency on the rest of Dovecote (the bottom layer)."""
