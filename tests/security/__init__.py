"""Attacks from issue 13 driven against real server processes."""
