"""The configuration: its schema, where values come from, and their checks."""
