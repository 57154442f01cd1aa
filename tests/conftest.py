"""Shared test set-up: in-process code logs only warnings and errors."""

from __future__ import annotations

from echod import logs

logs.configure("warning", "console")
