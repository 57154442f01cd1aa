"""echoctl: control, watch and benchmark an echod daemon."""
