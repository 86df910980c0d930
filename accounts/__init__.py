"""People: roles, API tokens, login throttling and the audit log (see accounts/rules.py)."""
